"""Benchmark suite: ``fp8_attention`` (the op ``fp8_attention``: fp8 forward, bf16 backward) against bf16 SDPA.

Cases: forward, and forward + backward, at B=4, H=16, d in {64, 128},
N in {1k, 4k, 16k}, causal and not (CUDA); one tiny configuration on CPU.
Baselines, each on the same inputs in the same run: ``F.scaled_dot_product_attention``
in bf16 with each backend forced (flash, cuDNN, memory-efficient) and with
PyTorch's own choice; a backend that cannot run here is skipped with its reason.
FLOPs: forward ``4 B H N^2 d`` (half when causal); forward + backward 3.5x that
(the backward's 2.5x, docs/theory.md, section 7), whatever each implementation
recomputes. Forward + backward runs in both gradient modes of ``fp8_attention``:
"exact" (a bf16 forward recomputes the statistics) and "saved" (the fp8 ones);
its ``params.bwd_path`` records the backward kernel ``LIPSCHITZ_FP8_ATTN_BWD``
selected ("flash" by default, "cudnn" with ``LIPSCHITZ_FP8_ATTN_BWD=cudnn``).

The forward is timed twice, reported as separate cases: ``fp8_attention_fwd``
with bf16 inputs (``params.inputs = "bf16"``, the op's quantization included) and
``fp8_attention_fwd_e4m3_inputs`` with inputs already in float8_e4m3fn
(``"fp8"``, quantized before timing, as a model that quantizes in its projections
hands them over); the SDPA baselines run on the bf16 inputs in both.

Plain functions (``attention_flops``, ``make_inputs``, ``fp8_forward``,
``sdpa_forward``, ``forward_backward``) are importable on their own; ``cases(cfg)``
builds the runner's cases (``lipschitz_ext.bench``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lipschitz_ext.ops import fp8_attention
from lipschitz_ext.ops.fp8_attention import fp8_attention_bwd_path, quantize_e4m3
from lipschitz_ext.bench import Case, Setup, Skip

GPU_CONFIGS = [(4, 16, n, d) for d in (64, 128) for n in (1024, 4096, 16384)]
CPU_CONFIGS = [(1, 2, 256, 64)]
SMOKE_CONFIGS = [(1, 2, 128, 64)]

#: SDPA backends timed as baselines (name -> torch.nn.attention.SDPBackend member name).
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION"}


def attention_flops(B: int, H: int, N: int, d: int, causal: bool, backward: bool = False) -> float:
    """Forward FLOPs ``4 B H N^2 d`` (halved if causal), times 3.5 with the backward."""
    f = 4.0 * B * H * N * N * d / (2.0 if causal else 1.0)
    return f * 3.5 if backward else f


def make_inputs(B: int, H: int, N: int, d: int, device, seed: int, requires_grad: bool = False):
    """``(q, k, v)`` bf16 ``[B, H, N, d]`` with unit-variance entries (and ``grad_out`` if
    ``requires_grad``: then ``(q, k, v, grad_out)`` with q, k, v leaves)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ts = [torch.randn(B, H, N, d, device=device, generator=gen).bfloat16() for _ in range(4 if requires_grad else 3)]
    if requires_grad:
        for t in ts[:3]:
            t.requires_grad_(True)
    return tuple(ts)


def fp8_forward(q, k, v, causal: bool, statistics: str = "exact") -> torch.Tensor:
    """Ours: fp8 attention with the Lipschitz scale 1/d and unit static scales;
    ``statistics`` is its ``backward`` mode ("exact" recomputes them, "saved")."""
    return fp8_attention(q, k, v, causal=causal, backward=statistics)


def fp8_forward_e4m3_inputs(q8, k8, v8, causal: bool) -> torch.Tensor:
    """Ours on inputs already in e4m3 (unit static scales, as :func:`fp8_forward`)."""
    return fp8_attention(q8, k8, v8, causal=causal)


def sdpa_forward(q, k, v, causal: bool, backend: Optional[str] = None) -> torch.Tensor:
    """bf16 SDPA with scale 1/d; ``backend`` forces one SDPBackend member by name."""
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0 / q.shape[-1])
    with sdpa_kernel(getattr(SDPBackend, backend)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0 / q.shape[-1])


def forward_backward(forward: Callable[..., torch.Tensor], q, k, v, grad_out, causal: bool, **kw):
    """One training step's attention: forward, then the gradients of q, k, v."""
    out = forward(q, k, v, causal, **kw)
    return torch.autograd.grad(out, (q, k, v), grad_out)


def _setup(fn, config, causal: bool, backward: bool, device, seed: int, n_sets: int, probe: bool,
           e4m3: bool = False, **kw):
    sets = [make_inputs(*config, device, seed + i, requires_grad=backward) for i in range(n_sets)]
    if e4m3:  # quantized once here, outside the timed call (unit scales)
        sets = [tuple(quantize_e4m3(t, 1.0) for t in s) for s in sets]
    call = functools.partial(forward_backward, fn, causal=causal, **kw) if backward else \
        functools.partial(fn, causal=causal, **kw)
    if probe:  # a forced SDPA backend may refuse these inputs: skip it with the reason
        try:
            call(*sets[0])
        except RuntimeError as exc:
            raise Skip(f"{kw.get('backend')}: {str(exc).splitlines()[0]}") from None
    return Setup(call, sets)


def cases(cfg) -> list:
    """The attention cases for ``cfg`` (a ``lipschitz_ext.bench.SuiteConfig``)."""
    configs = SMOKE_CONFIGS if cfg.smoke else (GPU_CONFIGS if cfg.is_cuda else CPU_CONFIGS)
    # The backward kernel this process's LIPSCHITZ_FP8_ATTN_BWD selects, on this device.
    major = torch.cuda.get_device_capability(cfg.device)[0] if cfg.is_cuda else 0
    bwd_path = fp8_attention_bwd_path(compute_major=major)
    out = []
    for i, config in enumerate(configs):
        B, H, N, d = config
        for causal in (True, False):
            # (backward, statistics mode, inputs)
            for backward, mode, inputs in ((False, "exact", "bf16"), (False, "exact", "fp8"),
                                           (True, "exact", "bf16"), (True, "saved", "bf16")):
                args = (config, causal, backward, cfg.device, cfg.seed + 97 * i)
                baselines = {"sdpa_default": functools.partial(_setup, sdpa_forward, *args, probe=False)}
                if cfg.is_cuda:
                    for name, backend in SDPA_BACKENDS.items():
                        baselines[name] = functools.partial(_setup, sdpa_forward, *args, probe=True, backend=backend)
                if inputs == "fp8":
                    name = "fp8_attention_fwd_e4m3_inputs"
                    ours = functools.partial(_setup, fp8_forward_e4m3_inputs, *args, probe=False, e4m3=True)
                else:
                    name = "fp8_attention_fwd_bwd" if backward else "fp8_attention_fwd"
                    ours = functools.partial(_setup, fp8_forward, *args, probe=False, statistics=mode)
                # Minimal traffic: q, k, v (2 bytes each in bf16, 1 in e4m3) in, out (bf16) out;
                # with the backward also dO, out, lse in and dq, dk, dv out.
                traffic = (5.0 if inputs == "fp8" else 8.0) if not backward else 22.0
                out.append(Case(
                    name=name,
                    shape=config,
                    dtype=torch.float8_e4m3fn if inputs == "fp8" else torch.bfloat16,
                    params={"causal": causal, "softmax_scale": 1.0 / d, "backward": backward, "inputs": inputs,
                            **({"statistics": mode, "bwd_path": bwd_path} if backward else {})},
                    ours=ours,
                    baselines=baselines,
                    flops=attention_flops(B, H, N, d, causal, backward),
                    bytes=traffic * B * H * N * d,
                    # The fp8 forward is bounded by the fp8 peak; with the bf16 backward, by bf16's.
                    peak=("bf16_tflops" if backward else "fp8_tflops") if cfg.is_cuda else "fp32_tflops",
                ))
    return out
