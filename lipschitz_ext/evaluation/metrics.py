"""Scoring a model during and after training: validation loss and top-1 accuracy on
fixed windows, the largest activation, and the certified bound of the current weights.

(Evaluation protocols beyond these fixed windows live in :mod:`lipschitz_ext.evaluation.protocols`.)
"""

from __future__ import annotations


import torch

from ..certify.certificate import certify
from ..certify.fp8 import configure_fp8_attention
from ..certify.published import paper_bound
from ..data.text import DataError
from ..nn import LipschitzGPT, activation_stats, fp8_backend_of
from .protocols import EVAL_PROTOCOLS, protocol_batches, score


__all__ = ["evaluate", "final_protocol_scores", "paper_bound_or_none", "loss_logit_scale", "certified_bound", "fp8_backend", "unwrap"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens, cfg, device: torch.device) -> dict[str, float]:
    """Validation loss and top-1 next-token accuracy on the windows of ``cfg.eval_protocol``
    (:mod:`lipschitz_ext.evaluation.protocols`; named in the result's ``protocol``), the max |activation|
    on the first batch, and (Lipschitz model) the certified bound of the current weights."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    fp8 = fp8_backend(m)
    if fp8 is not None:  # refresh the static scales from the current certificate, count saturation

        configure_fp8_attention(m)
        fp8.saturated, fp8.count_saturation = 0, True
    batches = list(protocol_batches(tokens, cfg.eval_protocol, cfg.seq_len, min(cfg.batch_size, 64),
                                    cfg.eval_batches))
    out = {**score(m, batches, device, loss_logit_scale(cfg)), "protocol": cfg.eval_protocol}
    stats = activation_stats(m, batches[0][0].to(device))
    out["max_activation"] = max(float(s["max_abs"]) for s in stats.values())
    out["certified_bound"] = certified_bound(m)
    if fp8 is not None:
        out["fp8_saturated"] = fp8.saturated  # entries beyond e4m3 at the certified scales: 0 expected
        fp8.count_saturation = False
    m.train(was_training)
    return out


def loss_logit_scale(cfg) -> float:
    """The factor on the logits inside the loss: ``cfg.logit_scale`` for the Lipschitz
    model, 1 for the baseline (whose logits nothing caps)."""
    return cfg.logit_scale if cfg.model == "lipschitz" else 1.0


def fp8_backend(model: torch.nn.Module):
    """The fp8 attention backend object when ``model`` (a LipschitzGPT) uses it, else None
    (the model's own instance: ``lipschitz_ext.nn.fp8_backend_of``)."""
    return fp8_backend_of(model) if isinstance(model, LipschitzGPT) else None


def certified_bound(model: torch.nn.Module) -> float | None:
    """The certified Lipschitz bound of a LipschitzGPT on its embedding's domain; None for a baseline."""
    if not isinstance(model, LipschitzGPT):
        return None

    return float(certify(model, input_rms=model.input_rms()).bound)


def final_protocol_scores(model: torch.nn.Module, tokens, cfg,
                          device: torch.device) -> dict[str, dict]:
    """The final model scored under every protocol: ``{protocol: {"val_loss", "val_accuracy",
    "tokens"}}``, or ``{"unavailable": reason}`` where the validation split cannot hold the
    protocol's windows (``paper`` needs 1280 + seq_len tokens)."""
    m = unwrap(model)
    out: dict[str, dict] = {}
    for p in EVAL_PROTOCOLS:
        try:
            batches = protocol_batches(tokens, p, cfg.seq_len, min(cfg.batch_size, 64), cfg.eval_batches)
            out[p] = score(m, batches, device, loss_logit_scale(cfg))
        except DataError as exc:
            out[p] = {"unavailable": str(exc)}
    return out


def paper_bound_or_none(model: torch.nn.Module) -> float | None:
    """The published (unsound) formula's value of a LipschitzGPT, for comparison beside the
    sound certificate (:func:`lipschitz_ext.certify.paper_bound`); None for a baseline."""
    m = unwrap(model)
    if not isinstance(m, LipschitzGPT):
        return None

    return float(paper_bound(m))
