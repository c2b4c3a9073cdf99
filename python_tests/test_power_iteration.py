"""lipschitz::power_iteration and the rank-1 constraints (normalize, hammer, spectral
weight decay) against float64 SVD references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipschitz_ext import ops
from reference import svd_apply_f64, with_spectrum

SHAPES = [(40, 60), (60, 40), (1, 33), (33, 1), (3, 20, 28), (2, 2, 17, 9), (64, 64)]


def gapped(shape, top=5.0, ratio=0.5):
    """Float64 matrices with sigma_1 = top and sigma_2 = ratio * top (fast convergence)."""
    *batch, m, n = shape
    r = min(m, n)
    s = torch.rand(*batch, r, dtype=torch.float64) * ratio * top
    s[..., 0] = top
    return with_spectrum(s, m, n)


@pytest.mark.parametrize("shape", SHAPES)
def test_triplet_matches_svd(shape):
    W = gapped(shape)
    sigma, u, v = ops.power_iteration(W.float(), iters=30)
    assert sigma.shape == shape[:-2] and u.shape == shape[:-1] and v.shape == shape[:-2] + shape[-1:]
    assert sigma.dtype == u.dtype == v.dtype == torch.float32
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(sigma.double(), S[..., 0], atol=1e-4, rtol=1e-5)
    # singular vectors up to a common sign: the rank-1 term sigma u v^T is unique
    torch.testing.assert_close(
        (sigma[..., None, None] * u[..., :, None] * v[..., None, :]).double(),
        S[..., 0, None, None] * U[..., :, :1] * Vh[..., :1, :],
        atol=2e-4,
        rtol=0,
    )
    # u^T W v = sigma and the vectors are unit
    torch.testing.assert_close((u.double().unsqueeze(-2) @ W @ v.double().unsqueeze(-1))[..., 0, 0], sigma.double(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones_like(sigma))


def test_gram_and_direct_paths_agree():
    # iters=40 on a 20-wide matrix takes the Gram path, iters=5 (repeated) the direct one
    W = gapped((3, 20, 50)).float()
    s_gram, u_gram, _ = ops.power_iteration(W, iters=40)
    u = None
    for _ in range(8):
        s_dir, u, _ = ops.power_iteration(W, iters=5, u=u)
    torch.testing.assert_close(s_gram, s_dir, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u_gram.abs(), u.abs(), atol=1e-4, rtol=0)


def test_sigma_is_a_lower_bound_and_warm_start_converges():
    W = torch.randn(4, 48, 64, dtype=torch.float64)  # close top singular values: slow
    true = torch.linalg.matrix_norm(W, 2)
    u, sig = None, None
    for _ in range(30):
        sig, u, _ = ops.power_iteration(W, iters=2, u=u)
        assert (sig <= true * (1 + 1e-12)).all()
    torch.testing.assert_close(sig, true, atol=0, rtol=1e-4)


def test_deterministic_start_and_no_rng_use():
    W = torch.randn(2, 30, 30)
    state = torch.random.get_rng_state()
    a = ops.power_iteration(W, iters=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = ops.power_iteration(W, iters=3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_structured_matrices():
    # all-ones (top singular vector is constant), rank one, and zero
    ones = torch.ones(7, 9)
    s, u, v = ops.power_iteration(ones, iters=2)
    torch.testing.assert_close(s, torch.tensor(63.0).sqrt())
    zero = torch.zeros(2, 5, 6)
    s, u, v = ops.power_iteration(zero)
    assert (s == 0).all() and (u == 0).all() and (v == 0).all()
    # a zero warm start (from a zero matrix) falls back to the default start
    s, _, _ = ops.power_iteration(torch.randn(2, 5, 6) + 3, iters=20, u=u)
    assert (s > 1).all()


def test_bad_warm_start_rows_fall_back():
    W = gapped((3, 12, 20)).float()
    u = torch.randn(3, 12)
    u[1] = float("nan")
    u[2] = 0
    s, _, _ = ops.power_iteration(W, iters=30, u=u)
    torch.testing.assert_close(s, torch.full((3,), 5.0), atol=1e-4, rtol=0)


def test_batched_equals_per_matrix_and_non_contiguous():
    base = torch.randn(4, 30, 22)
    for W in (base, base.mT, base[:, ::2, 1::2]):
        s, u, v = ops.power_iteration(W, iters=6)
        for i in range(W.shape[0]):
            si, ui, vi = ops.power_iteration(W[i], iters=6)
            torch.testing.assert_close(s[i], si, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(u[i], ui, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[i], vi, atol=1e-5, rtol=1e-5)


def test_bf16_and_float64():
    W = gapped((2, 24, 40))
    s64, _, _ = ops.power_iteration(W, iters=30)
    assert s64.dtype == torch.float64
    torch.testing.assert_close(s64, torch.full((2,), 5.0, dtype=torch.float64), atol=1e-10, rtol=0)
    sb, ub, _ = ops.power_iteration(W.bfloat16(), iters=30)
    assert sb.dtype == torch.float32 and ub.dtype == torch.float32
    torch.testing.assert_close(sb.double(), torch.linalg.matrix_norm(W.bfloat16().double(), 2), atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------
# rank-1 constraints


@pytest.mark.parametrize("shape", [(40, 60), (60, 40), (1, 17), (3, 24, 24), (2, 2, 10, 30)])
def test_normalize_matches_definition(shape):
    W = gapped(shape, top=4.0)
    out = ops.spectral_normalize(W.float(), sigma_max=2.0, iters=30)
    torch.testing.assert_close(out.double(), W / 2.0, atol=1e-5, rtol=1e-4)
    # already under the cap: unchanged
    small = gapped(shape, top=1.5).float()
    torch.testing.assert_close(ops.spectral_normalize(small, 2.0), small)
    # per-matrix mix
    both = torch.stack([W.float().reshape(-1, *shape[-2:])[0], small.reshape(-1, *shape[-2:])[0]])
    out = ops.spectral_normalize(both, 2.0, iters=30)
    torch.testing.assert_close(out[0], both[0] / 2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], both[1])


@pytest.mark.parametrize("shape", [(40, 60), (60, 40), (3, 24, 24), (1, 9)])
def test_hammer_sets_only_the_top_singular_value(shape):
    W = gapped(shape, top=3.0, ratio=0.5)
    out = ops.spectral_hammer(W.float(), sigma_max=1.0, iters=30)

    def ref_fn(S):
        S = S.clone()
        S[..., 0] = 1.0
        return S

    torch.testing.assert_close(out.double(), svd_apply_f64(W, ref_fn), atol=1e-4, rtol=0)
    # it can raise sigma_1 too
    up = ops.spectral_hammer(W.float(), sigma_max=4.0, iters=30)
    assert torch.linalg.matrix_norm(up.double(), 2).sub(4.0).abs().max() < 1e-4


@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
def test_spectral_weight_decay_definition(lam):
    W = gapped((3, 30, 20), top=2.0)
    out, u = ops.spectral_weight_decay_with_u(W.float(), lam, iters=30)
    assert u.shape == (3, 30)

    def ref_fn(S):
        S = S.clone()
        S[..., 0] *= 1 - lam
        return S

    torch.testing.assert_close(out.double(), svd_apply_f64(W, ref_fn), atol=1e-4, rtol=0)


def test_rank1_with_u_and_warm_start():
    W = gapped((2, 16, 24), top=3.0).float()
    out, u = ops.spectral_normalize_with_u(W, 1.0, iters=1)
    for _ in range(20):
        out, u = ops.spectral_normalize_with_u(W, 1.0, iters=1, u=u)
    assert torch.linalg.matrix_norm(out.double(), 2).sub(1.0).abs().max() < 1e-4


def test_rank1_dtypes_and_non_finite():
    W = torch.randn(3, 12, 18)
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        for op in (ops.spectral_normalize, ops.spectral_hammer):
            out = op(W.to(dt), 1.0)
            assert out.dtype == dt and out.shape == W.shape
    out = ops.spectral_weight_decay(W.bfloat16(), 0.5)
    assert out.dtype == torch.bfloat16
    for bad in (float("nan"), float("inf")):
        Wb = W.clone()
        Wb[1, 3, 4] = bad
        for out in (ops.spectral_normalize(Wb, 1.0), ops.spectral_hammer(Wb, 1.0), ops.spectral_weight_decay(Wb, 0.3)):
            assert not torch.isfinite(out[1]).any()
            assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
        s, _, _ = ops.power_iteration(Wb)
        assert torch.isnan(s[1]) and torch.isfinite(s[[0, 2]]).all()


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    top=st.floats(0.01, 100.0),
    cap=st.floats(0.1, 10.0),
)
def test_normalize_never_exceeds_cap_property(m, n, top, cap):
    W = gapped((2, m, n), top=top, ratio=0.5)
    out = ops.spectral_normalize(W, cap, iters=40)
    sig = torch.linalg.matrix_norm(out, 2)
    assert (sig <= cap * (1 + 1e-9) + 1e-12).all()
    torch.testing.assert_close(sig, torch.full_like(sig, min(top, cap)), atol=1e-9 * max(top, 1), rtol=1e-9)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.power_iteration(torch.randn(5)), "power_iteration: argument 'W' must have rank >= 2"),
        (lambda: ops.power_iteration(torch.ones(4, 4, dtype=torch.int32)), "argument 'W' must be a floating"),
        (lambda: ops.power_iteration(torch.randn(4, 4), iters=0), "argument 'iters' must be in"),
        (lambda: ops.power_iteration(torch.randn(2, 4, 5), u=torch.randn(2, 5)), "argument 'u' must have shape"),
        (lambda: ops.power_iteration(torch.randn(2, 4, 5), u=torch.ones(2, 4, dtype=torch.long)), "argument 'u' must be a floating"),
        (lambda: ops.spectral_normalize(torch.randn(4, 4), -1.0), "spectral_normalize: argument 'sigma_max' must be finite and >= 0"),
        (lambda: ops.spectral_hammer(torch.randn(4, 4), float("nan")), "spectral_hammer: argument 'sigma_max'"),
        (lambda: ops.spectral_weight_decay(torch.randn(4, 4), 1.5), "spectral_weight_decay: argument 'lam' must be in"),
        (lambda: ops.spectral_normalize(torch.randn(3), 1.0), "spectral_normalize: argument 'W' must have rank >= 2"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_empty_batch():
    s, u, v = ops.power_iteration(torch.randn(0, 4, 6))
    assert s.shape == (0,) and u.shape == (0, 4) and v.shape == (0, 6)
    assert ops.spectral_normalize(torch.randn(0, 4, 6)).shape == (0, 4, 6)


def test_opcheck():
    W = torch.randn(3, 10, 14)
    u = torch.randn(3, 10)
    for sample in [dict(W=W, iters=4), dict(W=W.mT, iters=4, u=u[:, :4].repeat(1, 4)[:, :14]),
                   dict(W=torch.randn(2, 5, 7, dtype=torch.float64), iters=3)]:
        torch.library.opcheck(torch.ops.lipschitz.power_iteration.default, (), sample)
    for name, param in (("spectral_normalize", "sigma_max"), ("spectral_hammer", "sigma_max"),
                        ("spectral_weight_decay", "lam")):
        op = getattr(torch.ops.lipschitz, name).default
        torch.library.opcheck(op, (), {"W": W, param: 0.5, "iters": 3, "u": u})
        torch.library.opcheck(op, (), {"W": W.bfloat16(), param: 0.5, "iters": 3})


def test_typed_results():
    """power_iteration's result has the schema's field names and still unpacks as a tuple;
    the rank-1 constraints return one type each: a tensor, or (out, u) from the *_with_u form."""
    W = torch.randn(2, 5, 7)
    r = ops.power_iteration(W, 4)
    assert isinstance(r, ops.SingularTriplet) and isinstance(r, tuple) and r._fields == ("sigma", "u", "v")
    sigma, u, v = r
    assert sigma is r.sigma and u is r.u and v is r.v and sigma.shape == (2,) and v.shape == (2, 7)
    schema = torch.ops.lipschitz.power_iteration.default._schema
    assert tuple(ret.name for ret in schema.returns) == r._fields
    for plain, with_u, param in ((ops.spectral_normalize, ops.spectral_normalize_with_u, 1.0),
                                 (ops.spectral_hammer, ops.spectral_hammer_with_u, 1.0),
                                 (ops.spectral_weight_decay, ops.spectral_weight_decay_with_u, 0.2)):
        out = plain(W, param, 4)
        both = with_u(W, param, 4)
        assert isinstance(out, torch.Tensor) and isinstance(both, ops.Rank1Result)
        assert torch.equal(both.out, out) and both.u.shape == (2, 5)
        out2, u2 = both
        assert out2 is both.out and u2 is both.u


def test_torch_compile_fullgraph():
    def f(W, u):
        out, u2 = ops.spectral_normalize_with_u(W * 2.0, 1.0, 2, u)
        s, _, _ = ops.power_iteration(out, 2, u2)
        return out, s

    W, u = torch.randn(2, 12, 20), torch.randn(2, 12)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for x, y in zip(compiled(W, u), f(W, u)):
        torch.testing.assert_close(x, y)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(768, 768), (3072, 768), (768, 3072), (12, 256, 256), (2, 3, 33, 70), (1, 513)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_matches_cpu(shape, dtype):
    W = gapped(shape, top=3.0).to(dtype)
    for op, arg in ((ops.spectral_normalize_with_u, 1.0), (ops.spectral_hammer_with_u, 1.0),
                    (ops.spectral_weight_decay_with_u, 0.2)):
        cpu, ucpu = op(W, arg, 20)
        gpu, ugpu = op(W.cuda(), arg, 20)
        assert gpu.dtype == dtype and gpu.shape == W.shape and ugpu.dtype == ucpu.dtype
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(gpu.cpu(), cpu, atol=tol, rtol=tol)
    s_cpu, _, _ = ops.power_iteration(W, 20)
    s_gpu, _, _ = ops.power_iteration(W.cuda(), 20)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-4, rtol=1e-4)
    torch.library.opcheck(torch.ops.lipschitz.spectral_hammer.default, (), dict(W=W.cuda(), sigma_max=1.0, iters=3))


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e9, 1e18, 1e30])
@pytest.mark.parametrize("shape", [(64, 32), (16, 512), (3, 20, 28)])
def test_power_iteration_any_magnitude(shape, scale):
    """sigma scales with W: no underflow to 0 or overflow to NaN in float32."""
    torch.manual_seed(0)
    W64 = gapped(shape)
    W = (W64 * scale).float()
    sigma, u, v = ops.power_iteration(W, 16)
    ref = torch.linalg.matrix_norm(W.double(), 2)
    torch.testing.assert_close(sigma.double(), ref, rtol=1e-4, atol=0)
    out = ops.spectral_normalize(W, 1.0)
    assert (torch.linalg.matrix_norm(out.double(), 2) <= 1.0 + 1e-4).all()


def test_spectral_norm_bound_is_a_certified_upper_bound():
    """Never below sigma_max (float64 SVD), within 1.3x of it, for any magnitude; target semantics."""
    torch.manual_seed(0)
    cases = [torch.randn(3, 64, 32), torch.randn(2, 16, 512), torch.randn(4, 128, 128),
             with_spectrum(torch.ones(2, 24), 24, 40).float(), torch.zeros(2, 5, 7)]
    for W0 in cases:
        for scale in (1e-30, 1.0, 1e9, 1e30):
            W = W0 * scale
            ub = ops.spectral_norm_bound(W)
            ref = torch.linalg.matrix_norm(W.double(), 2)
            assert ub.dtype == torch.float64 and ub.shape == W.shape[:-2]
            assert (ub >= ref * (1 - 1e-12)).all(), (ub, ref)
            assert (ub <= ref * 1.3 + 1e-300).all(), (ub, ref)
    W = torch.randn(64, 64)
    ref = float(torch.linalg.matrix_norm(W.double(), 2))
    assert float(ops.spectral_norm_bound(W, target=2 * ref)) <= 2 * ref
    assert float(ops.spectral_norm_bound(W, target=0.5 * ref)) >= ref
    assert torch.isnan(ops.spectral_norm_bound(torch.full((3, 3), float("inf")))).all()
    with pytest.raises(ValueError, match="argument 'W'"):
        ops.spectral_norm_bound(torch.ones(3))


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda W, m: ops.power_iteration(W, 4, u=m), "u"),
        (lambda W, m: ops.spectral_normalize(W, 1.0, 4, u=m), "u"),
        (lambda W, m: ops.spectral_hammer(W, 1.0, 4, u=m), "u"),
        (lambda W, m: ops.spectral_weight_decay(W, 0.1, 4, u=m), "u"),
    ],
)
def test_meta_warm_start_next_to_a_cpu_matrix_is_refused(call, arg):
    """A meta tensor next to a CPU one used to return uninitialized memory."""
    W = torch.randn(8, 6)
    with pytest.raises(ValueError, match=f"argument '{arg}' must be on W's device"):
        call(W, torch.empty(8, device="meta"))
    with pytest.raises(ValueError, match=f"argument '{arg}' must be on W's device"):
        call(W.to("meta"), torch.randn(8))


@pytest.mark.parametrize("shape", [(3, 40, 17), (2, 17, 40), (1, 64)])
def test_certified_at_most_matches_the_svd(shape):
    """The caps' one-factorization test: True exactly when sigma_max < t (away from rounding)."""
    from lipschitz_ext.ops import certified_at_most

    torch.manual_seed(0)
    W = torch.randn(*shape) * torch.tensor(3e5)
    s = torch.linalg.matrix_norm(W.double(), ord=2)
    for f, want in ((1.001, True), (0.999, False)):
        for b in range(s.numel()):
            got = certified_at_most(W, float(s.reshape(-1)[b]) * f)
            assert bool(got.reshape(-1)[b]) is want
    bad = W.clone().reshape(-1, *W.shape[-2:])
    bad[0, 0, 0] = float("nan")
    assert not bool(certified_at_most(bad, 1e30).reshape(-1)[0])
    assert bool(certified_at_most(torch.zeros(2, 3, 4), 1e-30).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [3e38, 1.0, 1e-40])
def test_certified_at_most_unscaled_narrow_dtypes_match_the_svd(dtype, scale):
    """Narrow dtypes skip the scaling pass (their squares fit float64): the test still says
    exactly whether sigma_max < t at float32's extremes, and refuses inf and NaN."""
    from lipschitz_ext.ops import certified_at_most

    torch.manual_seed(1)
    info = torch.finfo(dtype)
    W = (torch.rand(3, 12, 7, dtype=torch.float64) * 2 - 1) * min(scale, info.max / 4)
    W = W.to(dtype)
    if scale < 1e-30 and dtype != torch.float32:
        W = (torch.rand(3, 12, 7) * info.tiny).to(dtype)  # that dtype's subnormals
    s = torch.linalg.matrix_norm(W.double(), ord=2)
    assert bool((s > 0).all())
    for f, want in ((1.001, True), (0.999, False)):
        for b in range(3):
            assert bool(certified_at_most(W, float(s[b]) * f)[b]) is want, (b, f)
    for bad in (float("inf"), float("nan")):
        V = W.clone()
        V[1, 3, 2] = bad
        got = certified_at_most(V, float("inf") if bad != bad else 1e300)
        assert not bool(got[1]) and bool(got[0]) and bool(got[2])
