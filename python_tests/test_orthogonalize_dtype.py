"""orthogonalize's compute_dtype: bf16 Newton-Schulz against a float64
reference of where the composite polynomial puts each singular value."""

from __future__ import annotations

import pytest
import torch

from lipschitz_ext.ops import ns_max_gain, ns_polynomial, orthogonalize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
        torch.ops.lipschitz.orthogonalize.default(torch.randn(4, 6), 5, "polar_express", [], 1e-7, torch.float16)


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16, torch.float32])
def test_opcheck_with_compute_dtype(compute_dtype):
    for device in DEVICES:
        G = torch.randn(2, 6, 10, device=device)
        torch.library.opcheck(torch.ops.lipschitz.orthogonalize.default,
                              (G, 5, "polar_express", [], 1e-7, compute_dtype),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiles_with_compute_dtype():
    G = torch.randn(2, 6, 10)
    f = torch.compile(lambda x: orthogonalize(x, 5, compute_dtype=torch.bfloat16), backend="eager", fullgraph=True)
    assert torch.equal(f(G), orthogonalize(G, 5, compute_dtype=torch.bfloat16))
