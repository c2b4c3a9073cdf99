"""Scoring a model during and after training: validation loss and top-1 accuracy on
fixed windows, the largest activation, and the certified bound of the current weights.

(Evaluation protocols beyond these fixed windows live in :mod:`lipschitz_ext.protocols`.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import data as data_mod

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["evaluate", "loss_logit_scale", "certified_bound", "fp8_backend", "unwrap"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens, cfg: "TrainConfig", device: torch.device) -> dict[str, float]:
    """Validation loss and top-1 next-token accuracy on fixed windows, the max |activation|
    seen, and (Lipschitz model) the certified bound of the current weights."""
    from .nn import activation_stats

    m = unwrap(model)
    was_training = m.training
    m.eval()
    loss_sum, correct, count = 0.0, 0, 0
    max_act = 0.0
    fp8 = fp8_backend(m)
    if fp8 is not None:  # refresh the static scales from the current certificate, count saturation
        from .fp8_scales import configure_fp8_attention

        configure_fp8_attention(m)
        fp8.saturated, fp8.count_saturation = 0, True
    for i, (x, y) in enumerate(data_mod.eval_batches(tokens, min(cfg.batch_size, 64), cfg.seq_len,
                                                     cfg.eval_batches)):
        x, y = x.to(device), y.to(device)
        logits = m(x)
        loss_sum += F.cross_entropy(loss_logit_scale(cfg) * logits.flatten(0, 1).float(), y.flatten(),
                                    reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
        if i == 0:
            stats = activation_stats(m, x)
            max_act = max(float(s["max_abs"]) for s in stats.values())
    out = {"val_loss": loss_sum / count, "val_accuracy": correct / count, "max_activation": max_act}
    out["certified_bound"] = certified_bound(m)
    if fp8 is not None:
        out["fp8_saturated"] = fp8.saturated  # entries beyond e4m3 at the certified scales: 0 expected
        fp8.count_saturation = False
    m.train(was_training)
    return out


def loss_logit_scale(cfg: "TrainConfig") -> float:
    """The factor on the logits inside the loss: ``cfg.logit_scale`` for the Lipschitz
    model, 1 for the baseline (whose logits nothing caps)."""
    return cfg.logit_scale if cfg.model == "lipschitz" else 1.0


def fp8_backend(model: torch.nn.Module):
    """The fp8 attention backend object when ``model`` (a LipschitzGPT) uses it, else None
    (the model's own instance: ``lipschitz_ext.nn.fp8_backend_of``)."""
    from .nn import LipschitzGPT, fp8_backend_of

    return fp8_backend_of(model) if isinstance(model, LipschitzGPT) else None



def certified_bound(model: torch.nn.Module) -> float | None:
    """The certified Lipschitz bound of a LipschitzGPT on its embedding's domain; None for a baseline."""
    from .nn import LipschitzGPT

    if not isinstance(model, LipschitzGPT):
        return None
    from .certify import certify

    return float(certify(model, input_rms=model.input_rms()).bound)
