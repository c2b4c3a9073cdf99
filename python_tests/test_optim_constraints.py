"""Muon + the real lipschitz_ext.constraints: the caps hold after every step.

Norms are measured independently: float64 SVD of ``W' = W / sqrt(m / n)``
(the RMS->RMS operator norm, docs/theory.md, section 1).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from optim_helpers import one_thread  # noqa: F401 (autouse fixture)

from lipschitz_ext import constraints as C
from lipschitz_ext.ops import ns_max_gain, soft_cap_alpha
from lipschitz_ext.optim import Muon, build_optimizers

SHAPES = [(16, 48), (48, 16), (16, 48), (3, 24, 24), (1, 20)]


def rms_norms(p: torch.Tensor) -> torch.Tensor:
    m, n = p.shape[-2:]
    W = p.detach().double().reshape(-1, m, n) / math.sqrt(m / n)
    return torch.linalg.matrix_norm(W, ord=2)


def _capped_params(sigma):
    out = []
    for s in SHAPES:
        W = torch.randn(*s)
        C.SVDCap(sigma).apply_(W.view(-1, *s[-2:]))  # start inside the cap
        out.append(torch.nn.Parameter(W))
    return out


def _steps(opt, params, n, check):
    for _ in range(n):
        for p in params:
            p.grad = torch.randn_like(p) * 10
        opt.step()
        check()


@pytest.mark.parametrize("update_scale", ["fan_ratio", "none", "original"])
@pytest.mark.parametrize("sigma,wd", [(1.0, 0.0), (2.0, 0.1)])
def test_soft_cap_holds_after_every_step(update_scale, sigma, wd):
    # Large steps (lr 0.2): without the coupled alpha the weights would leave the cap.
    params = _capped_params(sigma)
    opt = Muon(params, lr=0.2, weight_decay=wd, constraint=C.SpectralSoftCap(sigma), update_scale=update_scale)
    worst = []

    def check():
        worst.append(max(rms_norms(p).max().item() for p in params))

    _steps(opt, params, 6, check)
    assert max(worst) <= sigma * (1 + 1e-4), worst
    assert min(worst) >= 0.5 * sigma  # the steps really push against the cap


def test_soft_cap_coupling_is_automatic_and_needed():
    sigma, lr, wd = 1.0, 0.2, 0.05
    con = C.SpectralSoftCap(sigma)
    params = _capped_params(sigma)
    opt = Muon(params, lr=lr, weight_decay=wd, constraint=con)
    mu = lr * ns_max_gain(5, "polar_express") * 1.05
    assert con.alpha_for(mu, lr * wd) == pytest.approx(soft_cap_alpha(sigma, mu, lr * wd))
    _steps(opt, params, 4, lambda: None)
    assert max(rms_norms(p).max().item() for p in params) <= sigma * (1 + 1e-4)
    # The same run with a fixed, too small alpha overshoots: the coupling is what keeps the cap.
    loose = _capped_params(sigma)
    opt = Muon(loose, lr=lr, weight_decay=wd, constraint=C.SpectralSoftCap(sigma, alpha=1e-3))
    _steps(opt, loose, 4, lambda: None)
    assert max(rms_norms(p).max().item() for p in loose) > sigma * 1.05


@pytest.mark.parametrize("method,tol", [("msign", 1e-2), ("polynomial", 1.5e-2)])
def test_hard_cap_holds_after_every_step(method, tol):
    sigma = 1.5
    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]  # may start above the cap
    opt = Muon(params, lr=0.1, constraint=C.SpectralHardCap(sigma, method=method))

    def check():
        for p in params:
            assert rms_norms(p).max().item() <= sigma * (1 + tol), (method, p.shape)

    _steps(opt, params, 4, check)


def test_normalize_state_round_trip_bit_identical():
    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    grads = [[torch.randn(*s) for s in SHAPES] for _ in range(6)]

    def run(ps, opt, gs):
        for g in gs:
            for p, x in zip(ps, g):
                p.grad = x.clone()
            opt.step()

    def make(ps):
        return Muon(ps, lr=0.1, constraint="normalize")  # by name, through make_constraint

    a = [torch.nn.Parameter(p.detach().clone()) for p in params]
    oa = make(a)
    run(a, oa, grads)
    assert oa.state[a[3]]["constraint.u"].shape == (3, 24)
    b = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ob = make(b)
    run(b, ob, grads[:3])
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    ob = make(b)
    ob.load_state_dict(torch.load(buf, weights_only=True))
    run(b, ob, grads[3:])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_build_optimizers_with_real_constraints_caps_everything():
    torch.manual_seed(0)
    vocab, d = 40, 24
    model = torch.nn.ModuleDict({
        "wte": torch.nn.Embedding(vocab, d),
        "fc": torch.nn.Linear(d, 4 * d, bias=False),
        "proj": torch.nn.Linear(4 * d, d, bias=False),
        "lm_head": torch.nn.Linear(d, vocab, bias=False),
    })
    with torch.no_grad():
        for name in ("fc", "proj", "lm_head"):
            model[name].weight.mul_(0.1)

    def forward(idx):
        x = model["wte"](idx)
        x = x + model["proj"](torch.nn.functional.gelu(model["fc"](x)))
        return model["lm_head"](x)

    opt = build_optimizers(model, lr=0.1, head_lr=0.05, head_sigma_max=3.0, hidden_sigma_max=1.0)
    for _ in range(4):
        idx = torch.randint(0, vocab, (4, 9))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(forward(idx).flatten(0, 1), idx.roll(1, -1).flatten()).backward()
        opt.step()
        assert rms_norms(model["fc"].weight).item() <= 1.0 + 1e-4
        assert rms_norms(model["proj"].weight).item() <= 1.0 + 1e-4
        assert rms_norms(model["lm_head"].weight).item() <= 3.0 * (1 + 1e-4)
        assert model["wte"].weight.double().pow(2).mean(-1).sqrt().max().item() <= 1.0 + 1e-6
    kinds = {g["kind"]: type(g["constraint"]).__name__ for o in opt.optimizers for g in o.param_groups}
    assert kinds == {"hidden": "SpectralSoftCap", "head": "SpectralSoftCap", "embedding": "EmbeddingRMSCap"}


@pytest.mark.parametrize("caps", [dict(sigma_max=1.5), dict(sigma_max=1.0, mlp_sigma_max=2.0),
                                  dict(sigma_max=3.0, attn_sigma_max=0.5)])
def test_build_optimizers_on_lipschitz_gpt_keeps_every_cap(caps):
    # The model's own param_groups_spec() decides roles and caps (hidden 1.5 or per-group
    # attention/MLP caps, head 4, embedding 1).
    from lipschitz_ext.nn import GPTConfig, LipschitzGPT

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=29, d_model=32, n_layers=2, n_heads=2, seq_len=12, **caps,
                    head_sigma_max=4.0, embed_max_rms=1.0)
    model = LipschitzGPT(cfg)
    opt = build_optimizers(model, lr=0.1, head_lr=0.05)
    spec = {d["name"]: d for d in model.param_groups_spec()}
    roles = {g["role"]: g for o in opt.optimizers for g in o.param_groups}
    assert set(roles) == set(spec)
    for _ in range(3):
        idx = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
        opt.zero_grad()
        logits = model(idx)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
        opt.step()
        for d in spec.values():
            for p in d["params"]:
                if d["kind"] == "embedding":
                    assert p.double().pow(2).mean(-1).sqrt().max().item() <= d["sigma_max"] + 1e-6
                else:
                    assert rms_norms(p).max().item() <= d["sigma_max"] * (1 + 1e-4), d["name"]


def test_hard_cap_pins_each_hidden_group_at_its_own_cap():
    # Attention capped at 1, MLP at 2: after a few large Muon steps the hard cap leaves
    # every matrix exactly at its own group's cap (the MLP is not clipped to the attention cap).
    from lipschitz_ext.nn import GPTConfig, LipschitzGPT

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=29, d_model=32, n_layers=2, n_heads=2, seq_len=12, sigma_max=1.0,
                    mlp_sigma_max=2.0)
    model = LipschitzGPT(cfg)
    opt = build_optimizers(model, lr=0.5, head_lr=0.05, hidden_constraint="hard_cap")
    for _ in range(5):
        idx = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
        opt.step()
    for name, p in model.named_parameters():
        if ".attn." in name and name.endswith(("q.weight", "k.weight", "v.weight", "o.weight")):
            assert rms_norms(p).item() == pytest.approx(1.0, rel=2e-3), name
        elif ".mlp." in name:
            assert rms_norms(p).item() == pytest.approx(2.0, rel=2e-3), name
