"""The ``"fp8"`` attention backend: :func:`lipschitz_ext.ops.fp8_attention` with
static q/k/v scales (set from the certificate by
:func:`lipschitz_ext.certify.configure_fp8_attention`)."""

from __future__ import annotations

import torch

from ..ops import fp8_attention, fp8_saturation_count
from ..ops.fp8_attention import fp8_attention_e4m3_inputs
from .attention import LipschitzAttention, register_attention_backend

__all__ = ["Fp8AttentionBackend", "FP8_BACKEND", "fp8_backend_of"]


class Fp8AttentionBackend:
    """Causal ``softmax(s q k^T / d_head) v`` in fp8 (a backend ``fn(q, k, v, s) -> out``).

    ``q, k, v [B, H, T, d_head]`` (d_head 64 or 128) are cast to bf16 for the fp8
    kernel and the output is cast back to q's dtype; gradients flow (bf16
    straight-through backward).

    Each model owns one instance (``new_instance()``; see :func:`fp8_backend_of`),
    shared by its layers; the registered :data:`FP8_BACKEND` is only the prototype.

    Attributes:
        scales: static ``(q_scale, k_scale, v_scale)`` shared by every layer using
            this instance; (1, 1, 1) until configured.
        count_saturation: debug flag; when True each call adds the number of
            q/k/v entries that saturate the e4m3 range to :attr:`saturated`
            (synchronizes with the device; 0 is expected with certified scales).
        saturated: the running count.
        backward: the gradient mode of :func:`lipschitz_ext.ops.fp8_attention`,
            ``"exact"`` (default) or ``"saved"`` (faster, fp8-sized gradient error).
        inputs: where q, k, v become e4m3. ``"bf16"`` (default): the op
            quantizes its bf16 inputs itself (on sm_90a, three pre-pass launches).
            ``"fp8"``: the projections end in the quantization: q, k, v are
            quantized as soon as they leave the projections and RoPE
            (:func:`lipschitz_ext.ops.fp8_attention.quantize_e4m3`, with these
            certified scales, ATen elementwise ops that ``torch.compile`` fuses
            with RoPE) and the op receives e4m3 tensors
            (:func:`lipschitz_ext.ops.fp8_attention.fp8_attention_e4m3_inputs`).
            The two give the same output and gradient bit for bit; the backward
            still saves the bf16 q, k, v.
    """

    def __init__(self) -> None:
        self.scales: tuple[float, float, float] = (1.0, 1.0, 1.0)
        self.count_saturation = False
        self.saturated = 0
        self.backward = "exact"
        self.inputs = "bf16"

    def new_instance(self) -> "Fp8AttentionBackend":
        """A fresh backend (scales (1, 1, 1), no counting, ``backward="exact"``, ``inputs="bf16"``) for one model."""
        return type(self)()

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if bias is not None:
            raise ValueError("attention backend 'fp8' has no positional bias: use pos_bias='none' with it")
        qs, ks, vs = self.scales
        if self.count_saturation:
            self.saturated += fp8_saturation_count(q, k, v, qs, ks, vs)
        if self.inputs == "bf16":
            attend = fp8_attention
        elif self.inputs == "fp8":
            attend = fp8_attention_e4m3_inputs
        else:
            raise ValueError(f"Fp8AttentionBackend: attribute 'inputs' must be 'bf16' or 'fp8', got {self.inputs!r}")
        out = attend(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True,
            softmax_scale=softmax_scale / q.shape[-1], q_scale=qs, k_scale=ks, v_scale=vs,
            backward=self.backward,
        )
        return out.to(q.dtype)


def fp8_backend_of(model: torch.nn.Module) -> Fp8AttentionBackend | None:
    """The fp8 backend instance ``model``'s attention layers use, or None when none uses fp8.

    ``model``: a ``LipschitzGPT`` (all its layers share one instance), a
    ``LipschitzAttention`` or any module holding them (DDP / compiled wrappers
    included). Set ``.scales`` on the result (or call
    :func:`lipschitz_ext.certify.configure_fp8_attention`) to change this
    model's scales only.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fp8_backend_of: expected an nn.Module, got {type(model).__name__}")
    for mod in model.modules():
        if isinstance(mod, LipschitzAttention) and mod.backend == "fp8" and not mod.positional:
            fn = mod.attention_backend()
            return fn if isinstance(fn, Fp8AttentionBackend) else None
    return None


#: The prototype registered as backend ``"fp8"`` (each model uses its own ``new_instance()``).
FP8_BACKEND = Fp8AttentionBackend()
register_attention_backend("fp8", FP8_BACKEND)
