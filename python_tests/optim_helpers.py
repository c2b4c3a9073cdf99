"""Test-local helpers for the optimizer tests.

:class:`PowerNormalize` is a small constraint written against the agreed
``lipschitz_ext.constraints`` interface (``apply_(W, *, lr, update_norm, decay,
state)``, state tensors with leading dim k), so the optimizer's plumbing can be
tested independently of the real constraints module. It records every call.
"""

from __future__ import annotations

import math

import torch


class PowerNormalize:
    """Spectral normalization in the RMS->RMS frame with a warm-started power iteration.

    ``W' = W / sqrt(m/n)``; ``sigma`` ~ ``||W'||_2`` by ``iters`` power steps from
    ``state["u"]`` (``[k, n]``, created if missing); ``W' <- W' / max(1, sigma / sigma_max)``.
    ``state["calls"]`` (``[k]``) counts applications per matrix.
    """

    name = "power_normalize"

    def __init__(self, sigma_max: float = 1.0, iters: int = 3):
        self.sigma_max = sigma_max
        self.iters = iters
        self.calls: list[dict] = []

    def apply_(self, W, *, lr=0.0, update_norm=0.0, decay=0.0, state=None):
        self.calls.append(dict(shape=tuple(W.shape), lr=lr, update_norm=update_norm, decay=decay,
                               state_keys=sorted(state) if state is not None else None))
        k, m, n = W.shape
        Wp = W.double() / math.sqrt(m / n)
        if state is not None and "u" in state:
            u = state["u"].double()
        else:
            # A per-matrix start (independent of how matrices are stacked or split over ranks).
            u = torch.linspace(1.0, 2.0, n, dtype=torch.float64, device=W.device).expand(k, n)
        for _ in range(self.iters):
            v = torch.einsum("kmn,kn->km", Wp, u)
            u = torch.einsum("kmn,km->kn", Wp, v)
            u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)
        sigma = torch.einsum("kmn,kn->km", Wp, u).norm(dim=1)
        factor = torch.clamp(sigma / self.sigma_max, min=1.0)
        W.copy_((W.double() / factor[:, None, None]).to(W.dtype))
        if state is not None:
            state["u"] = u.float()
            state["calls"] = state.get("calls", torch.zeros(k)) + 1


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]
