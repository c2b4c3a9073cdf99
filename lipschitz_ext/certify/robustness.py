"""Robustness of a LipschitzGPT in embedding space: the PGD attack that moves every token's
embedding by at most ``eps`` in RMS, and the radius a certified bound guarantees.

Norms are the certificate's: a sequence is measured by the largest per-token RMS norm,
``max_t ||x_t||_2 / sqrt(d)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .certificate import Certificate

__all__ = ["pgd_attack", "certified_radius", "token_rms"]

def _upcast(z: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors; float32/float64 stay as they are."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def token_rms(x: torch.Tensor) -> torch.Tensor:
    """Per-token RMS of ``x [..., d]`` over its last dim, kept as ``[..., 1]``."""
    return x.pow(2).mean(-1, keepdim=True).sqrt()


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float, domain_rms: float | None) -> torch.Tensor:
    """Per-token projection: RMS(delta_t) <= eps and, if given, RMS(x_t + delta_t) <= domain_rms."""
    delta = delta * (eps / token_rms(delta).clamp_min(1e-12)).clamp(max=1.0)
    if domain_rms is not None:
        y = x + delta
        y = y * (domain_rms / token_rms(y).clamp_min(1e-12)).clamp(max=1.0)
        delta = y - x
    return delta


def pgd_attack(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
               step_size: float | None = None, domain_rms: float | None = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy in embedding space.

    ``x [B, T, d]`` are clean token embeddings; returns ``x + delta`` with every
    token moved by at most ``eps`` in RMS (the certificate's input norm) and kept
    in the certificate's domain (per-token RMS <= ``domain_rms``). ``eps`` is a
    float or a tensor of per-sequence radii ``[B]``. Label entries ``-100`` are
    ignored, so an attack can target chosen positions. ``steps=1``
    with ``step_size=eps`` is the single-step attack (normalized-gradient FGSM).
    Each step moves every token along its own L2-normalized gradient.
    """
    if not isinstance(eps, torch.Tensor):
        eps = torch.tensor(float(eps), dtype=x.dtype)
    eps = eps.to(device=x.device, dtype=x.dtype)
    if eps.dim() == 1:  # one radius per batch element
        eps = eps.view(-1, 1, 1)
    if bool((eps <= 0).all()):
        return x.clone()
    eps = eps.clamp_min(0)
    step_size = 2.5 * eps / steps if step_size is None else step_size
    d = x.shape[-1]
    if steps > 1:  # random start inside the ball
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        delta = _project(noise * eps, x, eps, domain_rms)
    else:
        delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(_upcast(model.forward_embeddings(x + delta)).flatten(0, 1), y.flatten())
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            g_rms = g.norm(dim=-1, keepdim=True) / math.sqrt(d)
            delta = _project(delta + step_size * g / g_rms.clamp_min(1e-20), x, eps, domain_rms)
    return (x + delta).detach()


def certified_radius(logits: torch.Tensor, bound: float) -> torch.Tensor:
    """Per-token radius within which the top-1 prediction provably cannot change.

    With the certificate's norms, ``max_t ||dz_t||_2/sqrt(V) <= bound * eps``, so at
    each position the logit vector moves by at most ``bound * eps * sqrt(V)`` in L2,
    and the margin ``z_top - z_j`` by at most ``sqrt(2)`` times that. The prediction
    is certified for every ``eps < margin / (sqrt(2) * sqrt(V) * bound)`` (proof in
    docs/certificate.md): :meth:`lipschitz_ext.certify.Certificate.certified_radius`,
    per position. ``logits [..., V]`` -> radius ``[...]``.
    """
    try:
        b = float(bound)
    except (TypeError, ValueError):
        b = math.nan
    if isinstance(bound, bool) or not (math.isfinite(b) and b >= 0):
        raise ValueError(f"certified_radius: bound must be a finite certified Lipschitz bound >= 0 "
                         f"(certify(model).bound of a LipschitzGPT), got {bound!r}; baseline models have none")
    top2 = _upcast(logits).topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    # certify's radius is linear in the margin: its value at margin 1 scales every position's
    per_margin = Certificate.certified_radius(_RadiusOnly(b, {"vocab_size": logits.shape[-1]}), 1.0)
    return torch.where(margin > 0, margin * per_margin, torch.zeros_like(margin))




class _RadiusOnly(NamedTuple):
    """The two fields :meth:`Certificate.certified_radius` reads (a bound, not a full certificate)."""

    bound: float
    config: dict


