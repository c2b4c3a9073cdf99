"""Logit growth of a trained model: the largest attention logit of any layer and the
output logits' size, for transformers with and without a Lipschitz constraint."""

from __future__ import annotations

import torch

from ..nn.attention import LipschitzAttention
from ..nn.baseline import BaselineAttention

__all__ = ["attention_logits", "attention_logit_max", "output_logit_stats"]

@torch.no_grad()
def attention_logits(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Causal attention logits ``[B, H, T, T]`` of an attention module on its input
    ``x [B, T, d]``: after the softmax scale, before the softmax, ``-inf`` above the
    diagonal. The module computes them (``attention_logits(x)``): ``LipschitzAttention``
    ``(s / d_head) q_h k_h^T`` plus its positional bias; ``BaselineAttention``
    ``q_h k_h^T / sqrt(d_head)``, RoPE on q and k when it uses it."""
    if not hasattr(mod, "attention_logits"):
        raise TypeError(f"attention_logits: unsupported attention module {type(mod).__name__}")
    return mod.attention_logits(x)


def _is_attention(mod: torch.nn.Module) -> bool:
    return isinstance(mod, (LipschitzAttention, BaselineAttention)) or hasattr(mod, "attention_logits")


@torch.no_grad()
def attention_logit_max(model, idx: torch.Tensor) -> float:
    """Largest attention logit (after its scale, before the softmax, causal entries
    only) on ``idx``, over every attention module of the model (Wortsman et al.'s
    attention-logit growth indicator). Raises ``ValueError`` for a model without any."""
    found: list[float] = []
    handles = [mod.register_forward_hook(lambda m, inp, outp: found.append(float(attention_logits(m, inp[0]).max())))
               for mod in model.modules() if _is_attention(mod)]
    try:
        model(idx)
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise ValueError(f"attention_logit_max: {type(model).__name__} has no attention module")
    return max(found)


@torch.no_grad()
def output_logit_stats(model, idx: torch.Tensor) -> dict[str, float]:
    """Output-logit drift indicators: mean logit, max |logit|."""
    z = model(idx).float()
    return {"mean_logit": float(z.mean()), "max_abs_logit": float(z.abs().max())}


