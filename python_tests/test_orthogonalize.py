"""lipschitz::orthogonalize against float64 references (python_tests/reference.py)."""

import math

import pytest
import torch

from lipschitz_ext import ops
from reference import TABLES, normalized_svals, ns_matrix_f64, ns_scalar, polar_factor_f64

SHAPES = [(37, 53), (53, 37), (1, 29), (29, 1), (3, 17, 24), (2, 3, 24, 17), (64, 64)]


@pytest.mark.parametrize("name", list(TABLES))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_iteration(name, shape):
    G = torch.randn(shape)
    steps = 6
    out = ops.orthogonalize(G, steps=steps, coefficients=name)
    ref = ns_matrix_f64(G, name, steps)
    assert out.shape == G.shape and out.dtype == G.dtype
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", list(TABLES))
def test_singular_values_follow_composite_polynomial(name):
    # Controlled spectrum, from tiny to large, so the polynomial is probed widely.
    m, n = 24, 40
    U, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64))
    s = torch.logspace(-3, 0.5, m, dtype=torch.float64)
    G = (U * s) @ V.mT
    out = ops.orthogonalize(G.float(), steps=5, coefficients=name)
    got = torch.linalg.svdvals(out.double())
    want = ns_scalar(normalized_svals(G, name), name, 5).abs().sort(descending=True).values
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_polar_express_converges_to_polar_factor():
    for shape in [(30, 50), (50, 30), (4, 16, 16)]:
        # well-conditioned input so enough steps reach the polar factor
        G = torch.randn(shape, dtype=torch.float64) + 3 * torch.eye(shape[-2], shape[-1], dtype=torch.float64)
        out = ops.orthogonalize(G, steps=12)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, polar_factor_f64(G), atol=2e-2, rtol=0)
        sv = torch.linalg.svdvals(out)
        assert (sv - 1).abs().max() < 2e-2


def test_batched_equals_per_matrix():
    G = torch.randn(2, 3, 19, 31)
    out = ops.orthogonalize(G)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], ops.orthogonalize(G[i, j]), atol=1e-5, rtol=1e-5)


def test_tall_is_transpose_of_wide():
    G = torch.randn(4, 23, 61)
    wide = ops.orthogonalize(G)
    tall = ops.orthogonalize(G.mT.contiguous())
    torch.testing.assert_close(tall, wide.mT, atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs():
    base = torch.randn(5, 40, 90)
    for G in [base.mT, base[:, ::2, 1::3], base[::2]]:
        assert not G.is_contiguous() or G is base[::2]
        torch.testing.assert_close(ops.orthogonalize(G), ops.orthogonalize(G.contiguous()))


def test_bfloat16_and_half_inputs():
    G = torch.randn(3, 32, 48)
    for dt in (torch.bfloat16, torch.float16):
        out = ops.orthogonalize(G.to(dt))
        assert out.dtype == dt and out.shape == G.shape
        ref = ns_matrix_f64(G.to(dt), "polar_express", 5)
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_explicit_coefficient_list_and_repeat_last():
    G = torch.randn(20, 30)
    custom = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    out = ops.orthogonalize(G, steps=4, coefficients=custom)
    ref = ns_matrix_f64(G, custom, 4)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    # a named set used past its table repeats its last triple
    out = ops.orthogonalize(G, steps=8, coefficients="you")
    torch.testing.assert_close(out.double(), ns_matrix_f64(G, "you", 8), atol=2e-4, rtol=1e-3)


def test_jordan_composite_facts():
    # docs/theory.md, section 3: Jordan's 5-step composite peaks near 1.20 and maps 1e-3 to >= 0.47
    x = torch.linspace(1e-3, 1, 100001, dtype=torch.float64)
    p = ns_scalar(x, "jordan", 5)
    assert 1.18 < p.max() < 1.22 and p.min() >= 0.47
    # "You": max 1.14502 on (0, 1]
    assert math.isclose(ns_scalar(torch.logspace(-4, 0, 200001, dtype=torch.float64), "you", 5).max().item(), 1.14502, abs_tol=2e-4)


def test_non_finite_input_yields_nan():
    for bad in (float("nan"), float("inf")):
        G = torch.randn(3, 8, 12)
        G[1, 2, 3] = bad
        out = ops.orthogonalize(G)
        assert torch.isnan(out[1]).all()
        assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


def test_huge_finite_input_is_not_zeroed():
    G = torch.randn(10, 20) * 1e30  # squares overflow float32
    out = ops.orthogonalize(G, steps=8)
    torch.testing.assert_close(out, ops.orthogonalize(G / 1e30, steps=8), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.orthogonalize(torch.randn(5)), "argument 'G' must have rank >= 2"),
        (lambda: ops.orthogonalize(torch.randint(0, 3, (4, 4))), "argument 'G' must be a floating"),
        (lambda: ops.orthogonalize(torch.randn(4, 4), coefficients=[]), "empty list"),
        (lambda: ops.orthogonalize(torch.randn(4, 4), coefficients="newton"), "must be one of"),
        (lambda: ops.orthogonalize(torch.randn(4, 4), steps=0), "'steps' must be >= 1"),
        (lambda: ops.orthogonalize(torch.randn(4, 4), eps=-1.0), "'eps' must be finite and >= 0"),
        (lambda: ops.orthogonalize(torch.randn(4, 4), coefficients=[(1.0, 2.0)]), "triples"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()


def test_empty_batch():
    out = ops.orthogonalize(torch.randn(0, 4, 6))
    assert out.shape == (0, 4, 6)


def test_opcheck():
    for G in [torch.randn(3, 10, 14), torch.randn(14, 10).mT, torch.randn(2, 2, 5, 7, dtype=torch.float64)]:
        torch.library.opcheck(torch.ops.lipschitz.orthogonalize.default, (G, 5, "polar_express", [], 1e-7))
        torch.library.opcheck(torch.ops.lipschitz.orthogonalize.default, (G, 3, "custom", [3.0, -3.2, 1.2], 1e-7))


def test_torch_compile_fullgraph():
    def f(G):
        return ops.orthogonalize(G * 2.0, steps=5) + 1.0

    G = torch.randn(2, 12, 20)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(G), f(G))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(768, 768), (768, 3072), (3072, 768), (12, 256, 256), (2, 3, 33, 70), (1, 513)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(shape, dtype):
    G = torch.randn(shape).to(dtype)
    cpu = ops.orthogonalize(G)
    gpu = ops.orthogonalize(G.cuda())
    assert gpu.dtype == dtype and gpu.shape == G.shape
    # bf16 compute on CUDA vs fp32 on CPU: compare singular values and entries loosely
    err = (gpu.cpu().float() - cpu.float()).norm() / cpu.float().norm()
    assert err < 0.05, err
    sv_gpu = torch.linalg.svdvals(gpu.cpu().double())
    sv_ref = ns_scalar(normalized_svals(G, "polar_express"), "polar_express", 5)
    assert (sv_gpu.sort().values - sv_ref.sort().values).abs().max() < 0.08


@pytest.mark.cuda
def test_cuda_float64_and_non_finite():
    G = torch.randn(3, 20, 30, dtype=torch.float64)
    torch.testing.assert_close(ops.orthogonalize(G.cuda()).cpu(), ops.orthogonalize(G), atol=1e-9, rtol=1e-9)
    G = torch.randn(2, 8, 8, device="cuda")
    G[0, 0, 0] = float("nan")
    out = ops.orthogonalize(G)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    torch.library.opcheck(torch.ops.lipschitz.orthogonalize.default, (G[1:].clone(), 5, "polar_express", [], 1e-7))


@pytest.mark.parametrize("name", list(TABLES))
def test_ns_polynomial_matches_reference(name):
    x = torch.rand(3, 1000, dtype=torch.float64) * 2 - 1  # [-1, 1): where the composites stay bounded
    torch.testing.assert_close(ops.ns_polynomial(x, 7, name), ns_scalar(x, name, 7), atol=1e-12, rtol=1e-12)
    xf = x.float()[:, ::3]  # non-contiguous float32
    out = ops.ns_polynomial(xf, 7, name)
    assert out.dtype == torch.float32 and out.shape == xf.shape
    torch.testing.assert_close(out.double(), ns_scalar(xf, name, 7), atol=1e-5, rtol=1e-5)
    torch.library.opcheck(torch.ops.lipschitz.ns_polynomial.default, (x, 5, name, []))


def test_ns_max_gain_published_values():
    assert math.isclose(ops.ns_max_gain(5, "you"), 1.14502, abs_tol=1e-4)
    assert math.isclose(ops.ns_max_gain(6, "jiacheng"), 0.9993, abs_tol=2e-4)
    assert 1.18 < ops.ns_max_gain(5, "jordan") < 1.22
    with pytest.raises(RuntimeError, match="argument 's' must be a floating"):
        ops.ns_polynomial(torch.arange(3), 5, "you")


@pytest.mark.cuda
def test_cuda_ns_polynomial():
    x = torch.rand(1000, dtype=torch.float64)
    torch.testing.assert_close(ops.ns_polynomial(x.cuda(), 5, "you").cpu(), ops.ns_polynomial(x, 5, "you"))


@pytest.mark.parametrize("device_dtype", [torch.float32, torch.float64])
def test_zero_matrix_with_eps_zero_is_zero(device_dtype):
    """0 / 0 used to give NaN."""
    G = torch.zeros(2, 4, 6, dtype=device_dtype)
    G[1] = torch.randn(4, 6, dtype=device_dtype)
    out = ops.orthogonalize(G, eps=0.0)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    ref = ns_matrix_f64(G[1], "polar_express", 5, eps=0.0)
    torch.testing.assert_close(out[1].double(), ref, rtol=1e-4, atol=1e-4)
