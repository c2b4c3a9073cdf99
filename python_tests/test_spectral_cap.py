"""The spectral caps (soft cap + soft_cap_alpha, msign/polynomial/eigh hard cap,
orthogonal_project, svd_cap) against float64 SVD references on matrices with
controlled spectra."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipschitz_ext import ops
from lipschitz_ext.ops.spectral_cap import soft_cap_two_round_reference
from reference import HARD_CAP_QUINTIC, soft_cap_scalar, svd_apply_f64, with_spectrum

# (batch..., m, n) with spectra; r = min(m, n)
SHAPES = [(48, 80), (80, 48), (1, 40), (40, 1), (3, 32, 32), (2, 2, 24, 40)]
#: aspect >= 2: the hard cap's Newton-Schulz steps run on the small Gram matrix (float32/64)
GRAM_SHAPES = [(24, 96), (96, 24), (2, 20, 64)]


def spectrum(kind: str, batch, r: int, cap: float) -> torch.Tensor:
    """Singular values from 0 to 10x the cap: spread, rank-deficient, repeated."""
    if kind == "spread":
        s = torch.rand(*batch, r, dtype=torch.float64) * 10 * cap
    elif kind == "rank_deficient":
        s = torch.rand(*batch, r, dtype=torch.float64) * 10 * cap
        s[..., r // 2 :] = 0
    elif kind == "repeated":
        s = torch.full((*batch, r), 3.0 * cap, dtype=torch.float64)
        s[..., ::3] = 0.5 * cap
    else:
        raise ValueError(kind)
    return s


def controlled(shape, kind, cap=1.0):
    *batch, m, n = shape
    return with_spectrum(spectrum(kind, batch, min(m, n), cap), m, n)


# ---------------------------------------------------------------------------
# soft cap


def test_soft_cap_alpha_reference_examples():
    a = ops.soft_cap_alpha(1.0, 0.06)
    assert abs(a - 0.132) < 5e-4
    assert abs(soft_cap_scalar(torch.tensor(1.0), a).item() - 0.954) < 5e-4
    assert abs(ops.soft_cap_alpha(6.0, 0.1) - 0.00207) < 5e-6
    # f_a(k) = sigma_max exactly (the quartic's root)
    for sm, mu, wd in [(1.0, 0.06, 0.0), (6.0, 0.1, 0.0), (1.0, 0.1, 0.01), (2.0, 0.3, 0.05)]:
        k = sm * (1 - wd) + mu
        a = ops.soft_cap_alpha(sm, mu, wd)
        assert math.isclose(soft_cap_scalar(torch.tensor(k, dtype=torch.float64), a).item(), sm, rel_tol=1e-12)
        assert abs(-(k**9) * a**4 + 3 * k**7 * a**3 - 3 * k**5 * a**2 + (k - sm)) < 1e-12 * k


def test_soft_cap_alpha_edge_cases():
    assert ops.soft_cap_alpha(1.0, 0.0) == 0.0
    assert ops.soft_cap_alpha(1.0, 0.01, wd=0.05) == 0.0  # k <= sigma_max: nothing to do
    with pytest.raises(ValueError, match="argument 'mu'"):
        ops.soft_cap_alpha(1.0, -0.1)
    with pytest.raises(ValueError, match="argument 'sigma_max'"):
        ops.soft_cap_alpha(-1.0, 0.1)
    with pytest.raises(ValueError, match="too large"):
        ops.soft_cap_alpha(1.0, 5.0)


@settings(max_examples=60, deadline=None)
@given(sm=st.floats(0.05, 20.0), rel_mu=st.floats(0.0, 0.9), wd=st.floats(0.0, 0.2))
def test_soft_cap_alpha_is_the_smallest_capping_alpha(sm, rel_mu, wd):
    mu = rel_mu * sm
    k = sm * (1 - wd) + mu
    try:
        a = ops.soft_cap_alpha(sm, mu, wd)
    except ValueError:
        assert k > 1.3 * sm  # only the non-monotone regime can be infeasible
        return
    s = torch.linspace(0, k, 20001, dtype=torch.float64)
    peak = soft_cap_scalar(s, a).abs().max().item()
    assert peak <= sm * (1 + 1e-9)
    if k > sm * (1 + 1e-6):
        # minimal: a slightly smaller alpha lets some sigma <= k exceed the cap
        assert soft_cap_scalar(s, a * (1 - 1e-4)).abs().max().item() > sm


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["spread", "rank_deficient", "repeated"])
def test_soft_cap_matches_scalar_map(shape, kind):
    # coupling: sigma_max = 1, mu = 0.1 -> every sigma <= 1.1 must land <= 1
    a = ops.soft_cap_alpha(1.0, 0.1)
    W = controlled(shape, kind, cap=0.11)  # spectra up to 1.1 = k
    out = ops.spectral_soft_cap(W.float(), a)
    assert out.shape == W.shape and out.dtype == torch.float32
    ref = svd_apply_f64(W, lambda S: soft_cap_scalar(S, a))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    assert torch.linalg.matrix_norm(out.double(), 2).max() <= 1.0 + 1e-5
    # beyond k the map is still the scalar polynomial (no cap promised there)
    W = controlled(shape, kind, cap=0.2)
    ref = svd_apply_f64(W, lambda S: soft_cap_scalar(S, a))
    torch.testing.assert_close(ops.spectral_soft_cap(W, a), ref, atol=1e-10, rtol=1e-10)


def test_soft_cap_per_matrix_alpha_equals_separate_calls():
    W = torch.randn(2, 3, 20, 30) * 0.05
    alpha = torch.tensor([[0.1, 0.2, 0.0], [0.05, 0.3, 0.13]])
    out = ops.spectral_soft_cap(W, alpha)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], ops.spectral_soft_cap(W[i, j], float(alpha[i, j])), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ops.spectral_soft_cap(W, torch.tensor(0.2)), ops.spectral_soft_cap(W, 0.2))
    torch.testing.assert_close(ops.spectral_soft_cap(W, 0.0), W)


def test_soft_cap_tall_is_transpose_of_wide_and_non_contiguous():
    base = torch.randn(4, 30, 70) * 0.1
    torch.testing.assert_close(ops.spectral_soft_cap(base.mT, 0.2), ops.spectral_soft_cap(base, 0.2).mT, atol=1e-6, rtol=1e-5)
    for W in (base.mT, base[:, ::2, 1::3], base[::2]):
        torch.testing.assert_close(ops.spectral_soft_cap(W, 0.2), ops.spectral_soft_cap(W.contiguous(), 0.2))


def test_soft_cap_low_precision():
    a = ops.soft_cap_alpha(1.0, 0.06)
    W = controlled((3, 32, 48), "spread", cap=0.106)
    for dt in (torch.bfloat16, torch.float16):
        out = ops.spectral_soft_cap(W.to(dt), a)
        assert out.dtype == dt
        ref = svd_apply_f64(W.to(dt), lambda S: soft_cap_scalar(S, a))
        torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)
        assert torch.linalg.matrix_norm(out.double(), 2).max() <= 1.0 + 1e-2


# ---------------------------------------------------------------------------
# hard cap, orthogonal projection, SVD clip

#: |sigma_out - min(sigma, b)| <= MSIGN_TOL * b for spectra in [0, 10 b], float32.
MSIGN_TOL = 5e-3


@pytest.mark.parametrize("shape", SHAPES + GRAM_SHAPES)
@pytest.mark.parametrize("kind", ["spread", "rank_deficient", "repeated"])
def test_msign_hard_cap_matches_clip(shape, kind):
    cap = 0.7
    W = controlled(shape, kind, cap=cap)
    out = ops.spectral_hard_cap(W.float(), cap, method="msign")
    assert out.shape == W.shape and out.dtype == torch.float32
    ref = svd_apply_f64(W, lambda S: S.clamp(max=cap))
    err = torch.linalg.matrix_norm(out.double() - ref, 2).max().item()
    assert err <= MSIGN_TOL * cap, err
    got = torch.linalg.svdvals(out.double())
    want = torch.linalg.svdvals(ref)
    assert (got - want).abs().max() <= MSIGN_TOL * cap
    # svd_cap is the exact version of the same map
    torch.testing.assert_close(ops.svd_cap(W.float(), cap).double(), ref, atol=1e-5, rtol=1e-5)


#: eigh hard cap, float32: ||out - U min(S, b) V^T||_2 <= EIGH_TOL * ||W||_2 (rounding only).
EIGH_TOL = 2e-6


@pytest.mark.parametrize("shape", SHAPES + [(2, 1, 37)])
@pytest.mark.parametrize("kind", ["spread", "rank_deficient", "repeated"])
def test_eigh_hard_cap_is_exact(shape, kind):
    cap = 0.7
    W = controlled(shape, kind, cap=cap)
    out = ops.spectral_hard_cap(W.float(), cap, method="eigh")
    assert out.shape == W.shape and out.dtype == torch.float32
    ref = svd_apply_f64(W, lambda S: S.clamp(max=cap))
    scale = torch.linalg.matrix_norm(W, 2).clamp_min(cap)
    err = torch.linalg.matrix_norm(out.double() - ref, 2)
    assert (err <= EIGH_TOL * scale).all(), (err / scale).max()
    # float64 in, float64 out: exact to float64 rounding
    out64 = ops.spectral_hard_cap(W, cap, method="eigh")
    assert out64.dtype == torch.float64
    assert (torch.linalg.matrix_norm(out64 - ref, 2) <= 1e-12 * scale).all()


def test_eigh_hard_cap_at_the_cap_and_non_contiguous():
    # Training leaves most singular values AT the cap (a cluster the eigensolver cannot
    # resolve) with a few just above it: the cap must hold and the rest stay put.
    torch.manual_seed(1)
    s = torch.ones(4, 64, dtype=torch.float64)
    s[:, :5] = 1 + torch.rand(4, 5, dtype=torch.float64) * 0.05
    s[:, -8:] = torch.rand(4, 8, dtype=torch.float64)
    W = with_spectrum(s, 96, 64)
    ref = svd_apply_f64(W, lambda S: S.clamp(max=1.0))
    Wt = W.float().mT.contiguous().mT  # same values, column-major strides
    assert not Wt.is_contiguous()
    out = ops.spectral_hard_cap(Wt, 1.0, method="eigh")
    assert torch.linalg.matrix_norm(out.double() - ref, 2).max() <= EIGH_TOL * 1.05
    assert torch.linalg.svdvals(out.double()).max() <= 1.0 + 1e-6


@pytest.mark.parametrize("m, n", [(96, 64), (64, 96), (64, 64)])
def test_eigh_hard_cap_any_number_above_the_cap(m, n):
    """On CPU the eigh cap updates with only the r eigenvectors above the cap when r <= k / 2
    (the largest r of the batch), else with all: exact either way, and the identity for r = 0."""
    torch.manual_seed(2)
    k = min(m, n)
    for above in ([0, 0], [1, 0], [k // 2, 3], [k // 2 + 1, 0], [k, k // 2]):
        s = torch.rand(2, k, dtype=torch.float64) * 0.9
        for i, r in enumerate(above):
            s[i, :r] = 1.0 + torch.rand(r, dtype=torch.float64)
        W = with_spectrum(s, m, n)
        ref = svd_apply_f64(W, lambda S: S.clamp(max=1.0))
        out = ops.spectral_hard_cap(W.float(), 1.0, method="eigh")
        assert torch.linalg.matrix_norm(out.double() - ref, 2).max() <= EIGH_TOL * 2.0, above
        if above == [0, 0]:
            assert torch.equal(out, W.float())
        out64 = ops.spectral_hard_cap(W, 1.0, method="eigh")
        assert torch.linalg.matrix_norm(out64 - ref, 2).max() <= 1e-12 * 2.0, above


def _certificate_cases():
    """(W float32, cap) pairs that try to fool the eigh cap's own certificate: spectra at,
    just above and far above the cap, rank-deficient, huge and tiny scales, one dominant entry."""
    torch.manual_seed(5)
    cases = []
    for m, n in ((40, 160), (160, 40), (48, 48), (1, 300), (300, 1), (3, 256)):
        k = min(m, n)
        for kind in ("spread", "at_cap", "just_above", "rank_deficient", "far"):
            if kind == "spread":
                s = torch.rand(3, k, dtype=torch.float64) * 1.2
            elif kind == "at_cap":
                s = 1.0 + 1e-7 * torch.randn(3, k, dtype=torch.float64)
            elif kind == "just_above":
                s = 1.0 + torch.rand(3, k, dtype=torch.float64) * 1e-4
            elif kind == "rank_deficient":
                s = torch.rand(3, k, dtype=torch.float64) * 2
                s[:, k // 2:] = 0
            else:
                s = torch.rand(3, k, dtype=torch.float64) * 60
            W = with_spectrum(s, m, n)
            for scale in (1.0, 1e30, 1e-30):
                cases.append((W * scale, scale))
        W = torch.randn(2, m, n, dtype=torch.float64) * 1e-3
        W[:, 0, 0] = 3.0  # one entry dominates the norm and the max-abs scale
        cases.append((W, 1.0))
    return cases


@pytest.mark.parametrize("slack", [1e-3, 5e-3, 1e-6, 0.0])
def test_eigh_cap_certificate_is_sound(slack):
    """Every matrix the float32 eigh cap certifies has every singular value below
    cap (1 + slack) (float64 SVD of its output); typical inputs are certified at 1e-3."""
    op = torch.ops.lipschitz._spectral_hard_cap_eigh_certified
    certified_some = 0
    for W, cap in _certificate_cases():
        W32 = W.float()
        out, cert = op(W32, cap, slack)
        assert out.shape == W32.shape and out.dtype == torch.float32 and cert.shape == W32.shape[:-2]
        top = torch.linalg.matrix_norm(out.double(), 2)
        assert (top[cert] <= cap * (1 + slack) * (1 + 1e-12)).all(), (top[cert] / cap).max()
        certified_some += int(cert.sum())
        # the output is the eigh cap's
        torch.testing.assert_close(out, torch.ops.lipschitz._spectral_hard_cap(W32, cap, "eigh", 10, 16),
                                   atol=1e-5 * max(cap, float(top.max())), rtol=1e-4)
    assert certified_some > 0


def test_eigh_cap_certificate_at_its_boundary():
    """A target just below the output's own norm (a slack chosen from a first call) must never be
    certified: the float32 update's rounding, not only the exact update, has to fit under it."""
    op = torch.ops.lipschitz._spectral_hard_cap_eigh_certified
    torch.manual_seed(7)
    tried = 0
    for shape in ((64, 256), (256, 64), (2, 32, 320)):
        for _ in range(12):
            W = torch.randn(*shape)
            W = W / torch.linalg.matrix_norm(W, 2)[..., None, None] * 1.3
            out, _ = op(W, 1.0, 1.0)
            top = float(torch.linalg.matrix_norm(out.double(), 2).min())
            for below in (1e-9, 1e-7):
                if top * (1 - below) <= 1.0:  # rounding left this output at or under the cap itself
                    continue
                again, cert = op(W, 1.0, top * (1 - below) - 1.0)
                assert torch.equal(again, out) and not cert.any(), (shape, top, below)
                tried += 1
    assert tried >= 12


def test_eigh_cap_certificate_certifies_training_weights():
    """Weights at 1.2x the cap, the benchmark's and a training step's case, at aspect >= 3 (where
    the kernel certifies): all certified at the wrapper's slack; the wrapper returns exactly that
    output (no guard rescaling). Below aspect 3 the kernel leaves the certificate to the guard."""
    torch.manual_seed(6)
    for shape in ((4, 128, 512), (256, 784), (784, 256), (2, 64, 640)):
        W = torch.randn(*shape)
        W = W / torch.linalg.matrix_norm(W, 2)[..., None, None] * 1.2
        out, cert = torch.ops.lipschitz._spectral_hard_cap_eigh_certified(W, 1.0, 1e-3)
        assert cert.all()
        assert torch.equal(ops.spectral_hard_cap(W, 1.0, method="eigh"), out)
    # float64 weights, and a non-finite matrix in the batch: no certificate (the wrapper guards)
    _, cert = torch.ops.lipschitz._spectral_hard_cap_eigh_certified(torch.randn(2, 8, 12, dtype=torch.float64), 1.0)
    assert not cert.any()
    W = torch.randn(2, 8, 12)
    W[1, 0, 0] = float("nan")
    out, cert = torch.ops.lipschitz._spectral_hard_cap_eigh_certified(W, 1.0)
    assert not cert.any() and torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).any()
    _, cert = torch.ops.lipschitz._spectral_hard_cap_eigh_certified(torch.randn(2, 96, 96) * 0.2, 1.0)
    assert not cert.any()


@pytest.mark.parametrize("shape", [(2, 40, 64), (2, 32, 96)])
def test_msign_hard_cap_float64_is_tight(shape):
    W = controlled(shape, "spread", cap=1.0)
    out = ops.spectral_hard_cap(W, 1.0, method="msign", steps=12)
    ref = svd_apply_f64(W, lambda S: S.clamp(max=1.0))
    assert torch.linalg.matrix_norm(out - ref, 2).max() < 1e-3


def test_hard_cap_zero_cap_and_zero_matrix():
    W = torch.randn(2, 8, 12)
    assert (ops.spectral_hard_cap(W, 0.0) == 0).all()
    Z = torch.zeros(2, 8, 12)
    for method in ("msign", "polynomial", "eigh"):
        assert (ops.spectral_hard_cap(Z, 1.0, method=method) == 0).all()
    assert (ops.orthogonal_project(Z) == 0).all()


def _quintic(S, cap):
    """The paper's composite quintic at the cap ``cap`` (the polynomial hard cap's map)."""
    x = S / cap
    for a, b, c in HARD_CAP_QUINTIC:
        x = a * x + b * x**3 + c * x**5
    return x * cap


@pytest.mark.parametrize("kind", ["clustered", "tiny", "rank_deficient"])
@pytest.mark.parametrize("shape", GRAM_SHAPES + [(3, 128, 16)])
def test_polynomial_hard_cap_gram_path_awkward_spectra(shape, kind):
    """At aspect >= 2 the polynomial's pre-scale estimate and its steps share one small Gram
    matrix: singular values where the quintic puts them (float64 SVD reference) for clustered,
    tiny and rank-deficient spectra, tall, wide and batched, and a non-contiguous view alike."""
    cap = 0.5
    *batch, m, n = shape
    r = min(m, n)
    g = torch.Generator().manual_seed(r)
    if kind == "clustered":
        s = 1.3 * cap + 1e-4 * torch.rand(*batch, r, generator=g, dtype=torch.float64)
    elif kind == "tiny":
        s = torch.logspace(-8, 0.4, r, dtype=torch.float64).expand(*batch, r) * cap
    else:
        s = torch.rand(*batch, r, generator=g, dtype=torch.float64) * 2.5 * cap
        s[..., ::2] = 0
    W = with_spectrum(s, m, n)

    ref = svd_apply_f64(W, lambda S: _quintic(S, cap))
    out = ops.spectral_hard_cap(W.float(), cap, method="polynomial")
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=1e-4)
    Wt = W.float().mT.contiguous().mT  # the same values, column-major
    assert not Wt.is_contiguous()
    torch.testing.assert_close(ops.spectral_hard_cap(Wt, cap, method="polynomial"), out, atol=1e-6, rtol=1e-6)
    low = ops.spectral_hard_cap(W.bfloat16(), cap, method="polynomial")
    assert low.dtype == torch.bfloat16
    assert torch.linalg.matrix_norm(low.double() - ref, 2).max() <= 0.05 * cap


@pytest.mark.parametrize("shape", [(2, 24, 96), (96, 24)])
def test_polynomial_hard_cap_gram_path_prescales(shape):
    """Out of the quintic's range at aspect >= 2: the wrapper's certified pre-scale and, behind
    it, the private op's own estimate on the Gram matrix keep every output finite and capped."""
    cap = 1.0
    *batch, m, n = shape
    for top in (4.0, 10.0, 1e4):
        s = torch.linspace(0, top, min(m, n), dtype=torch.float64).expand(*batch, min(m, n))
        W = with_spectrum(s, m, n).float()
        for out in (ops.spectral_hard_cap(W, cap, method="polynomial"),
                    torch.ops.lipschitz._spectral_hard_cap(W, cap, "polynomial", 10, 16)):
            assert torch.isfinite(out).all()
            sv = torch.linalg.svdvals(out.double())
            assert sv.max() <= 1.0109 * cap + 5e-3, sv.max()
            assert sv[..., 0].min() > 0.99 * cap


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (1, 40), (3, 32, 32), *GRAM_SHAPES])
def test_polynomial_hard_cap_in_range_matches_quintic(shape):
    cap = 2.0
    *batch, m, n = shape
    s = torch.rand(*batch, min(m, n), dtype=torch.float64) * 2.9 * cap  # inside the valid range
    W = with_spectrum(s, m, n)

    out = ops.spectral_hard_cap(W.float(), cap, method="polynomial")
    torch.testing.assert_close(out.double(), svd_apply_f64(W, lambda S: _quintic(S, cap)), atol=2e-4, rtol=1e-4)


def test_polynomial_hard_cap_prescales_out_of_range_inputs():
    cap = 1.0
    for top in (4.0, 10.0, 1e4):
        s = torch.linspace(0, top, 32, dtype=torch.float64).expand(3, 32)
        W = with_spectrum(s, 32, 48).float()
        out = ops.spectral_hard_cap(W, cap, method="polynomial")
        assert torch.isfinite(out).all()
        sv = torch.linalg.svdvals(out.double())
        assert sv.max() <= 1.0109 * cap + 5e-3, sv.max()
        # the pre-scale maps the top singular value to ~3 cap, where f ~ 1
        assert sv[:, 0].min() > 0.99 * cap


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (1, 20), (3, 24, 24)])
def test_orthogonal_project(shape):
    *batch, m, n = shape
    s = torch.rand(*batch, min(m, n), dtype=torch.float64) * 9 + 1  # condition number <= 10
    W = with_spectrum(s, m, n)
    out = ops.orthogonal_project(W.float(), 2.0)
    torch.testing.assert_close(out.double(), svd_apply_f64(W, lambda S: torch.full_like(S, 2.0)), atol=5e-3, rtol=0)


def test_svd_cap_exact_and_dtypes():
    W = controlled((2, 3, 20, 12), "spread", cap=1.0)
    torch.testing.assert_close(ops.svd_cap(W, 1.0), svd_apply_f64(W, lambda S: S.clamp(max=1.0)), atol=1e-12, rtol=1e-12)
    for dt in (torch.bfloat16, torch.float16):
        out = ops.svd_cap(W.to(dt), 1.0)
        assert out.dtype == dt
        assert torch.linalg.matrix_norm(out.double(), 2).max() < 1.01


def test_ops_accept_low_precision_and_keep_dtype():
    W = controlled((2, 24, 40), "spread", cap=0.5)
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        for out in (
            ops.spectral_hard_cap(W.to(dt), 0.5, method="msign"),
            ops.spectral_hard_cap(W.to(dt), 0.5, method="polynomial"),
            ops.spectral_hard_cap(W.to(dt), 0.5, method="eigh"),
            ops.orthogonal_project(W.to(dt), 0.5),
        ):
            assert out.dtype == dt and out.shape == W.shape
    out = ops.spectral_hard_cap(W.bfloat16(), 0.5, method="msign")
    ref = svd_apply_f64(W.bfloat16(), lambda S: S.clamp(max=0.5))
    assert torch.linalg.matrix_norm(out.double() - ref, 2).max() < 0.02


def test_batched_equals_per_matrix():
    W = controlled((2, 3, 20, 28), "spread", cap=0.3).float()
    outs = {
        "soft": ops.spectral_soft_cap(W, 0.01),
        "hard": ops.spectral_hard_cap(W, 0.3, method="msign"),
        "poly": ops.spectral_hard_cap(W, 0.3, method="polynomial"),
        "eigh": ops.spectral_hard_cap(W, 0.3, method="eigh"),
        "orth": ops.orthogonal_project(W, 0.3),
        "svd": ops.svd_cap(W, 0.3),
    }
    for i in range(2):
        for j in range(3):
            Wi = W[i, j]
            single = {
                "soft": ops.spectral_soft_cap(Wi, 0.01),
                "hard": ops.spectral_hard_cap(Wi, 0.3, method="msign"),
                "poly": ops.spectral_hard_cap(Wi, 0.3, method="polynomial"),
                "eigh": ops.spectral_hard_cap(Wi, 0.3, method="eigh"),
                "orth": ops.orthogonal_project(Wi, 0.3),
                "svd": ops.svd_cap(Wi, 0.3),
            }
            for k, v in single.items():
                torch.testing.assert_close(outs[k][i, j], v, atol=1e-5, rtol=1e-4, msg=k)


def test_non_finite_weights_never_become_finite():
    for bad in (float("nan"), float("inf"), -float("inf")):
        W = torch.randn(3, 10, 16) * 0.1
        W[1, 2, 3] = bad
        for out in (
            ops.spectral_soft_cap(W, 0.1),
            ops.spectral_hard_cap(W, 1.0, method="msign"),
            ops.spectral_hard_cap(W, 1.0, method="polynomial"),
            ops.spectral_hard_cap(W, 1.0, method="eigh"),
            ops.orthogonal_project(W, 1.0),
        ):
            assert not torch.isfinite(out[1]).any()
            assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
        with pytest.raises(RuntimeError, match="svd_cap: argument 'W' contains non-finite"):
            ops.svd_cap(W)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.spectral_soft_cap(torch.randn(5), 0.1), "spectral_soft_cap: argument 'W' must have rank >= 2"),
        (lambda: ops.spectral_soft_cap(torch.ones(3, 3, dtype=torch.long), 0.1), "spectral_soft_cap: argument 'W' must be a floating"),
        (lambda: ops.spectral_soft_cap(torch.randn(3, 3), -0.1), "argument 'alpha' must be finite and >= 0"),
        (lambda: ops.spectral_soft_cap(torch.randn(2, 3, 3), torch.ones(3)), "argument 'alpha' must be a scalar or have W's batch shape"),
        (lambda: ops.spectral_soft_cap(torch.randn(2, 3, 3), torch.ones(2, dtype=torch.long)), "argument 'alpha' must be a float or a floating"),
        (lambda: ops.spectral_hard_cap(torch.randn(3, 3), -1.0), "spectral_hard_cap: argument 'sigma_max' must be finite and >= 0"),
        (lambda: ops.spectral_hard_cap(torch.randn(3), 1.0), "spectral_hard_cap: argument 'W' must have rank >= 2"),
        (lambda: ops.spectral_hard_cap(torch.randn(3, 3), 1.0, method="svd"), "argument 'method' must be 'msign', 'polynomial' or 'eigh'"),
        (lambda: ops.spectral_hard_cap(torch.randn(3, 3), 1.0, steps=0), "argument 'steps' must be in"),
        (lambda: ops.orthogonal_project(torch.randn(3, 3), -2.0), "orthogonal_project: argument 'sigma_max'"),
        (lambda: ops.orthogonal_project(torch.ones(3, 3, dtype=torch.int32)), "orthogonal_project: argument 'W' must be a floating"),
        (lambda: ops.svd_cap(torch.randn(3), 1.0), "svd_cap: argument 'W' must have rank >= 2"),
        (lambda: ops.svd_cap(torch.randn(3, 3), -1.0), "svd_cap: argument 'sigma_max'"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_empty_batch():
    W = torch.randn(0, 4, 6)
    for out in (ops.spectral_soft_cap(W, 0.1), ops.spectral_hard_cap(W), ops.orthogonal_project(W), ops.svd_cap(W)):
        assert out.shape == (0, 4, 6)


def test_opcheck():
    lib = torch.ops.lipschitz
    for W in (torch.randn(3, 10, 14) * 0.2, torch.randn(14, 10).mT * 0.2, torch.randn(2, 2, 5, 7, dtype=torch.float64)):
        torch.library.opcheck(lib.spectral_soft_cap.default, (W, 0.1))
        torch.library.opcheck(lib.spectral_soft_cap.per_matrix, (W, torch.full(W.shape[:-2], 0.1, dtype=W.dtype)))
        torch.library.opcheck(lib._spectral_hard_cap.default, (W, 0.5, "msign", 8, 16))
        torch.library.opcheck(lib._spectral_hard_cap.default, (W, 0.5, "polynomial", 8, 4))
        torch.library.opcheck(lib._spectral_hard_cap.default, (W, 0.5, "eigh", 8, 4))
        torch.library.opcheck(lib.orthogonal_project.default, (W, 1.0, 6))
        torch.library.opcheck(lib.svd_cap.default, (W, 0.5))
    # the hard cap's kernel is private: its guarantee is the wrapper's (certified pre-scale, guard)
    assert not hasattr(lib, "spectral_hard_cap")
    W = torch.randn(40, 20, dtype=torch.float64) * 1e6
    assert torch.linalg.matrix_norm(ops.spectral_hard_cap(W, 1.0, method="polynomial"), 2) <= 1.011 + 1e-9


def test_torch_compile_fullgraph():
    def f(W, a):
        return ops.spectral_hard_cap(ops.spectral_soft_cap(W * 2.0, a), 0.5) + ops.spectral_soft_cap(W, 0.1)

    W, a = torch.randn(2, 12, 20) * 0.1, torch.tensor([0.1, 0.2])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(W, a), f(W, a))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(768, 768), (3072, 768), (768, 3072), (12, 256, 256), (2, 3, 33, 70), (1, 513)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(shape, dtype):
    a = ops.soft_cap_alpha(1.0, 0.06)
    *batch, m, n = shape
    W = with_spectrum(torch.rand(*batch, min(m, n), dtype=torch.float64) * 1.06, m, n).to(dtype)
    Wg = W.cuda()
    for name, f in (
        ("soft", lambda X: ops.spectral_soft_cap(X, a)),
        ("soft_pm", lambda X: ops.spectral_soft_cap(X, torch.full(X.shape[:-2], a, device=X.device))),
        ("hard", lambda X: ops.spectral_hard_cap(X, 0.5, method="msign")),
        ("poly", lambda X: ops.spectral_hard_cap(X, 0.5, method="polynomial")),
        ("eigh", lambda X: ops.spectral_hard_cap(X, 0.5, method="eigh")),
        ("orth", lambda X: ops.orthogonal_project(X, 0.5)),
        ("svd", lambda X: ops.svd_cap(X, 0.5)),
    ):
        cpu, gpu = f(W), f(Wg)
        assert gpu.dtype == dtype and gpu.shape == W.shape, name
        err = ((gpu.cpu().double() - cpu.double()).norm() / cpu.double().norm().clamp_min(1e-12)).item()
        # msign leaves the smallest singular values unconverged, and bf16 vs fp32 moves them most
        assert err < (0.06 if name == "orth" else 0.03), (name, err)
    # the soft cap's guarantee survives bf16 GEMMs (fp32 iterate)
    out = ops.spectral_soft_cap(Wg, a).cpu().double()
    assert torch.linalg.matrix_norm(out, 2).max() <= 1.0 + 1e-2


@pytest.mark.cuda
def test_cuda_float64_and_non_finite():
    W = controlled((3, 20, 30), "spread", cap=0.1)
    torch.testing.assert_close(ops.spectral_soft_cap(W.cuda(), 0.2).cpu(), ops.spectral_soft_cap(W, 0.2), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ops.spectral_hard_cap(W.cuda(), 0.5, method="msign").cpu(),
                               ops.spectral_hard_cap(W, 0.5, method="msign"), atol=1e-8, rtol=1e-8)
    Wb = W.float().cuda()
    Wb[1, 0, 0] = float("nan")
    for out in (ops.spectral_soft_cap(Wb, 0.1), ops.spectral_hard_cap(Wb, 1.0, method="msign"), ops.spectral_hard_cap(Wb, 1.0)):
        assert not torch.isfinite(out[1]).any() and torch.isfinite(out[0]).all()
    torch.library.opcheck(torch.ops.lipschitz.spectral_soft_cap.default, (W.float().cuda(), 0.1))


@pytest.mark.parametrize("method, slack", [("eigh", 1e-3), ("msign", 5e-3), ("polynomial", 0.011)])
@pytest.mark.parametrize("scale", [1e3, 1e5, 1e7, 1e30])
def test_hard_cap_holds_far_above_the_cap(method, slack, scale):
    """Inputs 1e3..1e30 x the cap used to miss it (1.235, 18.7) or overflow."""
    torch.manual_seed(0)
    W = (torch.randn(3, 48, 24, dtype=torch.float64) * scale).float()
    out = ops.spectral_hard_cap(W, 1.0, method)
    assert torch.isfinite(out).all()
    got = torch.linalg.matrix_norm(out.double(), 2)
    assert (got <= 1.0 + slack).all(), got
    if method == "eigh" and scale <= 1e7:  # float64 inside once far above the cap: still the exact cap
        ref = svd_apply_f64(W.double(), lambda S: S.clamp(max=1.0))
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-3


def test_msign_hard_cap_near_float32_max():
    """Entries near float32's max used to give 2.1e32."""
    torch.manual_seed(0)
    W = torch.randn(2, 32, 16)
    W = W / W.abs().max() * 3e38
    for method in ("msign", "eigh", "polynomial"):
        out = ops.spectral_hard_cap(W, 2.0, method)
        got = torch.linalg.matrix_norm(out.double(), 2)
        assert torch.isfinite(out).all() and (got <= 2.0 * 1.011).all(), (method, got)
    out = ops.orthogonal_project(W, 2.0)
    assert (torch.linalg.matrix_norm(out.double(), 2) <= 2.0 * 1.005).all()


def test_meta_alpha_next_to_a_cpu_matrix_is_refused():
    """A meta alpha used to return uninitialized memory."""
    W = torch.randn(2, 8, 6)
    with pytest.raises(ValueError, match="argument 'alpha' must be on W's device"):
        ops.spectral_soft_cap(W, torch.zeros(2, device="meta"))


def test_polynomial_prescale_float32_certificate():
    """The pre-scale's float32 first test certifies sigma_max < t only when it holds (margin for
    the GEMM's rounding), refuses non-finite matrices and steps aside for float64 weights and a
    reduced float32 matmul precision."""
    from lipschitz_ext.ops.spectral_cap import _all_certified_below_fp32

    s = torch.linspace(0.1, 1.0, 24, dtype=torch.float64).expand(2, 24)
    W = with_spectrum(s, 24, 96)
    assert _all_certified_below_fp32(W.float(), 1.001) and _all_certified_below_fp32(W.bfloat16(), 1.01)
    assert not _all_certified_below_fp32(W.float(), 0.999)
    assert not _all_certified_below_fp32(W, 1.001)  # float64: the float64 test decides
    bad = W.float().clone()
    bad[1, 3, 4] = float("inf")
    assert not _all_certified_below_fp32(bad, 1e30)
    assert not _all_certified_below_fp32(torch.full((4, 8), 3e38), 1e39)  # the Gram overflows
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert not _all_certified_below_fp32(W.float(), 1.001)
    finally:
        torch.set_float32_matmul_precision(saved)


# ---------------------------------------------------------------------------
# The soft cap as one update: ``W' = W - W P``, ``P = H (H - 3x + 3I)``,
# ---------------------------------------------------------------------------
#: tall, wide, square, 1 x N, N x 1, batched (incl. two batch dims), odd sizes
ONE_UPDATE_SHAPES = [(3, 70, 24), (3, 24, 70), (4, 33, 33), (1, 57), (57, 1), (2, 3, 19, 41), (1, 5, 5)]


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


@pytest.mark.parametrize("shape", ONE_UPDATE_SHAPES)
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


@pytest.mark.parametrize("shape", ONE_UPDATE_SHAPES)
def test_float64_matches_svd_and_two_rounds(shape):
    a = 0.21
    W = weights(shape, top=1.6)  # a s^2 up to 0.54: past the monotone range, still the polynomial
    ref = svd_apply_f64(W, lambda S: soft_cap_scalar(S, a))
    out = ops.spectral_soft_cap(W, a)
    assert rel_max_err(out, ref) <= 1e-12
    assert rel_max_err(soft_cap_two_round_reference(W, a), ref) <= 1e-12
    torch.testing.assert_close(out, soft_cap_two_round_reference(W, a), atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("shape", ONE_UPDATE_SHAPES)
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
    from lipschitz_ext.constraints import SpectralSoftCap

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


def test_ops_ignore_a_callers_autocast_region():
    """The kernels pick their own GEMM dtypes: inside ``torch.autocast("cpu")`` (which would run
    float32 matmuls in bf16) every op returns exactly what it returns outside, so the eigh cap's
    certificate, which bounds float32 rounding, stays sound there."""
    torch.manual_seed(8)
    W = torch.randn(2, 128, 512)
    W = W / torch.linalg.matrix_norm(W, 2)[..., None, None] * 1.3
    calls = {
        "soft": lambda: ops.spectral_soft_cap(W, 0.05),
        "msign": lambda: ops.spectral_hard_cap(W, 1.0, method="msign"),
        "poly": lambda: ops.spectral_hard_cap(W, 1.0, method="polynomial"),
        "eigh": lambda: ops.spectral_hard_cap(W, 1.0, method="eigh"),
        "certified": lambda: torch.ops.lipschitz._spectral_hard_cap_eigh_certified(W, 1.0, 1e-3),
        "orth": lambda: ops.orthogonal_project(W, 1.0, method="msign"),
        "ns": lambda: ops.orthogonalize(W, 5, compute_dtype=torch.float32),
        "ns_gram": lambda: ops.orthogonalize(W, 5, compute_dtype=torch.float32, algorithm="gram"),
        "power": lambda: ops.power_iteration(W, 8),
        "svd": lambda: ops.svd_cap(W, 1.0),
    }
    for name, f in calls.items():
        plain = f()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = f()
        for a, b in zip(plain if isinstance(plain, tuple) else (plain,), inside if isinstance(inside, tuple) else (inside,)):
            assert torch.equal(a, b), name
