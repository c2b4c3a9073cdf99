"""Tests of build_optimizers / ConstrainedAdam: parameter roles and the combined optimizer."""

from __future__ import annotations

import io

import dataclasses

import pytest
import torch
from optim_helpers import PowerNormalize, one_thread  # noqa: F401 (autouse fixture)
from torch import nn

from lipschitz_ext.optim import ConstrainedAdam, Muon, OptimizerSet, build_optimizers, classify_parameters


class RowRMSCap:
    """Test-local embedding cap following the constraints interface: each row's RMS <= max_rms."""

    name = "row_rms"

    def __init__(self, max_rms=1.0):
        self.max_rms = max_rms
        self.sigma_max = None
        self.calls = []

    def apply_(self, W, *, lr=0.0, update_norm=0.0, decay=0.0, state=None):
        self.calls.append(tuple(W.shape))
        rms = W.pow(2).mean(-1, keepdim=True).sqrt()
        W.div_(torch.clamp(rms / self.max_rms, min=1.0))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=16, tie=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.q = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d, bias=False))
        self.gain = nn.Parameter(torch.ones(d))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx)
        x = x + self.q(x)
        x = x + self.mlp(x) * self.gain
        return self.lm_head(x)


def _kinds(roles):
    return {r.kind: [tuple(p.shape) for p in r.params] for r in roles}


def test_roles_of_a_generic_lm():
    kinds = _kinds(classify_parameters(TinyLM()))
    assert kinds == {"embedding": [(50, 16)], "hidden": [(16, 16), (64, 16), (16, 64)],
                     "head": [(50, 16)], "vector": [(16,), (64,)]}


def test_tied_head_counts_once_as_embedding_and_names_override():
    kinds = _kinds(classify_parameters(TinyLM(tie=True)))
    assert kinds["embedding"] == [(50, 16)] and "head" not in kinds
    kinds = _kinds(classify_parameters(TinyLM(), head_names=["q"]))
    assert kinds["head"] == [(16, 16)] and (50, 16) in kinds["hidden"]


def test_conv_kernels_go_to_adam_and_head_by_name():
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 8, 3))
    model.add_module("fc", nn.Linear(8, 8))
    model.add_module("output", nn.Linear(8, 10))
    kinds = _kinds(classify_parameters(model))
    assert (8, 3, 3, 3) in kinds["vector"] and kinds["head"] == [(10, 8)] and kinds["hidden"] == [(8, 8)]


class SpecModel(TinyLM):
    def param_groups_spec(self):
        return [
            {"name": "emb", "params": [self.wte.weight], "kind": "embedding", "sigma_max": 0.5},
            {"name": "attn", "params": [self.q.weight], "kind": "hidden", "sigma_max": 2.0},
            {"name": "mlp", "params": [self.mlp[0].weight, self.mlp[2].weight], "kind": "hidden", "sigma_max": 3.0},
            {"name": "out", "params": [self.lm_head.weight], "kind": "head", "sigma_max": 4.0},
            {"name": "vec", "params": [self.gain, self.mlp[0].bias], "kind": "vector", "sigma_max": None},
        ]


def test_param_groups_spec_is_used_with_its_caps():
    opt = build_optimizers(SpecModel(), hidden_constraint=lambda s: PowerNormalize(s),
                           head_constraint=lambda s: PowerNormalize(s), embedding_constraint=RowRMSCap)
    muon, adam = opt["muon"], opt["adam"]
    assert [(g["role"], g["constraint"].sigma_max) for g in muon.param_groups] == [
        ("attn", 2.0), ("mlp", 3.0), ("out", 4.0)]
    assert muon.param_groups[2]["lr"] == pytest.approx(0.005)
    assert adam.param_groups[0]["constraint"].max_rms == 0.5 and adam.param_groups[1]["constraint"] is None
    assert adam.defaults["betas"] == (0.8, 0.95)


def _train(opt, model, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 50, (4, 7), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(1, -1).flatten())
        loss.backward()
        opt.step()
    return loss.item()


def test_training_step_caps_embeddings_and_round_trips():
    torch.manual_seed(0)
    model = TinyLM()
    with torch.no_grad():
        model.wte.weight.mul_(5)  # start above the cap
    cap = RowRMSCap(1.0)
    kw = dict(hidden_constraint=lambda s: PowerNormalize(s), head_constraint=lambda s: PowerNormalize(s),
              embedding_constraint=cap)
    opt = build_optimizers(model, **kw)
    assert isinstance(opt, OptimizerSet) and isinstance(opt["muon"], Muon) and isinstance(opt["adam"], ConstrainedAdam)
    sched = opt.schedulers(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)))
    _train(opt, model, 2)
    for s in sched:
        s.step()
    assert cap.calls == [(1, 50, 16)] * 2
    rms = model.wte.weight.pow(2).mean(-1).sqrt()
    assert rms.max() <= 1.0 + 1e-6
    assert opt["muon"].param_groups[0]["lr"] == pytest.approx(0.025)

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    loss_a = _train(opt, model, 2, seed=1)
    after_a = [p.detach().clone() for p in model.parameters()]
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model_b = TinyLM()
    model_b.load_state_dict(saved["model"])
    opt_b = build_optimizers(model_b, **kw)
    opt_b.load_state_dict(saved["opt"])
    for o in opt_b.optimizers:
        for g in o.param_groups:
            g["lr"] = g["initial_lr"] * 0.5  # the schedulers' state at the save point
    assert _train(opt_b, model_b, 2, seed=1) == loss_a
    for x, y in zip(after_a, model_b.parameters()):
        assert torch.equal(x, y)


def test_errors():
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizers(nn.Sequential())
    with pytest.raises(TypeError, match="apply_"):
        ConstrainedAdam([nn.Parameter(torch.randn(3, 4))], constraint=object())
    with pytest.raises(ValueError, match="kind must be one of"):
        class Bad(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.randn(3, 3))

            def param_groups_spec(self):
                return [{"name": "w", "params": [self.w], "kind": "matrix"}]

        build_optimizers(Bad())


def test_config_is_typed_and_checked():
    from lipschitz_ext.optim import OptimizerConfig

    cfg = OptimizerConfig(lr=0.02, head_names=["head"])
    assert cfg.head_names == ("head",)  # any iterable, stored as a tuple
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    for bad, match in ((dict(update_scale="bogus"), "update_scale"), (dict(ns_dtype="fp8"), "ns_dtype"),
                       (dict(distributed="ddp"), "distributed"), (dict(lr=float("nan")), "lr"),
                       (dict(head_lr=-1.0), "head_lr"), (dict(embed_max_rms=True), "embed_max_rms")):
        with pytest.raises(ValueError, match=match):
            OptimizerConfig(**bad)
    with pytest.raises(TypeError, match="unknown setting"):
        build_optimizers(SpecModel(), lrr=0.1)
    with pytest.raises(TypeError, match="OptimizerConfig"):
        build_optimizers(SpecModel(), {"lr": 0.1})
    # a config and keyword overrides of it build the same optimizers
    a = build_optimizers(SpecModel(), OptimizerConfig(lr=0.02, momentum=0.9))
    b = build_optimizers(SpecModel(), OptimizerConfig(lr=0.5), lr=0.02, momentum=0.9)
    ga, gb = a["muon"].param_groups, b["muon"].param_groups
    assert [(g["lr"], g["momentum"]) for g in ga] == [(g["lr"], g["momentum"]) for g in gb]
    assert {g["lr"] for g in ga} == {0.02, 0.002}  # the head at lr / 10


def test_every_registered_constraint_name_builds_with_the_caps_it_takes():
    from lipschitz_ext import constraints as C

    for name, spec in C.CONSTRAINT_SPECS.items():
        opt = build_optimizers(SpecModel(), hidden_constraint=name, head_constraint=name)
        for g in opt["muon"].param_groups:
            c = g["constraint"]
            if name == "none":
                assert c is None
                continue
            assert c.name == name
            # a constraint that takes a cap gets its group's cap; the others are built without one
            cap = {"attn": 2.0, "mlp": 3.0, "out": 4.0}[g["role"]]
            want = C.make_constraint(name, sigma_max=cap) if spec.takes_cap else C.make_constraint(name)
            assert repr(c) == repr(want), (name, g["role"])
            if spec.takes_cap:
                assert repr(c) != repr(C.make_constraint(name)), name
