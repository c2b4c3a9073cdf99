"""lipschitz::fp8_attention: fp8 (e4m3) attention with static scales (wrapper, fake
kernels, autograd, and a saturation counter).

Forward (``csrc/fp8_attention.h`` states the exact arithmetic): q, k, v are
quantized to e4m3 as ``q * (1/q_scale)`` clamped to +-448, the scores
``(q8 k8^T) * q_scale * k_scale * softmax_scale`` go through an online softmax in
float32 over key tiles of 128, each tile's probabilities ``p in [0, 1]`` are
multiplied by 2^8 and cast to e4m3, ``P8 v8`` accumulates in float32, and the
result is ``acc * v_scale / (256 * rowsum(p))`` in bf16. On sm_90a both GEMMs run
on fp8 tensor cores (wgmma); other GPUs use an ATen emulation of the same
rounding; the CPU kernel is that emulation (the reference for tests).

fp8 inputs: q, k, v may be given already in ``float8_e4m3fn`` (``q = q8 *
q_scale``), e.g. quantized by :func:`quantize_e4m3` where they are produced; the
op then skips its quantization (on sm_90a only V's byte transpose remains) and
the result is bit for bit that of the bf16 inputs quantized with the same scales.
e4m3 tensors cannot carry useful gradients (autograd would round them to e4m3):
for training, :func:`fp8_attention_e4m3_inputs` quantizes bf16 inputs itself and
takes the gradient at the bf16 values.

Backward (straight-through for the quantization: a gradient of softmax
attention at the bf16 ``q, k, v``), FlashAttention's formulas in bf16 on CUDA
(PyTorch's kernels), in float32 ATen on CPU (chunked over query rows):

- ``backward="exact"`` (default): exact attention's gradient; on CUDA a bf16
  FlashAttention forward first recomputes the exact output and log-sum-exp.
- ``backward="saved"``: fed with the fp8 forward's own output and log-sum-exp,
  no recompute (faster) but fp8-sized gradient errors, since D = rowsum(dO * out)
  and P = exp(S - lse) inherit them (~7% of max|dq| at N=300, causal, d=64,
  where "exact" stays at bf16 rounding).

``backward_kernel`` picks the kernel that computes it, saved by the autograd
formula with the forward's other arguments: ``"flash"`` PyTorch's FlashAttention-2
backward, ``"cudnn"`` cuDNN's SDPA backward where available (cuDNN >= 9,
``torch.backends.cuda.cudnn_sdp_enabled()``, compute capability >= 8), falling
back to FlashAttention-2 otherwise, ``"math"`` the float32 ATen backward (the
CPU's), or ``"default"``: the environment variable ``LIPSCHITZ_FP8_ATTN_BWD``
(same names, read when the backward runs; ``"flash"`` when unset). GPUs of
compute capability < 8 run the math whatever the request; the CPU takes
``"default"`` and ``"math"`` only. :func:`fp8_attention_bwd_path` says which
kernel runs.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, get_args

import torch

from . import _recompute as R
from ._checks import check_same_device

__all__ = [
    "fp8_attention",
    "fp8_attention_e4m3_inputs",
    "fp8_attention_bwd_path",
    "fp8_saturation_count",
    "quantize_e4m3",
    "E4M3_MAX",
    "BACKWARD_KERNELS",
]

#: ``backward_kernel`` values of :func:`fp8_attention` (see the module docstring).
BackwardKernel = Literal["default", "math", "flash", "cudnn"]
BACKWARD_KERNELS: tuple[str, ...] = get_args(BackwardKernel)
#: ``backward`` values: which statistics the gradient uses.
Backward = Literal["exact", "saved"]

#: Largest finite float8 e4m3 value; quantized inputs are clamped to +-E4M3_MAX.
E4M3_MAX = 448.0

_FP8 = torch.float8_e4m3fn


def _f32(x: float) -> float:
    # x rounded to float32, as the kernels hold their constants.
    return float(torch.tensor(x, dtype=torch.float32))


def _check_scale(op: str, name: str, s: float) -> float:
    s = float(s)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"{op}: argument '{name}' must be finite and > 0, got {s}")
    return s


def quantize_e4m3(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``e4m3(clamp(x * float32(1/scale), +-448))``: the quantization the fp8 kernels apply.

    The product is a float32 multiply by the float32 reciprocal, rounded to
    nearest even and clamped (a raw e4m3 cast would turn overflow into NaN). Pass
    the result with the same ``scale`` to :func:`fp8_attention`: the output equals
    that of the unquantized ``x`` (for bf16 ``x``, bit for bit). ATen elementwise
    ops, so ``torch.compile`` fuses it with whatever produced ``x`` (a projection's
    RoPE). Not differentiable (see :func:`fp8_attention_e4m3_inputs`).

    Args:
        x: a floating tensor (bf16 for the op's bit-for-bit equality).
        scale: finite, > 0; powers of two make ``1/scale`` exact.

    Returns:
        ``float8_e4m3fn`` tensor of ``x``'s shape.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"quantize_e4m3: argument 'x' must be a floating tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    inv = _f32(1.0 / _check_scale("quantize_e4m3", "scale", scale))
    # A float32 copy (never x itself, even when x is float32), scaled in place.
    return x.detach().to(torch.float32, copy=True).mul_(inv).clamp_(-E4M3_MAX, E4M3_MAX).to(_FP8)


def fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    q_scale: float = 1.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    backward: Backward = "exact",
    backward_kernel: BackwardKernel = "default",
) -> torch.Tensor:
    """Softmax attention with q, k, v and P in float8 e4m3 and static scales.

    Args:
        q, k, v: bfloat16 ``[B, H, N, d]`` with ``d`` in {64, 128}, same shape
            and device (self-attention: queries and keys share ``N``); or all
            three ``float8_e4m3fn``, already quantized with the scales below
            (:func:`quantize_e4m3`; not differentiable).
        causal: mask keys after the query (top-left aligned).
        softmax_scale: multiplies ``q k^T``; default ``1/d`` (the Lipschitz
            transformer's convention, not ``1/sqrt(d)``).
        q_scale, k_scale, v_scale: static per-tensor scales; each tensor is stored
            as ``e4m3(x / scale)`` and entries with ``|x / scale| > 448`` saturate
            (count them with :func:`fp8_saturation_count`; choose the scales with
            :func:`lipschitz_ext.nn.fp8_scales.fp8_static_scales`). Powers of two
            make the division exact.
        backward: ``"exact"`` or ``"saved"`` statistics for the gradient (see
            the module docstring).
        backward_kernel: ``"default"``, ``"math"``, ``"flash"`` or ``"cudnn"``: the
            kernel of the gradient (see the module docstring); checked here, on
            every device.

    Returns:
        bfloat16 ``[B, H, N, d]``: ``softmax(softmax_scale * q k^T) v`` up to fp8
        rounding. Differentiable in bf16 q, k, v (bf16 straight-through backward).
    """
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k", k), ("v", v)):
            if isinstance(t, torch.Tensor) and t.dtype == _FP8 and t.requires_grad:
                raise ValueError(
                    f"fp8_attention: argument '{name}' is float8_e4m3fn and requires grad; e4m3 inputs are "
                    "not differentiable: pass bf16 tensors to fp8_attention_e4m3_inputs for training")
    return torch.ops.lipschitz.fp8_attention.default(
        q, k, v, bool(causal), None if softmax_scale is None else float(softmax_scale),
        float(q_scale), float(k_scale), float(v_scale), str(backward), str(backward_kernel),
    )


def fp8_saturation_count(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_scale: float = 1.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> int:
    """Number of entries of q, k, v that :func:`fp8_attention` would clamp.

    Counts ``|x * float32(1/scale)| > 448`` (the same float32 product the kernels
    quantize) over all three tensors; non-finite entries count too. With scales
    from the certificate this is 0; a debug check, it synchronizes with the device.
    """
    total = 0
    for x, s in ((q, q_scale), (k, k_scale), (v, v_scale)):
        if not (s > 0 and torch.isfinite(torch.tensor(s))):
            raise ValueError(f"fp8_saturation_count: scales must be finite and > 0, got {s}")
        inv = float(torch.tensor(1.0 / s, dtype=torch.float32))
        scaled = x.float() * inv
        total += int(((scaled.abs() > E4M3_MAX) | ~torch.isfinite(scaled)).sum())
    return total


@torch.library.register_fake("lipschitz::fp8_attention_fwd")
def _fp8_attention_fwd_fake(q, k, v, causal, softmax_scale, q_scale, k_scale, v_scale, backward="exact",
                            backward_kernel="default"):
    check_same_device("fp8_attention", "q", {"q": q, "k": k, "v": v})
    _check_backward_kernel("fp8_attention", "backward_kernel", backward_kernel)
    torch._check(q.dim() == 4, lambda: "fp8_attention: argument 'q' must have rank 4")
    torch._check(q.dtype in (torch.bfloat16, _FP8),
                 lambda: f"fp8_attention: argument 'q' must be bfloat16 or float8_e4m3fn, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        torch._check(t.dtype == q.dtype, lambda: f"fp8_attention: argument '{name}' must have q's dtype {q.dtype}")
    B, H, N, _ = q.shape
    return q.new_empty(q.shape, dtype=torch.bfloat16), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.register_fake("lipschitz::fp8_attention_bwd")
def _fp8_attention_bwd_fake(grad_out, q, k, v, out, lse, causal, softmax_scale, kernel="default"):
    _check_backward_kernel("fp8_attention_bwd", "kernel", kernel)
    check_same_device("fp8_attention_bwd", "q",
                      {"q": q, "grad_out": grad_out, "k": k, "v": v, "out": out, "lse": lse})
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _check_backward_kernel(op: str, arg: str, kernel: str) -> None:
    torch._check(kernel in BACKWARD_KERNELS,
                 lambda: f"{op}: argument '{arg}' must be one of {BACKWARD_KERNELS}, got {kernel!r}")


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale = inputs[:5]
    backward = inputs[8] if len(inputs) > 8 else "exact"
    ctx.backward_kernel = inputs[9] if len(inputs) > 9 else "default"
    out, lse = output
    ctx.saved_stats = backward == "saved"
    ctx.save_for_backward(q, k, v, *((out, lse) if ctx.saved_stats else ()))
    ctx.causal = causal
    ctx.softmax_scale = softmax_scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    # lse is an auxiliary output (marked non-differentiable): its gradient is ignored.
    q, k, v, *stats = ctx.saved_tensors
    if q.dtype == _FP8:
        raise RuntimeError("fp8_attention: e4m3 inputs are not differentiable (autograd would round their "
                           "gradient to e4m3): use fp8_attention_e4m3_inputs for training")
    out, lse = stats if ctx.saved_stats else (None, None)
    dq, dk, dv = torch.ops.lipschitz.fp8_attention_bwd.default(
        grad_out.contiguous(), q, k, v, out, lse, ctx.causal, ctx.softmax_scale, ctx.backward_kernel
    )
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd(
    "lipschitz::fp8_attention_fwd", _backward, setup_context=_setup_context
)

# fp8_attention_bwd is the backward itself: a second derivative (double backward) of
# fp8_attention is not implemented and raises, naming the op.
R.register_not_differentiable(
    "fp8_attention_bwd", "double backward of fp8_attention (create_graph=True) is not implemented")


class _E4M3InputAttention(torch.autograd.Function):
    """Forward on e4m3 inputs quantized here; backward at the bf16 inputs."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, q_scale, k_scale, v_scale, backward, backward_kernel):
        q8, k8, v8 = quantize_e4m3(q, q_scale), quantize_e4m3(k, k_scale), quantize_e4m3(v, v_scale)
        out, lse = torch.ops.lipschitz.fp8_attention_fwd.default(
            q8, k8, v8, causal, softmax_scale, q_scale, k_scale, v_scale, backward, backward_kernel)
        ctx.saved_stats = backward == "saved"
        ctx.backward_kernel = backward_kernel
        ctx.save_for_backward(q, k, v, *((out, lse) if ctx.saved_stats else ()))
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *stats = ctx.saved_tensors
        out, lse = stats if ctx.saved_stats else (None, None)
        dq, dk, dv = torch.ops.lipschitz.fp8_attention_bwd.default(
            grad_out.contiguous(), q, k, v, out, lse, ctx.causal, ctx.softmax_scale, ctx.backward_kernel)
        return dq, dk, dv, None, None, None, None, None, None, None


def fp8_attention_e4m3_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    q_scale: float = 1.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    backward: Backward = "exact",
    backward_kernel: BackwardKernel = "default",
) -> torch.Tensor:
    """:func:`fp8_attention` with the quantization moved out of the op, differentiably.

    Quantizes bf16 ``q, k, v`` with :func:`quantize_e4m3` (ATen elementwise ops:
    a caller under ``torch.compile`` gets them fused into the kernel that
    produces ``q, k, v``, e.g. a projection's RoPE) and runs the op on the e4m3
    tensors, which skips the op's own quantization. Output and gradient equal
    :func:`fp8_attention` on the same bf16 inputs bit for bit (the gradient is
    taken at the bf16 values, saved for the backward as there).

    Args:
        q, k, v: bfloat16 ``[B, H, N, d]``, ``d`` in {64, 128}.
        causal, softmax_scale, q_scale, k_scale, v_scale, backward, backward_kernel:
            as in :func:`fp8_attention`.

    Returns:
        bfloat16 ``[B, H, N, d]``, differentiable in q, k, v.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bfloat16:
            raise TypeError(f"fp8_attention_e4m3_inputs: argument '{name}' must be a bfloat16 tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"fp8_attention_e4m3_inputs: argument 'q' must have rank 4 (shape [B, H, N, d]), "
                         f"got shape {tuple(q.shape)}")
    op = "fp8_attention_e4m3_inputs"
    scales = [_check_scale(op, n, s) for n, s in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale))]
    scale = 1.0 / q.shape[-1] if softmax_scale is None else float(softmax_scale)
    return _E4M3InputAttention.apply(q, k, v, bool(causal), scale, *scales, str(backward), str(backward_kernel))


def fp8_attention_bwd_path(
    backward_kernel: BackwardKernel = "default",
    compute_major: Optional[int] = None,
    cudnn_version: Optional[int] = None,
    cudnn_sdp_enabled: Optional[bool] = None,
    empty: bool = False,
) -> str:
    """The kernel ``fp8_attention``'s backward runs: ``"math"``, ``"flash"`` or ``"cudnn"``.

    ``backward_kernel`` is :func:`fp8_attention`'s argument (``"default"`` resolves
    ``LIPSCHITZ_FP8_ATTN_BWD`` now). The other arguments default to this process's
    state: ``compute_major`` to the current CUDA device's compute capability major
    (0 without CUDA), ``cudnn_version`` to ``torch.backends.cudnn.version()`` (0
    without cuDNN), ``cudnn_sdp_enabled`` to ``torch.backends.cuda.cudnn_sdp_enabled()``.
    The rule is the one the CUDA kernel applies (``csrc/fp8_attention.h``,
    ``choose_bwd_path``); a cuDNN call that fails at run time still falls back to
    FlashAttention-2 with a warning.
    """
    if compute_major is None:
        compute_major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0
    if cudnn_version is None:
        cudnn_version = (torch.backends.cudnn.version() or 0) if torch.backends.cudnn.is_available() else 0
    if cudnn_sdp_enabled is None:
        cudnn_sdp_enabled = torch.backends.cuda.cudnn_sdp_enabled()
    return torch.ops.lipschitz_internal.fp8_attention_bwd_path(
        str(backward_kernel), int(compute_major), int(cudnn_version), bool(cudnn_sdp_enabled), bool(empty))
