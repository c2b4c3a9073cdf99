"""lipschitz::power_iteration and the rank-1 constraints built on it (wrappers + fake kernels).

All act on plain matrices ``[..., m, n]`` with the plain spectral norm (largest
singular value); the RMS->RMS frame is :mod:`lipschitz_ext.constraints`' job.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import math

import torch

from . import _recompute as R
from ._checks import check_same_device

__all__ = ["power_iteration", "spectral_normalize", "spectral_hammer", "spectral_weight_decay",
           "spectral_normalize_with_u", "spectral_hammer_with_u", "spectral_weight_decay_with_u",
           "SingularTriplet", "Rank1Result", "certified_at_most", "spectral_norm_bound"]


class SingularTriplet(NamedTuple):
    """:func:`power_iteration`'s result, the fields its schema names."""

    sigma: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


class Rank1Result(NamedTuple):
    """A rank-1 constraint's new weight ``out`` and the warm start ``u`` for its next call."""

    out: torch.Tensor
    u: torch.Tensor


def power_iteration(
    W: torch.Tensor, iters: int = 16, u: Optional[torch.Tensor] = None
) -> SingularTriplet:
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
        ``SingularTriplet(sigma [...], u [..., m], v [..., n])`` in float32 (float64 for float64
        ``W``) with ``u``, ``v`` unit vectors, ``sigma = ||W v|| = u^T W v``: a lower
        bound on the spectral norm that converges to it (like ``(s2/s1)^(2*iters)``).
        A zero matrix gives ``sigma = 0`` and zero vectors. NaN/inf in a matrix give
        NaN for that matrix.
    """
    return SingularTriplet(*torch.ops.lipschitz.power_iteration.default(W, int(iters), u))


def _vectors_fake(W):
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    return W.new_empty(W.shape[:-1], dtype=dt)


@torch.library.register_fake("lipschitz::power_iteration")
def _power_iteration_fake(W, iters=16, u=None):
    check_same_device("power_iteration", "W", {"W": W, "u": u})
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


def _rank1_fake_for(name: str):
    def fake(W, param=1.0, iters=16, u=None):
        check_same_device(name, "W", {"W": W, "u": u})
        return _rank1_fake(W, param, iters, u)

    return fake


for _name in ("spectral_normalize", "spectral_hammer", "spectral_weight_decay"):
    torch.library.register_fake(f"lipschitz::{_name}")(_rank1_fake_for(_name))



# autograd: the backward reruns these mirrors of the kernels (csrc/power_iteration.h) and
# takes their vjp (lipschitz_ext/ops/_recompute.py): the gradient through every iteration,
# of sigma and of the returned vectors, w.r.t. W and the warm start u.


def _power_iteration_mirror(W, iters=16, u=None):
    st = R.float_or_double(W.dtype)
    batch = W.shape[:-2]
    m, n = W.shape[-2:]
    if W.numel() == 0:
        return W.new_zeros(batch, dtype=st), W.new_zeros(W.shape[:-1], dtype=st), W.new_zeros(batch + (n,), dtype=st)
    sigma, uu, vv = R.power_iteration_batched(W.reshape(-1, m, n).to(st), iters, u)
    return sigma.reshape(batch), uu.reshape(W.shape[:-1]), vv.reshape(batch + (n,))


def _rank1_coefficients(kind: str, param: float, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "spectral_normalize":
        scale = R.scalar_div(param, torch.maximum(sigma, torch.full_like(sigma, param)).clamp_min(1e-30))
        return scale, torch.zeros_like(sigma)
    if kind == "spectral_hammer":
        return torch.ones_like(sigma), param - sigma
    return torch.ones_like(sigma), -param * sigma


def _rank1_mirror_for(kind: str):
    def mirror(W, param=1.0, iters=16, u=None):
        st = R.float_or_double(W.dtype)
        if W.numel() == 0:
            return W.new_zeros(W.shape), W.new_zeros(W.shape[:-1], dtype=st)
        W3 = W.reshape(-1, *W.shape[-2:])
        sigma, uu, vv = R.power_iteration_batched(W3.to(st), iters, u)
        scale, coef = _rank1_coefficients(kind, param, sigma)
        out = torch.baddbmm(W3.to(st) * scale.reshape(-1, 1, 1), (uu * coef.unsqueeze(-1)).unsqueeze(-1),
                            vv.unsqueeze(-2))
        return out.reshape(W.shape).to(W.dtype), uu.reshape(W.shape[:-1])

    return mirror


R.register_recompute_autograd("lipschitz::power_iteration", _power_iteration_mirror)
for _name in ("spectral_normalize", "spectral_hammer", "spectral_weight_decay"):
    R.register_recompute_autograd(f"lipschitz::{_name}", _rank1_mirror_for(_name))

def spectral_normalize(
    W: torch.Tensor, sigma_max: float = 1.0, iters: int = 16, u: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Spectral normalization: ``W / max(1, sigma_1 / sigma_max)`` per matrix.

    ``sigma_1`` comes from :func:`power_iteration` (``iters``, warm start ``u``),
    so the cap holds up to that estimate (which can only be low). ``W``:
    ``[..., m, n]``; returns a new tensor of W's shape and dtype.
    :func:`spectral_normalize_with_u` also returns the new warm start.
    """
    return spectral_normalize_with_u(W, sigma_max, iters, u).out


def spectral_normalize_with_u(
    W: torch.Tensor, sigma_max: float = 1.0, iters: int = 16, u: Optional[torch.Tensor] = None
) -> Rank1Result:
    """:func:`spectral_normalize`, and the new ``u [..., m]`` (float32/float64) for the next call."""
    return Rank1Result(*torch.ops.lipschitz.spectral_normalize.default(W, float(sigma_max), int(iters), u))


def spectral_hammer(
    W: torch.Tensor, sigma_max: float = 1.0, iters: int = 16, u: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Spectral hammer: ``W + (sigma_max - sigma_1) u_1 v_1^T`` per matrix.

    Sets the top singular value to ``sigma_max`` (it can raise it) and touches
    nothing else: other singular values may stay above the cap. Shapes, dtypes and
    ``u`` as in :func:`spectral_normalize`; :func:`spectral_hammer_with_u` also
    returns the new warm start.
    """
    return spectral_hammer_with_u(W, sigma_max, iters, u).out


def spectral_hammer_with_u(
    W: torch.Tensor, sigma_max: float = 1.0, iters: int = 16, u: Optional[torch.Tensor] = None
) -> Rank1Result:
    """:func:`spectral_hammer`, and the new ``u [..., m]`` (float32/float64) for the next call."""
    return Rank1Result(*torch.ops.lipschitz.spectral_hammer.default(W, float(sigma_max), int(iters), u))


def spectral_weight_decay(
    W: torch.Tensor, lam: float, iters: int = 16, u: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Spectral weight decay: ``W - lam * sigma_1 u_1 v_1^T`` (``sigma_1 -> (1 - lam) sigma_1``).

    ``lam`` in ``[0, 1]``. Shapes, dtypes and ``u`` as in :func:`spectral_normalize`;
    :func:`spectral_weight_decay_with_u` also returns the new warm start.
    """
    return spectral_weight_decay_with_u(W, lam, iters, u).out


def spectral_weight_decay_with_u(
    W: torch.Tensor, lam: float, iters: int = 16, u: Optional[torch.Tensor] = None
) -> Rank1Result:
    """:func:`spectral_weight_decay`, and the new ``u [..., m]`` (float32/float64) for the next call."""
    return Rank1Result(*torch.ops.lipschitz.spectral_weight_decay.default(W, float(lam), int(iters), u))


#: relative steps above the power-iteration estimate tried as certified bounds
_BOUND_FACTORS = (1.0 + 1e-6, 1.0 + 1e-4, 1.003, 1.03, 1.3)


def _scaled_gram(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, Y, s, finite)``: the float64 small-side Gram matrix ``A`` of ``Y = W / s`` per matrix
    (``s = max|W|``, 1 for zero or non-finite matrices, whose ``Y`` is 0), ``s`` and ``finite``
    flattened to ``[B]``. The scaling keeps every entry of ``Y`` in ``[-1, 1]``: no overflow or
    underflow for any finite input."""
    m, n = W.shape[-2:]
    X = W.reshape(-1, m, n).double()
    mx = X.abs().amax(dim=(-2, -1), keepdim=True)
    fin = torch.isfinite(mx)
    s = torch.where((mx > 0) & fin, mx, torch.ones_like(mx))
    Y = torch.where(fin, X / s, torch.zeros_like(X))
    return (Y.mT @ Y if m >= n else Y @ Y.mT), Y, s.reshape(-1), fin.reshape(-1)


def _cholesky_certifies(A: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """Per matrix of the float64 Gram matrices ``A [B, r, r]``: whether ``t2 I - A`` has a Cholesky
    factor (``t2 [B]``), i.e. every eigenvalue of ``A`` is below ``t2``. Consumes nothing: ``A``
    is left as it was."""
    M = -A
    M.diagonal(dim1=-2, dim2=-1).add_(t2[:, None])
    return torch.linalg.cholesky_ex(M).info == 0


def certified_at_most(W: torch.Tensor, t: float) -> torch.Tensor:
    """Whether ``sigma_max(W) < t`` is certified, per matrix of ``W [..., m, n]`` (bool ``[...]``).

    One float64 small-side Gram matrix ``A`` (of ``W / max|W|`` for float64 ``W``, of ``W`` itself
    for narrower dtypes, whose squares cannot overflow or underflow in float64) and one Cholesky factorization
    of ``t^2 I - A`` (positive definite exactly when ``sigma_max < t``): the cheap first test
    the caps run every step, so the full :func:`spectral_norm_bound` (a power iteration and
    six more factorizations) is paid only where this one fails. False for a non-finite
    matrix; True for a zero matrix when ``t > 0``. ``W`` must be a real floating tensor
    (complex, integer and bool are refused) and ``t`` a real number (not a bool).
    """
    if not isinstance(W, torch.Tensor) or not W.is_floating_point() or W.dim() < 2:
        raise ValueError(f"certified_at_most: argument 'W' must be a real floating [..., m, n] tensor, got "
                         f"{W.dtype if isinstance(W, torch.Tensor) else type(W).__name__}"
                         f"{'' if not isinstance(W, torch.Tensor) else f' of shape {tuple(W.shape)}'}")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t):
        raise ValueError(f"certified_at_most: argument 't' must be a real number, got {t!r}")
    batch = W.shape[:-2]
    if W.numel() == 0:
        return torch.ones(batch, dtype=torch.bool, device=W.device)
    if W.dtype == torch.float64:
        A, _, s, finite = _scaled_gram(W)
        t2 = (float(t) / s).square()
    else:
        # every float32 / bf16 / fp16 value squares to a normal float64 (3.4e38^2 and the smallest
        # subnormal's square are in range): the Gram matrix of W itself needs no scaling pass, and a
        # non-finite entry shows on its diagonal (the column or row norms)
        m, n = W.shape[-2:]
        X = W.reshape(-1, m, n).double()
        A = X.mT @ X if m >= n else X @ X.mT
        finite = torch.isfinite(A.diagonal(dim1=-2, dim2=-1)).all(-1)
        t2 = torch.full((A.shape[0],), float(t) * float(t), dtype=torch.float64, device=W.device)
    ok = _cholesky_certifies(A, t2) & finite & (float(t) > 0)
    return ok.reshape(batch)


def spectral_norm_bound(W: torch.Tensor, target: Optional[float] = None, iters: int = 64) -> torch.Tensor:
    """A certified upper bound on ``sigma_max`` of every matrix of ``W [..., m, n]``.

    Power iteration alone only gives a lower bound. This returns the smallest of
    ``min(||W||_F, sqrt(||W||_1 ||W||_inf))`` (always an upper bound) and the
    candidates ``t`` (``target`` if given, and the power-iteration estimate on the
    small-side Gram matrix ``A`` times 1 + 1e-6, 1 + 1e-4, 1.003, 1.03, 1.3) for which ``t^2 I - A`` has a
    Cholesky factor, i.e. is positive definite, i.e. ``sigma_max < t``. Everything is
    computed in float64 on ``W / max|W|`` (no overflow or underflow for any finite
    input), so the bound holds up to float64 rounding (~1e-13 relative). ``target``
    is one more candidate (certifying ``sigma_max < target`` costs nothing extra), so
    the result is ``<= target`` exactly when that holds; a zero matrix gets 0; a
    non-finite one NaN. Without data-dependent branches (traces under torch.compile).

    Returns: float64 ``[...]`` (float64 so rounding to W's dtype cannot push it below
    ``sigma_max``). Costs one float64 Gram matrix, ``iters`` small-side GEMVs and
    ``1 + len(candidates)`` small-side Cholesky factorizations.
    """
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"spectral_norm_bound: argument 'W' must be a tensor, got {type(W).__name__}")
    if W.dim() < 2 or not W.dtype.is_floating_point:
        raise ValueError(f"spectral_norm_bound: argument 'W' must be a floating [..., m, n] tensor, "
                         f"got shape {tuple(W.shape)} and {W.dtype}")
    if target is not None and not (float(target) >= 0 and float(target) < float("inf")):
        raise ValueError(f"spectral_norm_bound: argument 'target' must be finite and >= 0, got {target}")
    batch = W.shape[:-2]
    if W.numel() == 0:
        return W.new_zeros(batch, dtype=torch.float64)
    A, Y, s, finite = _scaled_gram(W)
    r = A.shape[-1]
    fro = torch.linalg.matrix_norm(Y)
    safe = torch.minimum(fro, (Y.abs().sum(-2).amax(-1) * Y.abs().sum(-1).amax(-1)).sqrt())
    v = torch.ones(A.shape[0], r, 1, dtype=torch.float64, device=A.device)
    for _ in range(int(iters)):
        v = A @ v
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(1e-300)
    est = (v.mT @ A @ v).reshape(-1).clamp_min(0).sqrt()  # a lower bound on sigma_max(Y)
    cands = [est * f for f in _BOUND_FACTORS]
    if target is not None:
        cands.insert(0, torch.full_like(est, float(target)) / s)
    C = torch.stack(cands)  # [K, B]
    eye = torch.eye(r, dtype=torch.float64, device=A.device)
    M = C.square()[..., None, None] * eye - A
    ok = torch.linalg.cholesky_ex(M.reshape(-1, r, r)).info.reshape(C.shape) == 0
    certified = torch.where(ok & (C > 0), C, torch.full_like(C, float("inf"))).amin(0)
    ub = torch.minimum(safe, certified) * s
    ub = torch.where(finite, ub, torch.full_like(ub, float("nan")))
    return ub.reshape(batch)
