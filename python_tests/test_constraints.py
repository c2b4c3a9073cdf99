"""lipschitz_ext.constraints: the RMS->RMS frame, the soft-cap coupling, state
round trips and the factory (the interface in /work/constraint_interface.md)."""

import math

import pytest
import torch

from lipschitz_ext import constraints as C
from lipschitz_ext import ops
from reference import soft_cap_scalar, svd_apply_f64, with_spectrum

# [k, m, n]: square, tall (fan_out > fan_in, the case public code got wrong), wide
SHAPES = [(3, 32, 32), (2, 96, 24), (2, 24, 96)]


def rms_norm(W: torch.Tensor) -> torch.Tensor:
    """||W||_rms = sqrt(n / m) sigma_max(W) per matrix, float64."""
    return math.sqrt(W.shape[-1] / W.shape[-2]) * torch.linalg.matrix_norm(W.double(), 2)


def in_frame(sv_rms: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """float64 weights [k, m, n] whose RMS->RMS singular values are sv_rms [k, r]."""
    return with_spectrum(sv_rms, m, n) * math.sqrt(m / n)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "make, tol",
    [
        (lambda: C.SVDCap(sigma_max=0.8), 1e-5),
        (lambda: C.SpectralHardCap(sigma_max=0.8), 1e-5),  # "auto" = eigh on CPU: exact
        (lambda: C.SpectralHardCap(sigma_max=0.8, method="msign"), 5e-3),
        (lambda: C.SpectralHardCap(sigma_max=0.8, method="polynomial"), 0.012),
        # 16 cold power iterations on close top singular values: converged to ~1%
        (lambda: C.SpectralNormalize(sigma_max=0.8), 1e-2),
        (lambda: C.Orthogonal(sigma_max=0.8), 5e-3),
    ],
)
def test_caps_hold_in_the_rms_frame(shape, make, tol):
    k, m, n = shape
    c = make()
    W = in_frame(torch.rand(k, min(m, n), dtype=torch.float64) * 4, m, n).float()
    W[:, :] += 0  # a plain float32 tensor the constraint modifies in place
    ptr = W.data_ptr()
    c.apply_(W, state={})
    assert W.data_ptr() == ptr
    got = rms_norm(W)
    assert (got <= 0.8 * (1 + tol)).all(), got
    assert c.sigma_max == 0.8


def frame_case(shape):
    """float64 weights [k, m, n] and their exact cap at RMS->RMS norm 1.3 (float64 SVD)."""
    k, m, n = shape
    W = in_frame(torch.rand(k, min(m, n), dtype=torch.float64) * 3, m, n)
    s = math.sqrt(m / n)
    return W, svd_apply_f64(W / s, lambda S: S.clamp(max=1.3)) * s


@pytest.mark.parametrize("shape", SHAPES)
def test_hard_cap_auto_is_the_exact_cap_on_cpu(shape):
    W, want = frame_case(shape)
    c = C.SpectralHardCap(sigma_max=1.3)
    assert c.method == "auto" and c.method_for(W) == "eigh"
    assert C.SpectralHardCap(method="msign").method_for(W) == "msign"
    Wf = W.float()
    c.apply_(Wf)
    scale = torch.linalg.matrix_norm(W, 2).max().item()
    assert (Wf.double() - want).abs().max().item() <= 2e-6 * scale
    c.apply_(W)
    torch.testing.assert_close(W, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_svd_cap_frame_matches_definition(shape):
    W, want = frame_case(shape)
    C.SVDCap(sigma_max=1.3).apply_(W)
    torch.testing.assert_close(W, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_soft_cap_coupling_keeps_capped_weights_capped(shape, decay):
    """Weights at the cap + a step of RMS->RMS norm <= mu land back under the cap."""
    k, m, n = shape
    sigma_max, mu = 1.0, 0.08
    r = min(m, n)
    s = math.sqrt(m / n)
    U, _ = torch.linalg.qr(torch.randn(k, m, r, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(k, n, r, dtype=torch.float64))
    sv = torch.rand(k, r, dtype=torch.float64) * sigma_max
    sv[:, 0] = sigma_max  # exactly at the cap
    # worst case: decay, then a step of RMS->RMS norm mu aligned with the weights
    Wp = (U * (sv * (1 - decay) + mu).unsqueeze(-2)) @ V.mT
    W = (Wp * s).float()
    assert rms_norm(W).max() > sigma_max  # the step did push it over
    c = C.SpectralSoftCap(sigma_max=sigma_max)
    before = W.double().clone()
    c.apply_(W, lr=0.1, update_norm=mu, decay=decay)
    assert (rms_norm(W) <= sigma_max * (1 + 1e-5)).all()
    # and it is exactly the scalar map in the RMS frame with the coupled alpha
    a = ops.soft_cap_alpha(sigma_max, mu, decay)
    assert c.alpha_for(mu, decay) == a
    s = math.sqrt(m / n)
    want = svd_apply_f64(before / s, lambda S: soft_cap_scalar(S, a)) * s
    torch.testing.assert_close(W.double(), want, atol=2e-5, rtol=1e-4)


def test_soft_cap_defaults_and_fixed_alpha():
    c = C.SpectralSoftCap(sigma_max=2.0)
    assert c.alpha_for(0.0) == ops.soft_cap_alpha(2.0, 0.1)  # default_mu * sigma_max
    assert C.SpectralSoftCap(alpha=0.3).alpha_for(0.5) == 0.3
    W = torch.randn(2, 16, 16) * 0.05
    W0 = W.clone()
    C.SpectralSoftCap(sigma_max=1.0).apply_(W, update_norm=0.01, decay=0.05)  # k < sigma_max: a = 0
    assert torch.equal(W, W0)


def test_weight_decay_and_spectral_weight_decay():
    W = torch.randn(3, 20, 30)
    W0 = W.clone()
    C.WeightDecay(wd=0.1).apply_(W, lr=0.5)
    torch.testing.assert_close(W, W0 * 0.95)
    assert C.WeightDecay(wd=0.1).sigma_max is None
    # spectral: sigma_1 shrinks by (1 - lam * lr), nothing else moves
    W = in_frame(torch.tensor([[2.0, 1.0, 0.5], [3.0, 0.2, 0.1]], dtype=torch.float64), 20, 30)
    c = C.SpectralWeightDecay(lam=0.5, iters=30)
    Wf = W.float()
    state = {}
    c.apply_(Wf, lr=0.2, state=state)
    assert state["u"].shape == (2, 20)

    def ref(S):
        S = S.clone()
        S[..., 0] *= 1 - 0.1
        return S

    torch.testing.assert_close(Wf.double(), svd_apply_f64(W, ref), atol=1e-5, rtol=1e-5)
    Wf0 = Wf.clone()
    c.apply_(Wf, lr=0.0)  # lam * lr = 0: no-op
    assert torch.equal(Wf, Wf0)
    with pytest.raises(ValueError, match="> 1"):
        c.apply_(Wf, lr=3.0)
    Wf = W.float()
    C.SpectralWeightDecay(lam=0.1, scale_by_lr=False).apply_(Wf)
    assert abs(torch.linalg.matrix_norm(Wf.double(), 2)[0].item() - 0.9 * 2.0 * math.sqrt(20 / 30)) < 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_hammer_sets_top_rms_singular_value(shape):
    k, m, n = shape
    sv = torch.rand(k, min(m, n), dtype=torch.float64) * 0.3
    sv[:, 0] = 2.0
    W = in_frame(sv, m, n).float()
    c = C.SpectralHammer(sigma_max=1.0)
    c.apply_(W, state={})
    torch.testing.assert_close(rms_norm(W), torch.ones(k, dtype=torch.float64), atol=1e-4, rtol=0)
    assert c.sigma_max is None and c.target == 1.0


def test_state_round_trip_per_parameter_split():
    """The optimizer may split state along dim 0 per parameter and stack it back."""
    W = in_frame(torch.rand(4, 24, dtype=torch.float64) * 2 + 0.5, 24, 40).float()
    c = C.SpectralNormalize(sigma_max=1.0, iters=1)
    Wa, Wb = W.clone(), W.clone()
    state_a: dict = {}
    per_param = [dict() for _ in range(4)]
    for _ in range(3):
        c.apply_(Wa, state=state_a)
        stacked = {"u": torch.stack([p["u"] for p in per_param])} if per_param[0] else {}
        c.apply_(Wb, state=stacked)
        for i, p in enumerate(per_param):
            p["u"] = stacked["u"][i]
        assert all(v.shape[0] == 4 for v in state_a.values())
    torch.testing.assert_close(Wa, Wb)
    torch.testing.assert_close(state_a["u"], torch.stack([p["u"] for p in per_param]))


def test_stale_state_is_replaced_and_warm_start_is_used():
    c = C.SpectralNormalize(sigma_max=1.0, iters=1)
    W = torch.randn(2, 10, 14)
    state = {"u": torch.randn(3, 7)}  # wrong shape (e.g. from another bucket): ignored
    c.apply_(W, state=state)
    assert state["u"].shape == (2, 10)
    # warm start converges with one iteration per call
    sv = torch.rand(2, 10, dtype=torch.float64)
    sv[:, 0] = 3.0
    W = in_frame(sv, 10, 14).float()
    for _ in range(20):
        c.apply_(W, state=state)
    assert (rms_norm(W) <= 1.0 + 1e-4).all()


def test_single_matrix_and_bf16_in_place():
    W = torch.randn(48, 16) * 3
    state: dict = {}
    C.SpectralNormalize(sigma_max=1.0).apply_(W, state=state)
    assert state["u"].shape == (1, 48)
    assert rms_norm(W).item() <= 1.0 + 1e-3
    Wb = (torch.randn(2, 32, 64) * 3).bfloat16()
    for c in (C.SpectralSoftCap(1.0), C.SpectralHardCap(1.0), C.Orthogonal(1.0), C.SVDCap(1.0), C.EmbeddingRMSCap(1.0)):
        W = Wb.clone()
        c.apply_(W, update_norm=0.05)
        assert W.dtype == torch.bfloat16 and torch.isfinite(W).all()


def test_embedding_rms_cap():
    E = torch.randn(2, 50, 16)
    E[:, :10] *= 5  # rows above the cap
    E[:, 10:] *= 0.1  # rows below
    E[0, 20] = 0  # a zero row stays zero
    before = E.clone()
    c = C.make_constraint("embedding_rms", max_rms=1.0)
    c.apply_(E)
    rms = E.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms[:, :10], torch.ones(2, 10))
    assert torch.equal(E[:, 10:], before[:, 10:])
    assert c.sigma_max == 1.0


def test_make_constraint_factory():
    expected = {
        "weight_decay": C.WeightDecay,
        "spectral_weight_decay": C.SpectralWeightDecay,
        "normalize": C.SpectralNormalize,
        "hammer": C.SpectralHammer,
        "soft_cap": C.SpectralSoftCap,
        "hard_cap": C.SpectralHardCap,
        "orthogonal": C.Orthogonal,
        "svd_cap": C.SVDCap,
        "embedding_rms": C.EmbeddingRMSCap,
    }
    for name, cls in expected.items():
        c = C.make_constraint(name)
        assert type(c) is cls and c.name == name and isinstance(c, C.Constraint)
    assert C.make_constraint("none") is None
    assert C.make_constraint("hard_cap", sigma_max=2.0, method="polynomial").method == "polynomial"
    with pytest.raises(ValueError, match="unknown constraint"):
        C.make_constraint("spectral_cap")
    with pytest.raises(ValueError, match="'method'"):
        C.make_constraint("hard_cap", method="svd")
    with pytest.raises(ValueError, match="'sigma_max' must be finite and >= 0"):
        C.SpectralSoftCap(sigma_max=-1.0)
    with pytest.raises(ValueError, match="must be \\[k, m, n\\] or \\[m, n\\]"):
        C.SVDCap().apply_(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="floating point"):
        C.WeightDecay(wd=0.1).apply_(torch.ones(3, 3, dtype=torch.long))
    assert "SpectralSoftCap(" in repr(C.SpectralSoftCap())


def test_non_finite_weights_stay_non_finite():
    for c in (C.SpectralSoftCap(1.0), C.SpectralHardCap(1.0), C.SpectralNormalize(1.0), C.Orthogonal(1.0)):
        W = torch.randn(2, 12, 12)
        W[1, 0, 0] = float("nan")
        c.apply_(W, update_norm=0.05)
        assert not torch.isfinite(W[1]).any() and torch.isfinite(W[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_embedding_cap_holds_exactly_after_rounding(dtype):
    """Rows are never left a rounding error above the cap (the certificate's domain)."""
    torch.manual_seed(5)
    for cap in (1.0, 0.37, 2.5):
        W = (3 * torch.randn(500, 96)).to(dtype)
        keep = W[:10].clone() * 0.01  # well inside: untouched
        W[:10] = keep
        C.EmbeddingRMSCap(cap).apply_(W)
        assert W.double().pow(2).mean(-1).sqrt().max().item() <= cap
        assert torch.equal(W[:10], keep)


def test_constraint_specs_match_the_constraints():
    """Each registry fact is checked against what the constraint really does (float64 SVD)."""
    import inspect

    assert set(C.CONSTRAINT_SPECS) == set(C.CONSTRAINTS) - {"embedding_rms"} | {"none"}
    assert C.capping_constraints() == ("soft_cap", "hard_cap", "normalize", "orthogonal", "svd_cap")
    torch.manual_seed(0)
    # RMS->RMS singular values 0.2..0.6, 0.84, 3 (the soft cap's one-step range at cap 0.8,
    # mu 0.05 is 0.85): a cap of 0.8 must clip the top two, the hammer only the first
    sv = torch.cat([torch.linspace(0.2, 0.6, 22), torch.tensor([0.84, 3.0])]).double().unsqueeze(0)
    for name, spec in C.CONSTRAINT_SPECS.items():
        assert spec.name == name and spec.help and "\n" not in spec.help
        if name == "none":
            assert C.make_constraint("none") is None and not spec.takes_cap and not spec.caps_spectrum
            continue
        cls = C.CONSTRAINTS[name]
        assert ("sigma_max" in inspect.signature(cls.__init__).parameters) == spec.takes_cap, name
        c = C.make_constraint(name, **({"sigma_max": 0.8} if spec.takes_cap else {}))
        assert (c.sigma_max is not None) == spec.caps_spectrum, name
        W = in_frame(sv, 48, 24).float()
        c.apply_(W, lr=0.5, update_norm=0.05, state={})
        rms_sv = math.sqrt(24 / 48) * torch.linalg.svdvals(W.double())
        capped = bool((rms_sv <= 0.8 * (1 + 2e-2)).all())  # normalize: 16 cold iterations
        assert capped == spec.caps_spectrum, (name, rms_sv.max())


@pytest.mark.parametrize("rms", [0.9, 4.0, 19.0, 1000.0, 1e30])
@pytest.mark.parametrize("shape", [(2, 16, 512), (2, 96, 24)])
def test_soft_cap_caps_weights_far_above_its_range(shape, rms):
    """One apply_ used to take RMS norm 4 -> 10.8, 19 -> 6.8e7, 1000 -> 2.2e23."""
    torch.manual_seed(0)
    k, m, n = shape
    sv = torch.rand(k, min(m, n), dtype=torch.float64) * rms
    sv[:, 0] = rms
    W = in_frame(sv, m, n).float()
    c = C.SpectralSoftCap(1.0)
    for _ in range(3):
        c.apply_(W)
        assert torch.isfinite(W).all()
        assert (rms_norm(W) <= 1.0 + 1e-5).all(), rms_norm(W)


def test_soft_cap_leaves_in_range_weights_bit_for_bit():
    """The pre-scale only touches matrices above the coupling's range k."""
    torch.manual_seed(0)
    W = in_frame(torch.rand(3, 24, dtype=torch.float64) * 1.04, 48, 24).float()
    c = C.SpectralSoftCap(1.0)  # k = 1.05
    expect = ops.spectral_soft_cap(W, c.alpha_for() / C.rms_scale(W) ** 2)
    c.apply_(W)
    assert torch.equal(W, expect)


@pytest.mark.parametrize("bad", ["zero", "nan"])
def test_normalize_with_a_bad_warm_start_still_caps(bad):
    """A zero or NaN stored u ran 2 iterations from the fallback start: 1.107, 1.371."""
    torch.manual_seed(0)
    sv = torch.cat([torch.tensor([3.0, 2.6]), torch.rand(30) * 2]).double()
    W = in_frame(sv.unsqueeze(0).repeat(2, 1), 32, 64).float()
    u = torch.zeros(2, 32) if bad == "zero" else torch.full((2, 32), float("nan"))
    C.SpectralNormalize(1.0).apply_(W, state={"u": u})
    assert (rms_norm(W) <= 1.0 + 1e-2).all(), rms_norm(W)


@pytest.mark.parametrize("make", [lambda: C.SpectralHardCap(1.0), lambda: C.SpectralHardCap(1.0, method="msign"),
                                  lambda: C.Orthogonal(1.0), lambda: C.SVDCap(1.0)])
def test_caps_hold_after_huge_steps(make):
    """x1e6 lr steps left the head at 1.041 under cap 1."""
    torch.manual_seed(0)
    W = in_frame(torch.rand(2, 24, dtype=torch.float64) * 3, 96, 24).float()
    c = make()
    for _ in range(3):
        W += torch.randn_like(W) * 1e6
        c.apply_(W)
        assert (rms_norm(W) <= 1.0 + 5e-3).all(), rms_norm(W)
