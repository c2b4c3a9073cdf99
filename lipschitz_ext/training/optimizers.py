"""The optimizer of a training run and its learning-rate schedule.

The Lipschitz model trains with ``lipschitz_ext.optim.build_optimizers`` (Muon with a
constraint per matrix group, Adam for the embedding and vectors); the baseline with AdamW
behind the same interface (:class:`AdamWSetup`).
"""

from __future__ import annotations


import torch

from ..optim import OptimizerConfig, build_optimizers
from .config import TrainConfig

__all__ = ["AdamWSetup", "build_optimizer", "all_param_groups", "lr_multiplier", "set_lrs"]


class AdamWSetup:
    """The baseline's optimizer with the same interface as build_optimizers' result."""

    def __init__(self, model: torch.nn.Module, cfg: "TrainConfig"):
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizers = [torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.baseline_lr, betas=(0.9, 0.95))]
        self.grad_clip = cfg.grad_clip
        self.model = model

    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def build_optimizer(model: torch.nn.Module, cfg: "TrainConfig"):
    """The optimizer ``cfg`` trains ``model`` with: AdamW for the baseline, else Muon on the
    matrices (each constrained to its cap after every step) and Adam on the embedding and
    vectors (``lipschitz_ext.optim.build_optimizers``; vectors use ``embed_lr``)."""
    if cfg.model == "baseline":
        return AdamWSetup(model, cfg)

    constraint = None if cfg.constraint == "none" else cfg.constraint
    # A CPU run without autocast stays float32 throughout, Newton-Schulz included;
    # elsewhere Muon's "auto" runs it in bf16 where the hardware multiplies bf16.
    cpu_fp32 = cfg.autocast == "none" and next(model.parameters()).device.type == "cpu"
    ns_dtype = ("float32" if cpu_fp32 else "auto") if cfg.ns_dtype == "auto" else cfg.ns_dtype
    return build_optimizers(model, OptimizerConfig(
        lr=cfg.lr, head_lr=cfg.head_lr, embed_lr=cfg.embed_lr, vector_lr=cfg.embed_lr,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, hidden_constraint=constraint,
        head_constraint=constraint, hidden_sigma_max=cfg.sigma_max, head_sigma_max=cfg.head_sigma_max,
        embed_max_rms=cfg.embed_max_rms, ns_dtype=ns_dtype,
    ))


def all_param_groups(opt) -> list[dict]:
    """Every param group of every optimizer of ``opt`` (a build_optimizer result)."""
    return [g for o in opt.optimizers for g in o.param_groups]


def lr_multiplier(cfg: "TrainConfig", step: int, elapsed: float = 0.0) -> float:
    """Linear warm-up, a constant lr, then linear decay to final_lr_frac at the end
    over the last ``cooldown_frac`` of the run (all of it by default). The end is the last
    step, or with ``schedule="time"`` the time budget (``elapsed`` seconds so far)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "time":
        progress = min(1.0, elapsed / cfg.time_budget)
    else:
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
    start = 1.0 - cfg.cooldown_frac
    decay = max(0.0, progress - start) / cfg.cooldown_frac
    return 1.0 - (1.0 - cfg.final_lr_frac) * decay


def set_lrs(opt, mult: float) -> None:
    """Set every group's lr to ``mult`` times its initial lr."""
    for g in all_param_groups(opt):
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"] * mult
