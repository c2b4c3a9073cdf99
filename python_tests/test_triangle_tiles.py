"""Host-side parts of the symmetric Newton-Schulz kernels, on the CPU.

The tile enumeration (csrc/triangle_tiles.h, the code the kernels decode their
block index with) through the debug op ``lipschitz_internal::triangle_tiles``; the
LIPSCHITZ_NS_BACKEND switch through ``lipschitz_internal::ns_backend``; and the whole
tiled iteration in float64 (ns_symmetric_reference.py) against the dense
float64 iteration and the CPU op.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipschitz_ext import ops
from ns_symmetric_reference import symmetric_ns_f64, tile_list
from reference import normalized_svals, ns_matrix_f64, ns_scalar

INT31 = 2**31 - 1


def check_symmetric_enumeration(n: int, tile: int, batch: int) -> None:
    """Every upper tile once per matrix, in block order, offsets, mirror coverage."""
    rows = tile_list(n, tile, batch)
    nt = math.ceil(n / tile)
    per = nt * (nt + 1) // 2
    assert rows.shape == (batch * per, 5) and rows.dtype == torch.int64
    expected = [(b, r, c) for b in range(batch) for r in range(nt) for c in range(r, nt)]
    assert [tuple(x) for x in rows[:, :3].tolist()] == expected
    b, r, c = rows[:, 0], rows[:, 1], rows[:, 2]
    assert torch.equal(rows[:, 3], b * n * n + r * tile * n + c * tile)
    assert torch.equal(rows[:, 4], b * n * n + c * tile * n + r * tile)
    # the kernels' write rule: (i, j) for i <= j in the tile, (j, i) for i < j
    writes = torch.zeros(batch, n, n, dtype=torch.int64)
    for bb, rr, cc, _, _ in rows.tolist():
        i = torch.arange(rr * tile, min(rr * tile + tile, n)).unsqueeze(1)
        j = torch.arange(cc * tile, min(cc * tile + tile, n)).unsqueeze(0)
        ii, jj = torch.broadcast_tensors(i, j)
        up, strict = ii <= jj, ii < jj
        writes[bb].index_put_((ii[up], jj[up]), torch.ones(int(up.sum()), dtype=torch.int64), accumulate=True)
        writes[bb].index_put_((jj[strict], ii[strict]), torch.ones(int(strict.sum()), dtype=torch.int64),
                              accumulate=True)
    assert bool((writes == 1).all()), "some element written zero or several times"


@pytest.mark.parametrize("n,tile,batch", [(1, 64, 1), (64, 64, 1), (65, 64, 2), (130, 64, 3), (7, 2, 2),
                                          (33, 16, 1), (100, 1, 1), (768, 64, 2), (3, 5, 4)])
def test_symmetric_enumeration(n, tile, batch):
    check_symmetric_enumeration(n, tile, batch)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(1, 200), tile=st.integers(1, 96), batch=st.integers(1, 3))
def test_symmetric_enumeration_property(n, tile, batch):
    tile = max(tile, n // 12)  # keep the tile count (and the test) small
    check_symmetric_enumeration(n, tile, batch)


@pytest.mark.parametrize("m,n,tile,batch", [(1, 1, 64, 1), (65, 130, 64, 2), (130, 65, 64, 1), (5, 9, 2, 3)])
def test_rectangular_enumeration(m, n, tile, batch):
    rows = tile_list(m, tile, batch, False, n)
    mt, nt = math.ceil(m / tile), math.ceil(n / tile)
    expected = [(b, r, c) for b in range(batch) for r in range(mt) for c in range(nt)]
    assert [tuple(x) for x in rows[:, :3].tolist()] == expected
    b, r, c = rows[:, 0], rows[:, 1], rows[:, 2]
    assert torch.equal(rows[:, 3], b * m * n + r * tile * n + c * tile)
    assert bool((rows[:, 4] == -1).all())
    writes = torch.zeros(batch, m, n, dtype=torch.int64)
    for bb, rr, cc, _, _ in rows.tolist():
        writes[bb, rr * tile:(rr + 1) * tile, cc * tile:(cc + 1) * tile] += 1
    assert bool((writes == 1).all())


def test_grid_guard_at_2_pow_31():
    # one tile per matrix: batch 2^31 - 1 is a valid grid (refused here only as a list too long to build)
    with pytest.raises(RuntimeError, match="more than this debug op lists"):
        tile_list(1, 64, INT31)
    with pytest.raises(RuntimeError, match=r"exceeds the 2\^31 - 1 blocks"):
        tile_list(1, 64, INT31 + 1)
    # 2000 x 2000 tiles -> 2001000 upper tiles per matrix; 1074 matrices pass 2^31
    assert 2001000 * 1073 <= INT31 < 2001000 * 1074
    with pytest.raises(RuntimeError, match="more than this debug op lists"):
        tile_list(64 * 2000, 64, 1073)
    with pytest.raises(RuntimeError, match=r"exceeds the 2\^31 - 1 blocks"):
        tile_list(64 * 2000, 64, 1074)
    # the product of two large counts must not overflow int64 into a small number
    with pytest.raises(RuntimeError, match=r"exceeds the 2\^31 - 1 blocks"):
        tile_list(2**31, 1, 2**40, False, 2**31)


@pytest.mark.parametrize("args,match", [((0, 64, 1), "'n' must be >= 1"), ((5, 0, 1), "'tile' must be >= 1"),
                                        ((5, 4, 0), "'batch' must be >= 1"),
                                        ((5, 4, 1, True, 6), "symmetric product is square")])
def test_bad_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lipschitz_internal.triangle_tiles(*args)


def test_backend_switch(monkeypatch):
    monkeypatch.delenv("LIPSCHITZ_NS_BACKEND", raising=False)
    assert torch.ops.lipschitz_internal.ns_backend() == "cublas"  # off by default
    for value, name in [("", "cublas"), ("cublas", "cublas"), ("symmetric", "symmetric")]:
        monkeypatch.setenv("LIPSCHITZ_NS_BACKEND", value)
        assert torch.ops.lipschitz_internal.ns_backend() == name
    monkeypatch.setenv("LIPSCHITZ_NS_BACKEND", "Symmetric ")
    with pytest.raises(RuntimeError, match="LIPSCHITZ_NS_BACKEND must be 'cublas' or 'symmetric', got 'Symmetric '"):
        torch.ops.lipschitz_internal.ns_backend()


@pytest.mark.parametrize("shape,tile", [((1, 1), 64), ((3, 5), 2), ((70, 70), 16), ((2, 33, 100), 16),
                                        ((2, 100, 33), 16), ((130, 130), 64), ((1, 67), 8)])
@pytest.mark.parametrize("coefficients", ["polar_express", "you"])
def test_tiled_iteration_matches_dense_f64(shape, tile, coefficients):
    G = torch.randn(shape, dtype=torch.float64)
    out, covered = symmetric_ns_f64(G, coefficients, 5, tile=tile)
    assert covered
    assert out.shape == G.shape
    torch.testing.assert_close(out, ns_matrix_f64(G, coefficients, 5), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out, ops.orthogonalize(G, 5, coefficients), atol=1e-12, rtol=1e-10)


def test_tiled_iteration_zero_matrix_and_bf16_rounding():
    G = torch.zeros(2, 9, 4, dtype=torch.float64)
    out, covered = symmetric_ns_f64(G, "polar_express", 3, tile=4)
    assert covered and bool((out == 0).all())
    # bf16 rounding of every stored product: the singular values still follow the scalar composite
    G = torch.randn(40, 72, dtype=torch.float64)
    out, covered = symmetric_ns_f64(G, "polar_express", 5, bf16=True)
    assert covered
    sv = torch.linalg.svdvals(out).sort().values
    ref = ns_scalar(normalized_svals(G, "polar_express"), "polar_express", 5).sort().values
    assert float((sv - ref).abs().max()) < 0.08
    assert float((out - ns_matrix_f64(G, "polar_express", 5)).norm() / out.norm()) < 0.05
