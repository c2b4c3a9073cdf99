"""Lower bounds on a LipschitzGPT's Lipschitz constant by search: the certificate's
bound must sit above every value found here."""

from __future__ import annotations

import copy
import math

import torch

from ..nn.gpt import LipschitzGPT
from .bounds import sequence_norm
from .certificate import _check_finite, _check_radius

__all__ = ["empirical_lipschitz", "attack_lipschitz"]

def _project(z: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each token down to per-token RMS <= radius (the domain)."""
    rms = z.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return z * torch.clamp(radius / rms.clamp_min(1e-300), max=1.0)


def empirical_lipschitz(
    model: LipschitzGPT,
    x: torch.Tensor,
    steps: int = 100,
    lr: float = 0.02,
    radius: float = 1e-4,
    input_rms: float = 1.0,
) -> float:
    """Lower bound on the Lipschitz constant of ``forward_embeddings`` by gradient ascent.

    Starting from ``x [B, T, d]`` (each batch element is an independent restart) and a
    random direction ``u``, ascends (Adam, ``lr`` in units of ``input_rms``) the ratio
    ``||f(p) - f(q)||_out / ||p - q||_in`` with ``p = proj(x)``, ``q = proj(x + r u / ||u||_in)``,
    ``r = radius * input_rms``, where ``proj`` scales each token into the domain
    (per-token RMS <= input_rms) and the norms are the certificate's. Runs in float64 on a
    copy of the model. Every evaluated pair lies in the domain, so the returned maximum
    over all steps and restarts is a true lower bound (up to float64 rounding).

    Raises ValueError for a non-finite ``x``, a model with NaN/inf weights (named), a
    non-finite output during the search (never returns 0 for a NaN model), ``steps < 1``
    or a non-positive ``lr``, ``radius`` or ``input_rms``.
    """
    who = "empirical_lipschitz"
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{who}: x must be a tensor [B, T, d], got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise ValueError(f"{who}: x must be a finite floating-point tensor")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{who}: steps must be an int >= 1, got {steps!r}")
    for name, value in (("lr", lr), ("radius", radius)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{who}: {name} must be finite and > 0, got {value!r}")
    input_rms = _check_radius(input_rms, who)
    _check_finite(model, who)
    f = copy.deepcopy(model).double().eval()
    for p in f.parameters():
        p.requires_grad_(False)
    r = radius * input_rms
    xv = x.detach().double().clone().requires_grad_(True)
    u = torch.randn_like(xv).requires_grad_(True)
    opt = torch.optim.Adam([{"params": [xv], "lr": lr * input_rms}, {"params": [u], "lr": lr}])
    best = 0.0
    for _ in range(steps):
        p = _project(xv, input_rms)
        q = _project(xv + r * u / sequence_norm(u)[:, None, None], input_rms)
        den = sequence_norm(p - q).clamp_min(1e-300)
        ratio = sequence_norm(f.forward_embeddings(p) - f.forward_embeddings(q)) / den
        if not bool(torch.isfinite(ratio).all()):
            # a NaN would vanish in max() and report a lower bound of 0: refuse instead
            raise ValueError(f"{who}: the model's output became non-finite on the domain "
                             f"(input_rms={input_rms:g}); no lower bound")
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


def attack_lipschitz(model: LipschitzGPT, input_rms: float = 1.0, steps: int = 300, restarts: int = 16,
                     generator: torch.Generator | None = None, lr: float = 0.03, structured: bool = False) -> float:
    """Lower bound on the Lipschitz constant of ``forward_embeddings`` on per-token RMS <= ``input_rms``
    by float64 Adam ascent over pairs, far apart and close.

    Two searches of ``restarts`` pairs ``[restarts, seq_len, d_model]`` each: *far* ascends over
    both points ``x, y`` freely, *close* over ``x`` and a direction ``u`` with
    ``y = x + 1e-4 * input_rms * u / ||u||``. Every point is scaled into the domain before it is
    evaluated (``lr`` in units of ``input_rms``), so the returned maximum ratio
    ``||f(x) - f(y)||_out / ||x - y||_in`` (the certificate's norms) over all steps is attained
    by a pair in the domain. Refuses what :func:`empirical_lipschitz` refuses.

    ``structured``: a stronger (slower, about 13x) search: after the plain one (same ``generator``, so
    never below it), both searches at the step sizes
    ``lr * (1/10, 1/3, 1, 3)`` with a cosine-decayed step, from three starts (random, every token at the
    radius, every token one vector at the radius plus 5% noise: keys at nearly equal logits), then a
    close search polishing the best pair found at ``lr / 30``. Still a lower bound, never a certificate.
    """
    who = "attack_lipschitz"
    radius = _check_radius(input_rms, who)
    for name, value in (("steps", steps), ("restarts", restarts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{who}: {name} must be an int >= 1, got {value!r}")
    _check_finite(model, who)
    f = copy.deepcopy(model).double().eval()
    for p in f.parameters():
        p.requires_grad_(False)
    shape = (restarts, f.config.seq_len, f.config.d_model)
    g = generator

    def start(kind: str) -> torch.Tensor:
        z = torch.randn(shape, dtype=torch.float64, generator=g)
        if kind == "random":
            return radius * z
        if kind == "repeat":
            z = z[:, :1] + 0.05 * z
        return z * (radius / z.pow(2).mean(-1, keepdim=True).sqrt())  # every token at the radius

    best, best_pair = 0.0, None

    def search(x: torch.Tensor, y: torch.Tensor, close: bool, step: float, decay: bool) -> None:
        nonlocal best, best_pair
        x, y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        opt = torch.optim.Adam([x, y], lr=step * radius)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0.01 * step * radius) if decay else None
        for _ in range(steps):
            p = _project(x, radius)
            q = _project(x + 1e-4 * radius * y / sequence_norm(y)[:, None, None] if close else y, radius)
            ratio = sequence_norm(f.forward_embeddings(p) - f.forward_embeddings(q)) / sequence_norm(p - q).clamp_min(1e-300)
            if not bool(torch.isfinite(ratio).all()):
                raise ValueError(f"{who}: the model's output became non-finite on the domain (input_rms={radius:g})")
            top = int(ratio.argmax())
            if ratio[top].item() > best:
                best, best_pair = ratio[top].item(), (x[top].detach().clone(), y[top].detach().clone(), close)
            opt.zero_grad()
            (-ratio.sum()).backward()
            opt.step()
            if sched is not None:
                sched.step()

    for close in (False, True):  # the plain search (with the same generator: structured >= plain)
        search(radius * torch.randn(shape, dtype=torch.float64, generator=g),
               radius * torch.randn(shape, dtype=torch.float64, generator=g), close, lr, False)
    if not structured:
        return best
    for step in (lr / 10, lr / 3, lr, 3 * lr):
        for kind in ("random", "sphere", "repeat"):
            for close in (False, True):
                y = start("random" if kind == "repeat" else kind)  # far: an independent partner
                search(start(kind), y if not close else torch.randn(shape, dtype=torch.float64, generator=g),
                       close, step, True)
    # polish: close pairs around the best point found, in random directions and in its own
    x, y, close = best_pair
    p = _project(x, radius)
    u = (_project(y, radius) - p) if not close else y
    xs = p[None] + 0.01 * radius * torch.randn(shape, dtype=torch.float64, generator=g)
    us = u[None] + 0.1 * u.norm() / math.sqrt(u.numel()) * torch.randn(shape, dtype=torch.float64, generator=g)
    search(xs, us, True, lr / 30, True)
    return best

