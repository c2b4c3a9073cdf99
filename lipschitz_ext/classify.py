"""Training certified MLP classifiers: config, presets, losses, the loop and sweeps.

A run writes the same kind of folder as ``lipschitz-train`` (``lipschitz_ext.run``):
``config.json`` (with ``"task": "classify"``), ``metrics.jsonl``, ``latest.pt`` (the atomic
resume checkpoint: weights, optimizer, step, seconds trained), ``model.pt`` (weights and
the model's hyperparameters only), ``summary.json`` and ``curves.png``. The metrics'
``val_*`` keys are measured on the data set's test split.

Losses (``logits z [B, C]``, labels ``y [B]``, ``s`` = ``logit_scale``):

- ``ce``: ``cross_entropy(s z, y)``.
- ``margin_ce``: ``cross_entropy(s (z + sqrt(2) L eps (1 - onehot(y))), y)`` with ``L`` the
  network's current Lipschitz estimate (product of power-iteration spectral norms, no
  gradient): the loss only reaches zero once the margin exceeds the one a certificate at
  radius ``eps`` needs, so ``eps`` trades clean accuracy for certified accuracy.

The learning rate decays linearly to zero at the end of the run: at ``time_budget``
seconds of training when one is set (:func:`linear_decay`), else at ``steps``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from . import constraints as cons
from . import ops
from .classifier_certify import DEFAULT_RADII, evaluate_classifier, l2_bound, pixels
from .image_data import DATASETS, ImageData, load_image_data
from .nn.classifier import ACTIVATIONS, INITS, LipschitzMLPClassifier
from .optim.muon import NonFiniteGradient
from .optimizers import set_lrs
from .run import (CheckpointError, append_metric, atomic_torch_save, load_checkpoint_file, prepare_out_dir,
                  read_json, release_run_folder, truncate_metrics, write_json)

__all__ = ["ClassifyConfig", "CLASSIFY_PRESETS", "OPTIMIZERS", "LOSSES", "TASK", "classify_config",
           "build_classifier", "build_classifier_optimizer", "classification_loss", "linear_decay", "batch_indices",
           "train_classifier", "load_classifier_run", "is_classifier_run", "ClassifierRun", "sweep_classifiers",
           "frontier_rows", "write_frontier"]

TASK = "classify"
OPTIMIZERS = ("muon", "adamw")
LOSSES = ("ce", "margin_ce")
CAP_FRAMES = ("l2", "rms")


@dataclass
class ClassifyConfig:
    """One classifier run. ``cap`` is each layer's spectral-norm cap: l2 (``cap_frame="l2"``,
    so the network is ``cap ** depth``-Lipschitz) or the paper's RMS->RMS frame."""

    dataset: str = "fashion-mnist"
    data: Optional[str] = None  # folder of the data set's files (None: the distribution's folder)
    out: Optional[str] = None
    preset: str = "certified"
    widths: list[int] = field(default_factory=lambda: [256, 256])
    bias: bool = False
    activation: str = "maxmin"
    init: str = "orthogonal"
    center: bool = True  # subtract the training set's mean image inside the model
    optimizer: str = "muon"
    constraint: str = "hard_cap"
    cap: float = 1.0
    cap_frame: str = "l2"
    lr: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 512
    loss: str = "margin_ce"
    margin_eps: float = 1.0
    logit_scale: float = 16.0
    time_budget: float = 0.0  # seconds of training (evaluation excluded); 0: none
    steps: int = 0  # 0: no step limit (then a time budget is needed)
    eval_every: float = 30.0  # seconds of training between test-split evaluations
    checkpoint_every: float = 60.0  # seconds of training between latest.pt checkpoints
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    radii: list[float] = field(default_factory=lambda: list(DEFAULT_RADII))
    attack_examples: int = 1000  # first test examples attacked with PGD-l2 at the end (0: none)
    attack_steps: int = 50
    attack_restarts: int = 3
    task: str = TASK

    def validate(self) -> "ClassifyConfig":
        def bad(name, why):
            raise ValueError(f"--{name.replace('_', '-')}: {why}")

        if self.dataset not in DATASETS:
            bad("dataset", f"choose from {sorted(DATASETS)}, got {self.dataset!r}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"choose from {OPTIMIZERS}, got {self.optimizer!r}")
        if self.constraint not in cons.CONSTRAINT_SPECS:
            bad("constraint", f"choose from {sorted(cons.CONSTRAINT_SPECS)}, got {self.constraint!r}")
        if self.loss not in LOSSES:
            bad("loss", f"choose from {LOSSES}, got {self.loss!r}")
        if self.activation not in ACTIVATIONS:
            bad("activation", f"choose from {ACTIVATIONS}, got {self.activation!r}")
        if self.init not in INITS:
            bad("init", f"choose from {INITS}, got {self.init!r}")
        if self.cap_frame not in CAP_FRAMES:
            bad("cap_frame", f"choose from {CAP_FRAMES}, got {self.cap_frame!r}")
        for name in ("cap", "lr", "logit_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                bad(name, f"must be finite and > 0, got {v}")
        for name in ("weight_decay", "margin_eps", "time_budget", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                bad(name, f"must be finite and >= 0, got {v}")
        for name in ("batch_size",):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "threads", "attack_examples", "attack_steps", "attack_restarts", "seed"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.steps == 0 and self.time_budget == 0:
            bad("time_budget", "give a time budget (seconds) or --steps")
        if not self.widths or any(w < 1 for w in self.widths):
            bad("widths", f"must be positive integers, got {self.widths}")
        if any(not (math.isfinite(r) and r > 0) for r in self.radii):
            bad("radii", f"must be finite and > 0, got {self.radii}")
        if self.attack_examples and (self.attack_steps < 1 or self.attack_restarts < 1):
            bad("attack_steps", "the attack needs at least one step and one start")
        return self


#: name -> (description, the fields it sets); every field not named keeps its default.
CLASSIFY_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "certified": ("the recommended certified recipe: 784-256-256-10 MaxMin MLP, Muon (lr 0.1) + hard cap 1 "
                  "per layer (1-Lipschitz), margin cross-entropy for radius 1.0, logits x16", {}),
    "lipschitz": ("the same 1-Lipschitz MLP trained on plain cross-entropy (no margin)", {"loss": "ce"}),
    "baseline": ("the same MLP unconstrained, AdamW, plain cross-entropy",
                 {"optimizer": "adamw", "constraint": "none", "lr": 1e-3, "loss": "ce"}),
    "paper-cifar10": ("the paper's MLP experiment: CIFAR-10, pixels / 255 only, 3072-256-256-10 without "
                      "biases, ReLU, first layer zero and the others scaled orthogonal, Muon + soft cap 6 "
                      "(RMS->RMS), lr 0.2 to zero over 2000 steps of batch 512, cross-entropy",
                      {"dataset": "cifar10", "center": False, "init": "paper", "activation": "relu",
                       "constraint": "soft_cap",
                       "cap": 6.0, "cap_frame": "rms", "lr": 0.2, "steps": 2000, "loss": "ce",
                       "logit_scale": 1.0}),
}


def classify_config(preset: str = "certified", **overrides: Any) -> ClassifyConfig:
    """The config of ``preset`` with ``overrides`` applied, validated."""
    if preset not in CLASSIFY_PRESETS:
        raise ValueError(f"--preset: choose from {sorted(CLASSIFY_PRESETS)}, got {preset!r}")
    fields = {**CLASSIFY_PRESETS[preset][1], **{k: v for k, v in overrides.items() if v is not None}}
    return ClassifyConfig(preset=preset, **fields).validate()


# ---------------------------------------------------------------------------
# model, optimizer, loss, schedule
# ---------------------------------------------------------------------------
def build_classifier(cfg: ClassifyConfig, in_features: int, num_classes: int,
                     mean: torch.Tensor | None = None) -> LipschitzMLPClassifier:
    """The MLP ``cfg`` describes (centred on ``mean`` when ``cfg.center``)."""
    torch.manual_seed(cfg.seed)
    cap = cfg.cap if cfg.cap_frame == "l2" else 1.0  # an RMS-frame cap is set per layer by the optimizer
    model = LipschitzMLPClassifier(in_features, cfg.widths, num_classes, bias=cfg.bias, activation=cfg.activation,
                                   cap=cap, constrained=cfg.constraint != "none", init=cfg.init)
    if cfg.center and mean is not None:
        model.set_mean(mean)
    return model


def _layer_caps(model: LipschitzMLPClassifier, cfg: ClassifyConfig) -> list[float]:
    """Each layer's cap in the constraints' RMS->RMS frame."""
    return [cfg.cap * math.sqrt(W.shape[1] / W.shape[0]) if cfg.cap_frame == "l2" else cfg.cap
            for W in model.weights()]


def _make_constraint(cfg: ClassifyConfig, sigma_max: float):
    name = cfg.constraint
    if name in ("none", "weight_decay"):  # weight decay is the optimizer's own
        return None
    if name == "spectral_weight_decay":
        return cons.SpectralWeightDecay(lam=cfg.weight_decay)
    return cons.make_constraint(name, sigma_max=sigma_max)


class AdamWConstrained:
    """``torch.optim.AdamW``, then each layer's constraint (same interface as ``OptimizerSet``)."""

    def __init__(self, model: LipschitzMLPClassifier, cfg: ClassifyConfig):
        wd = cfg.weight_decay if cfg.constraint not in ("spectral_weight_decay",) else 0.0
        weights = model.weights()
        others = [p for p in model.parameters() if all(p is not w for w in weights)]
        groups = [{"params": weights, "weight_decay": wd}]
        if others:
            groups.append({"params": others, "weight_decay": 0.0})
        self.optimizers = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))]
        self.weights = weights
        self.constraints = [_make_constraint(cfg, s) for s in _layer_caps(model, cfg)]
        self.cstate: list[dict] = [{} for _ in weights]

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step and the constraints; raises :class:`NonFiniteGradient` (changing
        nothing) when a gradient holds NaN or inf, as Muon does."""
        grads = [p.grad for g in self.optimizers[0].param_groups for p in g["params"] if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            raise NonFiniteGradient("AdamW: non-finite gradient; the step was skipped, nothing was changed")
        self.optimizers[0].step()
        lr = self.optimizers[0].param_groups[0]["lr"]
        for W, c, st in zip(self.weights, self.constraints, self.cstate):
            if c is not None and lr > 0:
                c.apply_(W, lr=lr, update_norm=0.0, decay=0.0, state=st)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizers[0].zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.optimizers[0].state_dict(), "constraint_state": self.cstate}

    def load_state_dict(self, state: dict) -> None:
        self.optimizers[0].load_state_dict(state["adamw"])
        self.cstate = [dict(s) for s in state["constraint_state"]]


def build_classifier_optimizer(model: LipschitzMLPClassifier, cfg: ClassifyConfig):
    """Muon (every layer one ``hidden`` group, its constraint at its cap; decoupled weight
    decay ``cfg.weight_decay``) or AdamW + the constraint after each step."""
    if cfg.optimizer == "adamw":
        return AdamWConstrained(model, cfg)
    from .optim import build_optimizers

    caps = iter(_layer_caps(model, cfg))

    def constraint_for(_sigma: float):  # called once per layer, in order
        return _make_constraint(cfg, next(caps))

    wd = 0.0 if cfg.constraint == "spectral_weight_decay" else cfg.weight_decay
    return build_optimizers(model, lr=cfg.lr, head_lr=cfg.lr, vector_lr=cfg.lr * 0.02, weight_decay=wd,
                            hidden_constraint=constraint_for, head_constraint=constraint_for,
                            ns_dtype="float32" if next(model.parameters()).device.type == "cpu" else "auto")


def linear_decay(step: int, elapsed: float, *, steps: int = 0, time_budget: float = 0.0) -> float:
    """The lr multiplier decaying linearly from 1 to 0: at ``time_budget`` seconds when one
    is set, else at ``steps``; 1 when neither is."""
    if time_budget > 0:
        return max(0.0, 1.0 - elapsed / time_budget)
    if steps > 0:
        return max(0.0, 1.0 - step / steps)
    return 1.0


def classification_loss(z: torch.Tensor, y: torch.Tensor, *, loss: str = "ce", logit_scale: float = 1.0,
                        margin_eps: float = 0.0, lipschitz: float = 1.0) -> torch.Tensor:
    """``ce`` or ``margin_ce`` (see the module docstring) of logits ``z [B, C]``, labels ``y [B]``."""
    if loss == "margin_ce" and margin_eps > 0:
        z = z + (math.sqrt(2.0) * lipschitz * margin_eps) * (1.0 - F.one_hot(y, z.shape[1]).to(z.dtype))
    elif loss not in LOSSES:
        raise ValueError(f"classification_loss: loss must be one of {LOSSES}, got {loss!r}")
    return F.cross_entropy(logit_scale * z, y)


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
    from tqdm import tqdm

    from .plots import plot_curves
    from .runtime import StopRequest

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


# ---------------------------------------------------------------------------
# sweeps and the frontier
# ---------------------------------------------------------------------------
def sweep_classifiers(base: dict, grid: list[dict], out: str, *, jobs: int = 1, quiet: bool = True) -> list[dict]:
    """Run ``lipschitz-classify train`` once per grid point (``base`` fields + the point's),
    ``jobs`` at a time in subprocesses, each into ``out/<name>``; a point whose run folder
    already holds summary.json is not rerun. Returns :func:`frontier_rows` of ``out``."""
    os.makedirs(out, exist_ok=True)
    pending = []
    for point in grid:
        name = "-".join(f"{k}={v}" for k, v in point.items()).replace("/", "_")
        run_dir = os.path.join(out, name)
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            continue
        cfg = {**base, **point, "out": run_dir}
        cmd = [sys.executable, "-m", "lipschitz_ext.cli_classify", "train", "--quiet", "--config-json", json.dumps(cfg)]
        if os.path.exists(os.path.join(run_dir, "latest.pt")):
            cmd = [sys.executable, "-m", "lipschitz_ext.cli_classify", "train", "--quiet", "--resume", run_dir]
        elif os.path.isdir(run_dir):  # an earlier attempt that never checkpointed
            for f in os.listdir(run_dir):
                os.remove(os.path.join(run_dir, f))
        pending.append((name, cmd))
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < max(1, jobs):
            name, cmd = pending.pop(0)
            if not quiet:
                print(f"sweep: {name}", file=sys.stderr)
            running.append((name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL)))
        time.sleep(0.5)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                if item[1].returncode != 0:
                    print(f"sweep: {item[0]} exited with status {item[1].returncode}", file=sys.stderr)
    rows = frontier_rows(out)
    write_frontier(rows, out)
    return rows


def frontier_rows(out: str) -> list[dict]:
    """One row per finished run under ``out``: method, optimizer, lr, cap, accuracy, bound."""
    rows = []
    for name in sorted(os.listdir(out)):
        p = os.path.join(out, name, "summary.json")
        if not os.path.exists(p):
            continue
        s = read_json(p)
        c = s["config"]
        rows.append({"run": name, "optimizer": c["optimizer"], "constraint": c["constraint"], "cap": c["cap"],
                     "lr": c["lr"], "weight_decay": c["weight_decay"], "steps": s["steps"],
                     "wall_seconds": s["wall_seconds"], "clean_accuracy": s["clean_accuracy"],
                     "certified_bound": s["certified_bound"], "certified_accuracy": s["certified_accuracy"]})
    return rows


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], -1.0
    for b, a in sorted(points):
        if a > best:
            front.append((b, a))
            best = a
    return front


def write_frontier(rows: list[dict], out: str) -> None:
    """``out/frontier.png`` (test accuracy vs certified bound: every run faint, and each
    optimizer x constraint's front -- its runs not beaten by one of a lower bound -- as a
    line; colour by constraint, solid Muon, dashed AdamW), ``out/frontier.json`` and
    ``out/frontier.md``."""
    from .plots import pyplot, save_figure

    write_json(os.path.join(out, "frontier.json"), rows)
    lines = ["| optimizer | constraint | cap | lr | weight decay | steps | test accuracy | certified bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["optimizer"], r["constraint"], r["cap"], r["lr"])):
        lines.append(f"| {r['optimizer']} | {r['constraint']} | {r['cap']:g} | {r['lr']:g} | {r['weight_decay']:g} | "
                     f"{r['steps']} | {100 * r['clean_accuracy']:.2f}% | {r['certified_bound']:.4g} |")
    with open(os.path.join(out, "frontier.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    methods = dict.fromkeys((r["optimizer"], r["constraint"]) for r in rows)
    colors = {c: f"C{i % 10}" for i, c in enumerate(dict.fromkeys(c for _, c in methods))}
    for o, c in sorted(methods, key=lambda m: (m[1], m[0])):  # colour: constraint; line: optimizer
        pts = [(r["certified_bound"], 100 * r["clean_accuracy"]) for r in rows
               if (r["optimizer"], r["constraint"]) == (o, c)]
        marker = "o" if o == "muon" else "s"
        ax.scatter(*zip(*pts), color=colors[c], alpha=0.3, s=14, marker=marker)
        ax.plot(*zip(*_pareto(pts)), "-" if o == "muon" else "--", marker=marker, color=colors[c],
                label=f"{o} + {c}")
    ax.set_xscale("log")
    ax.set(xlabel="certified l2 Lipschitz bound (pixel space)", ylabel="test accuracy (%)",
           title="accuracy vs certified bound (front of each method)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(out, "frontier.png"))
