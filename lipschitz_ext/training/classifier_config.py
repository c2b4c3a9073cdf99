"""The configuration of a certified MLP classifier run (``lipschitz-classify``): every
field, the presets, and what a config builds (the model, its constraint, its optimizer,
its learning-rate schedule).

The learning rate decays linearly to zero at the end of the run: at ``time_budget``
seconds of training when one is set (:func:`linear_decay`), else at ``steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .. import constraints as cons
from ..certify.classifier import DEFAULT_RADII
from ..data.images import DATASETS
from ..nn.classifier import ACTIVATIONS, INITS, LipschitzMLPClassifier
from ..nn.losses import LOSSES
from ..optim.muon import NonFiniteGradient
from ..optim.setup import OptimizerConfig, build_optimizers

__all__ = ["TASK", "OPTIMIZERS", "CAP_FRAMES", "ClassifyConfig", "CLASSIFY_PRESETS", "classify_config",
           "build_classifier", "AdamWConstrained", "build_classifier_optimizer", "linear_decay"]

TASK = "classify"
OPTIMIZERS = ("muon", "adamw")
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

    caps = iter(_layer_caps(model, cfg))

    def constraint_for(_sigma: float):  # called once per layer, in order
        return _make_constraint(cfg, next(caps))

    wd = 0.0 if cfg.constraint == "spectral_weight_decay" else cfg.weight_decay
    return build_optimizers(model, OptimizerConfig(
        lr=cfg.lr, head_lr=cfg.lr, vector_lr=cfg.lr * 0.02, weight_decay=wd, hidden_constraint=constraint_for,
        head_constraint=constraint_for, ns_dtype="float32" if next(model.parameters()).device.type == "cpu" else "auto"))


def linear_decay(step: int, elapsed: float, *, steps: int = 0, time_budget: float = 0.0) -> float:
    """The lr multiplier decaying linearly from 1 to 0: at ``time_budget`` seconds when one
    is set, else at ``steps``; 1 when neither is."""
    if time_budget > 0:
        return max(0.0, 1.0 - elapsed / time_budget)
    if steps > 0:
        return max(0.0, 1.0 - step / steps)
    return 1.0


