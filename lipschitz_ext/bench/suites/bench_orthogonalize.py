"""Benchmark suite: ``orthogonalize`` (Muon's msign, 5 Polar Express steps).

Baselines, each on the same matrices in the same run:
  torch_eager            plain-PyTorch Newton-Schulz, batched ``baddbmm``, in the input dtype
  torch_compile_baddbmm  the same function under ``torch.compile`` (static shapes)
  torch_optim_muon       ``torch.optim.Muon.step`` over one 2-D parameter per matrix
                         (its own loop: bf16 Newton-Schulz, 5 Jordan steps, plus momentum)
FLOPs: 5 steps of ``4 m^2 n + 2 m^3`` per matrix (full GEMMs, m <= n).
"""

from __future__ import annotations

import functools

import torch

from lipschitz_ext.bench import Case, Setup, Skip, SuiteConfig
from lipschitz_ext.ops import orthogonalize

STEPS = 5

# Polar Express (Amsel et al. 2025, arXiv:2505.16932; docs/theory.md, section 3) with the bf16 safety
# factor 1.01 applied to all but the last triple, as the C++ table does.
_PE_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
)
POLAR_EXPRESS = tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _PE_RAW)

# Shapes: the Shakespeare model (d=256, 3 blocks: Q/K/V/O, MLP in and out),
# GPT-2 small (12 layers: 4 square, 2 MLP matrices each), and squares.
SHAKESPEARE = [(12, 256, 256), (3, 256, 1024), (3, 1024, 256)]
GPT2_SMALL = [(48, 768, 768), (24, 768, 3072)]
SQUARE_GPU = [(1, n, n) for n in (1024, 2048, 4096, 8192)]
# On a host CPU the GPT-2 batches take seconds per call: one block's worth instead.
CPU_SHAPES = SHAKESPEARE + [(4, 768, 768), (2, 768, 3072), (1, 512, 512), (1, 1024, 1024)]
SMOKE_SHAPES = [(3, 64, 64), (2, 48, 96), (2, 96, 48)]


def newton_schulz_baddbmm(G: torch.Tensor, coefficients=POLAR_EXPRESS, eps: float = 1e-7) -> torch.Tensor:
    """Plain-PyTorch msign of ``G [B, m, n]`` in G's dtype: the modded-nanogpt recipe
    (Frobenius normalization, Gram matrix on the small side, batched baddbmm)."""
    X = G.mT if G.size(-2) > G.size(-1) else G
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    X = X / (norm * 1.01 + eps).to(X.dtype)
    for a, b, c in coefficients:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return X.mT if G.size(-2) > G.size(-1) else X


def ns_flops(shape: tuple[int, int, int], steps: int = STEPS) -> float:
    """Full-GEMM FLOPs of ``steps`` Newton-Schulz steps on a ``[B, m, n]`` batch."""
    b, m, n = shape
    m, n = min(m, n), max(m, n)
    return float(b * steps * (4 * m * m * n + 2 * m**3))


def _inputs(shape, dtype, device, seed: int, n_sets: int) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(shape, device=device, generator=gen).to(dtype),) for _ in range(n_sets)]


def _ours(shape, dtype, device, seed, n_sets: int) -> Setup:
    fn = functools.partial(orthogonalize, steps=STEPS, coefficients="polar_express")
    return Setup(fn, _inputs(shape, dtype, device, seed, n_sets))


def _eager(shape, dtype, device, seed, n_sets: int) -> Setup:
    return Setup(newton_schulz_baddbmm, _inputs(shape, dtype, device, seed, n_sets))


def _compiled(shape, dtype, device, seed, enabled: bool, n_sets: int) -> Setup:
    if not enabled:
        raise Skip("torch.compile baselines disabled (--smoke or --no-compile)")
    # A fresh cache per case: otherwise dynamo's recompile limit silently
    # falls back to eager after a handful of shapes.
    torch._dynamo.reset()
    fn = torch.compile(newton_schulz_baddbmm, dynamic=False, fullgraph=True)
    return Setup(fn, _inputs(shape, dtype, device, seed, n_sets))


def _muon(shape, dtype, device, seed, n_sets: int) -> Setup:
    if not hasattr(torch.optim, "Muon"):
        raise Skip(f"torch {torch.__version__} has no torch.optim.Muon (needs >= 2.9)")
    optimizers = []
    for (G,) in _inputs(shape, dtype, device, seed, n_sets):
        params = []
        for g in G:  # Muon is 2-D only: one parameter per matrix
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g.clone()
            params.append(p)
        optimizers.append((torch.optim.Muon(params, lr=1e-3, weight_decay=0.0, ns_steps=STEPS),))
    return Setup(_step, optimizers)


def _step(opt: torch.optim.Optimizer) -> None:
    opt.step()


def cases(cfg: SuiteConfig) -> list[Case]:
    """The orthogonalize cases for ``cfg`` (GPU: the issue's shape list; CPU: a lighter one)."""
    device = cfg.device
    dtype = cfg.dtype or (torch.bfloat16 if cfg.is_cuda else torch.float32)
    if cfg.smoke:
        shapes = SMOKE_SHAPES
    else:
        shapes = SHAKESPEARE + GPT2_SMALL + SQUARE_GPU if cfg.is_cuda else CPU_SHAPES
    out = []
    for i, shape in enumerate(shapes):
        args = (shape, dtype, device, cfg.seed + i)
        out.append(Case(
            name="orthogonalize",
            shape=shape,
            dtype=dtype,
            params={"steps": STEPS, "coefficients": "polar_express"},
            ours=functools.partial(_ours, *args),
            baselines={
                "torch_compile_baddbmm": functools.partial(_compiled, *args, cfg.compile),
                "torch_eager": functools.partial(_eager, *args),
                "torch_optim_muon": functools.partial(_muon, *args),
            },
            flops=ns_flops(shape),
            bytes=2.0 * shape[0] * shape[1] * shape[2] * dtype.itemsize,
            # The CPU kernel computes in float32 whatever the input dtype.
            peak=None if cfg.is_cuda else "fp32_tflops",
        ))
    return out
