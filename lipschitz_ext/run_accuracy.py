"""Re-scoring a trained run (``lipschitz-eval accuracy RUN_DIR``): validation loss and
accuracy under each evaluation protocol of :mod:`lipschitz_ext.protocols`, with the
certified bound of the same weights and, for comparison, the published formula's value."""

from __future__ import annotations

import torch

from . import certify as certify_mod
from .evaluate import loss_logit_scale
from .protocols import EVAL_PROTOCOLS, PROTOCOL_HELP, evaluate_protocols
from .run import load_run, run_data

__all__ = ["run_accuracy", "format_run_accuracy"]


def run_accuracy(run_dir: str, protocols: tuple[str, ...] = EVAL_PROTOCOLS, which: str = "latest",
                 device: str | torch.device = "cpu") -> dict:
    """Scores of the model in ``run_dir`` (checkpoint ``which``: ``latest`` is the model the
    run's summary reports, ``best`` the lowest validation loss) as a JSON-ready dict.

    Keys: ``run``, ``checkpoint``, ``step``, ``seq_len``, ``protocols``
    (``{name: {"val_loss", "val_accuracy", "tokens"}}``; the loss is of the logits the
    training loss sees, ``logit_scale * logits`` for the Lipschitz model), ``certified_bound``
    and ``paper_bound`` (None for a baseline).

    Raises:
        CheckpointError: a missing or foreign folder; DataError: data that does not hold
        the protocol's windows; ValueError: an unknown protocol.
    """
    from .nn import LipschitzGPT

    bad = [p for p in protocols if p not in EVAL_PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"protocols must be among {', '.join(EVAL_PROTOCOLS)}, got {', '.join(bad) or 'none'}")
    run = load_run(run_dir, which, device)
    model = run.model
    cfg, data = run_data(run, run_dir)
    scores = evaluate_protocols(model, data.val, cfg.seq_len, protocols, device, loss_logit_scale(cfg),
                                min(cfg.batch_size, 64), cfg.eval_batches)
    bound = paper = None
    if isinstance(model, LipschitzGPT):
        m = model.cpu()
        bound = float(certify_mod.certify(m, input_rms=m.input_rms()).bound)
        paper = float(certify_mod.paper_bound(m))
    return {"run": run_dir, "checkpoint": run.path, "step": run.step, "seq_len": cfg.seq_len,
            "protocols": scores, "certified_bound": bound, "paper_bound": paper}


def format_run_accuracy(rep: dict) -> str:
    """The console form of :func:`run_accuracy`'s dict."""
    lines = [f"{rep['run']} ({rep['checkpoint']}, step {rep['step']}, seq_len {rep['seq_len']})",
             f"{'protocol':<8} {'accuracy':>9} {'loss':>8} {'tokens':>9}  windows"]
    for p, r in rep["protocols"].items():
        lines.append(f"{p:<8} {100 * r['val_accuracy']:8.2f}% {r['val_loss']:8.4f} {r['tokens']:>9}  {PROTOCOL_HELP[p]}")
    if rep["certified_bound"] is not None:
        lines.append(f"certified bound (sound): {rep['certified_bound']:.6g}; published formula (unsound, "
                     f"comparison only): {rep['paper_bound']:.6g}")
    return "\n".join(lines)
