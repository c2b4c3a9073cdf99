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

Backward (straight-through for the quantization: a gradient of softmax
attention at the bf16 ``q, k, v``), FlashAttention's formulas in bf16 on CUDA
(PyTorch's kernels), in float32 ATen on CPU (chunked over query rows):

- ``backward="exact"`` (default): exact attention's gradient; on CUDA a bf16
  FlashAttention forward first recomputes the exact output and log-sum-exp.
- ``backward="saved"``: fed with the fp8 forward's own output and log-sum-exp,
  no recompute (faster) but fp8-sized gradient errors, since D = rowsum(dO * out)
  and P = exp(S - lse) inherit them (~7% of max|dq| at N=300, causal, d=64,
  where "exact" stays at bf16 rounding).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_same_device

__all__ = ["fp8_attention", "fp8_saturation_count", "E4M3_MAX"]

#: Largest finite float8 e4m3 value; quantized inputs are clamped to +-E4M3_MAX.
E4M3_MAX = 448.0


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
    backward: str = "exact",
) -> torch.Tensor:
    """Softmax attention with q, k, v and P in float8 e4m3 and static scales.

    Args:
        q, k, v: bfloat16 ``[B, H, N, d]`` with ``d`` in {64, 128}, same shape
            and device (self-attention: queries and keys share ``N``).
        causal: mask keys after the query (top-left aligned).
        softmax_scale: multiplies ``q k^T``; default ``1/d`` (the Lipschitz
            transformer's convention, not ``1/sqrt(d)``).
        q_scale, k_scale, v_scale: static per-tensor scales; each tensor is stored
            as ``e4m3(x / scale)`` and entries with ``|x / scale| > 448`` saturate
            (count them with :func:`fp8_saturation_count`; choose the scales with
            :func:`lipschitz_ext.fp8_scales.fp8_static_scales`). Powers of two
            make the division exact.
        backward: ``"exact"`` or ``"saved"`` statistics for the gradient (see
            the module docstring).

    Returns:
        bfloat16 ``[B, H, N, d]``: ``softmax(softmax_scale * q k^T) v`` up to fp8
        rounding. Differentiable in q, k, v (bf16 straight-through backward).
    """
    return torch.ops.lipschitz.fp8_attention.default(
        q, k, v, bool(causal), None if softmax_scale is None else float(softmax_scale),
        float(q_scale), float(k_scale), float(v_scale), str(backward),
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
def _fp8_attention_fwd_fake(q, k, v, causal, softmax_scale, q_scale, k_scale, v_scale, backward="exact"):
    check_same_device("fp8_attention", "q", {"q": q, "k": k, "v": v})
    torch._check(q.dim() == 4, lambda: "fp8_attention: argument 'q' must have rank 4")
    torch._check(q.dtype == torch.bfloat16, lambda: "fp8_attention: argument 'q' must be bfloat16")
    B, H, N, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.register_fake("lipschitz::fp8_attention_bwd")
def _fp8_attention_bwd_fake(grad_out, q, k, v, out, lse, causal, softmax_scale):
    check_same_device("fp8_attention_bwd", "q",
                      {"q": q, "grad_out": grad_out, "k": k, "v": v, "out": out, "lse": lse})
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale = inputs[:5]
    backward = inputs[8] if len(inputs) > 8 else "exact"
    out, lse = output
    ctx.saved_stats = backward == "saved"
    ctx.save_for_backward(q, k, v, *((out, lse) if ctx.saved_stats else ()))
    ctx.causal = causal
    ctx.softmax_scale = softmax_scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    # lse is an auxiliary output (marked non-differentiable): its gradient is ignored.
    q, k, v, *stats = ctx.saved_tensors
    out, lse = stats if ctx.saved_stats else (None, None)
    dq, dk, dv = torch.ops.lipschitz.fp8_attention_bwd.default(
        grad_out.contiguous(), q, k, v, out, lse, ctx.causal, ctx.softmax_scale
    )
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd(
    "lipschitz::fp8_attention_fwd", _backward, setup_context=_setup_context
)
