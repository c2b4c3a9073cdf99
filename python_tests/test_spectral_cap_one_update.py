"""The soft cap as one update: ``W' = W - W P``, ``P = H (H - 3x + 3I)``,
``H = x^2``, ``x = a G`` on the small side, against an independent float64 SVD
reference (``U f(S) V^T`` with the scalar map) and against the two-round form the op
used before (``soft_cap_two_round_reference``, bit-for-bit the old CPU op)."""

import pytest
import torch

from lipschitz_ext import ops
from lipschitz_ext.ops.spectral_cap import soft_cap_two_round_reference
from reference import soft_cap_scalar, svd_apply_f64, with_spectrum

#: tall, wide, square, 1 x N, N x 1, batched (incl. two batch dims), odd sizes
SHAPES = [(3, 70, 24), (3, 24, 70), (4, 33, 33), (1, 57), (57, 1), (2, 3, 19, 41), (1, 5, 5)]


def weights(shape, top=1.1, seed=0):
    """float64 weights with singular values spread over ``[0, top]`` (the coupling's range)."""
    torch.manual_seed(seed)
    *batch, m, n = shape
    s = torch.rand(*batch, min(m, n), dtype=torch.float64) * top
    s[..., 0] = top
    return with_spectrum(s, m, n)


def rel_max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in float64."""
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_is_exact_to_1e6_against_float64_svd(shape):
    a = ops.soft_cap_alpha(1.0, 0.1)
    W = weights(shape)
    ref = svd_apply_f64(W.float(), lambda S: soft_cap_scalar(S, a))  # of the rounded input
    out = ops.spectral_soft_cap(W.float(), a)
    assert out.dtype == torch.float32 and out.shape == W.shape
    assert rel_max_err(out, ref) <= 1e-6
    # the spectral norm of the error too (not only entrywise)
    err2 = torch.linalg.matrix_norm((out.double() - ref).reshape(-1, *shape[-2:]), 2).max()
    assert err2 <= 1e-6 * torch.linalg.matrix_norm(ref.reshape(-1, *shape[-2:]), 2).max()


@pytest.mark.parametrize("shape", SHAPES)
def test_float64_matches_svd_and_two_rounds(shape):
    a = 0.21
    W = weights(shape, top=1.6)  # a s^2 up to 0.54: past the monotone range, still the polynomial
    ref = svd_apply_f64(W, lambda S: soft_cap_scalar(S, a))
    out = ops.spectral_soft_cap(W, a)
    assert rel_max_err(out, ref) <= 1e-12
    assert rel_max_err(soft_cap_two_round_reference(W, a), ref) <= 1e-12
    torch.testing.assert_close(out, soft_cap_two_round_reference(W, a), atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
def test_equals_the_two_round_formula_in_float32(shape):
    a = ops.soft_cap_alpha(1.0, 0.06)
    W = weights(shape, top=1.06).float()
    old = soft_cap_two_round_reference(W, a)
    new = ops.spectral_soft_cap(W, a)
    assert rel_max_err(new, old.double()) <= 1e-6
    # and the one update is at least as close to float64 as the two rounds (one rounding of W)
    ref = svd_apply_f64(W, lambda S: soft_cap_scalar(S, a))
    assert rel_max_err(new, ref) <= 1.5 * rel_max_err(old, ref) + 1e-7


def test_per_matrix_alpha_is_one_batched_call():
    W = weights((2, 3, 30, 18), top=1.2).float()
    alpha = torch.tensor([[0.1, 0.2, 0.0], [0.05, 0.3, 0.13]])
    out = ops.spectral_soft_cap(W, alpha)
    for i in range(2):
        for j in range(3):
            a = float(alpha[i, j])
            ref = svd_apply_f64(W[i, j], lambda S: soft_cap_scalar(S, a))
            assert rel_max_err(out[i, j], ref) <= 1e-6
    assert torch.equal(out[0, 2], W[0, 2])  # a = 0: W unchanged, bit for bit
    torch.testing.assert_close(out, soft_cap_two_round_reference(W, alpha), atol=1e-6, rtol=1e-5)
    # float64 alpha next to float32 W, and a 0-d alpha
    torch.testing.assert_close(ops.spectral_soft_cap(W, alpha.double()), out)
    torch.testing.assert_close(ops.spectral_soft_cap(W, torch.tensor(0.2)), ops.spectral_soft_cap(W, 0.2))


def test_non_contiguous_views_equal_their_copies():
    base = weights((4, 40, 90)).float()
    a = 0.15
    for W in (base.mT, base[:, ::2, 1::3], base[::2], base.mT[:, 3:, :7]):
        assert not W.is_contiguous()
        out = ops.spectral_soft_cap(W, a)
        assert out.is_contiguous()
        # BLAS may order a transposed operand's sums differently: equal to float32 rounding
        torch.testing.assert_close(out, ops.spectral_soft_cap(W.contiguous(), a), atol=1e-6, rtol=1e-6)
        assert rel_max_err(out, svd_apply_f64(W, lambda S: soft_cap_scalar(S, a))) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_one_rounding_of_the_float64_result(dtype):
    a = ops.soft_cap_alpha(1.0, 0.06)
    W = weights((3, 48, 32), top=1.06).to(dtype)
    out = ops.spectral_soft_cap(W, a)
    assert out.dtype == dtype
    ref = svd_apply_f64(W, lambda S: soft_cap_scalar(S, a))
    # computed in float32 on CPU, rounded once: within one unit of the dtype's last place
    ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((out.double() - ref).abs() <= ulp + 1e-6 * ref.abs().max()).all()


def test_non_finite_matrix_stays_non_finite_and_alone():
    W = weights((3, 20, 12)).float()
    W[1, 4, 5] = float("inf")
    W[2, 0, 0] = float("nan")
    out = ops.spectral_soft_cap(W, 0.1)
    assert not torch.isfinite(out[1]).all() and not torch.isfinite(out[2]).all()
    torch.testing.assert_close(out[0], ops.spectral_soft_cap(W[0], 0.1))


def test_opcheck_tall_wide_and_per_matrix():
    lib = torch.ops.lipschitz
    for shape in ((2, 9, 4), (2, 4, 9), (1, 6)):
        W = torch.randn(shape) * 0.2
        torch.library.opcheck(lib.spectral_soft_cap.default, (W, 0.1))
        torch.library.opcheck(lib.spectral_soft_cap.per_matrix, (W, torch.full(W.shape[:-2], 0.1)))


def test_constraint_still_caps_far_out_of_range_weights():
    """The one update changes nothing about the RMS-frame pre-scale: a weight 50x above
    the cap still comes back under it."""
    from lipschitz_ext.constraints.spectral import SpectralSoftCap

    torch.manual_seed(1)
    W = torch.randn(2, 64, 32) * 50.0
    con = SpectralSoftCap(sigma_max=1.0)
    con.apply_(W, lr=0.01, update_norm=0.05)
    assert torch.isfinite(W).all()
    rms = torch.linalg.matrix_norm(W.double(), 2) * (32 / 64) ** 0.5  # RMS->RMS: ||W|| sqrt(n / m)
    assert (rms <= 1.0 + 1e-5).all(), rms


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(3, 70, 24), (3, 24, 70), (1, 33, 33), (1000, 12, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_one_update_matches_float64(shape, dtype):
    a = ops.soft_cap_alpha(1.0, 0.06)
    W = weights(shape, top=1.06).to(dtype)
    ref = svd_apply_f64(W, lambda S: soft_cap_scalar(S, a))
    for Wc in (W.cuda(), W.cuda().mT.contiguous().mT):  # contiguous and transposed layout
        out = ops.spectral_soft_cap(Wc, a)
        assert out.dtype == dtype and out.device.type == "cuda"
        # bf16 GEMM operands with fp32 accumulation: ~1e-2 of the largest entry
        assert rel_max_err(out.cpu(), ref) <= 1.5e-2
        pm = ops.spectral_soft_cap(Wc, torch.full(shape[:-2], a, device="cuda"))
        assert rel_max_err(pm.cpu(), ref) <= 1.5e-2
    W64 = W.double()
    torch.testing.assert_close(ops.spectral_soft_cap(W64.cuda(), a).cpu(), ops.spectral_soft_cap(W64, a),
                               atol=1e-12, rtol=1e-12)
