"""The certificate of a trained run (``lipschitz-eval certify RUN_DIR``): the per-layer
table of :func:`lipschitz_ext.certify.certify` on the weights, the global bound, the
worst case over every weight setting within the run's caps, and the published
certifier's value for comparison."""

from __future__ import annotations

import torch

from . import certify as certify_mod
from .run import CheckpointError, load_run

__all__ = ["run_certificate", "format_run_certificate"]


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
    from .nn import LipschitzGPT

    run = load_run(run_dir, which=which, device=device)
    if not isinstance(run.model, LipschitzGPT):
        raise CheckpointError(f"{run_dir}: a {run.config.model} model has no certificate (only "
                              "--model lipschitz runs are certified)")
    model = run.model.cpu()
    cert = certify_mod.certify(model, input_rms=model.input_rms())
    worst = certify_mod.worst_case_certificate(model.config)
    # the published (unsound) formula, where certify provides it
    paper = float(certify_mod.paper_bound(model)) if hasattr(certify_mod, "paper_bound") else None
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
