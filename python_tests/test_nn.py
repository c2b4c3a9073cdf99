"""lipschitz_ext.nn against hand-written float64 math (never the code under test)."""

import math

import pytest
import torch

from lipschitz_ext import nn as lnn

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matrices: threads only add OpenMP spin-waits, which stall badly on a busy shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(**kw):
    base = dict(vocab_size=11, d_model=16, n_layers=2, n_heads=2, seq_len=12, zero_init_out=False)
    base.update(kw)
    return lnn.GPTConfig(**base)


# ---------------------------------------------------------------- references (float64)


def rope_ref(x, base=10000.0):
    """x [T, dh]: rotate pair (i, i + dh/2) at position t by angle t * base^(-2i/dh)."""
    T, dh = x.shape
    out = x.clone()
    for t in range(T):
        for i in range(dh // 2):
            th = t * base ** (-2.0 * i / dh)
            c, s = math.cos(th), math.sin(th)
            a, b = x[t, i].item(), x[t, i + dh // 2].item()
            out[t, i], out[t, i + dh // 2] = a * c - b * s, a * s + b * c
    return out


def attention_ref(attn, x):
    """x [T, d] float64 -> [T, d]; explicit per-head, per-position softmax."""
    T, d = x.shape
    H, dh = attn.n_heads, attn.d_head
    Wv, Wo = attn.v.weight.detach().double(), attn.o.weight.detach().double()
    positional = attn.q is None  # softmax_scale = 0: no W_q, W_k; the bias alone sets the weights
    heads = []
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)
        v = x @ Wv[sl].T
        if not positional:
            q, k = x @ attn.q.weight.detach().double()[sl].T, x @ attn.k.weight.detach().double()[sl].T
            if attn.rope:
                q, k = rope_ref(q, attn.rope_base), rope_ref(k, attn.rope_base)
        out = torch.zeros(T, dh, dtype=F64)
        for t in range(T):
            logits = torch.stack([torch.zeros((), dtype=F64) if positional
                                  else attn.softmax_scale * (q[t] @ k[s]) / dh for s in range(t + 1)])
            if attn.bias_table is not None:  # b_h(t - s)
                logits = logits + torch.stack([attn.bias_table[h, t - s].double() for s in range(t + 1)])
            p = torch.exp(logits - logits.max())
            p = p / p.sum()
            out[t] = sum(p[s] * v[s] for s in range(t + 1))
        heads.append(out)
    return torch.cat(heads, dim=1) @ Wo.T / 3.0


def gelu_ref(z):
    return z * 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def mlp_ref(mlp, x):
    W_in, W_out = mlp.fc_in.weight.detach().double(), mlp.fc_out.weight.detach().double()
    k = mlp.act_scale
    return gelu_ref(k * (x @ W_in.T)) / (k * 1.1289041452) @ W_out.T  # GELU'(sqrt 2) to 11 digits


def gpt_ref(model, x):
    L = model.config.n_layers
    a = model.config.residual_scale / (2 * L)
    out = []
    for b in range(x.shape[0]):
        z = x[b].double()
        for blk in model.blocks:
            z = (1 - a) * z + a * attention_ref(blk.attn, z)
            z = (1 - a) * z + a * mlp_ref(blk.mlp, z)
        out.append(z @ model.head.weight.detach().double().T)
    return torch.stack(out)


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("shape", [(7, 23), (23, 7), (1, 9), (9, 1), (16, 16)])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_linear_init_is_rms_isometry(shape, scale):
    out_f, in_f = shape
    lin = lnn.LipschitzLinear(in_f, out_f, init_scale=scale)
    W = lin.weight.detach().double()
    s = torch.linalg.svdvals(W / math.sqrt(out_f / in_f))
    torch.testing.assert_close(s, torch.full_like(s, scale), atol=1e-5, rtol=1e-5)
    assert lin.rms_norm() == pytest.approx(scale, rel=1e-5)
    x = torch.randn(3, 5, in_f)
    torch.testing.assert_close(lin(x), x @ lin.weight.T)


def test_linear_zero_init_and_errors():
    assert lnn.LipschitzLinear(5, 3, init="zero").weight.abs().max() == 0
    with pytest.raises(ValueError, match="init"):
        lnn.LipschitzLinear(5, 3, init="xavier")
    with pytest.raises(ValueError, match="init_scale"):
        lnn.LipschitzLinear(5, 3, init_scale=-1.0)


def test_embedding_rows_inside_cap():
    for cap in (1.0, 0.5):
        emb = lnn.LipschitzEmbedding(37, 24, max_rms=cap)
        rms = emb.weight.detach().double().pow(2).mean(1).sqrt()
        assert rms.max() <= cap and rms.min() > cap * (1 - 1e-5)
        assert emb.max_row_rms() == pytest.approx(rms.max().item())
        idx = torch.tensor([[0, 36, 5]])
        torch.testing.assert_close(emb(idx)[0], emb.weight[[0, 36, 5]])
    with pytest.raises(ValueError, match="max_rms"):
        lnn.LipschitzEmbedding(3, 4, max_rms=0.0)


def test_gelu_constants():
    z = torch.linspace(-6, 6, 200001, dtype=F64, requires_grad=True)
    (slope,) = torch.autograd.grad(gelu_ref(z).sum(), z)
    assert slope.max().item() == pytest.approx(lnn.GELU_MAX_SLOPE, abs=1e-9)
    assert slope.min().item() == pytest.approx(lnn.GELU_MIN_SLOPE, abs=1e-9)
    assert slope.max().item() <= lnn.GELU_MAX_SLOPE + 1e-12


def test_rope_orthogonal_and_relative():
    x = torch.randn(2, 3, 9, 8, dtype=F64)
    r = lnn.apply_rope(x)
    torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(r[0, 0], rope_ref(x[0, 0]))
    # <R_t q, R_s k> depends only on t - s
    q, k = torch.randn(8, dtype=F64), torch.randn(8, dtype=F64)
    rq = lnn.apply_rope(q.expand(1, 1, 9, 8))[0, 0]
    rk = lnn.apply_rope(k.expand(1, 1, 9, 8))[0, 0]
    torch.testing.assert_close(rq[5] @ rk[2], rq[7] @ rk[4])


@pytest.mark.parametrize("heads,rope,scale", [(1, True, 1.0), (2, False, 3.0), (4, True, 0.5)])
def test_attention_matches_reference_math(heads, rope, scale):
    attn = lnn.LipschitzAttention(16, heads, softmax_scale=scale, rope=rope, zero_init_out=False).double()
    x = torch.randn(2, 7, 16, dtype=F64)
    out = attn(x)
    for b in range(2):
        torch.testing.assert_close(out[b], attention_ref(attn, x[b]), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 5, 33])
def test_sdpa_and_reference_backends_agree(dtype, T):
    q, k, v = (torch.randn(2, 3, T, 8, dtype=dtype) for _ in range(3))
    for s in (1.0, 7.0):
        a = lnn.sdpa_attention(q, k, v, s)
        b = lnn.reference_attention(q, k, v, s)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    # whole models with either backend, same weights
    cfg = small_config()
    m1 = lnn.LipschitzGPT(cfg).to(dtype)
    m2 = lnn.LipschitzGPT(small_config(attention="reference")).to(dtype)
    m2.load_state_dict(m1.state_dict())
    idx = torch.randint(0, 11, (2, min(T, 12)))
    torch.testing.assert_close(m1(idx), m2(idx), atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("kind", ["alibi", "learned"])
def test_positional_bias_matches_reference_math(kind):
    attn = lnn.LipschitzAttention(16, 4, softmax_scale=2.0, zero_init_out=False, pos_bias=kind, max_len=9).double()
    if kind == "learned":
        with torch.no_grad():
            attn.bias_table.copy_(torch.randn(4, 9, dtype=F64))
        assert attn.bias_table.requires_grad
    else:
        assert dict(attn.named_buffers())["bias_table"].shape == (4, 9)
        torch.testing.assert_close(attn.bias_table[:, 3], -3 * lnn.alibi_slopes(4).double())
    table = attn.bias_table.detach()
    x = torch.randn(2, 7, 16, dtype=F64)
    want = []
    for b in range(2):  # explicit per-head, per-position softmax with the bias b_h(t - s)
        H, dh, T = 4, 4, 7
        Wq, Wk, Wv, Wo = (m.weight.detach() for m in (attn.q, attn.k, attn.v, attn.o))
        heads = []
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            q = rope_ref(x[b] @ Wq[sl].T, attn.rope_base)
            k = rope_ref(x[b] @ Wk[sl].T, attn.rope_base)
            v = x[b] @ Wv[sl].T
            out = torch.zeros(T, dh, dtype=F64)
            for t in range(T):
                logits = torch.stack([2.0 * (q[t] @ k[s]) / dh + table[h, t - s] for s in range(t + 1)])
                p = torch.softmax(logits, 0)
                out[t] = sum(p[s] * v[s] for s in range(t + 1))
            heads.append(out)
        want.append(torch.cat(heads, 1) @ Wo.T / 3.0)
    torch.testing.assert_close(attn(x), torch.stack(want), atol=1e-10, rtol=1e-10)
    attn.backend = "reference"
    torch.testing.assert_close(attn(x), torch.stack(want), atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="exceeds"):
        attn(torch.randn(1, 10, 16, dtype=F64))


@pytest.mark.parametrize("kind", ["none", "learned"])
def test_positional_attention_matches_reference_math(kind):
    """softmax_scale = 0: out_t = W_o concat_h(sum_s softmax_s(b_h(t - s)) v_h,s) / 3, no W_q, W_k."""
    torch.manual_seed(4)
    attn = lnn.LipschitzAttention(12, 3, softmax_scale=0.0, zero_init_out=False, pos_bias=kind, max_len=9).double()
    assert attn.positional and attn.q is None and attn.k is None
    assert sorted(n for n, _ in attn.named_parameters()) == sorted(
        ["v.weight", "o.weight"] + (["bias_table"] if kind == "learned" else []))
    if kind == "learned":
        with torch.no_grad():
            attn.bias_table.copy_(2 * torch.randn(3, 9, dtype=F64))
    x = torch.randn(2, 7, 12, dtype=F64)
    want = torch.stack([attention_ref(attn, x[b]) for b in range(2)])
    torch.testing.assert_close(attn(x), want, atol=1e-12, rtol=1e-12)
    # non-contiguous input, and the logits it reports are the (masked) bias for every batch element
    xt = torch.randn(7, 2, 12, dtype=F64).transpose(0, 1)
    torch.testing.assert_close(attn(xt), attn(xt.contiguous()))
    logits = attn.attention_logits(x)
    assert logits.shape == (2, 3, 7, 7) and torch.isinf(logits[0, 0, 0, 1])
    if kind == "learned":
        assert logits[1, 2, 5, 3].item() == pytest.approx(attn.bias_table[2, 2].item())
    # bf16 runs and stays close to float64
    y = attn.to(torch.bfloat16)(x.to(torch.bfloat16)).double()
    assert (y - want).abs().max() < 0.05 * want.abs().max()
    with pytest.raises(ValueError, match="softmax_scale"):
        lnn.LipschitzAttention(12, 3, softmax_scale=-1.0)


def test_positional_gpt_trains_every_parameter():
    m = lnn.LipschitzGPT(small_config(softmax_scale=0.0, pos_bias="learned"))
    spec = m.param_groups_spec()
    assert sorted(id(p) for g in spec for p in g["params"]) == sorted(id(p) for p in m.parameters())
    assert not any(".q." in n or ".k." in n for n, _ in m.named_parameters())
    m(torch.randint(0, 11, (2, 12))).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_residual_scale_sets_alpha():
    m = lnn.LipschitzGPT(small_config(n_layers=3, residual_scale=2.0))
    assert all(b.alpha == pytest.approx(1 / 3) for b in m.blocks)
    for bad in (0.0, -1.0, 6.5, True):
        with pytest.raises(ValueError, match="residual_scale"):
            small_config(n_layers=3, residual_scale=bad)
    # alpha = 1 removes the skip path: with zero-initialized outputs the network is dead
    with pytest.raises(ValueError, match="no skip path"):
        small_config(n_layers=1, residual_scale=2.0, zero_init_out=True)
    assert lnn.LipschitzGPT(small_config(n_layers=1, residual_scale=2.0)).blocks[0].alpha == 1.0


def test_positional_bias_in_models_and_errors():
    m = lnn.LipschitzGPT(small_config(pos_bias="learned"))
    spec = m.param_groups_spec()
    assert [g["kind"] for g in spec] == ["vector", "embedding", "hidden", "head"]
    assert sorted(id(p) for g in spec for p in g["params"]) == sorted(id(p) for p in m.parameters())
    idx = torch.randint(0, 11, (2, 12))
    m(idx).square().sum().backward()
    assert all(torch.isfinite(b.attn.bias_table.grad).all() and b.attn.bias_table.grad.abs().sum() > 0
               for b in m.blocks)
    with pytest.raises(ValueError, match="pos_bias"):
        small_config(pos_bias="rotary")
    with pytest.raises(ValueError, match="pos_bias"):
        lnn.LipschitzAttention(8, 2, pos_bias="nope")
    with pytest.raises(ValueError, match="positional bias"):
        lnn.FP8_BACKEND(*(torch.randn(1, 1, 4, 8) for _ in range(3)), 1.0, bias=torch.zeros(1, 4, 4))


def test_backend_registry():
    calls = []

    def counting(q, k, v, s):
        calls.append(q.shape)
        return lnn.reference_attention(q, k, v, s)

    lnn.register_attention_backend("counting_test", counting, overwrite=True)
    try:
        m = lnn.LipschitzGPT(small_config(attention="counting_test"))
        m(torch.randint(0, 11, (3, 4)))
        assert calls == [torch.Size([3, 2, 4, 8])] * 2
        with pytest.raises(ValueError, match="already registered"):
            lnn.register_attention_backend("counting_test", counting)
    finally:
        del lnn.ATTENTION_BACKENDS["counting_test"]
    with pytest.raises(ValueError, match="unknown attention backend 'nope'.*reference"):
        lnn.LipschitzGPT(small_config(attention="nope"))


def test_mlp_block_and_gpt_match_reference():
    m = lnn.LipschitzGPT(small_config(softmax_scale=2.0)).double()
    x = torch.randn(2, 6, 16, dtype=F64)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(m.blocks[0].mlp(x), mlp_ref(m.blocks[0].mlp, x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.forward_embeddings(x), gpt_ref(m, x), atol=1e-6, rtol=1e-6)
    idx = torch.randint(0, 11, (2, 6))
    torch.testing.assert_close(m(idx), m.forward_embeddings(m.embed.weight[idx]))


@pytest.mark.parametrize("softmax_scale", [0.01, 0.0])
def test_scaled_recipe_matches_reference(softmax_scale):
    """The CPU preset's knobs (activation scale, residual scale, learned positional bias,
    small or zero softmax scale, MLP width 8d) against the float64 per-position reference."""
    cfg = small_config(mlp_act_scale=8.0, residual_scale=2.0, pos_bias="learned", softmax_scale=softmax_scale,
                       mlp_ratio=8)
    m = lnn.LipschitzGPT(cfg).double()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.bias_table.add_(torch.randn_like(blk.attn.bias_table))
    x = torch.randn(3, 7, 16, dtype=F64)
    torch.testing.assert_close(m.forward_embeddings(x), gpt_ref(m, x), atol=1e-6, rtol=1e-6)


def test_bf16_autocast_forward_keeps_a_float32_residual_stream():
    """Under torch.autocast(bfloat16) the matmuls run in bf16, the residual stream stays
    float32, and the logits stay within bf16 rounding of the float32 model's."""
    m = lnn.LipschitzGPT(small_config(mlp_act_scale=8.0, residual_scale=2.0, pos_bias="learned"))
    x = torch.randn(2, 9, 16)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    ref = m.forward_embeddings(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.blocks[0](x).dtype == torch.float32
        out = m.forward_embeddings(x)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max().item()
    assert 0 < err <= 0.03 * ref.abs().max().item()


def test_zero_init_and_default_sizes():
    m = lnn.LipschitzGPT(lnn.GPTConfig(vocab_size=65))
    assert sum(p.numel() for p in m.parameters()) == 65 * 256 * 2 + 3 * (4 * 256**2 + 2 * 4 * 256**2)
    for blk in m.blocks:
        assert blk.attn.o.weight.abs().max() == 0 and blk.mlp.fc_out.weight.abs().max() == 0
        assert blk.alpha == pytest.approx(1 / 6)
    assert not any(isinstance(mod, torch.nn.LayerNorm) for mod in m.modules())


def test_param_groups_spec_covers_every_parameter_once():
    m = lnn.LipschitzGPT(small_config(sigma_max=2.0, head_sigma_max=5.0, embed_max_rms=0.5))
    spec = m.param_groups_spec()
    assert [g["kind"] for g in spec] == ["embedding", "hidden", "head"]
    assert [g["sigma_max"] for g in spec] == [0.5, 2.0, 5.0]
    ids = [id(p) for g in spec for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())
    named = dict(m.named_parameters())
    for g in spec:
        assert all(named[n] is p for n, p in zip(g["names"], g["params"]))
    assert len(spec[1]["params"]) == 2 * 6
    b = lnn.BaselineGPT(small_config())
    bspec = b.param_groups_spec()
    assert {g["kind"] for g in bspec} == {"embedding", "hidden", "head", "vector"}
    assert sorted(id(p) for g in bspec for p in g["params"]) == sorted(id(p) for p in b.parameters())


def test_param_groups_spec_splits_attention_and_mlp_caps():
    # Different attention / MLP caps: two hidden groups, each with its own cap; equal caps
    # (set explicitly or through sigma_max) keep the single "hidden" group.
    m = lnn.LipschitzGPT(small_config(sigma_max=1.0, mlp_sigma_max=2.5))
    spec = m.param_groups_spec()
    assert [(g["name"], g["kind"], g["sigma_max"]) for g in spec] == [
        ("embedding", "embedding", 1.0), ("attention", "hidden", 1.0), ("mlp", "hidden", 2.5), ("head", "head", 1.0)]
    assert all(".attn." in n for n in spec[1]["names"]) and len(spec[1]["names"]) == 2 * 4
    assert all(".mlp." in n for n in spec[2]["names"]) and len(spec[2]["names"]) == 2 * 2
    assert sorted(id(p) for g in spec for p in g["params"]) == sorted(id(p) for p in m.parameters())
    same = lnn.LipschitzGPT(small_config(sigma_max=2.0, attn_sigma_max=2.0, mlp_sigma_max=2.0))
    assert [g["name"] for g in same.param_groups_spec()] == ["embedding", "hidden", "head"]
    with pytest.raises(ValueError, match="attn_sigma_max"):
        small_config(attn_sigma_max=-1.0)
    with pytest.raises(ValueError, match="mlp_sigma_max"):
        small_config(mlp_sigma_max=float("nan"))


@pytest.mark.parametrize("rope", [True, False])
def test_baseline_runs_and_is_causal(rope):
    cfg = small_config(rope=rope)
    b = lnn.BaselineGPT(cfg)
    idx = torch.randint(0, 11, (3, 9))
    logits = b(idx)
    assert logits.shape == (3, 9, 11)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in b.parameters())
    assert any(isinstance(mod, torch.nn.LayerNorm) for mod in b.modules())
    idx2 = idx.clone()
    idx2[:, 6] = (idx2[:, 6] + 1) % 11
    torch.testing.assert_close(b(idx2)[:, :6], logits[:, :6])
    assert b.forward_embeddings(torch.randn(2, 5, 16)).shape == (2, 5, 11)


def test_lipschitz_model_is_causal_and_batch_independent():
    m = lnn.LipschitzGPT(small_config())
    idx = torch.randint(0, 11, (3, 9))
    full = m(idx)
    torch.testing.assert_close(m(idx[1:2]), full[1:2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m(idx[:, :4]), full[:, :4], atol=1e-6, rtol=1e-6)


def test_activation_stats_both_models():
    idx = torch.randint(0, 11, (2, 8))
    for model in (lnn.LipschitzGPT(small_config()), lnn.BaselineGPT(small_config())):
        stats = lnn.activation_stats(model, idx)
        assert "head" in stats and "blocks.1.mlp" in stats and "blocks" not in stats
        logits = model(idx).double()
        assert stats["head"]["max_abs"] == pytest.approx(logits.abs().max().item(), rel=1e-6)
        assert stats["head"]["rms"] == pytest.approx(logits.pow(2).mean().sqrt().item(), rel=1e-6)
        for s in stats.values():
            assert 0 <= s["rms"] <= s["max_token_rms"] + 1e-9 and s["rms"] <= s["max_abs"] + 1e-9
    lip = lnn.LipschitzGPT(small_config())
    stats = lnn.activation_stats(lip, idx)
    assert stats["embed"]["max_token_rms"] <= 1.0
    assert not lip._forward_hooks and not lip.head._forward_hooks  # hooks removed


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(d_model=30, n_heads=4), "divisible"),
        (dict(sigma_max=-1.0), "sigma_max"),
        (dict(head_sigma_max=0.0), "head_sigma_max"),
        (dict(embed_max_rms=float("nan")), "embed_max_rms"),
        (dict(softmax_scale=-2.0), "softmax_scale"),
        (dict(n_layers=0), "n_layers"),
        (dict(vocab_size=2.5), "vocab_size"),
        (dict(d_model=12, n_heads=4, rope=True), "even head dimension"),
        (dict(attention=""), "attention"),
    ],
)
def test_bad_configs_raise_clear_errors(kw, match):
    base = dict(vocab_size=11, d_model=16, n_heads=2)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        lnn.GPTConfig(**base)


def test_bad_inputs_raise():
    m = lnn.LipschitzGPT(small_config())
    with pytest.raises(ValueError, match="seq_len"):
        m(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[B, T, 16\]"):
        m.forward_embeddings(torch.zeros(1, 3, 8))
    with pytest.raises(TypeError, match="GPTConfig"):
        lnn.LipschitzGPT({"vocab_size": 3})


@pytest.mark.parametrize("rope", [False, True])
def test_baseline_attention_logits_reproduce_forward(rope):
    from lipschitz_ext.nn.baseline import BaselineAttention

    torch.manual_seed(0)
    attn = BaselineAttention(small_config(rope=rope)).double()
    B, T, d = 2, 7, attn.n_heads * attn.d_head
    x = torch.randn(B, T, d, dtype=torch.float64)
    logits = attn.attention_logits(x)
    assert logits.shape == (B, attn.n_heads, T, T) and logits.dtype == torch.float64
    assert torch.isinf(logits[..., 0, 1]).all() and torch.isfinite(logits.tril()).all()
    # independent float64 reference: per head q_h k_h^T / sqrt(d_head) from the raw qkv matrix
    Wq, Wk, Wv = attn.qkv.weight.view(3, attn.n_heads, attn.d_head, d)
    if not rope:
        q = torch.einsum("btd,hed->bhte", x, Wq)
        k = torch.einsum("btd,hed->bhte", x, Wk)
        want = (q @ k.transpose(-2, -1)) / math.sqrt(attn.d_head)
        torch.testing.assert_close(logits.tril(), want.tril(), atol=1e-12, rtol=1e-12)
    # softmax(logits) v through the output projection is the module's forward
    v = torch.einsum("btd,hed->bhte", x, Wv)
    out = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(B, T, d) @ attn.o.weight.T
    torch.testing.assert_close(out, attn(x), atol=1e-12, rtol=1e-12)
    # bf16 modules report float32 logits
    assert attn.to(torch.bfloat16).attention_logits(x.to(torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="attention_logits: x must be"):
        attn.attention_logits(torch.randn(T, d, dtype=torch.bfloat16))
