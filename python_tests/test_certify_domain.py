"""Theorem 7 (the token domain, docs/certificate.md) and the structured attack: containment of every
reached token, the support-function bounds, the attention bound on a non-ball domain, and the gain."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipschitz_ext import nn as lnn
from lipschitz_ext.certify import TokenDomain, attention_bound_on_domain
from lipschitz_ext.certify import attack_lipschitz
from lipschitz_ext.certify import attention_bounds, sequence_norm
from lipschitz_ext.certify import certify
from lipschitz_ext.nn.mlp import GELU_MAX_SLOPE

from test_certify import _one_thread, build_at_caps, project  # noqa: F401  (_one_thread: autouse fixture)

F64 = torch.float64
SLACK = 1 + 1e-9


def support(E, u):
    """Support function of sum_i E_i B at the directions u [n, d] -> [n]."""
    return (E.mT[None] @ u[:, None, :, None]).squeeze(-1).norm(dim=-1).sum(-1)


def test_sup_norms_is_an_upper_bound_and_exact_on_one_ellipsoid():
    gen = torch.Generator().manual_seed(0)
    dom = TokenDomain(6, 1.0)
    P = torch.randn(3, 4, 6, dtype=F64, generator=gen)
    dom.unit = 1.0  # D = sum_i E_i B with the E_i below
    dom.E = torch.randn(1, 6, 6, dtype=F64, generator=gen)
    exact = torch.linalg.matrix_norm(P @ dom.E[0], 2)
    torch.testing.assert_close(dom.sup_norms(P), exact, rtol=1e-8, atol=0)
    assert (dom.sup_norms(P) >= exact).all()
    dom.E = torch.randn(5, 6, 6, dtype=F64, generator=gen)
    bound = dom.sup_norms(P)
    assert (bound <= torch.linalg.matrix_norm(P[:, None] @ dom.E[None], 2).sum(-1) * SLACK).all()  # never above the triangle
    for k in range(3):  # never below sum_i ||E_i^T P^T u|| for any unit u (the exact value is its max)
        u = torch.nn.functional.normalize(torch.randn(2000, 4, dtype=F64, generator=gen), dim=-1)
        assert support(P[k] @ dom.E, u).max() <= bound[k] * SLACK
    # the ball: sup ||P x|| over RMS <= 1 is sigma(P) sqrt(d), exactly
    ball = TokenDomain(6, 1.0)
    torch.testing.assert_close(ball.sup_norms(P), torch.linalg.matrix_norm(P, 2) * math.sqrt(6), rtol=1e-8, atol=0)


def test_merging_terms_only_grows_the_set():
    gen = torch.Generator().manual_seed(1)
    dom = TokenDomain(5, 1.0)
    E = torch.randn(30, 5, 5, dtype=F64, generator=gen) * torch.rand(30, 1, 1, dtype=F64, generator=gen)
    dom._set(E.clone())
    assert dom.E.shape[0] <= 12
    u = torch.nn.functional.normalize(torch.randn(4000, 5, dtype=F64, generator=gen), dim=-1)
    assert (support(E, u) <= support(dom.E, u) * SLACK).all()


def _stages(model, x):
    """Each sub-layer's input (the residual stream) and the final stream, in forward order."""
    out = []
    for b in model.blocks:
        out.append(x)
        x = torch.lerp(x, b.attn(x), b.alpha)
        out.append(x)
        x = torch.lerp(x, b.mlp(x), b.alpha)
    return out + [x]


@settings(max_examples=12, deadline=None, derandomize=True)
@given(s=st.sampled_from([0.0, 1.0, 4.0]), layers=st.integers(1, 3), cap=st.sampled_from([0.5, 1.0, 2.5]),
       radius=st.sampled_from([0.5, 1.0, 2.0]), kind=st.sampled_from(["random", "orthogonal", "aligned"]),
       heads=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_every_reached_token_lies_in_the_domain(s, layers, cap, radius, kind, heads, ratio, seed):
    """Theorem 7's invariant: the tokens of every sub-layer's output lie in the propagated set, seen
    through random projections and the next layer's own W_q^h, W_k^h, W_v^h, M_h and W_in."""
    cfg = lnn.GPTConfig(vocab_size=5, d_model=4 * heads, n_layers=layers, n_heads=heads, seq_len=6,
                        softmax_scale=s, mlp_ratio=ratio, attention="reference", zero_init_out=False,
                        pos_bias="learned")
    gen = torch.Generator().manual_seed(seed)
    model = build_at_caps(cfg, cap, kind, gen)
    d = cfg.d_model
    # inputs at the radius, inside it, and a few that repeat one token (sharp attention on equal keys)
    x = project(radius * 3 * torch.randn(64, 6, d, dtype=F64, generator=gen), radius)
    x[:16] = x[:16] * (radius / sequence_norm(x[:16]))[:, None, None]
    x[16:24] = x[16:24, :1].expand(8, 6, d)
    streams = _stages(model, x)
    dom = TokenDomain(d, radius)
    P = torch.randn(4, 3, d, dtype=F64, generator=gen)
    for j, z in enumerate(streams):
        tok = z.reshape(-1, d)
        mats = [P]
        if j < len(streams) - 1:
            blk = model.blocks[j // 2]
            if j % 2 == 0 and blk.attn.q is not None:
                H, dh = heads, d // heads
                mats += [blk.attn.q.weight.detach().view(H, dh, d), blk.attn.k.weight.detach().view(H, dh, d)]
            if j % 2 == 1:
                mats.append(blk.mlp.fc_in.weight.detach()[None])
        for M in mats:
            reached = (M[:, None] @ tok[None, :, :, None]).squeeze(-1).norm(dim=-1).amax(-1)
            assert (reached <= dom.sup_norms(M) * SLACK).all(), (j, reached, dom.sup_norms(M))
        assert sequence_norm(z).max() <= dom.radius() * SLACK
        if j < len(streams) - 1:
            blk = model.blocks[j // 2]
            if j % 2 == 0:
                Wv, Wo = blk.attn.v.weight.detach(), blk.attn.o.weight.detach()
                H, dh = heads, d // heads
                M = Wo.view(d, H, dh).permute(1, 0, 2) @ Wv.view(H, dh, d)
                dom.attention(blk.alpha, abs(blk.attn.out_factor), M)
            else:
                dom.mlp(blk.alpha, blk.mlp.act_divisor, blk.mlp.fc_in.weight, blk.mlp.fc_out.weight)
    assert certify(model, input_rms=radius).activation_bound >= sequence_norm(torch.cat(streams)).max() / SLACK


def test_attention_bound_on_a_flat_domain_is_sound_and_below_the_ball():
    """A domain much thinner along W_k's and W_v's rows than the ball: the Theorem 7 bound is well below
    Theorem 5's at the same radius, and an ascent over inputs inside the domain stays under it."""
    gen = torch.Generator().manual_seed(3)
    d, H = 8, 2
    attn = lnn.LipschitzAttention(d, H, softmax_scale=4.0, backend="reference", zero_init_out=False).double()
    with torch.no_grad():
        for lin in (attn.q, attn.k, attn.v, attn.o):
            lin.weight.copy_(torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=gen)).Q * 1.5)
    dom = TokenDomain(d, 1.0)
    E = torch.diag(torch.tensor([1.0] * 2 + [0.15] * 6, dtype=F64)) * math.sqrt(d)
    dom.unit, dom.E = 1.0, torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=gen)).Q[None] @ E[None]
    a = dom.radius()
    ball, _, _ = attention_bounds(attn, a, max_len=6)
    flat = attention_bound_on_domain(attn, a, dom, max_len=6)
    assert flat < 0.8 * ball
    # ascent over z in the unit ball, x = E z inside the domain (convex), pairs close and far
    best = 0.0
    for close in (False, True):
        z = torch.randn(24, 6, d, dtype=F64, generator=gen).requires_grad_(True)
        w = torch.randn(24, 6, d, dtype=F64, generator=gen).requires_grad_(True)
        opt = torch.optim.Adam([z, w], lr=0.05)
        for _ in range(150):
            unit = lambda v: v / v.norm(dim=-1, keepdim=True).clamp_min(1.0)  # noqa: E731  into the unit ball
            x = unit(z) @ dom.E[0].mT
            y = unit(z + 1e-4 * w / w.norm() if close else w) @ dom.E[0].mT
            r = sequence_norm(attn(x) - attn(y)) / sequence_norm(x - y).clamp_min(1e-300)
            best = max(best, r.max().item())
            opt.zero_grad()
            (-r.sum()).backward()
            opt.step()
    assert best <= flat * SLACK
    # on the ball domain itself Theorem 7 is Theorem 5
    assert attention_bound_on_domain(attn, 1.0, TokenDomain(d, 1.0), max_len=6) == pytest.approx(
        attention_bounds(attn, 1.0, max_len=6)[0], rel=1e-9)


def test_token_domain_cuts_the_deep_bound():
    """The 3-layer content model at 2.5x its caps (the hardest row of docs/certificate.md's content-attention table): the token domain brings the
    last attention layer's input radius and the network's bound well below Theorems 5-6."""
    torch.manual_seed(0)
    cfg = lnn.GPTConfig(vocab_size=7, d_model=8, n_layers=3, n_heads=2, seq_len=6, softmax_scale=4.0,
                        mlp_ratio=2, attention="reference", zero_init_out=False, pos_bias="alibi")
    model = lnn.LipschitzGPT(cfg).double()
    with torch.no_grad():
        for lin in model.modules():
            if isinstance(lin, lnn.LipschitzLinear):
                torch.nn.init.orthogonal_(lin.weight)
                lin.weight.mul_(2.5 * lin.rms_scale)
    new, mid = certify(model, input_rms=1.7), certify(model, input_rms=1.7, domain=False)
    assert new.bound < 0.75 * mid.bound
    assert new.rows[3].activation_bound < 0.9 * mid.rows[3].activation_bound
    assert attack_lipschitz(model, 1.7, steps=40, restarts=4, generator=torch.Generator().manual_seed(0)) <= new.bound


def test_mlp_domain_step_uses_the_activation_divisor():
    """``GELU(kz)/(k kappa) = z Phi(kz)/kappa`` for every act scale k: one token through the MLP sub-layer
    stays inside the propagated set for k = 1 and k = 8."""
    gen = torch.Generator().manual_seed(5)
    for k in (1.0, 8.0):
        mlp = lnn.LipschitzMLP(6, 2, zero_init_out=False, act_scale=k).double()
        with torch.no_grad():
            mlp.fc_in.weight.mul_(2.0)
            mlp.fc_out.weight.mul_(2.0)
        assert mlp.act_divisor == pytest.approx(GELU_MAX_SLOPE)
        dom = TokenDomain(6, 1.0)
        x = project(3 * torch.randn(4000, 6, dtype=F64, generator=gen))
        y = torch.lerp(x, mlp(x), 0.5)
        dom.mlp(0.5, mlp.act_divisor, mlp.fc_in.weight, mlp.fc_out.weight)
        assert sequence_norm(y[:, None]).max() <= dom.radius() * SLACK


def test_structured_attack_is_never_below_the_plain_one_and_below_the_bound():
    """``structured=True`` starts with the plain search on the same generator, so it can only find more;
    like it, it evaluates only pairs inside the domain (never above the certificate)."""
    torch.manual_seed(2)
    cfg = lnn.GPTConfig(vocab_size=5, d_model=8, n_layers=2, n_heads=2, seq_len=4, softmax_scale=2.0,
                        mlp_ratio=2, attention="reference", zero_init_out=False, pos_bias="learned")
    model = build_at_caps(cfg, 1.5, "orthogonal", torch.Generator().manual_seed(2))
    plain = attack_lipschitz(model, 1.2, steps=12, restarts=2, generator=torch.Generator().manual_seed(4))
    strong = attack_lipschitz(model, 1.2, steps=12, restarts=2, generator=torch.Generator().manual_seed(4),
                              structured=True)
    assert plain <= strong <= certify(model, input_rms=1.2).bound * SLACK
    with pytest.raises(ValueError, match="restarts"):
        attack_lipschitz(model, 1.2, restarts=0, structured=True)
