"""The constraints: decay, spectral normalization, hammer, soft cap, hard cap, orthogonal
projection, exact SVD clip, and the embedding's row-RMS cap (the frame: :mod:`lipschitz_ext.constraints.base`)."""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import ops
from ..ops.spectral_cap import _guard_cap as guard_cap
from .base import Constraint, _PowerIterationMixin, _check_nonneg, _store_u, rms_scale

class WeightDecay(Constraint):
    """Decoupled weight decay ``W <- (1 - wd * lr) W``. Guarantees no norm (``sigma_max = None``)."""

    name = "weight_decay"

    def __init__(self, wd: float = 0.0):
        self.wd = _check_nonneg("WeightDecay", "wd", wd)
        self.sigma_max = None

    def _apply(self, W3, *, lr, update_norm, decay, state):
        factor = 1.0 - self.wd * lr
        if factor != 1.0:
            W3.mul_(factor)  # W3 is W or a view of it
        return None


class SpectralWeightDecay(_PowerIterationMixin, Constraint):
    """Spectral weight decay ``W <- W - lam_eff * sigma_1 u_1 v_1^T`` (``sigma_1 -> (1 - lam_eff) sigma_1``).

    ``lam_eff = lam * lr`` (decoupled, like :class:`WeightDecay`) when
    ``scale_by_lr`` (default), else ``lam``; it must stay in ``[0, 1]``. The
    frame does not matter (the map is scale-free). ``iters`` power iterations
    per call, warm-started from ``state["u"]`` ``[k, m]``. ``sigma_max = None``.
    """

    name = "spectral_weight_decay"

    def __init__(self, lam: float = 0.0, iters: int = 2, scale_by_lr: bool = True):
        self.lam = _check_nonneg("SpectralWeightDecay", "lam", lam)
        self.iters = int(iters)
        self.scale_by_lr = bool(scale_by_lr)
        self.sigma_max = None

    def _apply(self, W3, *, lr, update_norm, decay, state):
        lam = self.lam * lr if self.scale_by_lr else self.lam
        if lam == 0.0:
            return None
        if lam > 1.0:
            raise ValueError(f"SpectralWeightDecay: lam * lr = {lam} > 1 would flip the top singular direction")
        out, u = ops.spectral_weight_decay_with_u(W3, lam, *self._iters(state, W3))
        _store_u(state, u)
        return out


#: Relative room above its cap that :class:`SpectralNormalize` leaves a matrix (float rounding).
NORMALIZE_SLACK = 1e-5


class SpectralNormalize(_PowerIterationMixin, Constraint):
    """Spectral normalization ``W' <- W' / max(1, sigma_1(W') / sigma_max)``.

    ``sigma_1`` by ``iters`` power iterations warm-started from ``state["u"]``
    ``[k, m]`` (:data:`COLD_ITERS` = 16 at least when there is none). That estimate
    can only be low, so the result is then checked against a certified bound
    (``ops.certified_at_most``, then ``ops.spectral_norm_bound`` where it fails) and a
    matrix still above ``sigma_max (1 + NORMALIZE_SLACK)`` is scaled down to the cap:
    for any finite input every singular value ends ``<= sigma_max (1 + 1e-5)``.
    """

    name = "normalize"

    def __init__(self, sigma_max: float = 1.0, iters: int = 2):
        self.sigma_max = _check_nonneg("SpectralNormalize", "sigma_max", sigma_max)
        self.iters = int(iters)

    def _apply(self, W3, *, lr, update_norm, decay, state):
        cap = self.sigma_max * rms_scale(W3)
        out, u = ops.spectral_normalize_with_u(W3, cap, *self._iters(state, W3))
        _store_u(state, u)
        return guard_cap(out, cap, NORMALIZE_SLACK)  # the power-iteration estimate can be low


class SpectralHammer(_PowerIterationMixin, Constraint):
    """Spectral hammer ``W' <- W' + (sigma_max - sigma_1) u_1 v_1^T``.

    Sets only the top singular value (it can raise it); the others may stay above
    the cap, so ``sigma_max`` is ``None``. The cap value is kept as ``target``.
    ``state["u"]`` ``[k, m]`` warm-starts the power iteration.
    """

    name = "hammer"

    def __init__(self, sigma_max: float = 1.0, iters: int = 2):
        self.target = _check_nonneg("SpectralHammer", "sigma_max", sigma_max)
        self.iters = int(iters)
        self.sigma_max = None

    def _apply(self, W3, *, lr, update_norm, decay, state):
        out, u = ops.spectral_hammer_with_u(W3, self.target * rms_scale(W3), *self._iters(state, W3))
        _store_u(state, u)
        return out


@functools.lru_cache(maxsize=4096)
def _coupled_alpha(sigma_max: float, mu: float, decay: float) -> float:
    return ops.soft_cap_alpha(sigma_max, mu, decay)


class SpectralSoftCap(Constraint):
    """Spectral soft cap: ``W' <- W'(I - a W'^T W')``, then ``W' <- W'(I + a W'^T W')``.

    ``a`` comes from the coupling ``ops.soft_cap_alpha(sigma_max, update_norm,
    decay)`` (cached), which maps every singular value ``<= k = sigma_max (1 -
    decay) + update_norm`` to ``<= sigma_max``: so if the weights entered the step
    with ``||W||_rms <= sigma_max`` and the step moved them by ``<= update_norm``,
    they leave it capped (``sigma_max`` is that guarantee). With ``update_norm ==
    0`` (an optimizer that gives no bound) it uses ``mu = default_mu * sigma_max``
    (default 0.05: ``a = 0.122`` for ``sigma_max = 1``). A fixed ``alpha`` (RMS
    frame) overrides the coupling. No state.

    Guarantee for ANY finite input (with the coupling; a fixed ``alpha`` is applied
    as given): a matrix whose certified bound
    (``ops.spectral_norm_bound``) exceeds the polynomial's range ``k`` (where
    ``f_a([0, k]) <= sigma_max``) is first scaled by ``k / bound``, so afterwards every
    singular value is ``<= sigma_max`` (up to ~1e-5 and float rounding) -- far above the cap the
    polynomial alone would grow them (4x the cap -> 10.8x). Weights inside the range
    are untouched, bit for bit. The check costs a float64 Gram matrix per call.
    """

    name = "soft_cap"

    def __init__(self, sigma_max: float = 1.0, alpha: Optional[float] = None, default_mu: float = 0.05):
        self.sigma_max = _check_nonneg("SpectralSoftCap", "sigma_max", sigma_max)
        if self.sigma_max == 0:
            raise ValueError("SpectralSoftCap: argument 'sigma_max' must be > 0")
        self.alpha = None if alpha is None else _check_nonneg("SpectralSoftCap", "alpha", alpha)
        self.default_mu = _check_nonneg("SpectralSoftCap", "default_mu", default_mu)

    def alpha_for(self, update_norm: float = 0.0, decay: float = 0.0) -> float:
        """The soft-cap ``a`` (RMS->RMS frame) this constraint uses for a step."""
        if self.alpha is not None:
            return self.alpha
        mu = update_norm if update_norm > 0 else self.default_mu * self.sigma_max
        try:
            return _coupled_alpha(self.sigma_max, float(mu), float(decay))
        except ValueError:  # ops names its internal mu; say which user setting it comes from
            raise ValueError(
                f"SpectralSoftCap(sigma_max={self.sigma_max:g}): this step's update norm {mu:.4g} "
                "(the optimizer's bound: learning rate x update scale) is too large for the soft "
                "cap's polynomial; lower the learning rate, or use the hard cap") from None

    def range_for(self, update_norm: float = 0.0, decay: float = 0.0) -> Optional[float]:
        """``k`` (RMS->RMS frame): the coupled polynomial of this step maps ``[0, k]`` to ``[0, sigma_max]``.

        ``None`` with a fixed ``alpha``: the user's polynomial is applied as given (no pre-scale).
        """
        if self.alpha is not None:
            return None
        mu = update_norm if update_norm > 0 else self.default_mu * self.sigma_max
        return max(self.sigma_max, self.sigma_max * (1.0 - decay) + mu)

    def _apply(self, W3, *, lr, update_norm, decay, state):
        try:
            a = self.alpha_for(update_norm, decay)
        except ValueError as exc:
            raise ValueError(f"{exc} (learning rate lr={lr:g})") from None
        s = rms_scale(W3)
        if self.alpha is not None:  # a fixed alpha: exactly the given polynomial
            return None if a == 0.0 else ops.spectral_soft_cap(W3, a / s**2)
        k = self.range_for(update_norm, decay) * s  # plain frame
        # 1e-5: weights rounded to their dtype may sit a hair above an exact k
        # one factorization certifies the common case; the full bound only where it cannot
        over = torch.zeros(W3.shape[0], dtype=torch.bool, device=W3.device)
        if W3.device.type == "meta" or not bool(ops.certified_at_most(W3, k * (1.0 + 1e-5)).all()):
            ub = ops.spectral_norm_bound(W3, target=k * (1.0 + 1e-5))
            over = ub > k * (1.0 + 1e-5)
        if bool(over.any()):
            c = torch.where(over, k / ub, torch.ones_like(ub))
            W3 = (W3.double() * c[:, None, None]).to(W3.dtype)
        elif a == 0.0:
            return None
        return W3 if a == 0.0 else ops.spectral_soft_cap(W3, a / s**2)


class SpectralHardCap(Constraint):
    """Spectral hard cap: singular values of ``W'`` clipped to ``sigma_max``.

    ``method``: ``"auto"`` (default: ``"eigh"`` for CPU weights, ``"msign"`` on GPUs),
    ``"eigh"`` (exact, through the eigendecomposition of the Gram matrix on the
    small side; ~1e-7 relative in float32 and the cheapest on CPU), ``"msign"``
    (exact formula on Polar Express msign, ``steps`` per msign; within ~5e-3 *
    sigma_max in float32; all GEMMs, the fast path on GPUs, where batched ``eigh`` is
    slow) or ``"polynomial"`` (the paper's quintic, peak 1.0109 * sigma_max;
    out-of-range inputs pre-scaled, see ``ops.spectral_hard_cap``). No state.

    For ANY finite input the result is under ``sigma_max`` times 1 + the method's
    accuracy (1e-3 eigh, 5e-3 msign, 0.011 polynomial): the op certifies its output
    and scales a matrix that rounding left above that down to the cap.
    """

    name = "hard_cap"

    def __init__(self, sigma_max: float = 1.0, method: str = "auto", steps: int = 10):
        self.sigma_max = _check_nonneg("SpectralHardCap", "sigma_max", sigma_max)
        if method != "auto" and method not in ops.HARD_CAP_METHODS:
            raise ValueError(f"SpectralHardCap: argument 'method' must be 'auto' or one of "
                             f"{ops.HARD_CAP_METHODS}, got {method!r}")
        self.method = method
        self.steps = int(steps)

    def method_for(self, W: torch.Tensor) -> str:
        """The op method used for weights ``W`` (``"auto"``: ``ops.choices.choose``, the measured rule)."""
        if self.method != "auto":
            return self.method
        return ops.choices.choose("hard_cap_method", W.device, W.dtype, tuple(W.shape[-2:]))

    def _apply(self, W3, *, lr, update_norm, decay, state):
        return ops.spectral_hard_cap(W3, self.sigma_max * rms_scale(W3), self.method_for(W3), self.steps)


class Orthogonal(Constraint):
    """Projection to the scaled Stiefel manifold: ``W' <- sigma_max * msign(W')`` (``steps`` Polar Express steps)."""

    name = "orthogonal"

    def __init__(self, sigma_max: float = 1.0, steps: int = 10):
        self.sigma_max = _check_nonneg("Orthogonal", "sigma_max", sigma_max)
        self.steps = int(steps)

    def _apply(self, W3, *, lr, update_norm, decay, state):
        return ops.orthogonal_project(W3, self.sigma_max * rms_scale(W3), self.steps)


class SVDCap(Constraint):
    """Exact ``W' <- U min(S, sigma_max) V^T`` by SVD (slow; the ground truth)."""

    name = "svd_cap"

    def __init__(self, sigma_max: float = 1.0):
        self.sigma_max = _check_nonneg("SVDCap", "sigma_max", sigma_max)

    def _apply(self, W3, *, lr, update_norm, decay, state):
        return ops.svd_cap(W3, self.sigma_max * rms_scale(W3))


class EmbeddingRMSCap(Constraint):
    """Per-token RMS cap for embedding tables: each row ``x`` gets ``RMS(x) <= max_rms``.

    ``W: [k, vocab, d]`` or ``[vocab, d]`` (``nn.Embedding`` layout: one token per
    row); rows above the cap are scaled down to it, others are untouched.
    ``sigma_max = max_rms``: the largest per-token RMS, i.e. the operator norm
    from one-hot inputs to RMS-normed outputs. No state.
    """

    name = "embedding_rms"

    def __init__(self, max_rms: float = 1.0):
        self.max_rms = _check_nonneg("EmbeddingRMSCap", "max_rms", max_rms)
        self.sigma_max = self.max_rms

    def _apply(self, W3, *, lr, update_norm, decay, state):
        # RMS in float64 and a target two ulps of W's dtype below the cap: rounding in the
        # final multiply (<= half an ulp per entry) can then never leave a row above it,
        # so the certificate's input domain (per-token RMS <= max_rms) really holds.
        rms = W3.double().pow(2).mean(dim=-1, keepdim=True).sqrt()
        target = self.max_rms * (1.0 - 2.0 * torch.finfo(W3.dtype).eps)
        factor = torch.where(rms > target, target / rms, torch.ones_like(rms))  # NaN rows stay NaN
        W3.mul_(factor.to(W3.dtype))
        return None

