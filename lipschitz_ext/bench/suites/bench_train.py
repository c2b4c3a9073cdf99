"""Benchmark suite ``train``: one full training step (forward, backward, optimizer step).

    lipschitz-bench --suite train                # the shared runner (lipschitz_ext.bench)
    lipschitz-bench --suite train --device cuda
    python -m lipschitz_ext.bench.suites.bench_train [lipschitz-bench options]   # the same
    python -m lipschitz_ext.bench.suites.bench_train step-split THREADS [OUT.json]
        # CPU, shakespeare-cpu: forward+backward and optimizer step timed back to back per step

The step is :mod:`lipschitz_ext.training.loop`'s: ``loss = training_loss_fn(model)(x, y)`` (forward
under the preset's resolved autocast, cross-entropy in float32), ``loss.backward()``,
``opt.step()``, ``opt.zero_grad()``, on the model and optimizer ``lipschitz-train`` builds
(:func:`lipschitz_ext.training.config.build_model`, :func:`lipschitz_ext.training.optimizers.build_optimizer`).
Shapes: the ``shakespeare-cpu`` preset on a CPU (batch 32 x 128 tokens, d 128, 2 layers, MLP
8d, positional attention), the ``shakespeare`` preset on CUDA, a one-block d=32 model in
``--smoke``.

Implementations, each in the same run (``speedup`` = baseline ms / ours):
- ``lipschitz_ext`` (ours): the Lipschitz model with the training forward+backward compiled
  (``--compile model``); eager when compile baselines are off (``--smoke``,
  ``--no-compile``: ``params.compile`` says which ran);
- ``lipschitz_eager``: the same step eager (``--compile none``): its speedup is what
  compiling buys;
- ``lipschitz_forward_backward``: the same model's forward+backward alone, compiled as ours
  is (no optimizer step): ``1 / speedup`` is the whole step over its forward+backward, the
  cost of Muon, Adam and the constraints;
- ``baseline_gpt_eager`` / ``baseline_gpt_compiled``: :class:`lipschitz_ext.nn.BaselineGPT`
  (pre-LayerNorm, content attention, AdamW) at the same d, layers, heads, MLP ratio, batch
  and context: its speedup below 1 is what the constraints and the Muon step cost.

Tokens per second of an implementation: ``params.tokens_per_step / median_ms * 1000``.
FLOPs (``flops``, ours): forward + backward matmuls and attention of the Lipschitz model
(3x the forward: ``2 N`` per token for ``N`` matrix weights, ``2 T d`` per token for each
attention product over the full ``T x T`` square, which SDPA and the positional mixing
compute) plus Muon's Newton-Schulz (5 steps of ``4 m^2 n + 2 m^3`` per matrix); the
constraint (hard cap) and Adam are left out. ``params.baseline_gpt_flops`` is the same
estimate for BaselineGPT (no Newton-Schulz: AdamW).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics

import torch

from lipschitz_ext import _bench
from lipschitz_ext.training import config as C
from lipschitz_ext.bench import Case, Setup, Skip, SuiteConfig
from lipschitz_ext.nn import LipschitzGPT
from lipschitz_ext.training.optimizers import build_optimizer
from lipschitz_ext.training.runtime import resolve_autocast
from lipschitz_ext.training.loop import training_loss_fn
from lipschitz_ext.optim import Muon

#: Characters of the built-in corpus's vocabulary (the shakespeare presets' tokenizer).
VOCAB = 65
NS_STEPS = 5
SMOKE = dict(d_model=32, n_layers=1, residual_scale=1.0, n_heads=2, seq_len=16, batch_size=2, mlp_ratio=4, autocast="none")


def bench_config(cfg: SuiteConfig) -> C.TrainConfig:
    """The TrainConfig whose training step the suite times on ``cfg.device``."""
    if cfg.smoke:
        return C.config_from_preset("shakespeare-cpu", device="cpu", **SMOKE)
    if cfg.is_cuda:
        return C.config_from_preset("shakespeare")
    return C.config_from_preset("shakespeare-cpu", device="cpu")


def _matrix_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    return [tuple(p.shape) for p in model.parameters() if p.dim() == 2]


def step_flops(tc: C.TrainConfig, model: torch.nn.Module, muon_matrices: list[tuple[int, int]]) -> float:
    """FLOPs of one training step of ``model`` at ``tc``'s shape (see the module docstring):
    3 x (matmuls ``2 N`` + attention ``2 T d`` per product, per token) + Newton-Schulz of
    ``muon_matrices``. Embedding lookups count nothing (no matmul)."""
    tokens = tc.batch_size * tc.seq_len
    n_matmul = sum(m * n for m, n in _matrix_shapes(model)) - tc.d_model * VOCAB  # the embedding is a gather
    positional = isinstance(model, LipschitzGPT) and tc.softmax_scale == 0
    products = 1 if positional else 2  # P V only, or Q K^T and P V
    forward = 2 * tokens * n_matmul + tc.n_layers * products * 2 * tokens * tc.seq_len * tc.d_model
    ns = sum(NS_STEPS * (4 * min(m, n) ** 2 * max(m, n) + 2 * min(m, n) ** 3) for m, n in muon_matrices)
    return float(3 * forward + ns)


def _build(tc: C.TrainConfig, model_kind: str, device: torch.device):
    tc = dataclasses.replace(tc, model=model_kind)
    torch.manual_seed(tc.seed)
    model = C.build_model(tc, VOCAB).to(device)
    return tc, model, build_optimizer(model, tc)


def _muon_matrices(opt) -> list[tuple[int, int]]:
    return [tuple(p.shape) for o in getattr(opt, "optimizers", []) if isinstance(o, Muon)
            for g in o.param_groups for p in g["params"]]


def _batches(tc: C.TrainConfig, device: torch.device, seed: int, n_sets: int) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (tc.batch_size, tc.seq_len)
    return [(torch.randint(0, VOCAB, shape, generator=gen).to(device),
             torch.randint(0, VOCAB, shape, generator=gen).to(device)) for _ in range(n_sets)]


def _step(tc: C.TrainConfig, model_kind: str, n_sets: int, *, device: torch.device, seed: int, compiled: bool,
          enabled: bool, optimizer: bool = True) -> Setup:
    """One training step of ``model_kind`` (``lipschitz`` | ``baseline``), compiled or eager;
    with ``optimizer=False`` only its forward+backward (the yardstick of what the optimizer
    step and the constraints add)."""
    if compiled and not enabled:
        raise Skip("torch.compile baselines disabled (--smoke or --no-compile)")
    tc, model, opt = _build(tc, model_kind, device)
    model.train()
    if compiled:
        torch._dynamo.reset()  # a fresh cache per implementation: no recompile limit reached
    loss_fn = training_loss_fn(model, tc, resolve_autocast(tc, device), device, compiled=compiled)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss_fn(x, y).backward()
        if optimizer:
            opt.step()
        opt.zero_grad(set_to_none=True)

    return Setup(step, _batches(tc, device, seed, max(2, n_sets)))


def cases(cfg: SuiteConfig) -> list[Case]:
    """The training-step case for ``cfg`` (one: the preset's shape on this device)."""
    tc = bench_config(cfg)
    device = cfg.device
    amp = resolve_autocast(tc, device)
    _, lip, lip_opt = _build(tc, "lipschitz", torch.device("cpu"))
    _, base, _ = _build(tc, "baseline", torch.device("cpu"))
    ours_compiled = cfg.compile

    def step(kind: str, compiled: bool, optimizer: bool = True):
        return functools.partial(_step, tc, kind, device=device, seed=cfg.seed, compiled=compiled,
                                 enabled=cfg.compile, optimizer=optimizer)

    baselines = {"lipschitz_forward_backward": step("lipschitz", ours_compiled, optimizer=False),
                 "baseline_gpt_eager": step("baseline", False), "baseline_gpt_compiled": step("baseline", True)}
    if ours_compiled:
        baselines = {"lipschitz_eager": step("lipschitz", False), **baselines}
    tokens = tc.batch_size * tc.seq_len
    n_weights = sum(p.numel() for p in lip.parameters())
    return [Case(
        name="train_step",
        shape=(tc.batch_size, tc.seq_len, tc.d_model, tc.n_layers),
        dtype=torch.bfloat16 if amp == "bf16" else torch.float32,
        params={"preset": tc.preset, "model": "lipschitz", "compile": "model" if ours_compiled else "none",
                "autocast": amp, "tokens_per_step": tokens, "mlp_ratio": tc.mlp_ratio, "n_heads": tc.n_heads,
                "softmax_scale": tc.softmax_scale, "constraint": tc.constraint, "ns_steps": NS_STEPS,
                "params": n_weights, "baseline_gpt_flops": step_flops(tc, base, [])},
        ours=step("lipschitz", ours_compiled),
        baselines=baselines,
        flops=step_flops(tc, lip, _muon_matrices(lip_opt)),
        # weights, gradients and optimizer state read and written once per step: the floor
        bytes=6.0 * 4 * n_weights,
    )]


def step_split(threads: int, steps: int = 45, warmup: int = 5, seed: int = 0) -> dict:
    """The ``shakespeare-cpu`` training step on CPU, eager, split in one loop: per step the
    forward+backward and then ``opt.step()`` are timed back to back (medians over ``steps -
    warmup`` steps), so both halves see the same moments of the machine. ``ratio`` is
    ``(forward_backward + optimizer_step) / forward_backward``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        tc = C.config_from_preset("shakespeare-cpu", device="cpu")
        tc, model, opt = _build(tc, "lipschitz", torch.device("cpu"))
        loss_fn = training_loss_fn(model, tc, resolve_autocast(tc, torch.device("cpu")), torch.device("cpu"),
                                   compiled=False)
        batches = _batches(tc, torch.device("cpu"), seed, 2)
        fb, st = [], []
        for i in range(steps):
            # one timed call each through the shared timer (host clock on CPU)
            f_ms = _bench.time_callable(lambda x, y: loss_fn(x, y).backward(), [batches[i % 2]], 0, 1, -1, 1)[0]
            o_ms = _bench.time_callable(opt.step, [()], 0, 1, -1, 1)[0]
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                fb.append(f_ms)
                st.append(o_ms)
    finally:
        torch.set_num_threads(saved)
    f, o = statistics.median(fb), statistics.median(st)
    return {"preset": "shakespeare-cpu", "threads": int(threads), "steps": steps, "warmup": warmup,
            "forward_backward_ms": f, "optimizer_step_ms": o, "ratio": (f + o) / f, "torch": torch.__version__}


if __name__ == "__main__":  # the shared runner: lipschitz-bench --suite train [its options]
    import sys

    if sys.argv[1:2] == ["step-split"]:  # python -m lipschitz_ext.bench.suites.bench_train step-split THREADS [OUT.json]
        import json

        result = step_split(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
        print(json.dumps(result, indent=1))
        if len(sys.argv) > 3:
            with open(sys.argv[3], "x") as f:  # never overwrite an earlier measurement
                json.dump(result, f, indent=1)
        sys.exit(0)
    from lipschitz_ext.cli.bench import main

    sys.exit(main(["--suite", "train", *sys.argv[1:]]))
