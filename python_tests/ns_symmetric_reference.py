"""Float64 mirror of the symmetric Newton-Schulz kernels (csrc/cuda/ns_symmetric.cu).

Same tile math as the kernels, on the CPU: the tile lists come from the C++ op
``lipschitz_internal::triangle_tiles`` (the enumeration the kernels decode their block
index with), and every tile is written with the kernels' rule: an upper tile
stores element (i, j) for i <= j and mirrors i < j to (j, i). Each output
element's write count is returned so tests can check exact-once coverage. With
``bf16=True`` every stored product and the normalized iterate are rounded to
bf16 as the kernels store them (fp32 accumulation is not modelled: float64).
"""

from __future__ import annotations

import torch

from reference import NORM_SCALE, triples

#: Output tile side of the kernels (kTile in ns_symmetric.cu).
KERNEL_TILE = 64


def tile_list(n: int, tile: int, batch: int, symmetric: bool = True, m: int = -1) -> torch.Tensor:
    """``[count, 5]`` int64 rows (batch, row_tile, col_tile, offset, mirror_offset) from C++."""
    return torch.ops.lipschitz_internal.triangle_tiles(n, tile, batch, symmetric, m)


def _round(x: torch.Tensor, bf16: bool) -> torch.Tensor:
    return x.to(torch.bfloat16).double() if bf16 else x


def tiled_symmetric(value, batch: int, s: int, tile: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, s, s]`` result and write counts of a symmetric product.

    ``value(b, rows, cols)`` returns the float64 tile of the product for the
    index ranges ``rows`` x ``cols`` (Python slices).
    """
    out = torch.full((batch, s, s), float("nan"), dtype=torch.float64)
    writes = torch.zeros((batch, s, s), dtype=torch.int64)
    for b, r, c, _, _ in tile_list(s, tile, batch).tolist():
        assert r <= c, (r, c)
        rows = slice(r * tile, min((r + 1) * tile, s))
        cols = slice(c * tile, min((c + 1) * tile, s))
        v = _round(value(b, rows, cols), bf16)
        i = torch.arange(rows.start, rows.stop).unsqueeze(1)
        j = torch.arange(cols.start, cols.stop).unsqueeze(0)
        upper = (i <= j).expand_as(v)
        strict = (i < j).expand_as(v)
        ii, jj = i.expand_as(v), j.expand_as(v)
        out[b, ii[upper], jj[upper]] = v[upper]
        writes[b, ii[upper], jj[upper]] += 1
        out[b, jj[strict], ii[strict]] = v[strict]
        writes[b, jj[strict], ii[strict]] += 1
    return out, writes


def tiled_rect(value, batch: int, m: int, n: int, tile: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, m, n]`` result and write counts of a rectangular product (all tiles)."""
    out = torch.full((batch, m, n), float("nan"), dtype=torch.float64)
    writes = torch.zeros((batch, m, n), dtype=torch.int64)
    for b, r, c, _, _ in tile_list(m, tile, batch, False, n).tolist():
        rows = slice(r * tile, min((r + 1) * tile, m))
        cols = slice(c * tile, min((c + 1) * tile, n))
        out[b, rows, cols] = _round(value(b, rows, cols), bf16)
        writes[b, rows, cols] += 1
    return out, writes


def symmetric_ns_f64(
    G: torch.Tensor, name_or_list, steps: int, eps: float = 1e-7, tile: int = KERNEL_TILE, bf16: bool = False
) -> tuple[torch.Tensor, bool]:
    """The kernels' iteration in float64 on ``G [..., m, n]``.

    Returns (result of G's shape, True when every element of every product of
    every step was written exactly once).
    """
    X = G.double().reshape(-1, G.shape[-2], G.shape[-1])
    batch, m, n = X.shape
    tall = m > n
    s = n if tall else m
    scale = NORM_SCALE.get(name_or_list, 1.0) if isinstance(name_or_list, str) else 1.0
    denom = torch.linalg.matrix_norm(X, keepdim=True) * scale + eps
    X = _round(torch.where(denom == 0, torch.zeros_like(X), X / denom), bf16)
    coverage_ok = True
    for a, b_coef, c_coef in triples(name_or_list, steps):
        Xc = X
        if tall:
            A, w1 = tiled_symmetric(lambda k, r, c: Xc[k][:, r].mT @ Xc[k][:, c], batch, s, tile, bf16)
        else:
            A, w1 = tiled_symmetric(lambda k, r, c: Xc[k][r, :] @ Xc[k][c, :].mT, batch, s, tile, bf16)
        B, w2 = tiled_symmetric(
            lambda k, r, c: b_coef * A[k][r, c] + c_coef * (A[k][r, :] @ A[k][:, c]), batch, s, tile, bf16
        )
        if tall:
            X, w3 = tiled_rect(lambda k, r, c: a * Xc[k][r, c] + Xc[k][r, :] @ B[k][:, c], batch, m, n, tile, bf16)
        else:
            X, w3 = tiled_rect(lambda k, r, c: a * Xc[k][r, c] + B[k][r, :] @ Xc[k][:, c], batch, m, n, tile, bf16)
        coverage_ok &= all(bool((w == 1).all()) for w in (w1, w2, w3))
    return X.reshape(G.shape), coverage_ok
