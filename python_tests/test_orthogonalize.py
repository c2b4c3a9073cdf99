"""lipschitz::orthogonalize against float64 references (python_tests/reference.py): the
op on every device, its compute_dtype (bf16 Newton-Schulz against a float64 reference of
where the composite polynomial puts each singular value), its backend argument, and the
CUDA symmetric backend (csrc/cuda/ns_symmetric.cu; skipped without a CUDA device, run by
bench/gpu_check.sh on the GPU machine)."""

import math

import pytest
import torch

from lipschitz_ext import ops
from lipschitz_ext.ops import ns_max_gain, ns_polynomial, orthogonalize
from ns_symmetric_reference import symmetric_ns_f64
from op_samples import DEVICES
from reference import TABLES, normalized_svals, ns_matrix_f64, ns_scalar, polar_factor_f64

ORTHOGONALIZE = torch.ops.lipschitz.orthogonalize.default

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
        torch.library.opcheck(ORTHOGONALIZE, (), dict(G=G, steps=5, coefficients="polar_express", eps=1e-7))
        torch.library.opcheck(ORTHOGONALIZE, (), dict(G=G, steps=3, coefficients="custom", custom=[3.0, -3.2, 1.2],
                                                      eps=1e-7))


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
    torch.library.opcheck(ORTHOGONALIZE, (), dict(G=G[1:].clone(), steps=5, coefficients="polar_express", eps=1e-7))


@pytest.mark.parametrize("name", list(TABLES))
def test_ns_polynomial_matches_reference(name):
    x = torch.rand(3, 1000, dtype=torch.float64) * 2 - 1  # [-1, 1): where the composites stay bounded
    torch.testing.assert_close(ops.ns_polynomial(x, 7, name), ns_scalar(x, name, 7), atol=1e-12, rtol=1e-12)
    xf = x.float()[:, ::3]  # non-contiguous float32
    out = ops.ns_polynomial(xf, 7, name)
    assert out.dtype == torch.float32 and out.shape == xf.shape
    torch.testing.assert_close(out.double(), ns_scalar(xf, name, 7), atol=1e-5, rtol=1e-5)
    torch.library.opcheck(torch.ops.lipschitz.ns_polynomial.default, (), dict(s=x, steps=5, coefficients=name))


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


# ---------------------------------------------------------- compute_dtype ----


def _with_singular_values(s: torch.Tensor, m: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[k, m, n]`` float64 matrices U diag(s) V^T with random orthogonal U, V."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(k, m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(k, n, r, generator=g, dtype=torch.float64))[0]
    return U @ torch.diag_embed(s.expand(k, r)) @ V.mT


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (64, 64)])
@pytest.mark.parametrize("coefficients", ["polar_express", "you", "jordan"])
# bf16: X rounded to 2^-9 relative at every step, amplified by the polynomial's slope (up to ~8)
@pytest.mark.parametrize("compute_dtype,tol", [(torch.bfloat16, 0.06), (torch.float32, 2e-4)])
def test_singular_values_land_where_the_polynomial_puts_them(device, shape, coefficients, compute_dtype, tol):
    m, n = shape
    r = min(m, n)
    s = torch.logspace(-2, 0, r, dtype=torch.float64)
    G = _with_singular_values(s, m, n, k=3)
    scale = 1.01 if coefficients == "polar_express" else 1.0
    expected = ns_polynomial(s / (torch.linalg.matrix_norm(G[0]) * scale + 1e-7), 5, coefficients)
    O = orthogonalize(G.float().to(device), 5, coefficients, compute_dtype=compute_dtype)
    assert O.dtype == torch.float32 and O.shape == G.shape
    got = torch.linalg.svdvals(O.cpu().double())  # descending, like expected (p is increasing on the range)
    want = expected.sort(descending=True).values.expand_as(got)
    assert (got - want).abs().max() <= tol, (got - want).abs().max()
    # the update-norm bound Muon hands the soft cap (p_max, safety 1.05) still holds
    assert got.max() <= ns_max_gain(5, coefficients) * 1.05


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_compute_with_bf16_and_float64_inputs(device):
    G = _with_singular_values(torch.linspace(0.2, 1.0, 16, dtype=torch.float64), 16, 32, k=2)
    ref = orthogonalize(G.to(device), 5)  # float64 stays float64 by default
    assert ref.dtype == torch.float64
    for dt in (torch.bfloat16, torch.float64):
        out = orthogonalize(G.to(device, dt), 5, compute_dtype=torch.bfloat16)
        assert out.dtype == dt
        torch.testing.assert_close(out.double().cpu(), ref.cpu(), atol=0.05, rtol=0)
    # names work like dtypes
    a = orthogonalize(G.float().to(device), 5, compute_dtype="bfloat16")
    b = orthogonalize(G.float().to(device), 5, compute_dtype=torch.bfloat16)
    assert torch.equal(a, b)


def test_default_compute_dtype_is_unchanged():
    G = torch.randn(3, 12, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(orthogonalize(G), orthogonalize(G, compute_dtype=torch.float32))  # CPU: float32
    assert torch.equal(orthogonalize(G.double()), orthogonalize(G.double(), compute_dtype="float64"))


def test_zero_and_nonfinite_inputs_in_bf16():
    Z = torch.zeros(2, 8, 12)
    assert torch.equal(orthogonalize(Z, compute_dtype=torch.bfloat16, eps=0.0), Z)
    X = torch.randn(2, 8, 12)
    X[1, 2, 3] = float("nan")
    out = orthogonalize(X, compute_dtype=torch.bfloat16)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


@pytest.mark.parametrize("bad,err,match", [
    (torch.float16, ValueError, "bfloat16, float32 or float64"),
    (torch.int32, ValueError, "bfloat16, float32 or float64"),
    ("half", ValueError, "bfloat16, float32 or float64"),
    ("nonsense", ValueError, "argument 'compute_dtype' must be one of"),
    (3, TypeError, "argument 'compute_dtype' must be a torch.dtype"),
])
def test_bad_compute_dtype_is_refused(bad, err, match):
    with pytest.raises(err, match=match):
        orthogonalize(torch.randn(4, 6), compute_dtype=bad)


def test_the_op_checks_compute_dtype_itself():
    with pytest.raises(RuntimeError, match="argument 'compute_dtype' must be bfloat16, float32 or float64"):
        ORTHOGONALIZE(G=torch.randn(4, 6), compute_dtype=torch.float16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16, torch.float32])
def test_opcheck_with_compute_dtype(compute_dtype, device):
    G = torch.randn(2, 6, 10, device=device)
    torch.library.opcheck(ORTHOGONALIZE, (), dict(G=G, steps=5, coefficients="polar_express", eps=1e-7,
                                                  compute_dtype=compute_dtype),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiles_with_compute_dtype():
    G = torch.randn(2, 6, 10)
    f = torch.compile(lambda x: orthogonalize(x, 5, compute_dtype=torch.bfloat16), backend="eager", fullgraph=True)
    assert torch.equal(f(G), orthogonalize(G, 5, compute_dtype=torch.bfloat16))

# ---------------------------------------------------------------- backend ----


@pytest.mark.parametrize("backend", ["cublas", "symmetric"])
def test_cpu_takes_the_default_backend_only(backend):
    G = torch.randn(2, 6, 10)
    assert torch.equal(ops.orthogonalize(G, backend="default"), ops.orthogonalize(G))
    with pytest.raises(RuntimeError, match=f"argument 'backend' must be 'default' on CPU .*'{backend}' is a CUDA"):
        ops.orthogonalize(G, backend=backend)
    with pytest.raises(RuntimeError, match="argument 'backend' must be 'default' on CPU"):
        ORTHOGONALIZE(G=G, backend=backend)  # the op checks it itself


@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_unknown_backend_is_refused_naming_the_argument(device):
    G = torch.randn(2, 6, 10, device=device)
    match = "argument 'backend' must be"
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.orthogonalize(G, backend="triton")
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.orthogonalize(G, backend="triton", algorithm="gram")


def test_backend_default_ignores_the_environment_on_cpu(monkeypatch):
    G = torch.randn(2, 6, 10)
    want = ops.orthogonalize(G)
    monkeypatch.setenv("LIPSCHITZ_NS_BACKEND", "symmetric")
    assert torch.equal(ops.orthogonalize(G), want)


def test_backend_argument_under_compile():
    G = torch.randn(2, 6, 10)
    f = torch.compile(lambda x: ops.orthogonalize(x, backend="default") * 2.0, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(G), ops.orthogonalize(G) * 2.0)


# ------------------------------------------------- CUDA symmetric backend ----
# Each test selects the backend itself (the argument, or LIPSCHITZ_NS_BACKEND behind
# backend="default"); the cuBLAS path is the reference on the GPU, the CPU op and
# float64 math the independent ones.

@pytest.fixture
def symmetric(monkeypatch):
    monkeypatch.setenv("LIPSCHITZ_NS_BACKEND", "symmetric")
    assert torch.ops.lipschitz_internal.ns_backend() == "symmetric"
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


SYMMETRIC_SHAPES = [(768, 768), (4, 768, 3072), (3, 3072, 768), (2, 3, 33, 70), (1, 513), (513, 1), (1, 1), (130, 67),
          (65, 65), (2, 64, 200), (200, 64)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SYMMETRIC_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_symmetric_matches_cublas_cpu_and_f64(symmetric, shape, dtype):
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


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(33, 70), (70, 33), (2, 65, 129)])
def test_symmetric_matches_tiled_bf16_mirror(symmetric, shape):
    G = torch.randn(shape)
    out = ops.orthogonalize(G.cuda().bfloat16(), 5, "you")
    mirror, covered = symmetric_ns_f64(G.bfloat16(), "you", 5, bf16=True)
    assert covered
    assert rel(out, mirror) < 0.05
    assert rel(out, ns_matrix_f64(G, "you", 5)) < 0.05


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (53, 37), (3, 128, 96), (2, 200, 70)])
@pytest.mark.parametrize("abc", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, -0.25, 2.0)])
def test_symmetric_single_products_vs_f64(symmetric, shape, abc):
    # one step with one coefficient at a time isolates each kernel:
    # (1,0,0) the normalization, (0,1,0) the Gram + update, (0,0,1) the b A + c A A product
    G = torch.randn(shape, dtype=torch.float64)
    out = ops.orthogonalize(G.float().cuda(), 1, [abc])
    ref = ns_matrix_f64(G.float(), [abc], 1)
    assert rel(out, ref) < 2e-2
    if abc == (1.0, 0.0, 0.0):  # X = bf16(G * factor): one bf16 rounding
        torch.testing.assert_close(out.cpu().double(), ref, rtol=2**-8, atol=1e-30)


@pytest.mark.cuda
def test_symmetric_non_contiguous_inputs_equal_contiguous(symmetric):
    base = torch.randn(4, 96, 130, device="cuda")
    for view in (base.mT, base[:, ::2, :], base[..., 1:-1], base.bfloat16().mT, base[::2]):
        assert not view.is_contiguous()
        torch.testing.assert_close(ops.orthogonalize(view), ops.orthogonalize(view.contiguous()), rtol=0, atol=0)


@pytest.mark.cuda
def test_symmetric_batch_1_and_large_batch(symmetric):
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


@pytest.mark.cuda
def test_symmetric_input_untouched_deterministic_zero_and_nan(symmetric):
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


@pytest.mark.cuda
def test_symmetric_float64_stays_on_the_exact_path(symmetric):
    G = torch.randn(3, 20, 30, dtype=torch.float64)
    torch.testing.assert_close(ops.orthogonalize(G.cuda()).cpu(), ops.orthogonalize(G), atol=1e-9, rtol=1e-9)


@pytest.mark.cuda
def test_symmetric_non_bf16_compute_dtype_stays_on_cublas(symmetric):
    # the symmetric kernels are bf16: compute_dtype=float32 keeps the cuBLAS path
    G = torch.randn(2, 40, 72, device="cuda")
    out = ops.orthogonalize(G, compute_dtype=torch.float32)
    ref = with_backend(symmetric, "cublas", lambda: ops.orthogonalize(G, compute_dtype=torch.float32))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
def test_symmetric_opcheck_and_compile(symmetric):
    G = torch.randn(2, 40, 72, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(ORTHOGONALIZE, (), dict(G=G, steps=5, coefficients="polar_express", eps=1e-7))
    torch.library.opcheck(ORTHOGONALIZE, (), dict(G=G, steps=5, coefficients="polar_express", eps=1e-7,
                                                  backend="symmetric"))
    compiled = torch.compile(lambda x: ops.orthogonalize(x) * 2.0, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(G), ops.orthogonalize(G) * 2.0)


@pytest.mark.cuda
def test_symmetric_bad_switch_value_is_refused(monkeypatch):
    monkeypatch.setenv("LIPSCHITZ_NS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="LIPSCHITZ_NS_BACKEND must be 'cublas' or 'symmetric'"):
        ops.orthogonalize(torch.randn(4, 4, device="cuda"))


@pytest.mark.cuda
def test_symmetric_grid_over_2_pow_31_blocks_refused(symmetric):
    # 2^31 matrices of 1 x 1: one tile each, one block more than a launch holds (4 GiB of bf16)
    G = torch.ones(2**31, 1, 1, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"more than 2\^31 - 1 thread blocks"):
        ops.orthogonalize(G)


@pytest.mark.cuda
def test_symmetric_backend_argument_equals_the_environment_switch(symmetric):
    G = torch.randn(3, 64, 96, device="cuda", dtype=torch.bfloat16)
    by_env = ops.orthogonalize(G)
    symmetric.setenv("LIPSCHITZ_NS_BACKEND", "cublas")
    assert torch.equal(ops.orthogonalize(G, backend="symmetric"), by_env)
    assert torch.equal(ops.orthogonalize(G, backend="cublas"), ops.orthogonalize(G))
    symmetric.setenv("LIPSCHITZ_NS_BACKEND", "symmetric")
    assert torch.equal(ops.orthogonalize(G, backend="cublas"),
                       with_backend(symmetric, "cublas", lambda: ops.orthogonalize(G)))


@pytest.mark.cuda
def test_symmetric_backend_argument_needs_bf16_compute():
    G = torch.randn(2, 40, 72, device="cuda")
    with pytest.raises(RuntimeError, match="argument 'backend' = 'symmetric' computes in bfloat16 only"):
        ops.orthogonalize(G, backend="symmetric", compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="argument 'backend' = 'symmetric' computes in bfloat16 only"):
        ops.orthogonalize(G.double(), backend="symmetric")
