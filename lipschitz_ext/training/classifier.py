"""Training certified MLP classifiers: the loop, its checkpoints, and reading a run back.

A run writes the same kind of folder as ``lipschitz-train`` (:mod:`lipschitz_ext.training.run`):
``config.json`` (with ``"task": "classify"``), ``metrics.jsonl``, ``latest.pt`` (the atomic
resume checkpoint: weights, optimizer, step, seconds trained), ``model.pt`` (weights and
the model's hyperparameters only), ``summary.json`` and ``curves.png``. The metrics'
``val_*`` keys are measured on the data set's test split. Losses: :mod:`lipschitz_ext.nn.losses`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import ops
from ..certify.classifier import evaluate_classifier, l2_bound, pixels
from ..data.images import ImageData, load_image_data
from ..evaluation.plots import plot_curves
from ..nn.classifier import LipschitzMLPClassifier
from ..nn.losses import classification_loss
from ..optim.muon import NonFiniteGradient
from ..storage.files import (CheckpointError, append_metric, atomic_torch_save, load_checkpoint_file, read_json,
                             truncate_metrics, write_json)
from ..storage.folder import prepare_out_dir, release_run_folder
from .classifier_config import (TASK, ClassifyConfig, build_classifier, build_classifier_optimizer,
                                linear_decay)
from .optimizers import set_lrs
from .runtime import StopRequest

__all__ = ["batch_indices", "RESUME_OVERRIDES", "train_classifier", "ClassifierRun", "is_classifier_run",
           "load_classifier_run"]

class _LipschitzEstimate:
    """Product of warm-started power-iteration spectral norms (a lower estimate, no gradient)."""

    def __init__(self):
        self.u: list[Optional[torch.Tensor]] = []

    @torch.no_grad()
    def __call__(self, weights: list[torch.Tensor], iters: int = 2) -> float:
        if len(self.u) != len(weights):
            self.u = [None] * len(weights)
            iters = 16
        total = 1.0
        for i, W in enumerate(weights):
            s, u, _ = ops.power_iteration(W.detach(), iters, self.u[i])
            self.u[i] = u
            total *= float(s)
        return total


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------
def _environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "python": platform.python_version()}


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The examples of ``step``: epochs are fixed permutations (seeded by ``seed`` and the
    epoch), whole batches only, so a resumed run sees the same batches."""
    per_epoch = max(1, n // batch)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[pos * batch:(pos + 1) * batch]


@torch.no_grad()
def _evaluate_fast(model, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    z = torch.cat([model(x[i:i + 5000]) for i in range(0, x.shape[0], 5000)])
    model.train()
    return {"val_loss": float(F.cross_entropy(z, y)), "val_accuracy": float((z.argmax(1) == y).double().mean()),
            "certified_bound": l2_bound(model)}


def _checkpoint(cfg, model, opt, step, elapsed) -> dict:
    return {"config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "elapsed": elapsed, "hyperparameters": model.hyperparameters()}


def _read_ckpt(path: str) -> dict:
    try:
        return load_checkpoint_file(path, ("model", "hyperparameters"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a usable lipschitz-classify checkpoint ({exc})") from None


#: fields a resumed run may change (how long it runs, how often it reports, where the data is)
RESUME_OVERRIDES = ("steps", "time_budget", "eval_every", "checkpoint_every", "threads", "data",
                    "attack_examples", "attack_steps", "attack_restarts")


def train_classifier(cfg: ClassifyConfig | None = None, *, resume: str | None = None, quiet: bool = False,
                     data: ImageData | None = None, overrides: dict | None = None) -> dict:
    """Train (or with ``resume`` continue) one run; returns its summary (also in summary.json).
    The run folder is locked for this process while it trains (one writer per folder).

    ``overrides``: with ``resume``, new values of :data:`RESUME_OVERRIDES` fields."""
    if resume is not None:
        if not is_classifier_run(resume):
            raise CheckpointError(f"--resume {resume}: not a lipschitz-classify run folder (no config.json with "
                                  "task classify)")
        out = prepare_out_dir(resume, resume=True)
        saved = read_json(os.path.join(out, "config.json"))
        bad = sorted(set(overrides or {}) - set(RESUME_OVERRIDES))
        if bad:
            raise ValueError(f"--resume: {', '.join('--' + b.replace('_', '-') for b in bad)} cannot change in a "
                             f"resumed run (only {', '.join(RESUME_OVERRIDES)})")
        cfg = dataclasses.replace(ClassifyConfig(**saved), **(overrides or {})).validate()
        if overrides:
            write_json(os.path.join(out, "config.json"), asdict(cfg))
        ck = _read_ckpt(os.path.join(out, "latest.pt")) if os.path.exists(os.path.join(out, "latest.pt")) else None
    else:
        cfg = cfg.validate()
        out = prepare_out_dir(cfg.out or os.path.join("runs", f"classify-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"))
        cfg = dataclasses.replace(cfg, out=out, data=os.path.abspath(cfg.data) if cfg.data else None)
        ck = None
    try:
        return _train_locked(cfg, out, ck, data, quiet)
    finally:
        release_run_folder(out)


def _train_locked(cfg: ClassifyConfig, out: str, ck: dict | None, data: ImageData | None, quiet: bool) -> dict:
    """The body of :func:`train_classifier`, in run folder ``out`` that this process has locked."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = data if data is not None else load_image_data(cfg.dataset, cfg.data)
    x_train, y_train = pixels(data.train_x), data.train_y
    x_test_u8, y_test = data.test_x, data.test_y
    x_test = pixels(x_test_u8)
    model = build_classifier(cfg, data.in_features, data.num_classes, x_train.mean(0))
    opt = build_classifier_optimizer(model, cfg)
    metrics = os.path.join(out, "metrics.jsonl")
    step, elapsed = 0, 0.0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, elapsed = int(ck["step"]), float(ck["elapsed"])
        truncate_metrics(metrics, step)
    else:
        write_json(os.path.join(out, "config.json"), asdict(cfg))
    lip = _LipschitzEstimate()
    n = x_train.shape[0]
    status, last_eval = "completed", {}
    next_eval = (elapsed // cfg.eval_every + 1) * cfg.eval_every if cfg.eval_every else float("inf")
    next_ckpt = elapsed + cfg.checkpoint_every if cfg.checkpoint_every else float("inf")
    bar = tqdm(total=cfg.steps or None, initial=step, disable=quiet, dynamic_ncols=True, desc=os.path.basename(out))
    model.train()
    with StopRequest() as stop:
        while True:
            if cfg.steps and step >= cfg.steps:
                break
            if cfg.time_budget and elapsed >= cfg.time_budget:
                status = "time_budget"
                break
            if stop.signum is not None:
                status = "interrupted"
                break
            t0 = time.perf_counter()
            set_lrs(opt, linear_decay(step, elapsed, steps=cfg.steps, time_budget=cfg.time_budget))
            idx = batch_indices(step, n, cfg.batch_size, cfg.seed)
            z = model(x_train[idx])
            L = lip(model.weights()) if cfg.loss == "margin_ce" else 1.0
            loss = classification_loss(z, y_train[idx], loss=cfg.loss, logit_scale=cfg.logit_scale,
                                       margin_eps=cfg.margin_eps, lipschitz=L)
            if not torch.isfinite(loss):
                status = "diverged"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            try:
                opt.step()
            except NonFiniteGradient:  # nothing was changed: the model is the last good step's
                status = "diverged"
                break
            step += 1
            elapsed += time.perf_counter() - t0
            bar.update(1)
            if step % 50 == 0:
                append_metric(metrics, {"step": step, "elapsed": round(elapsed, 3), "train_loss": float(loss.detach())})
            if elapsed >= next_eval:
                last_eval = {"step": step, "elapsed": round(elapsed, 3), **_evaluate_fast(model, x_test, y_test)}
                append_metric(metrics, last_eval)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{last_eval['val_accuracy']:.3f}",
                                bound=f"{last_eval['certified_bound']:.3g}")
                next_eval += cfg.eval_every
            if elapsed >= next_ckpt:
                atomic_torch_save(_checkpoint(cfg, model, opt, step, elapsed), os.path.join(out, "latest.pt"))
                next_ckpt += cfg.checkpoint_every
    bar.close()
    atomic_torch_save(_checkpoint(cfg, model, opt, step, elapsed), os.path.join(out, "latest.pt"))
    if status == "interrupted":
        print(f"{out}: interrupted at step {step}; continue with lipschitz-classify train --resume {out}",
              file=sys.stderr)
        return {"status": status, "steps": step}
    model.eval()
    atomic_torch_save({"model": model.state_dict(), "hyperparameters": model.hyperparameters(), "step": step,
                       "config": asdict(cfg)}, os.path.join(out, "model.pt"))
    final = {"step": step, "elapsed": round(elapsed, 3), **_evaluate_fast(model, x_test, y_test)}
    append_metric(metrics, final)
    summary = {"status": status, "steps": step, "wall_seconds": round(elapsed, 2), "split": "test",
               **evaluate_classifier(model, x_test_u8, y_test, radii=cfg.radii, attack_examples=cfg.attack_examples,
                                     attack_steps=cfg.attack_steps, attack_restarts=cfg.attack_restarts,
                                     seed=cfg.seed),
               "config": {k: getattr(cfg, k) for k in ("dataset", "optimizer", "constraint", "cap", "cap_frame",
                                                       "lr", "weight_decay", "loss", "margin_eps", "activation",
                                                       "widths", "batch_size", "time_budget", "seed")},
               "environment": _environment()}
    write_json(os.path.join(out, "summary.json"), summary)
    plot_curves(out)
    return summary


# ---------------------------------------------------------------------------
# reading a run back
# ---------------------------------------------------------------------------
@dataclass
class ClassifierRun:
    """A classifier run folder rebuilt: ``model`` (eval mode, float32), ``config`` and the
    checkpoint ``path`` / ``step``."""

    model: LipschitzMLPClassifier
    config: ClassifyConfig
    path: str
    step: int


def is_classifier_run(run_dir: str) -> bool:
    """Whether ``run_dir``'s config.json is a ``lipschitz-classify`` run's."""
    p = os.path.join(run_dir, "config.json")
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh).get("task") == TASK
    except (OSError, ValueError, AttributeError):
        return False


def load_classifier_run(run_dir: str, which: str = "best", device: str | torch.device = "cpu",
                        arg: str | None = None) -> ClassifierRun:
    """The model of a classifier run: ``model.pt`` (the finished run), else ``latest.pt``."""
    who = f"{arg} {run_dir}" if arg else run_dir
    cfg = ClassifyConfig(**read_json(os.path.join(run_dir, "config.json")))
    for name in (("model.pt", "latest.pt") if which == "best" else ("latest.pt", "model.pt")):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            ck = _read_ckpt(path)
            hp = dict(ck["hyperparameters"])
            model = LipschitzMLPClassifier(hp.pop("in_features"), hp.pop("widths"), hp.pop("num_classes"), **hp)
            try:
                model.load_state_dict(ck["model"])
            except RuntimeError as exc:
                raise CheckpointError(f"{who}: {path}: weights do not fit the model ({exc})") from None
            return ClassifierRun(model.to(device).eval(), cfg, path, int(ck.get("step", 0)))
    raise CheckpointError(f"{who}: holds no model.pt or latest.pt")

