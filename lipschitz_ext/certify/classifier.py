"""Certified l2 robustness of MLP classifiers, and the PGD-l2 attack that tests it.

For a classifier ``f`` whose logits are ``L``-Lipschitz in l2 (pixels in [0, 1]), two logits
``f_y - f_j`` differ by a ``sqrt(2) L``-Lipschitz function (``||e_y - e_j||_2 = sqrt(2)``),
so the prediction ``y`` cannot change within

    radius = (f_y(x) - max_{j != y} f_j(x)) / (sqrt(2) L).

Soundness, step by step (:func:`certified_radii`):

- ``L`` is the product of the layers' certified spectral-norm upper bounds
  (``ops.spectral_norm_bound``, float64), times ``1 + 1e-9`` for the rounding of that
  computation. Centring (a translation) and ReLU / MaxMin (1-Lipschitz) add nothing.
- the logits are computed in float64 from ``pixels / 255`` in float64; the rounding of
  that forward pass is bounded per example by
  ``e = sum_k gamma(n_k + 2) ||W_k||_F ||h_{k-1}||_2 prod_{j>k} sigma_j`` (``gamma(n) =
  n u / (1 - n u)``, ``u = 2^-53``; ``h_{k-1}`` the layer's computed input), doubled, plus
  the centring's ``u ||x - mean||_2 L``; the margin's error is at most ``sqrt(2) e``, so the
  radius used is ``margin / (sqrt(2) L) - e / L``.

:func:`pgd_l2` is a float64 projected-gradient attack inside the l2 ball and the [0, 1]
box, from several starts; :func:`soundness_check` runs it at each certified example's own
radius and counts the predictions it flips (a sound certificate gives zero).
"""

from __future__ import annotations

import copy
import math
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import ops
from ..nn.classifier import LipschitzMLPClassifier, MaxMin
from .certificate import check_certifiable


__all__ = ["DEFAULT_RADII", "l2_bound", "certified_radii", "certified_accuracy", "pgd_l2", "soundness_check",
           "evaluate_classifier", "pixels"]

#: radii reported by default (pixels in [0, 1]; 1.58 is the largest radius commonly reported
#: for 28x28 images in the certified-robustness literature)
DEFAULT_RADII = (0.1, 0.25, 0.5, 1.0, 1.58)

_U = 2.0 ** -53


def _gamma(n: int) -> float:
    return n * _U / (1.0 - n * _U)


def pixels(x_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8 [N, D]`` pixels as ``dtype`` values in [0, 1] (divided by 255)."""
    return x_uint8.to(dtype) / 255.0


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """The float64 weights of a :class:`LipschitzMLPClassifier` whose function they are: a
    model with hooks, a replaced ``forward``, a parametrization or any module the bound does
    not know is refused (``ValueError``), as :func:`lipschitz_ext.certify.check_certifiable`
    refuses them for transformers."""
    if not isinstance(model, LipschitzMLPClassifier):
        raise TypeError(f"expected a LipschitzMLPClassifier (or a list of weights), got {type(model).__name__}")
    check_certifiable(model, "l2_bound", known=(LipschitzMLPClassifier, nn.ModuleList, nn.Linear, nn.ReLU, MaxMin))
    return [t.detach().to("cpu", torch.float64) for t in model.weights()]


def _sigma_bounds(weights: Sequence[torch.Tensor]) -> list[float]:
    """Certified upper bounds on each ``sigma_max(W)``: ``ops.spectral_norm_bound`` given
    targets just above the float64 SVD value (a Cholesky factorization then proves each
    target; its own candidates are coarser when many singular values sit at the top, as a
    hard cap leaves them)."""
    out = []
    for W in weights:
        s = float(torch.linalg.matrix_norm(W, ord=2))
        out.append(min(float(ops.spectral_norm_bound(W, target=s * (1.0 + t))) for t in (1e-10, 1e-8, 1e-6)))
    return out


def l2_bound(model_or_weights) -> float:
    """Certified upper bound on the l2 -> l2 Lipschitz constant of the logits in pixel space.

    ``model_or_weights``: a :class:`~lipschitz_ext.nn.classifier.LipschitzMLPClassifier`
    (refused if hooks or unknown modules change its function), or a list of ``[fan_out, fan_in]`` weights of an MLP
    with 1-Lipschitz activations. Product of ``ops.spectral_norm_bound`` in float64, times
    ``1 + 1e-9``.
    """
    weights = ([t.detach().to("cpu", torch.float64) for t in model_or_weights]
               if isinstance(model_or_weights, (list, tuple)) else _weights(model_or_weights))
    return math.prod(_sigma_bounds(weights)) * (1.0 + 1e-9)


def _float64_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to("cpu", torch.float64).eval()


@torch.no_grad()
def certified_radii(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, *, batch: int = 4096,
                    bound: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-example certified l2 radii (pixels in [0, 1]).

    Args:
        model: a :class:`~lipschitz_ext.nn.classifier.LipschitzMLPClassifier`.
        x_uint8: ``uint8 [N, D]`` images; ``y``: ``int64 [N]`` labels.
        bound: the Lipschitz bound to use (default: :func:`l2_bound`).

    Returns:
        ``(radius float64 [N], correct bool [N], L)``: ``radius`` is 0 where the
        prediction is wrong, else the certified radius (see the module docstring).
    """
    m64 = _float64_copy(model)
    weights = [lin.weight for lin in m64.layers]
    sig = _sigma_bounds(weights)
    L = math.prod(sig) * (1.0 + 1e-9) if bound is None else float(bound)
    fro = [float(torch.linalg.matrix_norm(W)) for W in weights]
    tail = [math.prod(sig[k + 1:]) for k in range(len(sig))]
    radii, correct = [], []
    for i in range(0, x_uint8.shape[0], batch):
        x = pixels(x_uint8[i:i + batch], torch.float64)
        h = x - m64.mean
        err = _U * torch.linalg.vector_norm(h, dim=1) * L
        for k, lin in enumerate(m64.layers):
            err = err + 2.0 * _gamma(lin.weight.shape[1] + 2) * fro[k] * torch.linalg.vector_norm(h, dim=1) * tail[k]
            h = lin(h)
            if k + 1 < len(m64.layers):
                h = m64.act(h)
        yy = y[i:i + batch]
        top = h.gather(1, yy[:, None]).squeeze(1)
        other = h.scatter(1, yy[:, None], float("-inf")).amax(dim=1)
        margin = top - other
        r = margin / (math.sqrt(2.0) * L) - err / L
        ok = margin > 0
        radii.append(torch.where(ok, r.clamp_min(0.0), torch.zeros_like(r)))
        correct.append(ok)
    return torch.cat(radii), torch.cat(correct), L


def certified_accuracy(radius: torch.Tensor, correct: torch.Tensor, radii: Iterable[float]) -> dict[str, float]:
    """``{str(eps): fraction correct with radius > eps}`` (a prediction certified at ``eps``)."""
    return {f"{e:g}": float(((radius > e) & correct).double().mean()) for e in radii}


def _margin_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    top = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return other - top


def pgd_l2(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, eps, *, steps: int = 50, restarts: int = 3,
           seed: int = 0, batch: int = 1000) -> torch.Tensor:
    """Projected gradient ascent on ``max_{j != y} f_j - f_y`` in the l2 ball of radius ``eps``
    and the [0, 1] pixel box, float64, from ``restarts`` starts (the clean image, then uniform
    points in the ball).

    Args:
        x_uint8: ``uint8 [N, D]``; ``y``: ``int64 [N]`` the labels to attack (the clean
            predictions, to test a certificate).
        eps: a float or a float64 ``[N]`` of per-example radii.

    Returns:
        bool ``[N]``: True where some start found a point predicted other than ``y``.
    """
    m64 = _float64_copy(model)
    for p in m64.parameters():
        p.requires_grad_(False)
    n = x_uint8.shape[0]
    eps_all = torch.as_tensor(eps, dtype=torch.float64).expand(n) if not torch.is_tensor(eps) or eps.dim() == 0 \
        else eps.to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    fooled = torch.zeros(n, dtype=torch.bool)
    for i in range(0, n, batch):
        x = pixels(x_uint8[i:i + batch], torch.float64)
        yy, e = y[i:i + batch], eps_all[i:i + batch][:, None]
        alpha = 2.5 * e / steps
        hit = torch.zeros(x.shape[0], dtype=torch.bool)
        for r in range(restarts):
            if r == 0:
                delta = torch.zeros_like(x)
            else:
                d = torch.randn(x.shape, dtype=torch.float64, generator=gen)
                d = d / torch.linalg.vector_norm(d, dim=1, keepdim=True)
                u = torch.rand(x.shape[0], 1, dtype=torch.float64, generator=gen) ** (1.0 / x.shape[1])
                delta = d * u * e
                delta = (x + delta).clamp(0.0, 1.0) - x
            for _ in range(steps):
                delta.requires_grad_(True)
                z = m64(x + delta)
                with torch.no_grad():
                    hit |= z.argmax(dim=1) != yy
                g, = torch.autograd.grad(_margin_loss(z, yy).sum(), delta)
                with torch.no_grad():
                    gn = torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-300)
                    delta = delta + alpha * g / gn
                    norm = torch.linalg.vector_norm(delta, dim=1, keepdim=True)
                    delta = delta * torch.clamp(e / norm.clamp_min(1e-300), max=1.0)
                    delta = (x + delta).clamp(0.0, 1.0) - x  # box projection keeps the norm <= eps
            with torch.no_grad():
                hit |= m64(x + delta).argmax(dim=1) != yy
        fooled[i:i + batch] = hit
    return fooled


def soundness_check(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, *, steps: int = 50,
                    restarts: int = 3, seed: int = 0) -> dict:
    """Attack every certified, correct example at its own certified radius; a sound
    certificate leaves every one unflipped. Returns ``{"certified": n, "flipped": k}``."""
    radius, correct, _ = certified_radii(model, x_uint8, y)
    idx = torch.nonzero(correct & (radius > 0)).squeeze(1)
    if idx.numel() == 0:
        return {"certified": 0, "flipped": 0}
    fooled = pgd_l2(model, x_uint8[idx], y[idx], radius[idx], steps=steps, restarts=restarts, seed=seed)
    return {"certified": int(idx.numel()), "flipped": int(fooled.sum())}


def evaluate_classifier(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, *,
                        radii: Sequence[float] = DEFAULT_RADII, attack_examples: int = 1000, attack_steps: int = 50,
                        attack_restarts: int = 3, seed: int = 0) -> dict:
    """Clean accuracy, the certified bound, certified accuracy by radius (all of ``x``), and
    PGD-l2 accuracy by radius plus the soundness check on the first ``attack_examples``."""
    radius, correct, L = certified_radii(model, x_uint8, y)
    out = {"clean_accuracy": float(correct.double().mean()), "certified_bound": L,
           "certified_accuracy": certified_accuracy(radius, correct, radii),
           "median_certified_radius": float(radius.median()), "examples": int(y.shape[0])}
    k = min(int(attack_examples), int(y.shape[0]))
    if k > 0:
        xs, ys, cs = x_uint8[:k], y[:k], correct[:k]
        out["pgd_accuracy"] = {f"{e:g}": float((cs & ~pgd_l2(model, xs, ys, e, steps=attack_steps,
                                                               restarts=attack_restarts, seed=seed)).double().mean())
                               for e in radii}
        out["pgd"] = {"examples": k, "steps": attack_steps, "restarts": attack_restarts}
        out["soundness"] = soundness_check(model, xs, ys, steps=attack_steps, restarts=attack_restarts, seed=seed)
    return out
