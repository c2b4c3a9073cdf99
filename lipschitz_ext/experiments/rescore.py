"""Re-scoring a trained run folder: ``lipschitz-eval accuracy RUN_DIR`` (validation loss
and accuracy under each evaluation protocol of :mod:`lipschitz_ext.evaluation.protocols`,
with the certified bound of the same weights and the published formula's value) and
``lipschitz-eval certify RUN_DIR`` (the per-layer certificate of the weights, the global
bound, the worst case over every weight setting within the run's caps)."""

from __future__ import annotations

import torch

from ..certify.certificate import certify, worst_case_certificate
from ..certify.published import paper_bound
from ..evaluation.metrics import loss_logit_scale
from ..evaluation.protocols import EVAL_PROTOCOLS, PROTOCOL_HELP, evaluate_protocols
from ..nn import LipschitzGPT
from ..storage.files import CheckpointError
from ..training.run import load_run, run_data

__all__ = ["run_accuracy", "format_run_accuracy", "run_certificate", "format_run_certificate"]


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
        bound = float(certify(m, input_rms=m.input_rms()).bound)
        paper = float(paper_bound(m))
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



def run_certificate(run_dir: str, which: str = "latest", device: str | torch.device = "cpu") -> dict:
    """The certificate of the model in ``run_dir`` (checkpoint ``which``), as a JSON-ready dict.

    Keys: ``run``, ``checkpoint``, ``step``, ``bound`` (certified, on the embedding's domain
    ``input_rms``), ``worst_case_bound`` (any weights within the caps:
    :func:`~lipschitz_ext.certify.worst_case_certificate`), ``paper_bound`` (the published
    formula, unsound: comparison only; None where certify has none) and ``certificate``
    (every row: :meth:`Certificate.to_dict`). ``latest`` is the model the run's summary reports.

    Raises:
        CheckpointError: a missing or foreign folder, or a baseline run (it has no certificate).
    """
    run = load_run(run_dir, which=which, device=device)
    if not isinstance(run.model, LipschitzGPT):
        raise CheckpointError(f"{run_dir}: a {run.config.model} model has no certificate (only "
                              "--model lipschitz runs are certified)")
    model = run.model.cpu()
    cert = certify(model, input_rms=model.input_rms())
    worst = worst_case_certificate(model.config)
    # the published (unsound) formula, where certify provides it
    paper = float(paper_bound(model))
    return {"run": run_dir, "checkpoint": run.path, "step": run.step, "bound": float(cert.bound),
            "input_rms": float(cert.input_rms), "worst_case_bound": float(worst.bound),
            "worst_case_input_rms": float(worst.input_rms), "paper_bound": paper,
            "certificate": cert.to_dict(), "table": str(cert)}


def format_run_certificate(rep: dict) -> str:
    """The console form of :func:`run_certificate`'s dict."""
    lines = [f"{rep['run']} ({rep['checkpoint']}, step {rep['step']})", rep["table"], "",
             f"certified bound (these weights, per-token RMS <= {rep['input_rms']:.4g}): {rep['bound']:.6g}",
             f"worst case of the caps (any weights within them, RMS <= {rep['worst_case_input_rms']:.4g}): "
             f"{rep['worst_case_bound']:.6g}"]
    if rep["paper_bound"] is not None:
        lines.append(f"published formula (not a sound bound, for comparison): {rep['paper_bound']:.6g}")
    return "\n".join(lines)
