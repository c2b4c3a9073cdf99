"""The spectral caps: soft cap, hard cap, orthogonal projection and the exact SVD clip
(wrappers + fake kernels), plus the soft-cap coupling ``soft_cap_alpha``.

All act on plain matrices ``[..., m, n]`` with the plain spectral norm; the
RMS->RMS frame is :mod:`lipschitz_ext.constraints`' job. Compute: float32
(float64 for float64 input) on CPU; on CUDA the GEMMs run in bf16 with fp32
accumulation and the iterate is kept in fp32 (float64 stays float64).
"""

from __future__ import annotations

import math
from typing import Union

import torch

from . import _recompute as R
from ._checks import check_same_device
from .choices import choose
from .orthogonalize import orthogonalize
from .power_iteration import _cholesky_certifies, certified_at_most, spectral_norm_bound

__all__ = [
    "spectral_soft_cap",
    "soft_cap_alpha",
    "spectral_hard_cap",
    "orthogonal_project",
    "svd_cap",
    "HARD_CAP_METHODS",
    "ORTHOGONAL_PROJECT_METHODS",
    "POLYNOMIAL_PRESCALE",
]

#: Methods understood by :func:`spectral_hard_cap` (besides ``"auto"``).
HARD_CAP_METHODS = ("msign", "polynomial", "eigh")
#: ``method="polynomial"`` scales matrices whose estimated ``sigma_1 / sigma_max``
#: exceeds this down to it first (the quintic is only valid up to ~3.5).
POLYNOMIAL_PRESCALE = 3.0


def spectral_soft_cap(W: torch.Tensor, alpha: Union[float, torch.Tensor]) -> torch.Tensor:
    """Spectral soft cap: ``W <- W (I - a W^T W)`` then ``W <- W (I + a W^T W)``, as one update.

    Every singular value ``s`` becomes ``f(s) = s1 + a s1^3`` with ``s1 = s - a s^3``
    (singular vectors unchanged). The two rounds compose into ``W' = W (I - 3 x^2 +
    3 x^3 - x^4)``, ``x = a G``, ``G = W^T W`` on the small side (``W W^T``, multiplied
    from the left, for wide ``W``), computed as ``H = x^2``, ``P = H (H - 3 x + 3 I)``,
    ``W' = W - W P``: four batched GEMMs, two of them on the small side only, and one
    rounding of ``W`` (derivation: docs/soft_cap.md;
    :func:`soft_cap_two_round_reference` is the two-round form). Choose ``a`` with
    :func:`soft_cap_alpha`.

    Args:
        W: ``[..., m, n]`` floating tensor.
        alpha: a float >= 0 for all matrices, or a floating tensor of shape
            ``W.shape[:-2]`` (one ``a`` per matrix; values are not checked) or 0-d.

    Returns:
        A new tensor of W's shape and dtype.
    """
    if isinstance(alpha, torch.Tensor):
        return torch.ops.lipschitz.spectral_soft_cap.per_matrix(W, alpha)
    return torch.ops.lipschitz.spectral_soft_cap.default(W, float(alpha))


def soft_cap_two_round_reference(W: torch.Tensor, alpha: Union[float, torch.Tensor]) -> torch.Tensor:
    """The soft cap as the two rounds the op used to run (kept as the reference).

    ``W <- W + (-a) W G`` with ``G = W^T W``, then ``W <- W + a W G`` with the new ``G``
    (small side: ``G = W W^T`` and ``G W`` for wide ``W``), by the same ATen calls the
    C++ op made (``bmm`` for the Gram matrix, ``baddbmm`` with the residual fused), in
    float32 (float64 for float64 input): four batched GEMMs and two roundings of ``W``.
    Mathematically equal to :func:`spectral_soft_cap` (docs/soft_cap.md); the
    benchmark times both in one run and the tests compare them.

    Args:
        W: ``[..., m, n]`` floating tensor.
        alpha: a float, or a tensor of shape ``W.shape[:-2]`` or 0-d (one ``a`` per matrix).

    Returns:
        A new tensor of W's shape and dtype.
    """
    *batch, m, n = W.shape
    st = torch.float64 if W.dtype == torch.float64 else torch.float32
    X = W.reshape(-1, m, n).to(st)
    tall = m > n
    per_matrix = isinstance(alpha, torch.Tensor)
    a3 = alpha.to(st).reshape(-1, 1, 1).expand(X.shape[0], 1, 1) if per_matrix else None
    for sign in (-1.0, 1.0):
        A = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)
        c = sign if per_matrix else sign * float(alpha)
        if per_matrix:
            A = A * a3
        X = torch.baddbmm(X, X, A, beta=1.0, alpha=c) if tall else torch.baddbmm(X, A, X, beta=1.0, alpha=c)
    return X.reshape(W.shape).to(W.dtype)


def _soft_cap_map(s: float, a: float) -> float:
    s1 = s - a * s**3
    return s1 + a * s1**3


def soft_cap_alpha(sigma_max: float, mu: float, wd: float = 0.0) -> float:
    """The soft-cap coupling: the smallest ``a >= 0`` with ``|f_a(s)| <= sigma_max`` on ``[0, k]``.

    ``k = sigma_max * (1 - wd) + mu`` is the largest singular value a step can
    produce from weights capped at ``sigma_max`` (``mu``: the step's bound on the
    spectral-norm change, ``wd``: the decoupled weight-decay fraction applied).
    While ``t = a k^2 <= 1/3`` the map ``f_a`` is increasing on ``[0, k]`` and ``a``
    is the smallest non-negative root of ``-k^9 a^4 + 3 k^7 a^3 - 3 k^5 a^2 +
    (k - sigma_max) = 0`` (``f_a(k) = sigma_max``), found by bisection on the
    monotone ``t^2 (t^2 - 3t + 3) = 1 - sigma_max / k`` to float64 precision.
    That covers ``k <= 1.3068 sigma_max``. Beyond it the first cubic peaks inside
    ``[0, k]`` at ``s1* = 2 / (3 sqrt(3a))`` and ``a`` solves ``(31/27) s1* = sigma_max``;
    if even then ``|s1(k)| > s1*`` no ``a`` works and ValueError is raised.
    ``k <= sigma_max`` gives 0. Examples (docs/theory.md, section 2): ``(1, 0.06) -> 0.132``,
    ``(6, 0.1) -> 0.00207``.
    """
    sigma_max, mu, wd = float(sigma_max), float(mu), float(wd)
    for name, v in (("sigma_max", sigma_max), ("mu", mu), ("wd", wd)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"soft_cap_alpha: argument '{name}' must be finite and >= 0, got {v}")
    if wd > 1:
        raise ValueError(f"soft_cap_alpha: argument 'wd' must be <= 1, got {wd}")
    if sigma_max == 0:
        raise ValueError("soft_cap_alpha: argument 'sigma_max' must be > 0")
    k = sigma_max * (1.0 - wd) + mu
    if k <= sigma_max:
        return 0.0
    r = 1.0 - sigma_max / k
    if r <= 19.0 / 81.0:  # g(1/3): beyond it the first cubic peaks inside [0, k]
        lo, hi = 0.0, 1.0 / 3.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid * mid * (mid * mid - 3.0 * mid + 3.0) < r:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-17:
                break
        return hi / (k * k)
    # non-monotone regime: the interior peak of s - a s^3 decides
    a = (62.0 / (81.0 * sigma_max)) ** 2 / 3.0
    s1_peak = 2.0 / (3.0 * math.sqrt(3.0 * a))
    if abs(k - a * k**3) > s1_peak:
        raise ValueError(
            f"soft_cap_alpha: mu={mu} is too large for sigma_max={sigma_max} (k={k}): no soft-cap "
            "alpha maps every singular value in [0, k] to <= sigma_max"
        )
    return a


def spectral_hard_cap(
    W: torch.Tensor,
    sigma_max: float = 1.0,
    method: str = "auto",
    steps: int = 10,
    iters: int = 16,
) -> torch.Tensor:
    """Spectral hard cap: singular values ``s -> min(s, sigma_max)``, vectors kept.

    Args:
        W: ``[..., m, n]`` floating tensor.
        sigma_max: the cap (>= 0).
        method: ``"auto"`` (default): the measured rule for W's device, dtype, shape and
            thread count (:func:`lipschitz_ext.ops.choices.choose`, ``"hard_cap_method"``;
            the table is in docs/benchmarks.md: ``"eigh"`` on CPU, ``"msign"`` on CUDA).
            ``"msign"``: the exact two-msign formula
            ``1/2 [b Q + W - (b Q - W) msign(b Q - W)^T Q]``, ``Q = msign(W)``,
            each msign by ``steps`` Polar Express Newton-Schulz steps. Accuracy
            (float32 CPU, singular values in ``[0, 10 b]``): ``|s_out - min(s, b)|
            <= ~2e-3 * b``, limited by how well msign resolves the smallest nonzero
            singular values relative to ``||W||_F``; ``"polynomial"``: the paper's
            4-step odd quintic (``f(1) = 0.966``, peak 1.0109 near 1.185). It is only
            valid for ``s / b <~ 3.5`` and diverges above ~4, so matrices whose
            power-iteration estimate (``iters`` iterations) of ``sigma_1 / b``
            exceeds :data:`POLYNOMIAL_PRESCALE` (3.0) are first scaled down to it:
            the output then never exceeds ``~1.011 b``, but all its singular values
            of such a matrix are shrunk by that factor before the cap.
            ``"eigh"``: exact, through the eigendecomposition of the Gram matrix on
            the small side, ``W - W V diag(max(0, 1 - b / sqrt(l))) V^T`` (float32,
            float64 for float64 input; error ~1e-7 * ||W|| in float32). One Gram, one
            small-side ``eigh`` and two small-side GEMMs: the fastest method on CPU
            and for small matrices (d <= ~512); on GPUs batched ``eigh`` of large
            matrices is slow, use ``"msign"`` there.
        steps: Newton-Schulz steps per msign (``"msign"``). With float32/float64 GEMMs
            (CPU) and aspect ``max(m, n) / min(m, n) >= 2``, the msigns' and the
            polynomial's steps run on the small Gram matrix (Gram Newton-Schulz, the same
            polynomials; docs/kernels.md): ``~8 k^2 l + 28 k^3`` multiply-adds per
            ten-step msign instead of ``20 k^2 l + 10 k^3``.
        iters: power iterations of the pre-scale (``"polynomial"``). At aspect ``>= 2`` in
            float32/float64 they iterate on the small Gram matrix that the quintic's steps
            then start from (the large matrix is read once for both).

    This function is the hard cap's only public entry point: the registered kernel
    (``torch.ops.lipschitz._spectral_hard_cap``, private) computes the method's map without
    the certified pre-scale and output guard below, so the guarantee is this function's.

    Returns:
        A new tensor of W's shape and dtype. Non-finite input gives NaN for that matrix.
        For ANY finite input every output singular value is ``<= sigma_max (1 + slack)``
        (slack: 1e-3 eigh, 5e-3 msign, 0.011 polynomial; up to rounding to W's dtype):
        a certified bound checks the output (a float64 Gram matrix and one Cholesky
        factorization; :func:`spectral_norm_bound` only where that does not settle it) and
        scales a matrix that float rounding left above it (inputs ~1e5 x the cap and more)
        down to the cap; the polynomial's pre-scale uses that bound too. Eagerly on CPU
        the only host reads are those tests' flags (one per certificate).
    """
    if method == "auto" and isinstance(W, torch.Tensor) and W.dim() >= 2:
        method = choose("hard_cap_method", W.device, W.dtype, tuple(W.shape[-2:]))
    if isinstance(W, torch.Tensor) and W.dim() >= 2 and W.dtype.is_floating_point and W.numel() > 0 \
            and method == "polynomial" and math.isfinite(float(sigma_max)) and float(sigma_max) > 0:
        # the op's own pre-scale uses power iteration (a lower bound): a certified bound first,
        # paid in full only when the one-factorization test cannot certify the range
        if not _all_certified_below_fp32(W, POLYNOMIAL_PRESCALE * float(sigma_max)) \
                and not _all_certified_at_most(W, POLYNOMIAL_PRESCALE * float(sigma_max)):
            ub = spectral_norm_bound(W, target=POLYNOMIAL_PRESCALE * float(sigma_max))
            W = _scale_matrices(W, POLYNOMIAL_PRESCALE * float(sigma_max) / ub)
    slack = _HARD_CAP_SLACK.get(method, 0.0)
    if method == "eigh" and _certifies_itself(W, sigma_max, steps, iters):
        # the float32 CPU eigh cap proves its own output (docs/kernels.md): the guard's
        # Gram matrix and factorization only for the matrices it could not prove
        out, certified = torch.ops.lipschitz._spectral_hard_cap_eigh_certified.default(W, float(sigma_max), slack)
        return out if bool(certified.all()) else _guard_cap(out, float(sigma_max), slack)
    out = torch.ops.lipschitz._spectral_hard_cap.default(W, float(sigma_max), str(method), int(steps), int(iters))
    return _guard_cap(out, float(sigma_max), slack)


def _certifies_itself(W, sigma_max, steps, iters) -> bool:
    """Whether the eigh cap runs as ``_spectral_hard_cap_eigh_certified``: float32 CPU weights, a
    finite cap > 0, eagerly (its host read of the flags would break a traced graph), and float32
    GEMMs that round in float32 (matmul precision "highest"; the bound assumes it). Arguments out
    of range go to ``_spectral_hard_cap``, whose errors name them."""
    return (isinstance(steps, int) and 1 <= steps <= 100 and isinstance(iters, int) and 1 <= iters <= 10000
            and isinstance(W, torch.Tensor) and W.dtype == torch.float32 and W.device.type == "cpu"
            and W.dim() >= 2 and W.numel() > 0 and isinstance(sigma_max, (int, float))
            and math.isfinite(sigma_max) and sigma_max > 0 and not torch.compiler.is_compiling()
            and torch.get_float32_matmul_precision() == "highest")


#: the documented accuracy of each method: the guard leaves outputs within it untouched
_HARD_CAP_SLACK = {"eigh": 1e-3, "msign": 5e-3, "polynomial": 0.011}


def _all_certified_at_most(W: torch.Tensor, t: float) -> bool:
    """The host-side fast test: every matrix certified under ``t`` (False while tracing or on
    meta tensors, which keep the branch-free full bound)."""
    if torch.compiler.is_compiling() or W.device.type == "meta":
        return False
    return bool(certified_at_most(W, t).all())


def _all_certified_below_fp32(W: torch.Tensor, t: float) -> bool:
    """The polynomial pre-scale's first test (``t = 3 sigma_max``, far above any rounding): every
    matrix certified under ``t`` from its float32 Gram matrix ``A`` and a float64 Cholesky factor
    of ``(t^2 - e) I - A``. ``e`` bounds the GEMM's rounding in any summation order:
    ``|fl(A) - A| <= g |W|^T |W|`` elementwise, ``g = l u / (1 - l u)`` (``l`` the large side,
    ``u = 2^-24``), so ``||fl(A) - A||_2 <= g ||W||_F^2 <= g tr(fl A) / (1 - g)``, plus ``2^-149``
    per product for underflow. False (the float64 test decides) for float64 weights, a float32
    matmul precision other than ``"highest"`` (the GEMM may then round to bf16), an overflow or
    a non-finite entry, while tracing and on meta tensors."""
    if W.dtype == torch.float64 or torch.get_float32_matmul_precision() != "highest" \
            or torch.compiler.is_compiling() or W.device.type == "meta":
        return False
    m, n = W.shape[-2:]
    k, big = min(m, n), max(m, n)
    X = W.reshape(-1, m, n).float()
    with torch.autocast(W.device.type, enabled=False):  # the bound is for float32 rounding
        A = (X.mT @ X if m >= n else X @ X.mT).double()
    g = big * 2.0**-24 / (1.0 - big * 2.0**-24)
    e = g * A.diagonal(dim1=-2, dim2=-1).sum(-1) / (1.0 - g) + k * big * 2.0**-149
    ok = _cholesky_certifies(A, float(t) * float(t) - e) & torch.isfinite(e) & (float(t) * float(t) > e)
    return bool(ok.all())


def _scale_matrices(W: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``W * min(1, c)`` per matrix (``c`` float64 ``W.shape[:-2]``; NaN stays NaN)."""
    c = torch.where(torch.isnan(c), c, c.clamp(max=1.0))
    return (W.double() * c[..., None, None]).to(W.dtype) if W.dtype != torch.float64 else W * c[..., None, None]


def _guard_cap(out: torch.Tensor, cap: float, slack: float) -> torch.Tensor:
    """Scale any matrix of ``out`` whose certified ``sigma_max`` exceeds ``cap (1 + slack)`` down to ``cap``.

    Outputs already within the method's accuracy are returned unchanged; the others (far
    out-of-range inputs, where float32 rounding defeats the method) are brought under the cap.
    """
    if out.numel() == 0 or cap == 0:
        return out
    # the common case (a training step's output within the cap) costs one Gram + one Cholesky;
    # the host-side test keeps the full bound off that path (traced code keeps the branch-free one)
    if _all_certified_at_most(out, cap * (1.0 + slack)):
        return out
    ub = spectral_norm_bound(out, target=cap * (1.0 + slack))
    return _scale_matrices(out, torch.where(ub <= cap * (1.0 + slack), torch.ones_like(ub), cap / ub))


#: Methods understood by :func:`orthogonal_project` (besides ``"auto"``).
ORTHOGONAL_PROJECT_METHODS = ("msign", "gram")


def orthogonal_project(W: torch.Tensor, sigma_max: float = 1.0, steps: int = 10, method: str = "auto") -> torch.Tensor:
    """Projection to the scaled Stiefel manifold: ``sigma_max * msign(W)``.

    Every nonzero singular value becomes ``sigma_max`` (zero ones stay ~0), by
    ``steps`` Polar Express Newton-Schulz steps on ``W / (1.01 ||W||_F)``: singular
    values far below ``||W||_F`` converge last. ``W``: ``[..., m, n]``; returns a
    new tensor of W's shape and dtype, every singular value ``<= 1.005 sigma_max``
    for any finite input (certified, as in :func:`spectral_hard_cap`).

    ``method``: ``"msign"`` (the ``lipschitz::orthogonal_project`` op: standard
    Newton-Schulz), ``"gram"`` (the same polynomial by Gram Newton-Schulz,
    :func:`lipschitz_ext.ops.orthogonalize` ``(algorithm="gram", eps=0)`` in the caps'
    GEMM dtype: fewer multiply-adds from aspect ~3 up) or ``"auto"`` (default: the
    measured rule, :func:`lipschitz_ext.ops.choices.choose`).
    """
    if method == "auto" and isinstance(W, torch.Tensor) and W.dim() >= 2:
        method = choose("orthogonal_project_method", W.device, W.dtype, tuple(W.shape[-2:]))
    if method == "gram":
        if not math.isfinite(float(sigma_max)) or float(sigma_max) < 0:
            raise ValueError(f"orthogonal_project: argument 'sigma_max' must be finite and >= 0, got {sigma_max}")
        _, gemm = R.cap_dtypes(W.device, W.dtype) if W.dtype.is_floating_point else (None, None)
        out = orthogonalize(W, int(steps), "polar_express", eps=0.0, compute_dtype=gemm, algorithm="gram")
        out = out * sigma_max
    elif method in ("msign", "auto"):
        out = torch.ops.lipschitz.orthogonal_project.default(W, float(sigma_max), int(steps))
    else:
        raise ValueError(f"orthogonal_project: argument 'method' must be 'auto' or one of "
                         f"{ORTHOGONAL_PROJECT_METHODS}, got {method!r}")
    return _guard_cap(out, float(sigma_max), 5e-3)


def svd_cap(W: torch.Tensor, sigma_max: float = 1.0) -> torch.Tensor:
    """Exact ``U min(S, sigma_max) V^T`` by SVD: the ground truth and the slow baseline.

    ``torch.linalg.svd`` in float32 (float64 for float64 input) on CPU (LAPACK)
    and CUDA (cuSOLVER). Raises on non-finite input (the SVD is undefined there).
    ``W``: ``[..., m, n]``; returns a new tensor of W's shape and dtype.
    """
    return torch.ops.lipschitz.svd_cap.default(W, float(sigma_max))


def _same_fake(W, *args):
    torch._check(W.dim() >= 2, lambda: "argument 'W' must have rank >= 2")
    torch._check(W.dtype.is_floating_point, lambda: "argument 'W' must be floating")
    return W.new_empty(W.shape)


@torch.library.register_fake("lipschitz::spectral_soft_cap.per_matrix")
def _soft_cap_per_matrix_fake(W, alpha):
    check_same_device("spectral_soft_cap", "W", {"W": W, "alpha": alpha})
    return _same_fake(W)


@torch.library.register_fake("lipschitz::_spectral_hard_cap_eigh_certified")
def _eigh_certified_fake(W, sigma_max=1.0, slack=1e-3):
    return _same_fake(W), W.new_empty(W.shape[:-2], dtype=torch.bool)


for _name in (
    "spectral_soft_cap",
    "_spectral_hard_cap",
    "orthogonal_project",
    "svd_cap",
):
    torch.library.register_fake(f"lipschitz::{_name}")(_same_fake)



# ---------------------------------------------------------------------------
# autograd: the backward reruns these mirrors of the kernels (csrc/spectral_cap.h) and takes
# their vjp (lipschitz_ext/ops/_recompute.py). The exact caps (eigh, svd_cap) differentiate
# U min(S, b) V^T by the Daleckii-Krein formula in float64.


def _soft_cap_mirror(W, alpha):
    st, gemm = R.cap_dtypes(W.device, W.dtype)
    if W.numel() == 0:
        return W.new_zeros(W.shape)
    X = W.reshape(-1, *W.shape[-2:]).to(st)
    Xg = X.to(gemm)
    if isinstance(alpha, torch.Tensor):
        a = alpha.reshape(-1, 1, 1).expand(X.shape[0], 1, 1).to(R.float_or_double(st))
        A = (R.small_side_gram(Xg) * a).to(gemm)
    else:
        A = R.small_side_gram(Xg, alpha)
    H = torch.bmm(A, A)
    Rm = torch.add(H, A, alpha=-3.0)
    Rm.diagonal(0, -2, -1).add_(3.0)
    P = torch.bmm(H, Rm)
    if X.dtype == gemm:
        out = R.small_side_update(X, P, -1.0)
    else:
        WP = torch.bmm(Xg, P) if X.shape[1] > X.shape[2] else torch.bmm(P, Xg)
        out = X - WP.to(X.dtype)
    return out.reshape(W.shape).to(W.dtype)


def _hard_cap_msign(X, b, steps, gemm):
    tall = X.shape[1] > X.shape[2]
    Q = R.msign_batched(X, steps, gemm, gram=True)
    D = Q * b - X
    Rs = R.msign_batched(D, steps, gemm, gram=True)
    Dg, Rg, Qg = D.to(gemm), Rs.to(gemm), Q.to(gemm)
    T = torch.bmm(Dg, torch.bmm(Rg.mT, Qg)) if tall else torch.bmm(torch.bmm(Dg, Rg.mT), Qg)
    return (Q * b + X - T.to(X.dtype)) * 0.5


def _big_branch(sigma):
    """``sigma`` where it exceeds the pre-scale, else the pre-scale itself (``3 / that`` is then
    1, the value of ``min(1, 3 / sigma)``), so the unused branch's derivative ``-3 / sigma^2``
    cannot overflow to inf for tiny sigma (0 * inf = NaN)."""
    return torch.where(sigma > POLYNOMIAL_PRESCALE, sigma, torch.full_like(sigma, POLYNOMIAL_PRESCALE))


def _hard_cap_polynomial(X, b, iters, gemm):
    if R.cap_uses_gram(X, gemm):  # the pre-scale's estimate on the Gram matrix the steps start from
        Xg = X.to(gemm)
        G = R.small_side_gram(Xg)
        v = R._start_vector(G, None)
        for _ in range(iters):
            v = R._normalize_rows(torch.bmm(G, v))
        sigma = torch.linalg.vector_norm(torch.bmm(G, v), dim=(-2, -1), keepdim=True).sqrt() / b
        sigma = sigma.clamp_min(1e-30)
        f = torch.minimum(torch.ones_like(sigma), R.scalar_div(POLYNOMIAL_PRESCALE, _big_branch(sigma))) / b
        out = R.gram_newton_schulz_steps(Xg * f, R.hard_cap_polynomial_plan()[1], G * (f * f), restart=False)
        return out.to(X.dtype) * b
    Y = X / b
    sigma, _, _ = R.power_iteration_batched(Y.to(R.float_or_double(Y.dtype)), iters, None)
    sigma = sigma.clamp_min(1e-30)
    c = torch.minimum(torch.ones_like(sigma), R.scalar_div(POLYNOMIAL_PRESCALE, _big_branch(sigma)))
    Y = (Y * c.reshape(-1, 1, 1)).to(gemm)
    return R.cap_ns_steps(Y, R.hard_cap_polynomial_plan()[1], gram=True).to(X.dtype) * b


def _exact_cap_float64(W, sigma_max):
    X = W.reshape(-1, *W.shape[-2:]).to(torch.float64)
    s = R.max_abs_scale(X)
    return (R.exact_cap(X / s, R.scalar_div(sigma_max, s)) * s).reshape(W.shape).to(W.dtype)


def _hard_cap_mirror(W, sigma_max=1.0, method="msign", steps=10, iters=16):
    if W.numel() == 0:
        return W.new_zeros(W.shape)
    if sigma_max == 0.0:
        return W * 0
    if method == "eigh":
        return _exact_cap_float64(W, sigma_max)
    st, gemm = R.cap_dtypes(W.device, W.dtype)
    W3 = W.reshape(-1, *W.shape[-2:]).to(R.float_or_double(W.dtype))
    s = R.max_abs_scale(W3)
    X = (W3 / s).to(st)
    bs = R.scalar_div(sigma_max, s).to(X.dtype)
    out = _hard_cap_msign(X, bs, steps, gemm) if method == "msign" else _hard_cap_polynomial(X, bs, iters, gemm)
    return (out.to(W3.dtype) * s).reshape(W.shape).to(W.dtype)


def _orthogonal_project_mirror(W, sigma_max=1.0, steps=10):
    st, gemm = R.cap_dtypes(W.device, W.dtype)
    if W.numel() == 0:
        return W.new_zeros(W.shape)
    X = W.reshape(-1, *W.shape[-2:]).to(st)
    return (R.msign_batched(X, steps, gemm) * sigma_max).reshape(W.shape).to(W.dtype)


def _svd_cap_mirror(W, sigma_max=1.0):
    if W.numel() == 0:
        return W.new_zeros(W.shape)
    return _exact_cap_float64(W, sigma_max)


R.register_recompute_autograd("lipschitz::spectral_soft_cap", _soft_cap_mirror)
R.register_recompute_autograd("lipschitz::spectral_soft_cap.per_matrix", _soft_cap_mirror)
R.register_recompute_autograd("lipschitz::_spectral_hard_cap", _hard_cap_mirror)
R.register_recompute_autograd(
    "lipschitz::_spectral_hard_cap_eigh_certified",
    lambda W, sigma_max=1.0, slack=1e-3: (_hard_cap_mirror(W, sigma_max, "eigh"),
                                          torch.zeros(W.shape[:-2], dtype=torch.bool, device=W.device)))
R.register_recompute_autograd("lipschitz::orthogonal_project", _orthogonal_project_mirror)
R.register_recompute_autograd("lipschitz::svd_cap", _svd_cap_mirror)
