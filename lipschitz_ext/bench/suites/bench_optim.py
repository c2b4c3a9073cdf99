"""Benchmark one full optimizer step (momentum, Newton-Schulz, update, soft cap).

    lipschitz-bench --suite optim                # the shared runner (lipschitz_ext.bench)
    lipschitz-bench --suite optim --device cuda --repeats 5
    python -m lipschitz_ext.bench.suites.bench_optim [lipschitz-bench options]   # the same

Weight sets: the hidden matrices of GPT-2 small (12 layers, d=768: per layer
Q, K, V, O 768x768, MLP in 3072x768, MLP out 768x3072) and of the Shakespeare
model (3 layers, d=256), as parameters in PyTorch layout.

Implementations (each one step = what the paper's training loop does per step):
- ``lipschitz_ext``: :class:`lipschitz_ext.optim.Muon` with ``SpectralSoftCap``
  (one orthogonalize + one soft-cap call per shape bucket);
- ``torch_muon_softcap``: ``torch.optim.Muon`` (per-parameter loop, bf16
  Newton-Schulz) followed by a per-parameter soft cap in plain PyTorch;
- ``torch_fp32_loop_softcap``: the same per-parameter loop with fp32 (the
  parameter dtype) Newton-Schulz, to separate batching from precision.
All use 5 Newton-Schulz steps and the same coupled soft-cap alpha.

``muon_step``: one Muon step over the ``shakespeare-cpu`` preset's hidden
matrices (the README's main job), ours (``ns_dtype="auto"``: bf16 GEMMs where the
hardware multiplies bf16 natively) against ``torch.optim.Muon`` (bf16
Newton-Schulz, per-parameter loop) and ours forced to float32, in the same run;
``muon_step_soft_cap`` the same with the soft cap (torch's step followed by the
plain-PyTorch cap as its baseline). Their floor is the Newton-Schulz FLOPs at the
measured peak of the dtype ours resolves to.

Case definitions are plain functions (``model_shapes``, ``make_params``,
``make_step``) so a runner can import them; ``cases(cfg)`` exposes them to the
shared runner (``lipschitz-bench --suite optim``), whose C++ loop times them and
writes the table and the results JSON (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from lipschitz_ext import constraints, ops
from lipschitz_ext.optim import Muon
from lipschitz_ext.bench import Case, Setup, Skip
from lipschitz_ext.optim import resolve_ns_dtype
from lipschitz_ext.training import config

#: model -> (layers, d); "gpt2_block" is one GPT-2 layer (CPU runs), "smoke" the CI smoke.
MODELS: dict[str, tuple[int, int]] = {
    "shakespeare": (3, 256), "gpt2": (12, 768), "gpt2_block": (1, 768), "smoke": (1, 32)}
IMPLS = ("lipschitz_ext", "torch_muon_softcap", "torch_fp32_loop_softcap")
PARAMS = {"lr": 0.05, "momentum": 0.95, "ns_steps": 5, "sigma_max": 1.0, "constraint": "soft_cap"}
JORDAN = (3.4445, -4.7750, 2.0315)


def model_shapes(model: str) -> list[tuple[int, int]]:
    """The hidden weight shapes ``(fan_out, fan_in)`` of ``model``, layer by layer."""
    layers, d = MODELS[model]
    return [s for _ in range(layers) for s in [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]]


def make_params(model: str, dtype: torch.dtype, device: str, seed: int = 0):
    """Weights with RMS->RMS norm ~1 and gradients, as ``(params, grads)``."""
    g = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for m, n in model_shapes(model):
        W = torch.randn(m, n, generator=g) * (math.sqrt(m / n) / (math.sqrt(m) + math.sqrt(n)))
        params.append(torch.nn.Parameter(W.to(device=device, dtype=dtype)))
        grads.append(torch.randn(m, n, generator=g).to(device=device, dtype=dtype))
    return params, grads


def soft_cap_alpha() -> float:
    """The coupled alpha (RMS->RMS frame) all implementations use for this step size."""
    mu = PARAMS["lr"] * ops.ns_max_gain(PARAMS["ns_steps"], "polar_express") * 1.05
    return ops.soft_cap_alpha(PARAMS["sigma_max"], mu, 0.0)


def torch_soft_cap_(W: torch.Tensor, alpha: float) -> None:
    """Plain-PyTorch soft cap of one matrix in the RMS->RMS frame (small-side Gram), in place."""
    m, n = W.shape
    a = alpha / (m / n)  # alpha on W' = W / sqrt(m/n) is alpha / (m/n) on W
    X = W.float()
    for sign in (-1.0, 1.0):
        X = X + sign * a * (X @ (X.mT @ X) if m > n else (X @ X.mT) @ X)
    W.copy_(X)


def _ns_loop(G: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = JORDAN
    X = G.mT if G.shape[0] > G.shape[1] else G
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if G.shape[0] > G.shape[1] else X


def _torch_muon_step(params: list[torch.nn.Parameter], soft_cap: bool) -> Callable[[], None]:
    """``torch.optim.Muon``'s step (bf16 Newton-Schulz), then the plain-PyTorch soft cap if ``soft_cap``."""
    opt = torch.optim.Muon(params, lr=PARAMS["lr"], momentum=PARAMS["momentum"], weight_decay=0.0,
                           ns_steps=PARAMS["ns_steps"])
    if not soft_cap:
        return opt.step
    alpha = soft_cap_alpha()

    def step():
        opt.step()
        with torch.no_grad():
            for p in params:
                torch_soft_cap_(p, alpha)

    return step


def make_step(impl: str, params: list[torch.nn.Parameter]) -> Callable[[], None]:
    """A zero-argument callable doing one optimizer step of ``impl`` on ``params``."""
    lr, mom, steps = PARAMS["lr"], PARAMS["momentum"], PARAMS["ns_steps"]
    alpha = soft_cap_alpha()
    if impl == "lipschitz_ext":
        opt = Muon(params, lr=lr, momentum=mom, ns_steps=steps,
                   constraint=constraints.SpectralSoftCap(PARAMS["sigma_max"], alpha=alpha))
        return opt.step
    if impl == "torch_muon_softcap":
        return _torch_muon_step(params, soft_cap=True)
    if impl == "torch_fp32_loop_softcap":
        bufs = [torch.zeros_like(p) for p in params]

        @torch.no_grad()
        def step():
            for p, buf in zip(params, bufs):
                buf.lerp_(p.grad, 1 - mom)
                O = _ns_loop(p.grad.lerp(buf, mom), steps)
                p.add_(O, alpha=-lr * math.sqrt(p.shape[0] / p.shape[1]))
                torch_soft_cap_(p, alpha)

        return step
    raise ValueError(f"bench_optim: unknown impl {impl!r}; choose from {IMPLS}")


def step_flops(model: str) -> float:
    """Newton-Schulz (``4 m^2 n + 2 m^3`` per step, m the small side) + soft cap (``8 m^2 n``) FLOPs."""
    total = 0.0
    for m, n in model_shapes(model):
        s, l = min(m, n), max(m, n)
        total += PARAMS["ns_steps"] * (4 * s * s * l + 2 * s**3) + 8 * s * s * l
    return total


def preset_hidden_shapes(preset: str = "shakespeare-cpu") -> list[tuple[int, int]]:
    """The hidden (Muon, constrained) matrix shapes of a training preset's model."""
    model = config.build_model(config.config_from_preset(preset), 65)
    return [tuple(p.shape) for d in model.param_groups_spec() if d["kind"] == "hidden" for p in d["params"]]


MUON_IMPLS = ("lipschitz_ext", "lipschitz_ext_float32", "torch_optim_muon")


def make_muon_step(impl: str, params: list[torch.nn.Parameter], soft_cap: bool) -> Callable[[], None]:
    """One Muon step of ``impl`` (see :data:`MUON_IMPLS`), then the soft cap if ``soft_cap``."""
    lr, mom, steps = PARAMS["lr"], PARAMS["momentum"], PARAMS["ns_steps"]
    alpha = soft_cap_alpha()
    if impl in ("lipschitz_ext", "lipschitz_ext_float32"):
        cap = constraints.SpectralSoftCap(PARAMS["sigma_max"], alpha=alpha) if soft_cap else None
        opt = Muon(params, lr=lr, momentum=mom, ns_steps=steps, constraint=cap,
                   ns_dtype="auto" if impl == "lipschitz_ext" else "float32")
        return opt.step
    if impl == "torch_optim_muon":
        if not hasattr(torch.optim, "Muon"):
            raise Skip(f"torch {torch.__version__} has no torch.optim.Muon")
        return _torch_muon_step(params, soft_cap)
    raise ValueError(f"bench_optim: unknown impl {impl!r}; choose from {MUON_IMPLS}")


def ns_flops(shapes: list[tuple[int, int]]) -> float:
    """Newton-Schulz FLOPs of one step over ``shapes`` (``4 s^2 l + 2 s^3`` per NS step)."""
    total = 0.0
    for m, n in shapes:
        s, l = min(m, n), max(m, n)
        total += PARAMS["ns_steps"] * (4 * s * s * l + 2 * s**3)
    return total


def _muon_factory(impl: str, shapes: list[tuple[int, int]], dtype: torch.dtype, device: str, soft_cap: bool):
    def build(n_sets: int) -> Setup:
        g = torch.Generator().manual_seed(0)
        params = []
        for m, n in shapes:
            W = torch.randn(m, n, generator=g) * (math.sqrt(m / n) / (math.sqrt(m) + math.sqrt(n)))
            p = torch.nn.Parameter(W.to(device=device, dtype=dtype))
            p.grad = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)
            params.append(p)
        return Setup(make_muon_step(impl, params, soft_cap), [()])

    return build


def muon_cases(cfg) -> list:
    """``muon_step`` / ``muon_step_soft_cap`` on the shakespeare-cpu hidden matrices
    (smoke: two tiny matrices), ours vs torch.optim.Muon and ours in float32."""
    device = str(cfg.device)
    dtype = cfg.dtype or torch.float32
    shapes = [(16, 16), (64, 16), (16, 64)] if cfg.smoke else preset_hidden_shapes()
    ns = resolve_ns_dtype("auto", cfg.device, dtype)
    out = []
    for soft_cap in (False, True):
        out.append(Case(
            name="muon_step_soft_cap" if soft_cap else "muon_step",
            shape=(len(shapes), max(max(s) for s in shapes)),
            dtype=dtype,
            params={"model": "smoke" if cfg.smoke else "shakespeare-cpu", "matrices": len(shapes),
                    "shapes": [list(s) for s in shapes], "ns_dtype": str(ns).removeprefix("torch."),
                    "constraint": "soft_cap" if soft_cap else "none",
                    **{k: v for k, v in PARAMS.items() if k != "constraint"}},
            ours=_muon_factory("lipschitz_ext", shapes, dtype, device, soft_cap),
            baselines={impl: _muon_factory(impl, shapes, dtype, device, soft_cap) for impl in MUON_IMPLS[1:]},
            flops=ns_flops(shapes),
            bytes=5.0 * sum(m * n for m, n in shapes) * dtype.itemsize,
            peak="bf16_tflops" if ns == torch.bfloat16 else "fp32_tflops" if ns == torch.float32 else None,
        ))
    return out


#: the Fashion-MNIST MLP's weights (fan_out, fan_in) and the batch of its forward+backward
MLP_SHAPES: list[tuple[int, int]] = [(256, 784), (256, 256), (10, 256)]
MLP_BATCH = 512
#: ``mlp_step``'s implementations: ours (Muon, auto dtype and algorithm, + the auto hard cap), ours
#: forced to float32 / bfloat16 Newton-Schulz, AdamW's step, and the MLP's forward+backward
MLP_IMPLS = ("muon_hard_cap", "muon_hard_cap_float32", "muon_hard_cap_bfloat16", "adamw_step", "forward_backward")


def make_mlp_step(impl: str, params: list[torch.nn.Parameter], seed: int = 0) -> Callable[[], None]:
    """One step of ``impl`` (:data:`MLP_IMPLS`) on the MLP weights ``params`` (grads set)."""
    if impl.startswith("muon_hard_cap"):
        ns = {"muon_hard_cap": "auto", "muon_hard_cap_float32": "float32", "muon_hard_cap_bfloat16": "bfloat16"}[impl]
        opt = Muon(params, lr=PARAMS["lr"], momentum=PARAMS["momentum"], ns_steps=PARAMS["ns_steps"],
                   constraint=constraints.SpectralHardCap(PARAMS["sigma_max"]), ns_dtype=ns)
        return opt.step
    if impl == "adamw_step":
        return torch.optim.AdamW(params, lr=1e-3).step
    if impl == "forward_backward":
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(MLP_BATCH, params[0].shape[1], generator=g).to(params[0])
        y = torch.randint(0, params[-1].shape[0], (MLP_BATCH,), generator=g, device=params[0].device)

        def fwd_bwd():
            h = x
            for i, W in enumerate(params):
                h = h @ W.mT
                if i + 1 < len(params):
                    h = torch.relu(h)
            torch.nn.functional.cross_entropy(h, y).backward()

        return fwd_bwd
    raise ValueError(f"bench_optim: unknown impl {impl!r}; choose from {MLP_IMPLS}")


def _mlp_factory(impl: str, shapes: list[tuple[int, int]], dtype: torch.dtype, device: str):
    def build(n_sets: int) -> Setup:
        g = torch.Generator().manual_seed(0)
        params = []
        for m, n in shapes:
            W = torch.randn(m, n, generator=g) * (1.2 / (math.sqrt(m) + math.sqrt(n)))  # 1.2x the cap
            p = torch.nn.Parameter(W.to(device=device, dtype=dtype))
            p.grad = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)
            params.append(p)
        return Setup(make_mlp_step(impl, params), [()])

    return build


def mlp_cases(cfg) -> list:
    """``mlp_step``: the Fashion-MNIST MLP's whole Muon + hard-cap step (``auto`` everywhere),
    beside the same step in float32 / bf16 Newton-Schulz, AdamW's step and the model's
    forward+backward at batch 512, in the same run (smoke: two tiny matrices)."""
    device = str(cfg.device)
    dtype = cfg.dtype or torch.float32
    shapes = [(16, 24), (4, 16)] if cfg.smoke else MLP_SHAPES
    return [Case(
        name="mlp_step", shape=(len(shapes), max(max(s) for s in shapes)), dtype=dtype,
        params={"model": "smoke" if cfg.smoke else "fashion_mlp", "shapes": [list(s) for s in shapes],
                "constraint": "hard_cap(auto)", "batch": MLP_BATCH,
                **{k: v for k, v in PARAMS.items() if k != "constraint"}},
        ours=_mlp_factory(MLP_IMPLS[0], shapes, dtype, device),
        baselines={impl: _mlp_factory(impl, shapes, dtype, device) for impl in MLP_IMPLS[1:]},
        flops=ns_flops(shapes), bytes=5.0 * sum(m * n for m, n in shapes) * dtype.itemsize,
        peak=None if cfg.is_cuda else "fp32_tflops",
    )]


def _factory(impl: str, model: str, dtype: torch.dtype, device: str):
    def build(n_sets: int) -> Setup:
        # One set: a step updates its weights in place, and the GPT-2 set is large.
        params, grads = make_params(model, dtype, device)
        for p, g in zip(params, grads):
            p.grad = g
        return Setup(make_step(impl, params), [()])

    return build


def cases(cfg) -> list:
    """Cases for the shared runner: one full optimizer step per model (GPU: both
    models; CPU: Shakespeare and one GPT-2 layer, the full set takes ~45 s a step)."""
    device = str(cfg.device)
    dtype = cfg.dtype or (torch.bfloat16 if cfg.is_cuda else torch.float32)
    if cfg.smoke:
        models = ["smoke"]
    else:
        models = ["shakespeare", "gpt2"] if cfg.is_cuda else ["shakespeare", "gpt2_block"]
    out = []
    for model in models:
        layers, d = MODELS[model]
        n_elem = sum(m * n for m, n in model_shapes(model))
        out.append(Case(
            name="optimizer_step",
            shape=(layers, d),
            dtype=dtype,
            params={"model": model, "matrices": len(model_shapes(model)), **PARAMS},
            ours=_factory("lipschitz_ext", model, dtype, device),
            baselines={impl: _factory(impl, model, dtype, device) for impl in IMPLS[1:]},
            flops=step_flops(model),
            # read W, G, momentum; write W, momentum (the elementwise floor)
            bytes=5.0 * n_elem * dtype.itemsize,
            peak=None if cfg.is_cuda else "fp32_tflops",
        ))
    return out + muon_cases(cfg) + mlp_cases(cfg)


if __name__ == "__main__":  # the shared runner: lipschitz-bench --suite optim [its options]
    import sys

    from lipschitz_ext.cli.bench import main

    sys.exit(main(["--suite", "optim", *sys.argv[1:]]))
