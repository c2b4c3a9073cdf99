"""lipschitz_ext.certify: soundness (never below a measured ratio), the formula, the API."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lipschitz_ext
from lipschitz_ext import nn as lnn
from lipschitz_ext.certify import Certificate, certify, worst_case_certificate
from lipschitz_ext.certify import attack_lipschitz, empirical_lipschitz
from lipschitz_ext.certify import attention_bounds, mlp_block_bound, mlp_bounds, sequence_norm

F64 = torch.float64
SLACK = 1 + 1e-9  # float64 rounding of the measured ratios


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matrices: threads only add OpenMP spin-waits, which stall badly on a busy shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def project(z, radius=1.0):
    rms = z.pow(2).mean(-1, keepdim=True).sqrt()
    return z * torch.clamp(radius / rms, max=1.0)


def random_model(cfg, scale_lo=0.2, scale_hi=3.0, gen=None):
    """Random weights inside and outside the caps: each matrix a random matrix at a random RMS->RMS norm."""
    m = lnn.LipschitzGPT(cfg).double()
    with torch.no_grad():
        for lin in m.modules():
            if isinstance(lin, lnn.LipschitzLinear):
                W = torch.randn(lin.weight.shape, dtype=F64, generator=gen)
                target = scale_lo + (scale_hi - scale_lo) * torch.rand((), dtype=F64, generator=gen)
                lin.weight.copy_(W / lnn.rms_norm_of(W) * target)
            elif isinstance(lin, lnn.LipschitzAttention) and lin.bias_table is not None:
                # any input-independent bias, sharp or flat: the bound must not depend on it
                lin.bias_table.copy_(4 * torch.randn(lin.bias_table.shape, dtype=F64, generator=gen))
    return m


def pair_ratio(f, x, y):
    return (sequence_norm(f(x) - f(y)) / sequence_norm(x - y)).max().item()


# ---------------------------------------------------------------- independent reference of the theorem


def sv(W):
    return torch.linalg.svdvals(W.detach().double())[..., 0]


def rope_matrices(attn, T):
    """``R_t [T, d_h, d_h]`` read off the module's own apply_rope (columns = rotated basis vectors)."""
    dh = attn.d_head
    basis = torch.eye(dh, dtype=F64)[:, None, None, :].expand(dh, 1, T, dh)
    out = lnn.apply_rope(basis.contiguous(), attn.rope_base)  # out[b, 0, t] = R_t e_b
    return out[:, 0].permute(1, 2, 0)


def reference_rho(attn, T):
    """max over causal pairs s <= t < T of sigma(W_q^hT R_t^T R_s W_k^h), per head, full SVDs."""
    H, dh = attn.n_heads, attn.d_head
    Wq, Wk = attn.q.weight.detach().double(), attn.k.weight.detach().double()
    R = rope_matrices(attn, T) if attn.rope else torch.eye(dh, dtype=F64).expand(1, dh, dh)
    pairs = [(t, s) for t in range(R.shape[0]) for s in range(t + 1) if s == 0 or T <= 8]  # R_t^T R_s: distance t - s
    return torch.stack([
        max(sv(Wq[h * dh:(h + 1) * dh].T @ R[t].T @ R[s] @ Wk[h * dh:(h + 1) * dh]) for t, s in pairs)
        for h in range(H)])


def reference_bound(model, input_rms=1.0, refined=True):
    """Theorem 3 of docs/certificate.md written out again with full SVDs (with Theorems 5 and 6
    when ``refined``, else Theorems 1 and 2' only)."""
    cfg = model.config
    H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    alpha = 1 / (2 * cfg.n_layers)
    lip, a = 1.0, input_rms
    lo, hi = (1 - 1.1289041452) / 1.1289041452, 1.0
    for blk in model.blocks:
        at = blk.attn
        Wq, Wk, Wv, Wo = (m.weight.detach().double() for m in (at.q, at.k, at.v, at.o))
        q = torch.stack([sv(Wq[h * dh:(h + 1) * dh]) for h in range(H)])
        k = torch.stack([sv(Wk[h * dh:(h + 1) * dh]) for h in range(H)])
        v = torch.stack([sv(Wv[h * dh:(h + 1) * dh]) for h in range(H)])
        mh = torch.stack([sv(Wo[:, h * dh:(h + 1) * dh] @ Wv[h * dh:(h + 1) * dh]) for h in range(H)])
        so, sq = sv(Wo), sv(Wq)
        c = at.softmax_scale * a * a * d / dh
        V = min(so * v.norm(), mh.sum())
        DQ = c * min(so * min(sq * (k * v).max(), (q * k * v).norm()),
                     min((q * k * mh).sum(), sq * (k * mh).norm()))
        DK = c * min(so * (q * k * v).norm(), (q * k * mh).sum())
        if refined:
            rho = torch.minimum(reference_rho(at, cfg.seq_len), q * k)
            DQ = min(DQ, c * min(so * (rho * v).norm(), (rho * mh).sum()))
            DK = DQ  # Theorem 5 (b): the key path shares the query token's budget
        lip *= (1 - alpha) + alpha * (V + DQ + DK).item() / 3
        a *= (1 - alpha) + alpha * V.item() / 3
        W_in, W_out = blk.mlp.fc_in.weight.detach().double(), blk.mlp.fc_out.weight.detach().double()
        n_in = sv(W_in) * math.sqrt(W_in.shape[1] / W_in.shape[0])
        n_out = sv(W_out) * math.sqrt(W_out.shape[1] / W_out.shape[0])
        n_prod = sv(W_out @ W_in)
        old = (1 - alpha) + alpha * (abs(hi + lo) / 2 * n_prod + (hi - lo) / 2 * n_out * n_in).item()
        J0 = (1 - alpha) * torch.eye(d, dtype=F64) + alpha * (hi + lo) / 2 * (W_out @ W_in)
        lip *= min(old, (sv(J0) + alpha * (hi - lo) / 2 * n_out * n_in).item())  # Theorem 2'
        g = (1 - alpha) + alpha * ((n_prod + n_out * n_in) / (2 * 1.1289041452)).item()
        if refined:  # Theorem 6
            kap = 1.1289041452
            G0 = (1 - alpha) * torch.eye(d, dtype=F64) + alpha / (2 * kap) * (W_out @ W_in)
            g = min(g, (sv(G0) + alpha / (2 * kap) * n_out * n_in).item())
        a *= g
    Wh = model.head.weight.detach().double()
    return lip * sv(Wh).item() * math.sqrt(Wh.shape[1] / Wh.shape[0]), a


# ---------------------------------------------------------------- strategies

configs = st.builds(
    lambda heads, dh, layers, s, vocab, mlp_ratio, pos_bias, rs: lnn.GPTConfig(
        vocab_size=vocab, d_model=heads * dh, n_layers=layers, n_heads=heads, seq_len=8,
        softmax_scale=s, mlp_ratio=mlp_ratio, attention="reference", zero_init_out=False,
        pos_bias=pos_bias, residual_scale=rs,
    ),
    heads=st.sampled_from([1, 2, 4]),
    dh=st.sampled_from([2, 4]),
    layers=st.integers(1, 2),
    s=st.sampled_from([0.25, 1.0, 4.0, 12.0]),
    vocab=st.integers(2, 9),
    mlp_ratio=st.integers(1, 3),
    pos_bias=st.sampled_from(["none", "learned"]),
    rs=st.sampled_from([0.5, 1.0, 2.0]),
)


@settings(max_examples=20, deadline=None)
@given(cfg=configs, seed=st.integers(0, 2**16), T=st.integers(1, 6))
def test_empirical_search_never_exceeds_bound(cfg, seed, T):
    gen = torch.Generator().manual_seed(seed)
    model = random_model(cfg, gen=gen)
    cert = certify(model)
    torch.manual_seed(seed)
    x = project(3 * torch.randn(6, T, cfg.d_model, dtype=F64, generator=gen))
    emp = empirical_lipschitz(model, x, steps=60, lr=0.05)
    assert emp <= cert.bound * SLACK, (emp, cert.bound)
    # random pairs, near and far, all inside the domain
    y = project(x + 10 ** torch.empty(6, 1, 1, dtype=F64).uniform_(-6, 0.5, generator=gen)
                * torch.randn(x.shape, dtype=F64, generator=gen))
    assert pair_ratio(model.forward_embeddings, x, y) <= cert.bound * SLACK
    # the logit bound and the activation bound
    assert sequence_norm(model.forward_embeddings(x)).max() <= cert.logit_bound * SLACK
    stats = lnn.activation_stats(model.float(), torch.randint(0, cfg.vocab_size, (3, T)))
    model.double()
    if cert.embedding_in_domain:
        for blk in range(cfg.n_layers):
            assert stats[f"blocks.{blk}"]["max_token_rms"] <= cert.activation_bound * (1 + 1e-5)


@settings(max_examples=8, deadline=None)
@given(cfg=configs, seed=st.integers(0, 2**16))
def test_jacobian_vector_norms_below_bound(cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    model = random_model(cfg, gen=gen)
    bound = certify(model).bound
    x = project(2 * torch.randn(4, 5, cfg.d_model, dtype=F64, generator=gen))
    for _ in range(3):
        u = torch.randn(x.shape, dtype=F64, generator=gen)
        _, jvp = torch.autograd.functional.jvp(model.forward_embeddings, x, u)
        assert (sequence_norm(jvp) / sequence_norm(u)).max() <= bound * SLACK


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_trained_model_stays_certified(opt_name):
    torch.manual_seed(7)
    cfg = lnn.GPTConfig(vocab_size=7, d_model=8, n_layers=2, n_heads=2, seq_len=8, softmax_scale=4.0)
    model = lnn.LipschitzGPT(cfg).double()
    opt = (torch.optim.SGD(model.parameters(), lr=0.5) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.05))
    data = torch.randint(0, 7, (16, 8))
    before = certify(model).bound
    for _ in range(15):  # unconstrained steps: weights leave their caps
        loss = torch.nn.functional.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    cert = certify(model, domain=False)  # the reference has Theorems 5 and 6, not the token domain (Theorem 7)
    assert cert.bound != before
    assert cert.bound == pytest.approx(reference_bound(model, 1.0)[0], rel=1e-6)
    assert certify(model).bound <= cert.bound
    x = model.embed.weight.detach()[data[:4]]
    x = project(x, 1.0)
    emp = empirical_lipschitz(model, x, steps=80, lr=0.05)
    assert emp <= cert.bound * SLACK


def attention_ascent(attn, a, T, steps, restarts=12):
    """Largest measured (Lipschitz ratio, gain) of an attention module on per-token RMS <= a."""
    d = attn.d_model
    x = torch.randn(restarts, T, d, dtype=F64, requires_grad=True)
    u = torch.randn(restarts, T, d, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([x, u], lr=0.03)
    best = best_gain = 0.0
    for _ in range(steps):
        p = project(x, a)
        q = project(x + 1e-5 * a * u / sequence_norm(u)[:, None, None], a)
        r = sequence_norm(attn(p) - attn(q)) / sequence_norm(p - q)
        g = sequence_norm(attn(p)) / a
        best, best_gain = max(best, r.max().item()), max(best_gain, g.max().item())
        opt.zero_grad()
        (-r.sum() - g.sum()).backward()
        opt.step()
    return best, best_gain


@settings(max_examples=15, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), s=st.sampled_from([0.5, 2.0, 8.0, 24.0]),
       a=st.floats(0.3, 1.5), T=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_attention_bound_sound_on_random_modules(heads, s, a, T, seed):
    """Theorem 1 alone: random heads, scales, domain radii and weights (norms 0.3-2.5)."""
    torch.manual_seed(seed)
    attn = lnn.LipschitzAttention(4 * heads, heads, softmax_scale=s, backend="reference",
                                  zero_init_out=False).double()
    with torch.no_grad():
        for lin in (attn.q, attn.k, attn.v, attn.o):
            lin.weight.mul_(torch.empty(()).uniform_(0.3, 2.5))
    bound, gain, _ = attention_bounds(attn, a)
    best, best_gain = attention_ascent(attn, a, T, steps=60, restarts=8)
    assert best <= bound * SLACK and best_gain <= gain * SLACK


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_bound_sound_and_tight_on_module(heads):
    """The attention bound alone, on its domain ``per-token RMS <= a``, against ascent."""
    torch.manual_seed(3)
    attn = lnn.LipschitzAttention(8, heads, softmax_scale=4.0, backend="reference", zero_init_out=False).double()
    a = 0.8
    bound, gain, _ = attention_bounds(attn, a)
    best, best_gain = attention_ascent(attn, a, T=4, steps=250)
    assert best <= bound * SLACK and best_gain <= gain * SLACK
    assert best >= 0.4 * bound  # the derivation is not vacuous (measured 0.5-0.97)
    if heads == 1:
        assert best_gain == pytest.approx(gain, rel=1e-3)  # gain bound is exact for one head


def test_mlp_bound_sound_and_published_formula_is_not():
    """1-D MLP with unit weights: slope 1 at x = sqrt 2; the published ||W_out|| ||W_in|| / 1.1289 is below it."""
    mlp = lnn.LipschitzMLP(1, mlp_ratio=1).double()
    with torch.no_grad():
        mlp.fc_in.weight.fill_(1.0)
        mlp.fc_out.weight.fill_(1.0)
    lip, gain, norms = mlp_bounds(mlp)
    x = torch.tensor([[math.sqrt(2)]], dtype=F64, requires_grad=True)
    (slope,) = torch.autograd.grad(mlp(x).sum(), x)
    assert slope.item() == pytest.approx(1.0, abs=1e-12)
    assert slope.item() <= lip * SLACK
    assert slope.item() > norms["out"] * norms["in"] / 1.1289 + 0.1
    z = torch.linspace(-8, 8, 4001, dtype=F64)[:, None]
    assert (mlp(z).abs() / z.abs().clamp_min(1e-12)).max() <= gain * SLACK


def _block_jacobian_norm(mlp, alpha, x):
    """Largest spectral norm over tokens of the Jacobian of (1 - alpha) x + alpha Mlp(x)."""
    block = lambda t: (1 - alpha) * t + alpha * mlp(t)  # noqa: E731
    J = torch.autograd.functional.jacobian(block, x)  # [n, d, n, d]; tokens are independent
    n = x.shape[0]
    return max(torch.linalg.matrix_norm(J[i, :, i, :], 2).item() for i in range(n))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_mlp_block_bound_is_sound_and_tighter_when_the_product_turns(sign):
    """Theorem 2': W_out W_in = sign * s * Q (orthogonal Q). For sign = -1 the identity and the
    branch pull apart, so the sub-layer is far below (1 - a) + a L_mlp; for +1 the bounds agree."""
    torch.manual_seed(3)
    d, alpha = 6, 0.5
    mlp = lnn.LipschitzMLP(d, mlp_ratio=2, act_scale=3.0).double()
    with torch.no_grad():
        U = torch.linalg.qr(torch.randn(2 * d, d, dtype=F64)).Q  # [2d, d], orthonormal columns
        mlp.fc_in.weight.copy_(2.0 * U)
        mlp.fc_out.weight.copy_(sign * 1.5 * U.mT)  # W_out W_in = sign * 3 I
    lip, _, _ = mlp_bounds(mlp)
    old = (1 - alpha) + alpha * lip
    tight = mlp_block_bound(mlp, alpha)
    assert tight <= old * (1 + 1e-12)
    if sign > 0:
        assert tight == pytest.approx(old, rel=1e-9)
    else:
        assert tight < 0.75 * old
    worst = 0.0
    for scale in (0.3, 1.0, 3.0):  # the GELU slope extremes sit at different radii
        x = scale * torch.randn(64, d, dtype=F64)
        worst = max(worst, _block_jacobian_norm(mlp, alpha, x))
    assert worst <= tight * SLACK
    assert worst >= 0.5 * tight  # not vacuous
    with pytest.raises(ValueError, match="alpha"):
        mlp_block_bound(mlp, 0.0)


def test_positional_attention_certificate_is_sound_and_the_s_to_0_limit():
    """softmax_scale = 0: L_att = G_att = phi V on every domain, equal to a content model's bound
    as s -> 0 with the same V, O weights, and never below measured ratios of the whole model."""
    torch.manual_seed(8)
    cfg = lnn.GPTConfig(vocab_size=9, d_model=16, n_layers=2, n_heads=4, seq_len=8, softmax_scale=0.0,
                        zero_init_out=False, pos_bias="learned", attention="reference")
    model = random_model(cfg, 0.5, 2.0)
    content = random_model(lnn.GPTConfig(**{**cfg.to_dict(), "softmax_scale": 1e-12}), 0.5, 2.0)
    content.load_state_dict(model.state_dict(), strict=False)  # same V, O, MLPs, head, bias
    for a in (0.5, 1.0, 7.0):
        lip, gain, norms = attention_bounds(model.blocks[0].attn, a)
        assert lip == gain and set(norms) == {"v", "o"}
        assert lip == pytest.approx(attention_bounds(content.blocks[0].attn, a)[0], rel=1e-9)
    cert = certify(model)
    assert cert.bound == pytest.approx(certify(content).bound, rel=1e-9)
    x = project(torch.randn(6, 8, 16, dtype=F64))
    for scale in (1e-3, 0.3):
        y = project(x + scale * torch.randn(6, 8, 16, dtype=F64))
        assert pair_ratio(model.forward_embeddings, x, y) <= cert.bound * SLACK
    assert empirical_lipschitz(model, x, steps=60) <= cert.bound * SLACK
    from lipschitz_ext.nn.fp8_scales import fp8_scales_from_certificate
    with pytest.raises(ValueError, match="positional"):
        fp8_scales_from_certificate(cert, 16, 4)


def test_zero_branches_make_the_bound_exact():
    """Zero output projections: f(x) = (1 - 1/(2L))^(2L) W_head x, and the certificate is that exactly."""
    cfg = lnn.GPTConfig(vocab_size=5, d_model=8, n_layers=2, n_heads=2, seq_len=6)
    model = lnn.LipschitzGPT(cfg).double()
    cert = certify(model)
    exact = (1 - 1 / 4) ** 4 * model.head.rms_norm()
    assert cert.bound == pytest.approx(exact, rel=1e-8) and cert.bound >= exact
    emp = empirical_lipschitz(model, project(torch.randn(4, 3, 8, dtype=F64)), steps=150, lr=0.05)
    assert emp == pytest.approx(exact, rel=2e-2) and emp <= cert.bound * SLACK


def test_certificate_matches_reference_and_is_input_independent():
    torch.manual_seed(11)
    cfg = lnn.GPTConfig(vocab_size=13, d_model=16, n_layers=3, n_heads=4, seq_len=10,
                        softmax_scale=2.0, zero_init_out=False)
    model = random_model(cfg, 0.5, 1.5)
    cert = certify(model, domain=False)  # Theorems 5 and 6, what the reference writes out
    ref, a = reference_bound(model)
    assert cert.bound == pytest.approx(ref, rel=1e-7) and cert.bound >= ref
    assert cert.rows[-2].activation_bound == pytest.approx(a, rel=1e-7)
    # batch size / sequence length do not enter: outputs per element are independent of the batch
    x = project(torch.randn(5, 10, 16, dtype=F64))
    full = model.forward_embeddings(x)
    torch.testing.assert_close(model.forward_embeddings(x[2:3]), full[2:3])
    torch.testing.assert_close(model.forward_embeddings(x[:, :4]), full[:, :4])
    for T in (1, 4, 10):
        y = project(x[:, :T] + 1e-3 * torch.randn(5, T, 16, dtype=F64))
        assert pair_ratio(model.forward_embeddings, x[:, :T], y) <= cert.bound * SLACK
    assert certify(model, domain=False).bound == cert.bound
    assert certify(model).bound <= cert.bound
    model.float()  # the certificate reads the weights in any dtype
    assert certify(model, domain=False).bound == pytest.approx(cert.bound, rel=1e-6)


def test_input_radius_scales_domain():
    torch.manual_seed(5)
    model = random_model(lnn.GPTConfig(vocab_size=5, d_model=8, n_layers=1, n_heads=2, seq_len=6,
                                       zero_init_out=False))
    small, big = certify(model, input_rms=0.5), certify(model, input_rms=2.0)
    assert small.bound <= certify(model).bound <= big.bound
    x = project(torch.randn(4, 5, 8, dtype=F64), 2.0)
    assert empirical_lipschitz(model, x, steps=60, input_rms=2.0) <= big.bound * SLACK
    with pytest.raises(ValueError, match="input_rms"):
        certify(model, input_rms=0.0)


def test_certified_radius_protects_predictions():
    torch.manual_seed(2)
    cfg = lnn.GPTConfig(vocab_size=6, d_model=8, n_layers=1, n_heads=2, seq_len=6,
                        zero_init_out=False, head_sigma_max=4.0)
    model = random_model(cfg, 0.5, 2.0)
    cert = certify(model)
    x = project(torch.randn(64, 5, 8, dtype=F64), 0.7)
    z = model.forward_embeddings(x)
    top2 = z.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).amin(dim=-1)  # per sequence, over positions
    for b in range(64):
        eps = cert.certified_radius(margin[b].item())
        assert eps == pytest.approx(margin[b].item() / (math.sqrt(2 * 6) * cert.bound))
        eps = min(eps, 0.3)  # stay inside the domain: x has per-token RMS <= 0.7
        for _ in range(3):
            d = torch.randn(5, 8, dtype=F64)
            y = x[b] + 0.999 * eps * d / sequence_norm(d)
            assert torch.equal(model.forward_embeddings(y[None]).argmax(-1), z[b : b + 1].argmax(-1))
    assert cert.certified_radius(0.0) == 0.0


def test_api_export_and_table():
    model = lnn.LipschitzGPT(lnn.GPTConfig(vocab_size=9, d_model=8, n_layers=2, n_heads=2, seq_len=4))
    threads = torch.get_num_threads()
    cert = lipschitz_ext.certify.certify(model)
    assert torch.get_num_threads() == threads  # certify's single-threaded section is undone
    assert isinstance(cert, Certificate)
    assert lipschitz_ext.certify.empirical_lipschitz is empirical_lipschitz  # the public door: the subpackage
    assert lipschitz_ext.certify.certify is certify and not callable(lipschitz_ext.certify)
    d = json.loads(cert.to_json())
    assert d["bound"] == cert.bound and len(d["rows"]) == 2 * 2 + 1
    assert "per-token RMS" in d["input_norm"] and "<= 1" in d["domain"]
    assert d["config"]["vocab_size"] == 9 and cert.to_dict()["rows"][0]["name"] == "blocks.0.attn"
    text = str(cert)
    assert "blocks.1.mlp" in text and "head" in text and f"{cert.bound:.6g}" in text
    assert cert.embedding_in_domain and cert.embedding_max_rms <= 1.0
    r = cert.rows
    assert r[-1].running_bound == pytest.approx(cert.bound)
    assert all(b.running_bound == pytest.approx(a.running_bound * b.block_bound) for a, b in zip(r, r[1:]))
    with pytest.raises(TypeError, match="LipschitzGPT"):
        certify(lnn.BaselineGPT(model.config))
    with torch.no_grad():
        model.embed.weight.mul_(2.0)
    assert not certify(model).embedding_in_domain


def test_shakespeare_model_at_cap_is_fast():
    """Acceptance: d=256, 3 layers, 4 heads, vocab 65, every singular value at its cap."""
    model = lnn.LipschitzGPT(lnn.GPTConfig(vocab_size=65))
    with torch.no_grad():
        for lin in model.modules():
            if isinstance(lin, lnn.LipschitzLinear):
                torch.nn.init.orthogonal_(lin.weight)
                lin.weight.mul_(lin.rms_scale)
    cert = certify(model, refined=False)  # the refined reference needs 256 x 4 full 256^2 SVDs: too slow here
    assert cert.bound == pytest.approx(reference_bound(model, refined=False)[0], rel=1e-7)
    assert certify(model).bound <= cert.bound
    for row in cert.rows:
        capped = {k: v for k, v in row.weight_norms.items() if k != "out@in"}
        assert capped and all(v == pytest.approx(1.0, rel=1e-6) for v in capped.values())
    assert cert.seconds < 5.0  # < 1 s on an idle 2-core CPU (docs/certificate.md); slack for shared CI


def test_positional_bias_costs_nothing_in_the_bound():
    """The bias is input-independent: the certificate is the same with and without it,
    and stays sound when the bias makes heads sharp (measured ratio below the bound)."""
    torch.manual_seed(11)
    cfg = lnn.GPTConfig(vocab_size=9, d_model=8, n_layers=2, n_heads=2, seq_len=8, softmax_scale=4.0,
                        attention="reference", zero_init_out=False, pos_bias="learned")
    model = random_model(cfg, scale_lo=0.8, scale_hi=1.5)
    plain = lnn.LipschitzGPT(lnn.GPTConfig(**{**cfg.to_dict(), "pos_bias": "none"})).double()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "bias_table" not in k})
    assert certify(model).bound == pytest.approx(certify(plain).bound, rel=1e-12)
    x = project(2 * torch.randn(4, 6, 8, dtype=F64))
    assert not torch.allclose(model.forward_embeddings(x), plain.forward_embeddings(x))
    for scale in (1.0, 30.0):  # 30: near-one-hot attention patterns
        with torch.no_grad():
            model.blocks[0].attn.bias_table.mul_(scale)
        emp = empirical_lipschitz(model, x, steps=80, lr=0.05)
        assert emp <= certify(model).bound * SLACK


# ---------------------------------------------------------------- worst case over the caps

capped_configs = st.builds(
    lambda heads, dh, layers, s, mlp_ratio, rs, act, caps: lnn.GPTConfig(
        vocab_size=7, d_model=heads * dh, n_layers=layers, n_heads=heads, seq_len=8, softmax_scale=s,
        mlp_ratio=mlp_ratio, attention="reference", zero_init_out=False, pos_bias="learned",
        residual_scale=rs, mlp_act_scale=act, attn_sigma_max=caps[0], mlp_sigma_max=caps[1],
        head_sigma_max=caps[2],
    ),
    heads=st.sampled_from([1, 2, 4]),
    dh=st.sampled_from([2, 4]),
    layers=st.integers(1, 3),
    s=st.sampled_from([0.0, 0.25, 1.0, 4.0]),
    mlp_ratio=st.integers(1, 3),
    rs=st.sampled_from([0.5, 1.0, 2.0]),
    act=st.sampled_from([1.0, 8.0]),
    caps=st.tuples(*[st.sampled_from([0.5, 1.0, 1.5, 2.0])] * 3),
)


def model_within_caps(cfg, gen, kind):
    """Weights with RMS->RMS norms <= their group's cap: random ones at random norms, random
    orthogonal ones at the cap, or the MLP's W_out aligned with W_in^T (product norm at its
    largest), the cases that push each term of the certificate."""
    m = lnn.LipschitzGPT(cfg).double()
    in_attn = {id(x) for b in m.blocks for x in b.attn.modules()}
    with torch.no_grad():
        for lin in m.modules():
            if not isinstance(lin, lnn.LipschitzLinear):
                continue
            cap = cfg.head_sigma_max if lin is m.head else cfg.attn_cap if id(lin) in in_attn else cfg.mlp_cap
            W = torch.randn(lin.weight.shape, dtype=F64, generator=gen)
            if kind == "random":
                frac = 0.3 + 0.7 * torch.rand((), dtype=F64, generator=gen)
            else:
                W, frac = torch.linalg.qr(W if W.shape[0] >= W.shape[1] else W.mT).Q, 1.0
                W = W if W.shape == lin.weight.shape else W.mT
            lin.weight.copy_(W / lnn.rms_norm_of(W) * cap * frac)
        if kind == "aligned":  # W_out = c W_in^T / scale: W_out W_in = c^2 P with P a projection
            for b in m.blocks:
                W_in = b.mlp.fc_in.weight
                b.mlp.fc_out.weight.copy_(W_in.mT / lnn.rms_norm_of(W_in.mT) * cfg.mlp_cap)
    return m


@settings(max_examples=25, deadline=None)
@given(cfg=capped_configs, seed=st.integers(0, 2**16), kind=st.sampled_from(["random", "orthogonal", "aligned"]))
def test_worst_case_certificate_bounds_every_model_within_the_caps(cfg, seed, kind):
    gen = torch.Generator().manual_seed(seed)
    model = model_within_caps(cfg, gen, kind)
    worst = worst_case_certificate(model)
    cert = certify(model)
    slack = 1 + 1e-7  # certify() rounds every norm up by SIGMA_MARGIN; these weights sit at the caps
    assert cert.bound <= worst.bound * slack
    assert cert.activation_bound <= worst.activation_bound * slack
    assert cert.logit_bound <= worst.logit_bound * slack
    for r, w in zip(cert.rows, worst.rows):
        assert r.name == w.name and r.block_bound <= w.block_bound * slack, r.name
    # and every measured ratio sits under it, as under the certificate itself
    x = project(torch.randn(3, 6, cfg.d_model, dtype=F64, generator=gen))
    y = project(x + 0.1 * torch.randn(x.shape, dtype=F64, generator=gen))
    assert pair_ratio(model.forward_embeddings, x, y) <= worst.bound * SLACK


def test_worst_case_certificate_is_linear_in_the_head_cap_and_reads_no_weights():
    cfg = lnn.GPTConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=4, seq_len=8, softmax_scale=0.0,
                        pos_bias="learned", residual_scale=2.0, mlp_act_scale=8.0, attn_sigma_max=1.5,
                        mlp_sigma_max=2.0, head_sigma_max=1.0)
    a = worst_case_certificate(lnn.LipschitzGPT(cfg))
    model = lnn.LipschitzGPT(lnn.GPTConfig(**{**cfg.to_dict(), "head_sigma_max": 0.25}))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(100.0)  # far outside the caps: not read
    b = worst_case_certificate(model)
    assert b.bound == pytest.approx(0.25 * a.bound, rel=1e-12)
    assert b.embedding_in_domain and "MLP cap 2" in b.domain
    # positional attention at the caps: branch = out_factor (1/3) * sqrt(H) * c^2
    assert a.rows[0].branch_bound == pytest.approx(1.5 * 1.5 * 2 / 3, rel=1e-12)
    # twice the embedding radius: content-free layers scale nothing, so the bound is the same
    assert worst_case_certificate(lnn.LipschitzGPT(cfg), input_rms=2.0).bound == pytest.approx(a.bound)
    with pytest.raises(ValueError, match="input_rms"):
        worst_case_certificate(lnn.LipschitzGPT(cfg), input_rms=0.0)
    with pytest.raises(TypeError, match="LipschitzGPT"):
        worst_case_certificate(torch.nn.Linear(2, 2))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(cfg=capped_configs)
def test_worst_case_certificate_reads_a_config_like_a_model(cfg):
    """A GPTConfig gives exactly the certificate of a model built from it (weights unread)."""
    from_cfg = worst_case_certificate(cfg)
    from_model = worst_case_certificate(lnn.LipschitzGPT(cfg))
    assert from_cfg.bound == from_model.bound and from_cfg.to_dict()["rows"] == from_model.to_dict()["rows"]
    assert from_cfg.config == cfg.to_dict() and from_cfg.input_rms == cfg.embed_max_rms
    assert worst_case_certificate(cfg, input_rms=0.7).bound == worst_case_certificate(
        lnn.LipschitzGPT(cfg), input_rms=0.7).bound
    with pytest.raises(TypeError, match="GPTConfig"):
        worst_case_certificate(cfg.to_dict())


# ---------------------------------------------------------------- bad input is refused clearly


def _tiny(s=1.0):
    cfg = lnn.GPTConfig(vocab_size=5, d_model=8, n_layers=2, n_heads=2, seq_len=6, softmax_scale=s,
                        zero_init_out=False, attention="reference")
    return random_model(cfg, 0.5, 1.5, gen=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["blocks.1.attn.k.weight", "blocks.0.mlp.fc_out.weight", "head.weight",
                                   "embed.weight"])
def test_non_finite_weights_are_refused_by_name(bad, where):
    model = _tiny()
    with torch.no_grad():
        model.get_parameter(where).view(-1)[3] = bad
    for fn in (certify, lambda m: empirical_lipschitz(m, project(torch.randn(2, 3, 8, dtype=F64)), steps=2),
               lipschitz_ext.certify.paper_bound):
        with pytest.raises(ValueError, match=where.replace(".", r"\.")):
            fn(model)


def test_non_finite_bias_table_is_refused():
    cfg = lnn.GPTConfig(vocab_size=5, d_model=8, n_layers=1, n_heads=2, seq_len=6, pos_bias="alibi")
    model = lnn.LipschitzGPT(cfg)
    model.blocks[0].attn.bias_table[0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.bias_table"):
        certify(model)


@pytest.mark.parametrize("rho", [1e300, 1e160])
def test_overflowing_radius_is_refused_not_nan(rho):
    """The radius enters squared (the logit scale): past float64's range the bound is refused."""
    model = _tiny()
    with pytest.raises(ValueError, match="overflows float64.*input_rms"):
        certify(model, input_rms=rho)
    with pytest.raises(ValueError, match="overflows float64"):
        worst_case_certificate(model, input_rms=rho)
    big = certify(model, input_rms=1e20)  # large but representable: finite numbers only
    assert all(math.isfinite(v) for v in (big.bound, big.activation_bound, big.logit_bound))
    with pytest.raises(TypeError, match="input_rms"):
        certify(model, input_rms="1")


def test_empirical_lipschitz_refuses_a_nan_model_and_bad_arguments():
    model = _tiny()
    x = project(torch.randn(2, 3, 8, dtype=F64))
    with torch.no_grad():  # finite weights whose output overflows to inf/NaN on the domain
        model.blocks[0].mlp.fc_in.weight.mul_(1e300)
        model.blocks[0].mlp.fc_out.weight.mul_(1e300)
    with pytest.raises(ValueError, match="non-finite"):
        empirical_lipschitz(model, x, steps=2)
    model = _tiny()
    for kwargs, match in (({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"radius": float("nan")}, "radius"),
                          ({"input_rms": 0.0}, "input_rms")):
        with pytest.raises(ValueError, match=match):
            empirical_lipschitz(model, x, **kwargs)
    with pytest.raises(ValueError, match="finite"):
        empirical_lipschitz(model, x * float("nan"))


# ---------------------------------------------------------------- the published (unsound) formula


def test_paper_bound_matches_the_published_formula_by_hand():
    """The published formula (docs/theory.md, section 5) written out with torch.linalg.matrix_norm(ord=2) in float64."""
    from lipschitz_ext.certify import paper_bound
    cfg = lnn.GPTConfig(vocab_size=7, d_model=8, n_layers=2, n_heads=2, seq_len=6, softmax_scale=2.0,
                        zero_init_out=False, mlp_ratio=3)
    model = random_model(cfg, 0.4, 1.6, gen=torch.Generator().manual_seed(4))

    def rms(W):  # RMS->RMS norm of W [out, in]
        W = W.detach().double()
        return math.sqrt(W.shape[1] / W.shape[0]) * torch.linalg.matrix_norm(W, ord=2).item()

    alpha, lip, a = 1 / (2 * 2), 1.0, 1.0
    for blk in model.blocks:
        q, k, v, o = (rms(m.weight) for m in (blk.attn.q, blk.attn.k, blk.attn.v, blk.attn.o))
        l_att = (1 / 3) * o * (v + 2 * v * a ** 2 * q * k) * 2.0
        lip, a = (1 - alpha) * lip + alpha * lip * l_att, (1 - alpha) * a + alpha * (o * v / 3) * a
        l_mlp = rms(blk.mlp.fc_out.weight) * rms(blk.mlp.fc_in.weight) / 1.1289
        lip, a = (1 - alpha) * lip + alpha * lip * l_mlp, (1 - alpha) * a + alpha * l_mlp * a
    expected = lip * rms(model.head.weight)
    assert paper_bound(model) == pytest.approx(expected, rel=1e-8)
    # positional attention: s = 0 removes the attention term entirely in the published formula
    pos = lnn.LipschitzGPT(lnn.GPTConfig(**{**cfg.to_dict(), "softmax_scale": 0.0})).double()
    with torch.no_grad():
        for blk in pos.blocks:
            blk.attn.o.weight.zero_()
            blk.mlp.fc_out.weight.zero_()
    assert paper_bound(pos) == pytest.approx((1 - alpha) ** 4 * rms(pos.head.weight), rel=1e-8)
    with pytest.raises(TypeError, match="LipschitzGPT"):
        paper_bound(lnn.BaselineGPT(cfg))


def test_paper_bound_is_below_a_measured_ratio():
    """Why it is documented as unsound: a 1-layer model whose measured ratio exceeds it.
    No attention branch (W_o = 0), identity MLP weights, alpha = 1/2: the stream is x/2 after
    attention, and at x/2 = sqrt 2 (per coordinate) the MLP's slope is exactly 1."""
    from lipschitz_ext.certify import paper_bound
    cfg = lnn.GPTConfig(vocab_size=3, d_model=2, n_layers=1, n_heads=1, seq_len=2, softmax_scale=0.0,
                        zero_init_out=False, mlp_ratio=1, rope=False)
    model = lnn.LipschitzGPT(cfg).double()
    with torch.no_grad():
        model.blocks[0].attn.o.weight.zero_()
        model.blocks[0].mlp.fc_in.weight.copy_(torch.eye(2, dtype=F64))
        model.blocks[0].mlp.fc_out.weight.copy_(torch.eye(2, dtype=F64))
        model.head.weight.copy_(torch.eye(3, 2, dtype=F64) * math.sqrt(3 / 2))  # RMS->RMS norm 1
    x = torch.full((1, 1, 2), 2 * math.sqrt(2), dtype=F64)
    measured = pair_ratio(model.forward_embeddings, x, x + 1e-6)
    assert measured == pytest.approx(0.5 * (0.5 + 0.5 * 1.0), abs=1e-6)
    published = 0.5 * (0.5 + 0.5 / 1.1289)  # attention: L_att = 0 (s = 0); MLP: 1 / 1.1289
    assert paper_bound(model) == pytest.approx(published, rel=1e-8) and published < measured - 0.02
    assert certify(model, input_rms=3.0).bound >= measured * (1 - 1e-9)


# ---------------------------------------------------------------- the refined bound (Theorems 5, 6) vs an attack


def build_at_caps(cfg, cap, kind, gen):
    """Weights at RMS->RMS norm ``cap`` (the head at its own cap; random ones at 0.3-1 x cap). ``aligned``: W_k = W_q (each
    head's logit form as large as the caps allow), W_o = W_v^T (PSD head maps M_h), W_out = W_in^T."""
    m = lnn.LipschitzGPT(cfg).double()
    with torch.no_grad():
        for lin in m.modules():
            if isinstance(lin, lnn.LipschitzLinear):
                W = torch.randn(lin.weight.shape, dtype=F64, generator=gen)
                frac = 0.3 + 0.7 * torch.rand((), dtype=F64, generator=gen) if kind == "random" else 1.0
                if kind != "random":
                    W = torch.linalg.qr(W if W.shape[0] >= W.shape[1] else W.mT).Q
                    W = W if W.shape == lin.weight.shape else W.mT
                c = cfg.head_sigma_max if lin is m.head else cap
                lin.weight.copy_(W / lnn.rms_norm_of(W) * c * frac)
            elif isinstance(lin, lnn.LipschitzAttention) and isinstance(lin.bias_table, torch.nn.Parameter):
                lin.bias_table.copy_(3 * torch.randn(lin.bias_table.shape, dtype=F64, generator=gen))
        if kind == "aligned":
            for b in m.blocks:
                if b.attn.q is not None:
                    b.attn.k.weight.copy_(b.attn.q.weight)
                b.attn.o.weight.copy_(b.attn.v.weight.mT)
                b.mlp.fc_out.weight.copy_(b.mlp.fc_in.weight.mT / lnn.rms_norm_of(b.mlp.fc_in.weight.mT) * cap)
    return m


@settings(max_examples=10, deadline=None, derandomize=True)
@given(s=st.sampled_from([0.0, 1.0, 4.0]), layers=st.integers(1, 3), cap=st.sampled_from([0.5, 1.0, 2.5]),
       radius=st.sampled_from([0.5, 1.0, 2.0]), kind=st.sampled_from(["random", "orthogonal", "aligned"]),
       heads=st.sampled_from([1, 2]), rope=st.booleans(), bias=st.sampled_from(["none", "learned"]),
       seed=st.integers(0, 2**16))
def test_refined_certificate_is_sound_and_never_looser(s, layers, cap, radius, kind, heads, rope, bias, seed):
    cfg = lnn.GPTConfig(vocab_size=5, d_model=4 * heads, n_layers=layers, n_heads=heads, seq_len=4,
                        softmax_scale=s, mlp_ratio=2, attention="reference", zero_init_out=False, rope=rope,
                        pos_bias=bias, attn_sigma_max=cap, mlp_sigma_max=cap, head_sigma_max=1.0)
    gen = torch.Generator().manual_seed(seed)
    model = build_at_caps(cfg, cap, kind, gen)
    new, old = certify(model, input_rms=radius), certify(model, input_rms=radius, refined=False)
    mid = certify(model, input_rms=radius, domain=False)  # Theorems 5 and 6 without the token domain
    assert new.bound <= mid.bound * (1 + 1e-12) and mid.bound <= old.bound * (1 + 1e-12)
    assert new.activation_bound <= old.activation_bound * (1 + 1e-12)
    for r_new, r_old in zip(new.rows, old.rows):
        assert r_new.branch_bound <= r_old.branch_bound * (1 + 1e-12), r_new.name
    measured = attack_lipschitz(model, radius, steps=30, restarts=3, generator=gen)
    assert measured <= new.bound * SLACK, (measured, new.bound)
    # the logit and activation bounds hold on the attacked points too
    x = project(radius * torch.randn(8, 4, cfg.d_model, dtype=F64, generator=gen), radius)
    assert sequence_norm(model.forward_embeddings(x)).max() <= new.logit_bound * SLACK
    worst, worst_old = worst_case_certificate(cfg, radius), worst_case_certificate(cfg, radius, refined=False)
    assert new.bound <= worst.bound * (1 + 1e-7) and worst.bound <= worst_old.bound * (1 + 1e-12)


def test_key_path_sharing_is_what_the_worst_case_gains():
    """At the caps, Theorem 5 replaces the key path's sqrt(H) c^4 by c^4 (c = the attention cap):
    the Q/K term goes from (1 + sqrt H) to 2 (times the logit scale s a^2 H and c^4 / 3)."""
    for H in (1, 4):
        cfg = lnn.GPTConfig(vocab_size=5, d_model=8 * H, n_layers=1, n_heads=H, seq_len=4, softmax_scale=2.0,
                            attn_sigma_max=1.5)
        new, old = worst_case_certificate(cfg), worst_case_certificate(cfg, refined=False)
        c, logit = 1.5, 2.0 * 1.0 * H
        v_path = math.sqrt(H) * c * c
        assert old.rows[0].branch_bound == pytest.approx((v_path + logit * c ** 4 * (1 + math.sqrt(H))) / 3)
        assert new.rows[0].branch_bound == pytest.approx((v_path + logit * c ** 4 * 2) / 3)


def test_product_norm_of_orthogonal_heads_cuts_the_qk_term():
    """Each head's queries live in the first half of its d_h coordinates and its keys in the
    second (no RoPE): every logit is 0, rho_h = 0, so the refined branch bound is the V path
    alone, while Theorem 1 pays for the Q/K terms (q_h = k_h = 1)."""
    attn = lnn.LipschitzAttention(8, 2, softmax_scale=4.0, backend="reference", rope=False,
                                  zero_init_out=False).double()
    with torch.no_grad():
        Q = torch.linalg.qr(torch.randn(8, 8, dtype=F64)).Q  # orthonormal rows: sigma(W_q) = sigma(W_k) = 1
        Z = torch.zeros(2, 8, dtype=F64)
        attn.q.weight.copy_(torch.cat((Q[0:2], Z, Q[2:4], Z)))  # head h: rows 0-1 of its 4 coordinates
        attn.k.weight.copy_(torch.cat((Z, Q[4:6], Z, Q[6:8])))  # rows 2-3: <q_t, k_s> = 0
    lip, gain, norms = attention_bounds(attn, 1.0, max_len=4)
    old, _, _ = attention_bounds(attn, 1.0, max_len=4, refined=False)
    assert norms["max_h qk"] < 2e-9 and lip == pytest.approx(gain) and old > 3 * lip
    x = project(torch.randn(6, 4, 8, dtype=F64), 1.0)
    y = project(x + 0.3 * torch.randn(6, 4, 8, dtype=F64), 1.0)
    assert (sequence_norm(attn(x) - attn(y)) / sequence_norm(x - y)).max() <= lip * SLACK


def test_rope_product_norm_covers_every_distance():
    """With RoPE, rho_h is the max over the relative rotations of distances < max_len: it is
    at least the r = 0 value and grows (weakly) with max_len; the r = 0 value alone would not do."""
    torch.manual_seed(1)
    attn = lnn.LipschitzAttention(8, 2, softmax_scale=1.0, backend="reference", zero_init_out=False).double()
    rhos = [attention_bounds(attn, 1.0, max_len=n)[2]["max_h qk"] for n in (1, 4, 64)]
    assert rhos[0] <= rhos[1] <= rhos[2]
    # without max_len, RoPE models fall back to q_h k_h (no product norms)
    assert "max_h qk" not in attention_bounds(attn, 1.0)[2]
