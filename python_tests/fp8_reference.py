"""Independent references for lipschitz::fp8_attention (written from the spec in
csrc/fp8_attention.h, not from the kernels): exact float64 attention, and a
float32 emulation of the fp8 rounding with a selectable key-tile size."""

from __future__ import annotations

import math
from typing import Optional

import torch

E4M3_MAX = 448.0


def exact_attention(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) v in float64 for [..., N, d] inputs."""
    q, k, v = (x.double() for x in (q, k, v))
    s = (q @ k.mT) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to e4m3 (nearest even) after clamping to +-448; float32 result."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def emulate_fp8_attention(q, k, v, causal, scale, q_scale=1.0, k_scale=1.0, v_scale=1.0,
                          tile: Optional[int] = 128):
    """fp8 attention emulated in float32: returns (out bf16, lse float32).

    tile=128 follows the kernel's tile-wise online softmax; tile=None uses one
    tile (the exact row max before P's fp8 cast: the ideal per-row scaling).
    q, k, v in float8_e4m3fn are taken as already quantized with the scales.
    """
    n = q.shape[-2]
    tile = n if tile is None else tile
    # float8_e4m3fn inputs are already quantized with these scales: only widened.
    q8, k8, v8 = (x.float() if x.dtype == torch.float8_e4m3fn else e4m3(x.float() * f32(1.0 / s))
                  for x, s in ((q, q_scale), (k, k_scale), (v, v_scale)))
    c = f32(q_scale * k_scale * scale * math.log2(math.e))
    m = torch.full(q.shape[:-1] + (1,), float("-inf"))
    l = torch.zeros(q.shape[:-1] + (1,))
    acc = torch.zeros(q8.shape)
    rows = torch.arange(n).unsqueeze(1)
    for n0 in range(0, n, tile):
        n1 = min(n, n0 + tile)
        t = (q8 @ k8[..., n0:n1, :].mT) * c
        if causal:
            t = t.masked_fill(torch.arange(n0, n1).unsqueeze(0) > rows, float("-inf"))
        m_new = torch.maximum(m, t.amax(-1, keepdim=True))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(t - m_new)
        l = l * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + e4m3(p * 256.0) @ v8[..., n0:n1, :]
        m = m_new
    out = (acc * (f32(v_scale / 256.0) / l)).bfloat16()
    lse = ((m + torch.log2(l)) * math.log(2.0)).squeeze(-1)
    return out, lse


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    err = out.double() - ref
    return 10.0 * math.log10(float(ref.pow(2).sum()) / max(float(err.pow(2).sum()), 1e-300))


# Per-row accuracy (FlashAttention-3's criterion, row by row, so that a bug
# confined to a few rows cannot hide behind the other rows' errors).
#: bf16's unit roundoff: the floor of a row's baseline error, relative to the row.
BF16_U = 2.0**-8


def row_max_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """max over the head dim of |out - ref| in float64: one value per row [..., N]."""
    return (out.double() - ref.double()).abs().amax(-1)


def bad_rows(out, q, k, v, causal: bool, scale: float, q_scale=1.0, k_scale=1.0, v_scale=1.0,
             ideal_factor: float = 3.0, bf16_factor: float = 32.0) -> torch.Tensor:
    """Indices [n_bad, ndim - 1] of the rows of ``out`` that fail either per-row bound.

    With ``ref`` exact float64 attention on the (bf16) q, k, v, each row's max
    error must be at most
      - ``ideal_factor`` x that of the ideal fp8 emulation (per-row scaling of P,
        :func:`emulate_fp8_attention` with tile=None) + ``BF16_U / 2`` of the
        row's max |ref| (the output's own bf16 rounding), and
      - ``bf16_factor`` x that of a bf16 computation (float32 math on the bf16
        inputs, output rounded to bf16), floored at ``BF16_U`` of the row's max
        |ref| (a row whose bf16 result is exact, e.g. a single key).
    Measured on the CPU emulation (N up to 2048): up to 2.14 for the first ratio
    (the tile-wise P scaling), up to 22 for the second (fp8's 3 mantissa bits
    against bf16's 7 predict ~16). ``q, k, v`` bf16 or
    float32 (the scales quantize them as the kernels do).
    """
    ref = exact_attention(q, k, v, causal, scale)
    ideal, _ = emulate_fp8_attention(q, k, v, causal, scale, q_scale, k_scale, v_scale, tile=None)
    bf16 = exact_attention(q.float(), k.float(), v.float(), causal, scale).float().bfloat16()
    err, row_scale = row_max_error(out, ref), ref.abs().amax(-1)
    ok_ideal = err <= ideal_factor * row_max_error(ideal, ref) + 0.5 * BF16_U * row_scale
    ok_bf16 = err <= bf16_factor * torch.maximum(row_max_error(bf16, ref), BF16_U * row_scale)
    return (~(ok_ideal & ok_bf16)).nonzero()
