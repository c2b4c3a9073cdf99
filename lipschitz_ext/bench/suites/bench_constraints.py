"""Benchmark the spectral constraint ops at the model shapes, next to svd_cap and
the same math written in plain PyTorch.

    lipschitz-bench --suite constraints                    # the shared runner (lipschitz_ext.bench)
    lipschitz-bench --suite constraints --device cuda --filter spectral_soft_cap
    python -m lipschitz_ext.bench.suites.bench_constraints [lipschitz-bench options]   # the same

Case definitions are plain data/functions (SHAPES, OPS, make_input, cases) so a
runner can import them; timing, tables and the results JSON (docs/benchmarks.md) are the
runner's (one C++ timing loop for every suite).
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import sys
from typing import Callable

import torch

from lipschitz_ext import _bench, ops
from lipschitz_ext.bench import Case, Setup
from lipschitz_ext.ops._recompute import ns_plan
from lipschitz_ext.ops.choices import TABLE, Rule, choose_rule
from lipschitz_ext.ops.spectral_cap import soft_cap_two_round_reference
from lipschitz_ext.optim import resolve_ns_dtype

#: suite -> list of (batch, m, n): same-shape weight buckets of each model.
#: Shakespeare (d=256, 3 blocks): Q,K,V,O per block = 12 x 256x256; MLP in 3 x 1024x256,
#: MLP out 3 x 256x1024. GPT-2 small (12 layers, d=768): 48 x 768x768, 24 x 3072x768
#: (MLP in and the transposed MLP out, stacked).
SHAPES: dict[str, list[tuple[int, int, int]]] = {
    "shakespeare": [(12, 256, 256), (3, 1024, 256), (3, 256, 1024)],
    "gpt2": [(48, 768, 768), (24, 3072, 768)],
}
#: extra CPU shapes of the soft cap only (the GPT-2 MLP aspect 4 at a quarter of its batch)
SOFT_CAP_CPU_SHAPES: list[tuple[int, int, int]] = [(8, 3072, 768)]

#: model -> its weight buckets (batch, m, n), fp32 on CPU: the constraint step's cost per model
#: (the ``ratios`` table below and the CPU cases of the runner)
MODEL_GROUPS: dict[str, list[tuple[int, int, int]]] = {
    "fashion_mlp": [(1, 256, 784), (1, 256, 256), (1, 10, 256)],  # the Fashion-MNIST MLP
    "shakespeare_cpu_mlp": [(4, 128, 1024)],  # the shakespeare-cpu preset's MLP matrices
    "gpt2_mlp": [(2, 768, 3072)],  # one GPT-2-small MLP (in, out transposed)
}

#: fixed parameters of every timed op
PARAMS = {"iters": 16, "sigma_max": 1.0, "alpha": 0.132, "lam": 0.1, "steps": 10}


def make_input(shape: tuple[int, int, int], dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """Random weights with spectral norm ~1.06 (just over a cap of 1, as after a step)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g, dtype=torch.float32)
    W = W * (1.06 / (math.sqrt(shape[-2]) + math.sqrt(shape[-1])))
    return W.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------
# the same math in plain PyTorch (small-side Gram, batched matmuls)


def torch_power_iteration(W, iters=16):
    u = torch.ones(W.shape[:-1], dtype=torch.float32, device=W.device)
    X = W.float()
    for _ in range(iters):
        v = torch.nn.functional.normalize((X.mT @ u.unsqueeze(-1)).squeeze(-1), dim=-1)
        u = torch.nn.functional.normalize((X @ v.unsqueeze(-1)).squeeze(-1), dim=-1)
    sigma = (u.unsqueeze(-2) @ X @ v.unsqueeze(-1))[..., 0, 0]
    return sigma, u, v


def torch_spectral_normalize(W, sigma_max=1.0, iters=16):
    sigma, _, _ = torch_power_iteration(W, iters)
    return (W.float() / torch.clamp(sigma / sigma_max, min=1.0)[..., None, None]).to(W.dtype)


def torch_spectral_hammer(W, sigma_max=1.0, iters=16):
    sigma, u, v = torch_power_iteration(W, iters)
    return (W.float() + (sigma_max - sigma)[..., None, None] * u.unsqueeze(-1) * v.unsqueeze(-2)).to(W.dtype)


def torch_spectral_weight_decay(W, lam=0.1, iters=16):
    sigma, u, v = torch_power_iteration(W, iters)
    return (W.float() - (lam * sigma)[..., None, None] * u.unsqueeze(-1) * v.unsqueeze(-2)).to(W.dtype)


def small_side_gram(W: torch.Tensor) -> torch.Tensor:
    """``W^T W`` for tall ``W`` (m > n), else ``W W^T``: ``[..., k, k]``, k = min(m, n).

    The yardstick pass of the GEMM-bound ops: every op forms its Gram matrix on the
    small side, so one pass is ``2 m k^2`` FLOPs (the large-side ``W W^T`` of a tall
    matrix costs ``m / k`` times more and made tall ops look ``m / k`` times cheaper).
    """
    return torch.bmm(W.mT, W) if W.shape[-2] > W.shape[-1] else torch.bmm(W, W.mT)


def torch_soft_cap(W, alpha=0.132):
    X = W.float()
    tall = X.shape[-2] > X.shape[-1]
    for sign in (-1.0, 1.0):
        X = X + sign * alpha * (X @ (X.mT @ X) if tall else (X @ X.mT) @ X)
    return X.to(W.dtype)


def _torch_msign(X, steps):
    # Polar Express with the 1.01 safety factor: the kernels' own table (ops.ns_plan)
    scale, coeffs = ns_plan(steps, "polar_express", ())
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) * scale + 1e-30)
    for a, b, c in coeffs:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def torch_hard_cap(W, sigma_max=1.0, steps=10):
    X = W.float()
    Q = _torch_msign(X, steps)
    D = sigma_max * Q - X
    R = _torch_msign(D, steps)
    return (0.5 * (sigma_max * Q + X - D @ R.mT @ Q)).to(W.dtype)


def torch_hard_cap_eigh(W, sigma_max=1.0):
    X = W.float()
    tall = X.shape[-2] >= X.shape[-1]
    lam, V = torch.linalg.eigh(X.mT @ X if tall else X @ X.mT)
    M = (V * (1 - sigma_max * lam.clamp_min(0).rsqrt()).clamp_min(0).unsqueeze(-2)) @ V.mT
    return (X - X @ M if tall else X - M @ X).to(W.dtype)


def torch_orthogonal(W, sigma_max=1.0, steps=10):
    return (sigma_max * _torch_msign(W.float(), steps)).to(W.dtype)


def torch_svd_cap(W, sigma_max=1.0):
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return ((U * S.clamp(max=sigma_max).unsqueeze(-2)) @ Vh).to(W.dtype)


P = PARAMS
#: op name -> (ours, plain PyTorch); every callable takes the weights only.
OPS: dict[str, tuple[Callable, Callable]] = {
    "power_iteration": (lambda W: ops.power_iteration(W, P["iters"]), lambda W: torch_power_iteration(W, P["iters"])),
    "spectral_normalize": (
        lambda W: ops.spectral_normalize(W, P["sigma_max"], P["iters"]),
        lambda W: torch_spectral_normalize(W, P["sigma_max"], P["iters"]),
    ),
    "spectral_hammer": (
        lambda W: ops.spectral_hammer(W, P["sigma_max"], P["iters"]),
        lambda W: torch_spectral_hammer(W, P["sigma_max"], P["iters"]),
    ),
    "spectral_weight_decay": (
        lambda W: ops.spectral_weight_decay(W, P["lam"], P["iters"]),
        lambda W: torch_spectral_weight_decay(W, P["lam"], P["iters"]),
    ),
    "spectral_soft_cap": (lambda W: ops.spectral_soft_cap(W, P["alpha"]), lambda W: torch_soft_cap(W, P["alpha"])),
    # the op's former two-round form (two rounds, same ATen calls as its C++): the one update's baseline
    "spectral_soft_cap_two_round": (lambda W: soft_cap_two_round_reference(W, P["alpha"]), None),
    "spectral_hard_cap_msign": (
        lambda W: ops.spectral_hard_cap(W, P["sigma_max"], "msign", P["steps"]),
        lambda W: torch_hard_cap(W, P["sigma_max"], P["steps"]),
    ),
    "spectral_hard_cap_polynomial": (
        lambda W: ops.spectral_hard_cap(W, P["sigma_max"], "polynomial", P["steps"], P["iters"]),
        None,
    ),
    "spectral_hard_cap_eigh": (
        lambda W: ops.spectral_hard_cap(W, P["sigma_max"], "eigh"),
        lambda W: torch_hard_cap_eigh(W, P["sigma_max"]),
    ),
    "orthogonal_project": (
        lambda W: ops.orthogonal_project(W, P["sigma_max"], P["steps"], method="msign"),
        lambda W: torch_orthogonal(W, P["sigma_max"], P["steps"]),
    ),
    "orthogonal_project_gram": (lambda W: ops.orthogonal_project(W, P["sigma_max"], P["steps"], method="gram"),
                                None),
    "svd_cap": (lambda W: ops.svd_cap(W, P["sigma_max"]), lambda W: torch_svd_cap(W, P["sigma_max"])),
    # one batched small-side Gram pass over the same batch: the yardstick for the GEMM-bound ops
    "gemm_reference": (small_side_gram, None),
}


def _op_flops(op: str, shape) -> float:
    """FLOPs of one call (m <= n after the small-side transpose); 0 where the op is
    bandwidth- or SVD-bound (the runner then uses the byte floor). Full GEMMs: no
    symmetric product is counted at half price, so ``flops / peak`` is the floor of
    today's ATen path, not of a triangle-only kernel."""
    b, m, n = shape
    m, n = min(m, n), max(m, n)
    ns = P["steps"] * (4 * m * m * n + 2 * m**3)
    return float(b * {
        "power_iteration": 4 * P["iters"] * m * n,
        "spectral_normalize": 4 * P["iters"] * m * n,
        "spectral_hammer": 4 * P["iters"] * m * n,
        "spectral_weight_decay": 4 * P["iters"] * m * n,
        # one update: Gram + update (2 m^2 n each) and H = A A, P = H R (2 m^3 each)
        "spectral_soft_cap": 4 * m * m * n + 4 * m**3,
        "spectral_soft_cap_two_round": 8 * m * m * n,  # two rounds, each a Gram + a product
        "spectral_hard_cap_msign": 2 * ns,  # two msign evaluations (lower bound)
        "spectral_hard_cap_polynomial": 4 * (4 * m * m * n + 2 * m**3),
        "spectral_hard_cap_eigh": 4 * m * m * n + 2 * m**3,  # Gram, V g V^T, product (eigh not counted)
        "orthogonal_project": ns,
        # Gram Newton-Schulz, 10 float32 steps (restarts before 2, 5, 8): docs/kernels.md
        "orthogonal_project_gram": 2 * (8 * m * m * n + 28 * m**3),
        "gemm_reference": 2 * m * m * n,
    }.get(op, 0))


def _setup(fn: Callable, shape, dtype, device, seed: int, n_sets: int):
    return Setup(fn, [(make_input(shape, dtype, device, seed + i),) for i in range(n_sets)])


def gemm_passes(op: str, shape) -> float:
    """The FLOPs of one call in small-side Gram passes (``2 b m^2 n``, m <= n): the
    count the op can at best cost in units of the ``one_gemm_pass`` baseline. The
    measured count is the case's ``median_ms / baselines["one_gemm_pass"]``."""
    b, m, n = shape
    m, n = min(m, n), max(m, n)
    return _op_flops(op, shape) / (2.0 * b * m * m * n)


#: the capping methods (and the projection) timed at the MODEL_GROUPS buckets
_CAP_OPS = ("spectral_soft_cap", "spectral_hard_cap_msign", "spectral_hard_cap_polynomial", "spectral_hard_cap_eigh",
            "orthogonal_project", "orthogonal_project_gram", "svd_cap")

#: ops timed only as a baseline of another case
_BASELINE_ONLY = ("gemm_reference", "spectral_soft_cap_two_round")


def cases(cfg) -> list:
    """Cases for the shared ``lipschitz-bench --suite constraints`` runner: every
    op at the Shakespeare and GPT-2-small buckets, beside plain PyTorch and svd_cap;
    the soft cap also beside its two-round form (``two_round``) and one small-side
    Gram pass (``one_gemm_pass``), and on CPU also at the tall GPT-2 MLP shape.
    ``params["gemm_passes"]``: the FLOP floor of the case in Gram passes."""
    device = str(cfg.device)
    dtype = cfg.dtype or (torch.bfloat16 if cfg.is_cuda else torch.float32)
    if cfg.smoke:
        shapes, names = [(2, 16, 24)], ["spectral_soft_cap", "spectral_normalize", "svd_cap"]
    else:
        shapes = SHAPES["shakespeare"] + SHAPES["gpt2"] if cfg.is_cuda else SHAPES["shakespeare"] + [(8, 768, 768)]
        names = [k for k in OPS if k not in _BASELINE_ONLY]
    pairs = [(shape, op) for shape in shapes for op in names]
    if not cfg.smoke and not cfg.is_cuda:
        pairs += [(shape, "spectral_soft_cap") for shape in SOFT_CAP_CPU_SHAPES]
        # the models' buckets: every capping method beside svd_cap
        pairs += [(shape, op) for group in MODEL_GROUPS.values() for shape in group for op in _CAP_OPS]
    out = []
    for shape, op in pairs:
        ours, plain = OPS[op]
        baselines = {}
        if plain is not None and op != "svd_cap":
            baselines["torch_eager"] = functools.partial(_setup, plain, shape, dtype, device, cfg.seed)
        if op != "svd_cap":
            baselines["svd_cap"] = functools.partial(_setup, OPS["svd_cap"][0], shape, dtype, device, cfg.seed)
        if op == "spectral_soft_cap":
            baselines["two_round"] = functools.partial(_setup, OPS["spectral_soft_cap_two_round"][0], shape,
                                                       dtype, device, cfg.seed)
            baselines["one_gemm_pass"] = functools.partial(_setup, OPS["gemm_reference"][0], shape, dtype,
                                                           device, cfg.seed)
        params = dict(PARAMS)
        if _op_flops(op, shape) > 0:
            params["gemm_passes"] = round(gemm_passes(op, shape), 4)
        out.append(Case(
            name=op, shape=tuple(shape), dtype=dtype, params=params,
            ours=functools.partial(_setup, ours, shape, dtype, device, cfg.seed),
            baselines=baselines, flops=_op_flops(op, shape),
            bytes=2.0 * shape[0] * shape[1] * shape[2] * dtype.itemsize,
            peak=None if cfg.is_cuda else "fp32_tflops",
        ))
    return out


def soft_cap_ab(shapes=((24, 3072, 768), (48, 768, 768)), repeats: int = 15, alpha: float = 0.132,
                seed: int = 0) -> dict:
    """The one-update soft cap against its two-round form and one small-side Gram pass,
    float32 on CPU, one call at a time in the runner's C++ loop, interleaved in one process (the order alternates every repeat, so a
    neighbour's load falls on both alike): medians of ``repeats`` calls per shape, the
    speedup ``two_round / one_update``, the measured Gram passes of each, and the
    error of each against float64 (the two-round form in float64; tests check it
    against an SVD) as ``max |out - ref| / max |ref|`` and in the Frobenius norm.

    Returns the JSON-ready dict ``{"device", "torch", "threads", "cases": [...]}``.
    """
    fns = {
        "one_update": lambda W: ops.spectral_soft_cap(W, alpha),
        "two_round": lambda W: soft_cap_two_round_reference(W, alpha),
        "one_gemm_pass": small_side_gram,
    }
    out = {"device": f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "alpha": alpha, "repeats": repeats, "cases": []}
    for shape in shapes:
        W = make_input(tuple(shape), torch.float32, "cpu", seed)
        for fn in fns.values():  # warm-up
            fn(W)
        times: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for r in range(repeats):
            for k in names if r % 2 == 0 else names[::-1]:
                times[k].append(_bench.time_callable(fns[k], [(W,)], 0, 1, -1, 1)[0])  # ms
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = soft_cap_two_round_reference(W.double(), alpha)
        err = {}
        for k in ("one_update", "two_round"):
            d = fns[k](W).double() - ref
            err[k] = {"max_rel": (d.abs().max() / ref.abs().max()).item(),
                      "fro_rel": (torch.linalg.vector_norm(d) / torch.linalg.vector_norm(ref)).item()}
        out["cases"].append({
            "shape": list(shape), "dtype": "float32", "median_ms": med,
            "min_ms": {k: min(v) for k, v in times.items()},
            "speedup_one_update_vs_two_round": med["two_round"] / med["one_update"],
            "measured_gemm_passes": {k: med[k] / med["one_gemm_pass"] for k in ("one_update", "two_round")},
            "flop_gemm_passes": {"one_update": gemm_passes("spectral_soft_cap", shape),
                                 "two_round": gemm_passes("spectral_soft_cap_two_round", shape)},
            "error_vs_float64": err,
        })
        print(json.dumps(out["cases"][-1]), flush=True)
    return out


# ---------------------------------------------------------------------------
# ratios: every method's time over svd_cap's at the MODEL_GROUPS, and the auto rules they imply

#: method -> (choice it is a candidate of or None, value, callable on one bucket W)
def _ratio_methods() -> dict[str, tuple]:
    b, steps = P["sigma_max"], P["steps"]

    def ns(dtype, algorithm):
        return lambda W: ops.orthogonalize(W, 5, compute_dtype=dtype, algorithm=algorithm)

    def ns_auto(W):  # what Muon(ns_dtype="auto") runs
        dt = resolve_ns_dtype("auto", W.device, W.dtype, tuple(W.shape[-2:]))
        return ops.orthogonalize(W, 5, compute_dtype=dt, algorithm="auto")

    return {
        "svd_cap": (None, None, lambda W: ops.svd_cap(W, b)),
        "soft_cap": (None, None, lambda W: ops.spectral_soft_cap(W, P["alpha"])),
        "hard_cap_msign": ("hard_cap_method", "msign", lambda W: ops.spectral_hard_cap(W, b, "msign", steps)),
        "hard_cap_polynomial": ("hard_cap_method", "polynomial",
                                lambda W: ops.spectral_hard_cap(W, b, "polynomial", steps, P["iters"])),
        "hard_cap_eigh": ("hard_cap_method", "eigh", lambda W: ops.spectral_hard_cap(W, b, "eigh")),
        "hard_cap_auto": ("hard_cap_method", "auto", lambda W: ops.spectral_hard_cap(W, b, "auto", steps)),
        "orthogonal_msign": ("orthogonal_project_method", "msign",
                             lambda W: ops.orthogonal_project(W, b, steps, method="msign")),
        "orthogonal_gram": ("orthogonal_project_method", "gram",
                            lambda W: ops.orthogonal_project(W, b, steps, method="gram")),
        "orthogonal_auto": ("orthogonal_project_method", "auto", lambda W: ops.orthogonal_project(W, b, steps)),
        "ns_float32_standard": ("ns", ("float32", "standard"), ns(torch.float32, "standard")),
        "ns_float32_gram": ("ns", ("float32", "gram"), ns(torch.float32, "gram")),
        "ns_bfloat16_standard": ("ns", ("bfloat16", "standard"), ns(torch.bfloat16, "standard")),
        "ns_bfloat16_gram": ("ns", ("bfloat16", "gram"), ns(torch.bfloat16, "gram")),
        "ns_auto": ("ns", "auto", ns_auto),
    }


def ratios(threads=(1, 2), repeats: int = 7, groups=None, seed: int = 0) -> dict:
    """Median time of every capping method, the projection and Newton-Schulz (fp32/bf16,
    standard/Gram) per model of :data:`MODEL_GROUPS`, float32 weights at 1.2x the cap on
    CPU, one call at a time in the runner's C++ loop, methods interleaved (the order flips
    every repeat), at each thread count in ``threads``, all in this one process.

    Returns ``{"threads": {t: {"groups": {group: {"svd_cap_ms", "ms", "ratio"}},
    "buckets": {"b x m x n": {method: ms}}}}, "load_before", "load_after", "rules"}``;
    ``rules`` are the :class:`lipschitz_ext.ops.choices.Rule` rows the timings imply.
    """
    groups = list(groups or MODEL_GROUPS)
    methods = _ratio_methods()
    names = list(methods)
    out = {"device": "cpu", "torch": torch.__version__, "repeats": repeats, "load_before": os.getloadavg(),
           "threads": {}}
    saved = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(int(t))
            res = {"groups": {}, "buckets": {}}
            for group in groups:
                Ws = [make_input(shape, torch.float32, "cpu", seed) * (1.2 / 1.06) for shape in MODEL_GROUPS[group]]
                for k in names:  # warm-up
                    for W in Ws:
                        methods[k][2](W)
                per = {k: [[] for _ in Ws] for k in names}
                for r in range(repeats):
                    for k in names if r % 2 == 0 else names[::-1]:
                        for i, W in enumerate(Ws):
                            per[k][i].append(_bench.time_callable(methods[k][2], [(W,)], 0, 1, -1, 1)[0])
                tot = {k: statistics.median([sum(v[i][r] for i in range(len(Ws))) for r in range(repeats)])
                       for k, v in per.items()}
                res["groups"][group] = {"svd_cap_ms": tot["svd_cap"], "ms": tot,
                                        "ratio": {k: v / tot["svd_cap"] for k, v in tot.items()}}
                for i, shape in enumerate(MODEL_GROUPS[group]):
                    res["buckets"]["x".join(map(str, shape))] = {k: statistics.median(v[i]) for k, v in per.items()}
            out["threads"][int(t)] = res
    finally:
        torch.set_num_threads(saved)
    out["load_after"] = os.getloadavg()
    out["rules"] = derive_rules(out)
    return out


def _pick(data: list[tuple[tuple[int, int], dict[str, float]]], values: list, slack: float = 0.10,
          prefer=None):
    """A split at an aspect ratio (``(lo, hi, aspect)``: each side's fastest value in total,
    each within ``slack`` of the best at every bucket of its side) where the fastest value
    changes with the aspect, else one value within ``slack`` of the best everywhere;
    ``None`` if neither holds. ``prefer`` (the reference algorithm) wins wherever it is
    within ``slack`` of the best."""
    def ok(v, rows):
        return all(t[v] <= (1 + slack) * min(t[u] for u in values) for _, t in rows)

    def best_total(rows):
        if prefer is not None and ok(prefer, rows):
            return prefer
        return min(values, key=lambda v: sum(t[v] for _, t in rows))

    def aspect(s):
        return max(s) / max(min(s), 1)

    for a in sorted({aspect(s) for s, _ in data})[1:]:
        lo = [(s, t) for s, t in data if aspect(s) < a]
        hi = [(s, t) for s, t in data if aspect(s) >= a]
        vl, vh = best_total(lo), best_total(hi)
        if vl != vh and ok(vl, lo) and ok(vh, hi):
            return (vl, vh, a)
    good = [v for v in values if ok(v, data)]
    if good:
        return best_total(data) if best_total(data) in good else good[0]
    return None


def derive_table(measured: dict, source: str = "SRC") -> list:
    """The :class:`lipschitz_ext.ops.choices.Rule` rows (first match wins) that pick, at every
    benched bucket and thread count, a value within 10% of the fastest fixed choice (split at
    an aspect ratio where the fastest changes with it), each with ``source``; a comment string
    where no such rule exists."""
    rows: list = []
    per_thread: dict[str, dict[int, object]] = {}
    for t, res in measured["threads"].items():
        data = [(tuple(int(x) for x in key.split("x")[1:]), ms) for key, ms in res["buckets"].items()]
        data = [(s, ms) for s, ms in data if min(s) >= 16]  # tiny buckets (10x256) cost ~nothing either way
        # the exact cap (eigh) wherever it is within the slack: the others approximate its map
        cap = _pick([(s, {v: ms[f"hard_cap_{v}"] for v in ("msign", "polynomial", "eigh")}) for s, ms in data],
                    ["msign", "polynomial", "eigh"], prefer="eigh")
        proj = _pick([(s, {v: ms[f"orthogonal_{v}"] for v in ("msign", "gram")}) for s, ms in data], ["msign", "gram"],
                     prefer="msign")
        dtype = _pick([(s, {d: min(ms[f"ns_{d}_standard"], ms[f"ns_{d}_gram"]) for d in ("float32", "bfloat16")})
                       for s, ms in data], ["float32", "bfloat16"])
        algo = {d: _pick([(s, {a: ms[f"ns_{d}_{a}"] for a in ("standard", "gram")}) for s, ms in data],
                         ["standard", "gram"], prefer="standard") for d in ("float32", "bfloat16")}
        per_thread.setdefault("hard_cap_method", {})[int(t)] = cap
        per_thread.setdefault("orthogonal_project_method", {})[int(t)] = proj
        per_thread.setdefault("ns_dtype", {})[int(t)] = dtype
        for d, v in algo.items():
            per_thread.setdefault(f"ns_algorithm/{d}", {})[int(t)] = v
    for key, by_t in per_thread.items():
        choice, _, ns_dt = key.partition("/")
        dt = ns_dt or "float32"
        # only the measured thread counts: others keep the table's defaults until a run measures them
        same = len({repr(v) for v in by_t.values()}) == 1
        ranges = {min(by_t): (min(by_t), max(by_t))} if same else {t: (t, t) for t in sorted(by_t)}
        for t, rng in ranges.items():
            v = by_t[t]
            common = {"device": "cpu", "dtype": dt, "threads": rng, "source": source}
            if v is None:
                rows.append(f"# {choice} ({dt}, {t} threads): no value within 10% of the best at every bucket")
            elif isinstance(v, tuple):
                lo, hi, a = v
                rows.append(Rule(choice, hi, min_aspect=float(f"{a:.3g}"), **common))
                rows.append(Rule(choice, lo, **common))
            else:
                rows.append(Rule(choice, v, **common))
    return rows


def rule_source(rule) -> str:
    """One row as the ``Rule(...)`` source of :data:`lipschitz_ext.ops.choices.TABLE`."""
    th = "" if rule.threads == (1, 1 << 20) else f", threads={rule.threads}"
    asp = "" if rule.min_aspect == 0.0 else f", min_aspect={rule.min_aspect:g}"
    return (f'Rule("{rule.choice}", "{rule.value}", device="{rule.device}", dtype="{rule.dtype}"{th}{asp}, '
            f"source={rule.source})")


def derive_rules(measured: dict) -> list[str]:
    """:func:`derive_table` as source lines (``source=SRC``), comments kept."""
    return [r if isinstance(r, str) else rule_source(r) for r in derive_table(measured)]


def auto_table_markdown(measured: dict, source: str) -> str:
    """The rows of docs/benchmarks.md's auto-rules table that a run implies: for each choice,
    thread count and benched bucket (small side >= 16; both orientations) what
    :func:`lipschitz_ext.ops.choices.choose` picks with the derived rows ahead of the current
    table, buckets with the same pick and source in one row. ``source`` is the run's stamp
    (a pick the run left to the current table keeps that row's source)."""
    rules = tuple(r for r in derive_table(measured, source) if not isinstance(r, str)) + TABLE
    shapes: list[tuple[int, int]] = []
    for res in measured["threads"].values():
        for key in res["buckets"]:
            m, n = (int(x) for x in key.split("x")[1:])
            for s in ((m, n), (n, m)):
                if min(s) >= 16 and s not in shapes:
                    shapes.append(s)
    lines = []
    # ns_algorithm's dtype is the Newton-Schulz compute dtype: both are measured
    keys = [(c, torch.float32) for c in ("hard_cap_method", "orthogonal_project_method", "ns_dtype", "ns_algorithm")]
    for choice, dtype in keys + [("ns_algorithm", torch.bfloat16)]:
        for t in sorted(int(t) for t in measured["threads"]):
            picks: dict[tuple[str, str], list[str]] = {}
            for m, n in shapes:
                r = choose_rule(choice, "cpu", dtype, (m, n), threads=t, table=rules)
                picks.setdefault((r.value, r.source), []).append(f"{m}x{n}")
            name = str(dtype).removeprefix("torch.")
            for (v, src), where in picks.items():
                lines.append(f"| {choice} | cpu | {name} | {t} | {', '.join(where)} | {v} | {src} |")
    return "\n".join(lines)


def ratios_markdown(measured: dict) -> str:
    """The ratio tables (one per thread count): svd_cap's median ms, every method over it."""
    lines = []
    cols = [k for k in next(iter(measured["threads"].values()))["groups"][next(iter(
        next(iter(measured["threads"].values()))["groups"]))]["ratio"] if k != "svd_cap"]
    for t, res in measured["threads"].items():
        lines.append(f"\n{t} thread(s); load average before/after: "
                     f"{measured['load_before'][0]:.2f} / {measured['load_after'][0]:.2f}\n")
        lines.append("| model | svd_cap ms | " + " | ".join(cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        for g, r in res["groups"].items():
            lines.append(f"| {g} | {r['svd_cap_ms']:.1f} | " + " | ".join(f"{r['ratio'][k]:.2f}" for k in cols) + " |")
        lines.append("\nper bucket (each method's median over svd_cap's at that bucket):\n")
        lines.append("| bucket | svd_cap ms | " + " | ".join(cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        for b, ms in res.get("buckets", {}).items():
            lines.append(f"| {b} | {ms['svd_cap']:.1f} | " + " | ".join(f"{ms[k] / ms['svd_cap']:.2f}" for k in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # the shared runner: lipschitz-bench --suite constraints [its options]
    if sys.argv[1:2] == ["ratios"]:  # python -m lipschitz_ext.bench.suites.bench_constraints ratios [REPEATS] [OUT.json] [GROUP ...]
        result = ratios(repeats=int(sys.argv[2]) if len(sys.argv) > 2 else 7, groups=sys.argv[4:] or None)
        print(ratios_markdown(result))
        print("\n".join(["", "implied rules (lipschitz_ext/ops/choices.py TABLE):", *result["rules"]]))
        stamp = sys.argv[3].rsplit("/", 1)[-1].removesuffix(".json") if len(sys.argv) > 3 else "this run"
        print("\nimplied docs/benchmarks.md auto-rules rows:\n" + auto_table_markdown(result, stamp))
        if len(sys.argv) > 3:
            with open(sys.argv[3], "x") as f:  # never overwrite an earlier measurement
                json.dump(result, f, indent=1)
        sys.exit(0)
    if sys.argv[1:2] == ["soft-cap-ab"]:  # python -m lipschitz_ext.bench.suites.bench_constraints soft-cap-ab [REPEATS] [OUT.json]
        result = soft_cap_ab(repeats=int(sys.argv[2]) if len(sys.argv) > 2 else 15)
        if len(sys.argv) > 3:
            with open(sys.argv[3], "w") as f:
                json.dump(result, f, indent=1)
        sys.exit(0)
    from lipschitz_ext.cli.bench import main

    sys.exit(main(["--suite", "constraints", *sys.argv[1:]]))
