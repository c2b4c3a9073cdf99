"""lipschitz::orthogonalize: Muon's msign by Newton-Schulz (wrapper + fake kernel)."""


from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional, Union, get_args

import torch

from . import _recompute as R
from .choices import choose

__all__ = ["orthogonalize", "ns_polynomial", "ns_max_gain", "ALGORITHMS", "BACKENDS", "COEFFICIENT_SETS",
           "COMPUTE_DTYPES"]

#: ``backend`` values of :func:`orthogonalize` (the CUDA Newton-Schulz kernels).
Backend = Literal["default", "cublas", "symmetric"]
BACKENDS: tuple[str, ...] = get_args(Backend)

#: ``compute_dtype`` values :func:`orthogonalize` accepts (besides None, the device default).
COMPUTE_DTYPES = (torch.bfloat16, torch.float32, torch.float64)

#: Named Newton-Schulz coefficient sets understood by :func:`orthogonalize`.
COEFFICIENT_SETS = ("jordan", "you", "jiacheng", "polar_express")

Coefficients = Union[str, Sequence[Sequence[float]]]


def _coefficient_args(coefficients: Coefficients) -> tuple[str, list[float]]:
    if isinstance(coefficients, str):
        return coefficients, []
    flat: list[float] = []
    for i, triple in enumerate(coefficients):
        t = tuple(float(x) for x in triple)
        if len(t) != 3:
            raise ValueError(
                f"orthogonalize: argument 'coefficients' must hold (a, b, c) triples; "
                f"entry {i} has {len(t)} values"
            )
        flat.extend(t)
    return "custom", flat


def _compute_dtype_arg(compute_dtype) -> Optional[torch.dtype]:
    if compute_dtype is None:
        return None
    dt = compute_dtype
    if isinstance(dt, str):
        dt = getattr(torch, dt.removeprefix("torch."), None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"orthogonalize: argument 'compute_dtype' must be one of 'bfloat16', 'float32', "
                             f"'float64', a torch dtype or None, got {compute_dtype!r}")
    if not isinstance(dt, torch.dtype):
        raise TypeError(f"orthogonalize: argument 'compute_dtype' must be a torch.dtype, a dtype name or None, "
                        f"got {type(compute_dtype).__name__}")
    if dt not in COMPUTE_DTYPES:
        raise ValueError(f"orthogonalize: argument 'compute_dtype' must be bfloat16, float32 or float64, got {dt}")
    return dt


def orthogonalize(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: Coefficients = "polar_express",
    eps: float = 1e-7,
    compute_dtype: Union[torch.dtype, str, None] = None,
    algorithm: str = "standard",
    backend: Backend = "default",
) -> torch.Tensor:
    """Muon's msign: approximately ``U V^T`` for ``G = U S V^T``, by Newton-Schulz.

    Args:
        G: ``[..., m, n]`` floating tensor; leading dims are independent
            matrices. Tall or wide (the Gram matrix is always the small side).
        steps: number of Newton-Schulz steps (>= 1).
        coefficients: ``"jordan"``, ``"you"``, ``"jiacheng"``, ``"polar_express"``
            (default; with its bf16 safety factor 1.01), or an explicit list of
            ``(a, b, c)`` triples. Step ``i`` uses triple ``min(i, len - 1)``: past
            the end of a table the last triple repeats.
        eps: added to the normalizer ``||G||_F * (1.01 for polar_express else 1)``.
        compute_dtype: the dtype of the Newton-Schulz GEMMs: ``torch.bfloat16``
            (fp32 accumulation, bf16 rounding of each product: singular values land
            within ~1e-2 of the composite polynomial's), ``torch.float32``,
            ``torch.float64``, their names, or None (default) for the device
            default: bf16 on CUDA, float32 on CPU, float64 for float64 input. The
            Frobenius normalizer is always accumulated in float64.
            :func:`lipschitz_ext.ops.choices.native_bf16_matmul` says where bf16 pays.
        algorithm: ``"standard"`` (default): each step on ``X`` (three GEMMs, two of
            them ``k x k x l`` for ``k = min(m, n)``, ``l = max(m, n)``); ``"gram"``: the
            same polynomial by Gram Newton-Schulz (``lipschitz::orthogonalize_gram``: the
            steps on the small Gram matrix ``X X^T`` with restarts, ``k x k`` GEMMs but for
            ``~4 k^2 l`` multiply-adds in all; pays from aspect ``l / k`` ~3 up); ``"auto"``:
            the measured rule of :func:`lipschitz_ext.ops.choices.choose` for this device,
            dtype, thread count and shape. Both give the same singular values up to
            rounding (docs/kernels.md, "Gram Newton-Schulz").
        backend: the kernels of the standard steps on CUDA: ``"cublas"`` (three
            batched cuBLAS GEMMs per step, the reference), ``"symmetric"`` (upper-
            triangle tiles, mirrored stores; bf16 compute only) or ``"default"``:
            the environment variable ``LIPSCHITZ_NS_BACKEND`` (``"cublas"`` when
            unset). The CPU kernel takes ``"default"`` only; ``algorithm="gram"``
            ignores it. A value the device does not implement raises, naming
            ``backend``.

    Returns:
        Tensor of G's shape and dtype. Each singular value ``s`` of ``G`` becomes
        ``p(s / (||G||_F * scale + eps))`` where ``p`` is the composite odd
        polynomial of the steps (near 1 for Polar Express), up to the rounding
        of ``compute_dtype``. Non-finite input yields NaN output.
    """
    name, custom = _coefficient_args(coefficients)
    if _algorithm(algorithm, G, compute_dtype) == "gram":
        if backend not in BACKENDS:
            raise ValueError(f"orthogonalize: argument 'backend' must be one of {BACKENDS}, got {backend!r}")
        return torch.ops.lipschitz.orthogonalize_gram.default(
            G, int(steps), name, custom, float(eps), _compute_dtype_arg(compute_dtype))
    return torch.ops.lipschitz.orthogonalize.default(
        G, int(steps), name, custom, float(eps), _compute_dtype_arg(compute_dtype), str(backend))


#: ``algorithm`` values :func:`orthogonalize` accepts.
ALGORITHMS = ("standard", "gram", "auto")


def _algorithm(algorithm: str, G: torch.Tensor, compute_dtype) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"orthogonalize: argument 'algorithm' must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm != "auto":
        return algorithm

    if not isinstance(G, torch.Tensor) or G.dim() < 2:
        return "standard"  # the op names the bad argument
    dt = _compute_dtype_arg(compute_dtype) or R.ns_compute_dtype(G.device, G.dtype, None)
    return choose("ns_algorithm", G.device, dt, tuple(G.shape[-2:]))


@torch.library.register_fake("lipschitz::orthogonalize")
@torch.library.register_fake("lipschitz::orthogonalize_gram")
def _orthogonalize_fake(G, steps=5, coefficients="polar_express", custom=(), eps=1e-7, compute_dtype=None,
                        backend="default"):
    torch._check(backend in BACKENDS,
                 lambda: f"orthogonalize: argument 'backend' must be one of {BACKENDS}, got {backend!r}")
    torch._check(G.dim() >= 2, lambda: "orthogonalize: argument 'G' must have rank >= 2")
    torch._check(G.dtype.is_floating_point, lambda: "orthogonalize: argument 'G' must be floating")
    return G.new_empty(G.shape)


def ns_polynomial(
    s: torch.Tensor, steps: int = 5, coefficients: Coefficients = "polar_express"
) -> torch.Tensor:
    """The composite odd polynomial ``p`` of :func:`orthogonalize`'s steps, elementwise.

    ``orthogonalize`` maps each singular value ``sigma`` of ``G`` to
    ``p(sigma / (||G||_F * scale + eps))``; this evaluates ``p`` itself (evaluated in
    float64, returned in ``s``'s dtype and shape).
    """
    name, custom = _coefficient_args(coefficients)
    return torch.ops.lipschitz.ns_polynomial.default(s, int(steps), name, custom)


#: The coarsest grid :func:`ns_max_gain` accepts.
MIN_GAIN_GRID = 10_001


def ns_max_gain(steps: int = 5, coefficients: Coefficients = "polar_express", grid: int = 200_001) -> float:
    """``p_max``: the largest value the composite polynomial takes on ``(0, 1]``.

    After normalization every singular value lies in ``(0, 1]``, so a Muon update
    ``msign(M)`` has spectral norm at most ``p_max`` (1.14502 for the 5-step "You"
    set). Evaluated on a log-spaced grid from 1e-7 to 1 in float64 (the composite is
    odd and smooth; the grid resolves its peaks to ~1e-6 relative). ``grid`` must be an
    int >= ``MIN_GAIN_GRID``: a coarser grid misses the peaks and would under-state ``p_max``.
    """
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < MIN_GAIN_GRID:
        raise ValueError(f"ns_max_gain: argument 'grid' must be an int >= {MIN_GAIN_GRID} (a coarser grid "
                         f"misses the polynomial's peaks), got {grid!r}")
    x = torch.logspace(-7, 0, grid, dtype=torch.float64)
    return float(ns_polynomial(x, steps, coefficients).max())


@torch.library.register_fake("lipschitz::ns_polynomial")
def _ns_polynomial_fake(s, steps=5, coefficients="polar_express", custom=()):
    return s.new_empty(s.shape)


# ---------------------------------------------------------------------------
# autograd: the backward reruns these mirrors of the kernels (csrc/cpu/orthogonalize.cpp)
# and takes their vjp (lipschitz_ext/ops/_recompute.py)


def _orthogonalize_mirror(G, steps=5, coefficients="polar_express", custom=(), eps=1e-7, compute_dtype=None,
                          backend="default", iterate=R.newton_schulz_steps):
    # every backend computes the same steps; the gradient is the cuBLAS path's
    norm_scale, triples = R.ns_plan(steps, coefficients, custom)
    compute = R.ns_compute_dtype(G.device, G.dtype, compute_dtype)
    if G.numel() == 0:
        return G.new_zeros(G.shape)
    G3 = G.reshape(-1, G.shape[-2], G.shape[-1])
    norm = torch.linalg.vector_norm(G3, dim=(-2, -1), keepdim=True, dtype=torch.float64)
    denom = norm * norm_scale + eps
    inv = R.safe_reciprocal(denom)
    X = (G3.to(torch.float64) * inv).to(compute)
    if compute != torch.float64 and G.dtype != torch.float64:
        # the kernel multiplies in float32 when every 1/denom is a normal float32 (a host-side
        # test there; both branches here, so the backward traces)
        X = torch.where(denom.amax() < 1e30, (G3.to(torch.float32) * inv.to(torch.float32)).to(compute), X)
    return iterate(X, triples).reshape(G.shape).to(G.dtype)


def _orthogonalize_gram_mirror(G, steps=5, coefficients="polar_express", custom=(), eps=1e-7, compute_dtype=None):
    return _orthogonalize_mirror(G, steps, coefficients, custom, eps, compute_dtype, "default",
                                 R.gram_newton_schulz_steps)


def _ns_polynomial_mirror(s, steps=5, coefficients="polar_express", custom=()):
    x = s.to(torch.float64)
    for a, b, c in R.ns_plan(steps, coefficients, custom)[1]:
        x2 = x * x
        x = x * (a + x2 * (b + x2 * c))
    return x.to(s.dtype)


R.register_recompute_autograd("lipschitz::orthogonalize", _orthogonalize_mirror)
R.register_recompute_autograd("lipschitz::ns_polynomial", _ns_polynomial_mirror)
R.register_recompute_autograd("lipschitz::orthogonalize_gram", _orthogonalize_gram_mirror)
