"""lipschitz::power_iteration and the rank-1 constraints built on it (wrappers + fake kernels).

All act on plain matrices ``[..., m, n]`` with the plain spectral norm (largest
singular value); the RMS->RMS frame is :mod:`lipschitz_ext.constraints`' job.
"""

from __future__ import annotations

from typing import Optional, Union, overload

import torch

__all__ = ["power_iteration", "spectral_normalize", "spectral_hammer", "spectral_weight_decay"]


def power_iteration(
    W: torch.Tensor, iters: int = 16, u: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triplet of every matrix in a batch, by power iteration.

    Args:
        W: ``[..., m, n]`` floating tensor; leading dims are independent matrices.
        iters: number of ``W^T``/``W`` application pairs (>= 1). When
            ``2 * iters`` exceeds ``min(m, n)`` the Gram matrix of the small side is
            formed once and iterated instead (same iteration, fewer FLOPs).
        u: optional warm start ``[..., m]`` (e.g. the ``u`` of the previous call);
            rows that are zero or non-finite fall back to the default start. Without
            it a fixed deterministic start is used (no global RNG is touched).

    Returns:
        ``(sigma [...], u [..., m], v [..., n])`` in float32 (float64 for float64
        ``W``) with ``u``, ``v`` unit vectors, ``sigma = ||W v|| = u^T W v``: a lower
        bound on the spectral norm that converges to it (like ``(s2/s1)^(2*iters)``).
        A zero matrix gives ``sigma = 0`` and zero vectors. NaN/inf in a matrix give
        NaN for that matrix.
    """
    return torch.ops.lipschitz.power_iteration.default(W, int(iters), u)


def _vectors_fake(W):
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    return W.new_empty(W.shape[:-1], dtype=dt)


@torch.library.register_fake("lipschitz::power_iteration")
def _power_iteration_fake(W, iters=16, u=None):
    torch._check(W.dim() >= 2, lambda: "power_iteration: argument 'W' must have rank >= 2")
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    return (
        W.new_empty(W.shape[:-2], dtype=dt),
        W.new_empty(W.shape[:-1], dtype=dt),
        W.new_empty(W.shape[:-2] + W.shape[-1:], dtype=dt),
    )


def _rank1_fake(W, param=1.0, iters=16, u=None):
    torch._check(W.dim() >= 2, lambda: "argument 'W' must have rank >= 2")
    return W.new_empty(W.shape), _vectors_fake(W)


for _name in ("spectral_normalize", "spectral_hammer", "spectral_weight_decay"):
    torch.library.register_fake(f"lipschitz::{_name}")(_rank1_fake)


Result = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def _finish(out: tuple[torch.Tensor, torch.Tensor], return_u: bool) -> Result:
    return out if return_u else out[0]


def spectral_normalize(
    W: torch.Tensor,
    sigma_max: float = 1.0,
    iters: int = 16,
    u: Optional[torch.Tensor] = None,
    *,
    return_u: bool = False,
) -> Result:
    """Spectral normalization: ``W / max(1, sigma_1 / sigma_max)`` per matrix.

    ``sigma_1`` comes from :func:`power_iteration` (``iters``, warm start ``u``),
    so the cap holds up to that estimate (which can only be low). ``W``:
    ``[..., m, n]``; returns a new tensor of W's shape and dtype, plus the new
    ``u [..., m]`` (float32/float64) when ``return_u``.
    """
    return _finish(
        torch.ops.lipschitz.spectral_normalize.default(W, float(sigma_max), int(iters), u), return_u
    )


def spectral_hammer(
    W: torch.Tensor,
    sigma_max: float = 1.0,
    iters: int = 16,
    u: Optional[torch.Tensor] = None,
    *,
    return_u: bool = False,
) -> Result:
    """Spectral hammer: ``W + (sigma_max - sigma_1) u_1 v_1^T`` per matrix.

    Sets the top singular value to ``sigma_max`` (it can raise it) and touches
    nothing else: other singular values may stay above the cap. Shapes, dtypes and
    ``u``/``return_u`` as in :func:`spectral_normalize`.
    """
    return _finish(
        torch.ops.lipschitz.spectral_hammer.default(W, float(sigma_max), int(iters), u), return_u
    )


def spectral_weight_decay(
    W: torch.Tensor,
    lam: float,
    iters: int = 16,
    u: Optional[torch.Tensor] = None,
    *,
    return_u: bool = False,
) -> Result:
    """Spectral weight decay: ``W - lam * sigma_1 u_1 v_1^T`` (``sigma_1 -> (1 - lam) sigma_1``).

    ``lam`` in ``[0, 1]``. Shapes, dtypes and ``u``/``return_u`` as in
    :func:`spectral_normalize`.
    """
    return _finish(
        torch.ops.lipschitz.spectral_weight_decay.default(W, float(lam), int(iters), u), return_u
    )
