"""The ops' backward: each op's forward recomputed with differentiable torch ops, then a vjp.

The C++ kernels are forward-only. Each differentiable op registers (next to its fake
kernel) a *mirror*: the same pipeline written with the same ATen calls in the same
order, coefficients, iteration counts, branches and working dtypes (on CPU the
mirror's output equals the kernel's bit for bit, the exact caps below aside;
``python_tests/test_op_autograd.py`` checks it). Its backward reruns the mirror under :func:`torch.enable_grad` and returns
:func:`torch.autograd.grad` of it: the exact gradient of the function the op computes
(the unrolled Newton-Schulz polynomial, power iteration, ...), at one extra forward
plus its reverse pass. Under ``create_graph=True`` the recompute stays on the graph, so
double backward works. Data-dependent branches of the kernels (a host-side ``.item()``)
are written as :func:`torch.where` over both branches so the backward traces under
``torch.compile``. The eigh/SVD caps are the exception: their derivative is the
Daleckii-Krein formula in float64 (:class:`_ExactCap`), stable where eigenvalues repeat.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

_DOUBLE = torch.float64


# ---------------------------------------------------------------------------
# the autograd registration shared by every recomputed op


#: op name ("lipschitz::orthogonalize", "lipschitz::spectral_soft_cap.per_matrix") -> its mirror
MIRRORS: dict[str, Callable[..., object]] = {}


def register_recompute_autograd(op: str, mirror: Callable[..., object]) -> None:
    """``torch.library.register_autograd(op)`` with the backward "rerun ``mirror``, take its vjp".

    ``mirror`` takes the op's arguments (in schema order, defaults filled) and returns
    what the op returns, computed by differentiable torch ops.
    """
    MIRRORS[op] = mirror

    def setup_context(ctx, inputs, output):
        ctx.args = tuple(None if isinstance(x, torch.Tensor) else x for x in inputs)
        ctx.tensor_pos = tuple(i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor))
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_pos))

    def backward(ctx, *grads):
        args = list(ctx.args)
        for i, t in zip(ctx.tensor_pos, ctx.saved_tensors):
            args[i] = t
        want = [i for i in ctx.tensor_pos if ctx.needs_input_grad[i]]
        result: list[Optional[torch.Tensor]] = [None] * len(args)
        if not want:
            return tuple(result)
        create_graph = torch.is_grad_enabled()  # True under backward(create_graph=True)
        with torch.enable_grad():
            for i in want:
                # keep the caller's graph for double backward; a fresh leaf otherwise
                if not (create_graph and args[i].requires_grad):
                    args[i] = args[i].detach().requires_grad_()
            outs = mirror(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in want], [g for _, g in pairs],
                                      allow_unused=True, create_graph=create_graph) if pairs else [None] * len(want)
        for i, g in zip(want, got):
            result[i] = torch.zeros_like(args[i]) if g is None else g
        return tuple(result)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def register_not_differentiable(op: str, why: str) -> None:
    """``op``'s backward raises NotImplementedError naming the op (instead of the autograd
    fallback's warning and silent results)."""

    def backward(ctx, *grads):
        raise NotImplementedError(f"lipschitz::{op} is not differentiable: {why}")

    torch.library.register_autograd(f"lipschitz::{op}", backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------
# working dtypes, as the device backends pick them (csrc/backend.h, csrc/cuda/*.cu)


def float_or_double(dtype: torch.dtype) -> torch.dtype:
    return _DOUBLE if dtype == _DOUBLE else torch.float32


def cap_dtypes(device: torch.device, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(state, gemm) dtypes of the spectral caps: float32 (float64) on CPU; on CUDA the
    iterate in float32 (bf16 stays bf16) and the GEMMs in bf16 (float64 stays float64)."""
    if dtype == _DOUBLE:
        return _DOUBLE, _DOUBLE
    if device.type == "cuda":
        return (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32), torch.bfloat16
    return torch.float32, torch.float32


def ns_compute_dtype(device: torch.device, dtype: torch.dtype, requested: Optional[torch.dtype]) -> torch.dtype:
    """orthogonalize's GEMM dtype: ``requested``, else bf16 on CUDA / float32 elsewhere (float64 stays)."""
    if requested is not None:
        return requested
    if dtype == _DOUBLE:
        return _DOUBLE
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ---------------------------------------------------------------------------
# Newton-Schulz (csrc/newton_schulz.h, csrc/ns_coefficients.h)

Plan = tuple[float, tuple[tuple[float, float, float], ...]]  # (norm_scale, triples)

_MAX_STEPS = 100
_TABLES: dict[str, Plan] = {}


def _unflatten(flat: Sequence[float]) -> Plan:
    return float(flat[0]), tuple(tuple(float(x) for x in flat[i:i + 3]) for i in range(1, len(flat), 3))


def ns_plan(steps: int, coefficients: str, custom: Sequence[float]) -> Plan:
    """The plan the kernels run: ``steps`` triples, the last one of a table repeating.

    The named tables come from the C++ ``lipschitz_internal::ns_plan`` op (read once, at import: the
    backward may be traced, where an op call is not allowed); ``custom`` was already
    validated by the forward.
    """
    if coefficients == "custom":
        table = [tuple(float(x) for x in custom[i:i + 3]) for i in range(0, len(custom), 3)]
        return 1.0, tuple(table[min(i, len(table) - 1)] for i in range(steps))
    scale, table = _TABLES[coefficients]
    return scale, table[:steps]


def hard_cap_polynomial_plan() -> Plan:
    return _TABLES["hard_cap_polynomial"]


#: (steps, compute dtype) -> the steps before which Gram Newton-Schulz restarts
_GRAM_RESTARTS: dict[tuple[int, torch.dtype], frozenset[int]] = {}


def gram_ns_restarts(steps: int, compute: torch.dtype) -> frozenset[int]:
    """The steps (0-based) before which ``orthogonalize_gram`` restarts (the C++ rule)."""
    return _GRAM_RESTARTS[(steps, compute)]


def _load_tables() -> None:
    for name in ("jordan", "you", "jiacheng", "polar_express"):
        _TABLES[name] = _unflatten(torch.ops.lipschitz_internal.ns_plan(_MAX_STEPS, name, []))
    _TABLES["hard_cap_polynomial"] = _unflatten(torch.ops.lipschitz_internal.hard_cap_polynomial_plan())
    for dt in (torch.bfloat16, torch.float16, torch.float32, _DOUBLE):
        for steps in range(1, _MAX_STEPS + 1):
            _GRAM_RESTARTS[(steps, dt)] = frozenset(torch.ops.lipschitz_internal.gram_ns_restarts(steps, dt))


_load_tables()


def newton_schulz_steps(X: torch.Tensor, triples: Sequence[tuple[float, float, float]]) -> torch.Tensor:
    """``X -> a X + b (X X^T) X + c (X X^T)^2 X`` per triple, on the small side (as the kernels)."""
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in triples:
        A = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, X, B, beta=a, alpha=1.0) if tall else torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return X


def gram_newton_schulz_steps(X0: torch.Tensor, triples: Sequence[tuple[float, float, float]],
                             R0: Optional[torch.Tensor] = None, restart: bool = True) -> torch.Tensor:
    """The same steps on the small Gram matrix, with restarts unless ``restart`` is False (as
    ``gram_newton_schulz_steps_from`` in csrc/newton_schulz.h: the same ATen calls in the same
    order; ``R0``: X0's Gram matrix when the caller has it)."""
    tall = X0.shape[-2] > X0.shape[-1]
    restarts = gram_ns_restarts(len(triples), X0.dtype) if restart else frozenset()
    X = X0.mT if tall else X0
    R = torch.bmm(X, X.mT) if R0 is None else R0
    Q = None
    for i, (a, b, c) in enumerate(triples):
        if i in restarts:
            X = torch.bmm(Q, X)
            R = torch.bmm(X, X.mT)
            Q = None
        P = torch.baddbmm(R, R, R, beta=b, alpha=c)
        P.diagonal(0, -2, -1).add_(a)
        Q = P if Q is None else torch.bmm(Q, P)
        if i + 1 < len(triples) and i + 1 not in restarts:
            R = torch.bmm(P, torch.bmm(R, P))
    X = torch.bmm(Q, X)
    return X.mT if tall else X


def scalar_div(c: float, t: torch.Tensor) -> torch.Tensor:
    """``c / t`` as ATen's C++ ``Scalar / Tensor`` computes it (a true division; Python's
    ``c / t`` multiplies by the reciprocal, which rounds differently)."""
    return torch.full_like(t, c) / t


def safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    """``1 / d`` with 0 where ``d == 0`` (its gradient stays finite there too)."""
    zero = d == 0
    return torch.where(zero, torch.zeros_like(d), torch.where(zero, torch.ones_like(d), d).reciprocal())


def cap_uses_gram(X: torch.Tensor, gemm: torch.dtype) -> bool:
    """``cap_uses_gram`` in spectral_cap.h: float32/float64 GEMMs and aspect >= 2."""
    k, big = min(X.shape[-2:]), max(X.shape[-2:])
    return gemm in (torch.float32, _DOUBLE) and big >= 2 * k


def cap_ns_steps(X: torch.Tensor, triples, gram: bool) -> torch.Tensor:
    """The hard cap's steps (``cap_ns_steps`` in spectral_cap.h): Gram Newton-Schulz for
    float32/float64 GEMMs at aspect >= 2 when ``gram``, else the standard steps."""
    if gram and cap_uses_gram(X, X.dtype):
        return gram_newton_schulz_steps(X, triples)
    return newton_schulz_steps(X, triples)


def msign_batched(X: torch.Tensor, steps: int, gemm: torch.dtype, gram: bool = False) -> torch.Tensor:
    """Polar Express msign of ``X [B, m, n]``, normalized by ``1.01 ||X||_F`` (spectral_cap.h)."""
    scale, triples = ns_plan(steps, "polar_express", ())
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=_DOUBLE)
    big = 1e300 if X.dtype == _DOUBLE else 1e38
    inv = torch.where(norm == 0, torch.zeros_like(norm), safe_reciprocal(norm * scale).clamp_max(big)).to(X.dtype)
    return cap_ns_steps((X * inv).to(gemm), triples, gram).to(X.dtype)


# ---------------------------------------------------------------------------
# power iteration (csrc/power_iteration.h)


def max_abs_scale(X3: torch.Tensor) -> torch.Tensor:
    """The power of two near ``max|X|`` per matrix ``[B, 1, 1]`` (1 for zero, NaN for non-finite).

    Piecewise constant in X (derivative 0), so computed without a graph."""
    with torch.no_grad():
        mx = X3.abs().amax(dim=(1, 2), keepdim=True)
        p2 = torch.exp2(torch.floor(torch.log2(mx.double()))).to(mx.dtype)
        nan = torch.full((), float("nan"), dtype=mx.dtype, device=mx.device)
        return torch.where(mx == 0, torch.ones_like(mx), torch.where(torch.isfinite(mx), p2, nan))


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-2, keepdim=True).clamp_min(1e-30)


def _start_vector(W3: torch.Tensor, u: Optional[torch.Tensor]) -> torch.Tensor:
    batch, m = W3.shape[0], W3.shape[1]
    i = torch.arange(1, m + 1, dtype=_DOUBLE, device=W3.device)
    u0 = (torch.frac(i * 0.6180339887498949) + 0.5).to(W3.dtype).expand(batch, m)
    if u is None:
        return u0.unsqueeze(-1)
    uu = u.reshape(batch, m).to(W3.dtype)
    nrm = torch.linalg.vector_norm(uu, dim=-1, keepdim=True)
    ok = (nrm > 0) & torch.isfinite(nrm)
    return torch.where(ok, uu, u0).unsqueeze(-1)


def power_iteration_batched(W3: torch.Tensor, iters: int,
                            u_init: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sigma [B], u [B, m], v [B, n])`` of ``W3 [B, m, n]`` as the kernels iterate: on
    ``W / max_abs_scale(W)``, through the small-side Gram matrix when that is cheaper."""
    s = max_abs_scale(W3)
    X = W3 / s
    m, n = X.shape[1], X.shape[2]
    small, large = min(m, n), max(m, n)
    u = _start_vector(X, u_init)
    v = None
    Xt = X.mT
    direct = 4.0 * iters * m * n
    gram = 2.0 * small * small * large + 2.0 * (iters - 1) * small * small + 4.0 * m * n
    if gram < direct and iters > 1:
        if m <= n:
            G = torch.bmm(X, Xt)
            for _ in range(iters - 1):
                u = _normalize_rows(torch.bmm(G, u))
            v = _normalize_rows(torch.bmm(Xt, u))
        else:
            G = torch.bmm(Xt, X)
            v = _normalize_rows(torch.bmm(Xt, u))
            for _ in range(iters - 1):
                v = _normalize_rows(torch.bmm(G, v))
        iters = 1
    Wv = None
    for i in range(iters):
        if i > 0 or v is None:
            v = _normalize_rows(torch.bmm(Xt, u))
        Wv = torch.bmm(X, v)
        u = _normalize_rows(Wv)
    if Wv is None:
        Wv = torch.bmm(X, v)
    sigma = torch.linalg.vector_norm(Wv, dim=(-2, -1)) * s.reshape(-1)
    return sigma, u.squeeze(-1), v.squeeze(-1)


# ---------------------------------------------------------------------------
# the exact cap U min(S, b) V^T (hard_cap_eigh in csrc/spectral_cap.h; svd_cap)


def small_side_gram(X: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """``c X^T X`` (tall X) or ``c X X^T`` (wide or square), as the kernels form it."""
    tall = X.shape[1] > X.shape[2]
    L, R = (X.mT, X) if tall else (X, X.mT)
    if c == 1.0:
        return torch.bmm(L, R)
    k = L.shape[1]
    return torch.baddbmm(X.new_zeros(X.shape[0], k, k), L, R, beta=0.0, alpha=c)


def small_side_update(X: torch.Tensor, M: torch.Tensor, c: float) -> torch.Tensor:
    """``X + c X M`` (tall X) or ``X + c M X`` (wide or square)."""
    tall = X.shape[1] > X.shape[2]
    return torch.baddbmm(X, X, M, beta=1.0, alpha=c) if tall else torch.baddbmm(X, M, X, beta=1.0, alpha=c)


class _ExactCap(torch.autograd.Function):
    """``X - X F(G)`` with ``G`` the small-side Gram matrix and ``F(G) = V diag(g(l)) V^T``,
    ``g(l) = max(0, 1 - b / sqrt(l))``: the exact cap ``U min(S, b) V^T`` of ``X [B, m, n]``
    for a per-matrix ``b [B, 1, 1]`` (no gradient), in X's dtype.

    Backward: the Daleckii-Krein derivative of the matrix function ``F``, ``dF = V (Gamma o
    V^T dG V) V^T`` with ``Gamma_ij = (g_i - g_j) / (l_i - l_j)`` and ``g'`` where the
    eigenvalues (nearly) coincide: finite for repeated and zero singular values, where the
    eigenvector derivative that ``torch.linalg.eigh``'s backward uses is not.
    """

    @staticmethod
    def forward(ctx, X, b):
        lam, V = torch.linalg.eigh(small_side_gram(X))
        g = (1.0 - b.reshape(-1, 1) * torch.rsqrt(lam.clamp_min(0))).clamp_min(0)
        M = torch.bmm(V * g.unsqueeze(-2), V.mT)
        ctx.save_for_backward(X, b, lam, V, g, M)
        return small_side_update(X, M, -1.0)

    @staticmethod
    def backward(ctx, gY):
        X, b, lam, V, g, M = ctx.saved_tensors
        with torch.no_grad():
            gX = _exact_cap_vjp(X, b, lam, V, g, M, gY)
        if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative raises
            gX = _NoDoubleBackward.apply(gX, X, gY)
        return gX, None


def _exact_cap_vjp(X, b, lam, V, g, M, gY):
    tall = X.shape[1] > X.shape[2]
    # Y = X - X M (tall) / X - M X (wide): the direct term and the gradient reaching M
    gX = small_side_update(gY, M, -1.0)
    gM = -(X.mT @ gY) if tall else -(gY @ X.mT)
    # M = F(G): Daleckii-Krein with divided differences of g
    bb = b.reshape(-1, 1)
    lpos = lam.clamp_min(0)
    dg = torch.where(g > 0, 0.5 * bb * lpos.clamp_min(torch.finfo(lam.dtype).tiny) ** -1.5, torch.zeros_like(g))
    dl = lam.unsqueeze(-1) - lam.unsqueeze(-2)
    dgv = g.unsqueeze(-1) - g.unsqueeze(-2)
    scale = lam.abs().amax(-1, keepdim=True).unsqueeze(-1).clamp_min(torch.finfo(lam.dtype).tiny)
    close = dl.abs() <= 1e3 * torch.finfo(lam.dtype).eps * scale
    mid = 0.5 * (dg.unsqueeze(-1) + dg.unsqueeze(-2))
    gamma = torch.where(close, mid, dgv / torch.where(close, torch.ones_like(dl), dl))
    gG = V @ (gamma * (V.mT @ (0.5 * (gM + gM.mT)) @ V)) @ V.mT
    # G = X^T X (tall) / X X^T (wide); gG is symmetric
    return gX + (2.0 * (X @ gG) if tall else 2.0 * (gG @ X))


class _NoDoubleBackward(torch.autograd.Function):
    """Passes the exact caps' gradient through; differentiating it again raises."""

    @staticmethod
    def forward(ctx, grad, *inputs):
        return grad.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "lipschitz::_spectral_hard_cap (method='eigh') and lipschitz::svd_cap: double backward "
            "(a derivative of the gradient) is not implemented")


def exact_cap(X: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact cap of ``X [B, m, n]`` at ``b [B, 1, 1]``, NaN for a matrix with a non-finite entry."""
    finite = torch.isfinite(X).flatten(1).all(1).reshape(-1, 1, 1)
    Xs = torch.where(finite, X, torch.zeros((), dtype=X.dtype, device=X.device))
    out = _ExactCap.apply(Xs, b)
    return torch.where(finite, out, torch.full((), float("nan"), dtype=X.dtype, device=X.device))
