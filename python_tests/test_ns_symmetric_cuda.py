"""CUDA tests of LIPSCHITZ_NS_BACKEND=symmetric (csrc/cuda/ns_symmetric.cu).

Each test sets the switch itself; the cuBLAS path (the default) is the
reference on the GPU, the CPU op and float64 math the independent ones. All
skipped without a CUDA device (run by bench/gpu_check.sh on the GPU machine).
"""

from __future__ import annotations

import pytest
import torch

from lipschitz_ext import ops
from ns_symmetric_reference import symmetric_ns_f64
from reference import normalized_svals, ns_matrix_f64, ns_scalar

pytestmark = pytest.mark.cuda


@pytest.fixture
def symmetric(monkeypatch):
    monkeypatch.setenv("LIPSCHITZ_NS_BACKEND", "symmetric")
    assert torch.ops.lipschitz.ns_backend() == "symmetric"
    return monkeypatch


def with_backend(monkeypatch, name: str, fn):
    monkeypatch.setenv("LIPSCHITZ_NS_BACKEND", name)
    try:
        return fn()
    finally:
        monkeypatch.setenv("LIPSCHITZ_NS_BACKEND", "symmetric")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


SHAPES = [(768, 768), (4, 768, 3072), (3, 3072, 768), (2, 3, 33, 70), (1, 513), (513, 1), (1, 1), (130, 67),
          (65, 65), (2, 64, 200), (200, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_cublas_cpu_and_f64(symmetric, shape, dtype):
    G = torch.randn(shape).to(dtype)
    out = ops.orthogonalize(G.cuda())
    assert out.dtype == dtype and out.shape == G.shape and out.is_cuda
    ref_gpu = with_backend(symmetric, "cublas", lambda: ops.orthogonalize(G.cuda()))
    ref_cpu = ops.orthogonalize(G.float())
    # two bf16 pipelines differ by rounding noise (a wrong tile gives O(1) errors)
    assert rel(out, ref_gpu) < 0.05
    assert rel(out, ref_cpu) < 0.05
    sv = torch.linalg.svdvals(out.cpu().double()).sort(dim=-1).values
    sv_ref = ns_scalar(normalized_svals(G, "polar_express"), "polar_express", 5).sort(dim=-1).values
    assert float((sv - sv_ref).abs().max()) < 0.08


@pytest.mark.parametrize("shape", [(33, 70), (70, 33), (2, 65, 129)])
def test_matches_tiled_bf16_mirror(symmetric, shape):
    G = torch.randn(shape)
    out = ops.orthogonalize(G.cuda().bfloat16(), 5, "you")
    mirror, covered = symmetric_ns_f64(G.bfloat16(), "you", 5, bf16=True)
    assert covered
    assert rel(out, mirror) < 0.05
    assert rel(out, ns_matrix_f64(G, "you", 5)) < 0.05


@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (53, 37), (3, 128, 96), (2, 200, 70)])
@pytest.mark.parametrize("abc", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, -0.25, 2.0)])
def test_single_products_vs_f64(symmetric, shape, abc):
    # one step with one coefficient at a time isolates each kernel:
    # (1,0,0) the normalization, (0,1,0) the Gram + update, (0,0,1) the b A + c A A product
    G = torch.randn(shape, dtype=torch.float64)
    out = ops.orthogonalize(G.float().cuda(), 1, [abc])
    ref = ns_matrix_f64(G.float(), [abc], 1)
    assert rel(out, ref) < 2e-2
    if abc == (1.0, 0.0, 0.0):  # X = bf16(G * factor): one bf16 rounding
        torch.testing.assert_close(out.cpu().double(), ref, rtol=2**-8, atol=1e-30)


def test_non_contiguous_inputs_equal_contiguous(symmetric):
    base = torch.randn(4, 96, 130, device="cuda")
    for view in (base.mT, base[:, ::2, :], base[..., 1:-1], base.bfloat16().mT, base[::2]):
        assert not view.is_contiguous()
        torch.testing.assert_close(ops.orthogonalize(view), ops.orthogonalize(view.contiguous()), rtol=0, atol=0)


def test_batch_1_and_large_batch(symmetric):
    G = torch.randn(1, 64, 96, device="cuda", dtype=torch.bfloat16)
    assert rel(ops.orthogonalize(G), ops.orthogonalize(G.cpu().float())) < 0.05
    G = torch.randn(1100, 24, 40, device="cuda")
    out = ops.orthogonalize(G)
    ref = ops.orthogonalize(G.cpu())
    per_matrix = ((out.cpu() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max()
    assert float(per_matrix) < 0.08
    G = torch.randn(2048, 70, 33, device="cuda", dtype=torch.bfloat16)  # tall, batch > 1000, odd sides
    out = ops.orthogonalize(G)
    ref_gpu = with_backend(symmetric, "cublas", lambda: ops.orthogonalize(G))
    assert rel(out, ref_gpu) < 0.05


def test_input_untouched_deterministic_zero_and_nan(symmetric):
    G = torch.randn(3, 80, 50, device="cuda", dtype=torch.bfloat16)
    keep = G.clone()
    a, b = ops.orthogonalize(G), ops.orthogonalize(G)
    assert torch.equal(G, keep)  # bf16 G is read by the first step, never written
    assert torch.equal(a, b)
    Z = torch.zeros(2, 20, 30, device="cuda")
    assert torch.equal(ops.orthogonalize(Z, eps=0.0), Z)
    N = torch.randn(2, 8, 8, device="cuda")
    N[0, 0, 0] = float("nan")
    out = ops.orthogonalize(N)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


def test_float64_stays_on_the_exact_path(symmetric):
    G = torch.randn(3, 20, 30, dtype=torch.float64)
    torch.testing.assert_close(ops.orthogonalize(G.cuda()).cpu(), ops.orthogonalize(G), atol=1e-9, rtol=1e-9)


def test_non_bf16_compute_dtype_stays_on_cublas(symmetric):
    # the symmetric kernels are bf16: compute_dtype=float32 keeps the cuBLAS path
    G = torch.randn(2, 40, 72, device="cuda")
    out = ops.orthogonalize(G, compute_dtype=torch.float32)
    ref = with_backend(symmetric, "cublas", lambda: ops.orthogonalize(G, compute_dtype=torch.float32))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_opcheck_and_compile(symmetric):
    G = torch.randn(2, 40, 72, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.lipschitz.orthogonalize.default, (G, 5, "polar_express", [], 1e-7))
    compiled = torch.compile(lambda x: ops.orthogonalize(x) * 2.0, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(G), ops.orthogonalize(G) * 2.0)


def test_bad_switch_value_is_refused(monkeypatch):
    monkeypatch.setenv("LIPSCHITZ_NS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="LIPSCHITZ_NS_BACKEND must be 'cublas' or 'symmetric'"):
        ops.orthogonalize(torch.randn(4, 4, device="cuda"))


def test_grid_over_2_pow_31_blocks_refused(symmetric):
    # 2^31 matrices of 1 x 1: one tile each, one block more than a launch holds (4 GiB of bf16)
    G = torch.ones(2**31, 1, 1, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"more than 2\^31 - 1 thread blocks"):
        ops.orthogonalize(G)
