"""Muon's step: Newton-Schulz dtype, no host syncs, buckets prepared once,
device-side non-finite skips, CUDA-graph capture (CUDA tests skip without a device)."""

from __future__ import annotations

import math

import pytest
import torch
from optim_helpers import PowerNormalize, clone_params, one_thread  # noqa: F401 (autouse fixture)

from lipschitz_ext import constraints as C
from lipschitz_ext.ops.orthogonalize import native_bf16_matmul
from lipschitz_ext.optim import Muon, resolve_ns_dtype

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _params(shapes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(*s, generator=g) / math.sqrt(s[-1])).to(device, dtype)) for s in shapes]


def _set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)


SHAPES = [(8, 12), (12, 8), (8, 12), (2, 8, 12), (6, 6)]


def test_ns_dtype_resolution_and_validation():
    bf16_cpu = native_bf16_matmul("cpu")
    assert resolve_ns_dtype("auto", "cpu") == (torch.bfloat16 if bf16_cpu else torch.float32)
    assert resolve_ns_dtype("auto", "cpu", torch.float64) == torch.float64
    assert resolve_ns_dtype("float32", "cpu", torch.float64) == torch.float32
    assert resolve_ns_dtype("bfloat16", "cpu") == torch.bfloat16
    p = _params([(4, 6)])
    assert Muon(p).ns_dtype_resolved == ("bfloat16" if bf16_cpu else "float32")
    assert Muon(p, ns_dtype="float32").ns_dtype_resolved == "float32"
    assert Muon([{"params": p}, {"params": _params([(3, 3)]), "ns_dtype": "float32"}],
                ns_dtype="bfloat16").ns_dtype_resolved == "bfloat16,float32"
    for bad in ("fp16", "bf16", None, torch.bfloat16):
        with pytest.raises(ValueError, match="Muon: ns_dtype must be one of"):
            Muon(p, ns_dtype=bad)
    opt = Muon(p)
    opt.param_groups[0]["ns_dtype"] = "half"
    p[0].grad = torch.randn(4, 6)
    with pytest.raises(ValueError, match="ns_dtype of param group 0"):
        opt.step()
    with pytest.raises(ValueError, match="Muon: ns_dtype must be one of"):
        resolve_ns_dtype("float16")


def test_native_bf16_detection_follows_the_cpu_probes():
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if " avx512_bf16" in flags or " amx_bf16" in flags:
        assert native_bf16_matmul("cpu")
    elif flags and __import__("platform").machine() == "x86_64":
        assert not native_bf16_matmul("cpu")
    assert not native_bf16_matmul("meta")


@pytest.mark.parametrize("ns_dtype", ["bfloat16", "float32"])
def test_step_uses_the_ns_dtype(monkeypatch, ns_dtype):
    import lipschitz_ext.optim.muon as muon_mod

    seen = []
    real = muon_mod.orthogonalize

    def spy(G, *args, compute_dtype=None, **kw):
        seen.append(compute_dtype)
        return real(G, *args, compute_dtype=compute_dtype, **kw)

    monkeypatch.setattr(muon_mod, "orthogonalize", spy)
    p = _params(SHAPES)
    opt = Muon(p, ns_dtype=ns_dtype, constraint=PowerNormalize())
    _set_grads(p, 1)
    opt.step()
    assert seen and set(seen) == {getattr(torch, ns_dtype)}


def _tiny_regression(ns_dtype: str, steps: int) -> list[float]:
    """A 2-layer linear net fit by Muon (float32 weights): the loss after every step."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=g)
    T = torch.tanh(X @ torch.randn(32, 16, generator=g) / 4) @ torch.randn(16, 8, generator=g)
    W1 = torch.nn.Parameter(torch.randn(64, 32, generator=g) / 8)
    W2 = torch.nn.Parameter(torch.randn(8, 64, generator=g) / 8)
    opt = Muon([W1, W2], lr=0.02, ns_dtype=ns_dtype)
    losses = []
    for _ in range(steps):
        loss = ((torch.tanh(X @ W1.T) @ W2.T - T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bf16_newton_schulz_loss_curve_matches_float32():
    a, b = _tiny_regression("bfloat16", 150), _tiny_regression("float32", 150)
    assert a[-1] < 0.5 * a[0] and b[-1] < 0.5 * b[0]  # both train
    for i in (49, 99, 149):  # the curves agree within a few percent along the way
        assert a[i] == pytest.approx(b[i], rel=0.05), (i, a[i], b[i])


class _NoSync:
    """Make every host read of a tensor raise (Tensor.item / __bool__ / tolist / __float__ / __int__)."""

    NAMES = ("item", "__bool__", "tolist", "__float__", "__int__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def boom(*_a, **_k):
            raise AssertionError("host read of a tensor inside Muon.step")

        for n in self.NAMES:
            setattr(torch.Tensor, n, boom)
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("kw", [dict(), dict(nesterov=False, weight_decay=0.1),
                                dict(constraint=PowerNormalize(0.9)), dict(nonfinite="skip"),
                                dict(nonfinite="ignore", weight_decay=0.1)])
def test_step_reads_no_tensor_on_the_host(kw):
    # The CPU-side guard for "no host sync per step": no .item()/bool()/tolist() of a
    # tensor anywhere in step(), including the first step (buckets prepared).
    p = _params(SHAPES)
    opt = Muon(p, lr=0.03, **kw)
    raising = kw.get("nonfinite", "raise") == "raise"
    for s in range(3):
        _set_grads(p, s)
        if s == 1:
            p[1].grad[0, 0] = float("nan")  # a skipped step is sync-free too
        if s == 2 and raising:  # reporting it reads the flags: that is the raise, not a step
            with pytest.raises(RuntimeError, match="non-finite gradient"):
                opt.step()
        with _NoSync():
            opt.step()
    if kw.get("nonfinite") == "skip":
        assert opt.skipped_steps == 1


def test_buckets_and_stacked_buffers_are_prepared_once():
    p = _params(SHAPES)
    opt = Muon(p, constraint=PowerNormalize())
    _set_grads(p, 0)
    opt.step()
    plan = opt._plans[0]
    bufs = [opt.state[q]["momentum_buffer"] for q in p]
    stacks = {b.buf.data_ptr() for b in plan.buckets}
    assert len(plan.buckets) == 3  # (8, 12) x 4 matrices, (12, 8), (6, 6)
    # every momentum buffer is a view into its bucket's stack
    assert all(any(x.untyped_storage().data_ptr() == s for s in stacks) for x in bufs)
    for s in range(1, 4):
        _set_grads(p, s)
        opt.step()
        assert opt._plans[0] is plan
        assert all(opt.state[q]["momentum_buffer"] is x for q, x in zip(p, bufs))
    # a parameter without a gradient changes the set: rebuilt, momentum kept bit for bit
    before = [x.clone() for x in bufs]
    _set_grads(p, 9)
    p[2].grad = None
    ref = clone_params(p)
    opt.step()
    assert opt._plans[0] is not plan and torch.equal(opt.state[p[2]]["momentum_buffer"], before[2])
    assert torch.equal(p[2], ref[2])


def test_loaded_momentum_goes_into_fresh_stacks_and_resumes_bit_exactly():
    # (test_optim's round trip through torch.save covers the file; this, the stacks)
    make = lambda ps: Muon(ps, lr=0.04, weight_decay=0.05, constraint=C.SpectralSoftCap(1.0))
    a = _params(SHAPES)
    oa = make(a)
    for s in range(3):
        _set_grads(a, s)
        oa.step()
    c = clone_params(a)
    oc = make(c)
    oc.load_state_dict(oa.state_dict())
    for s in range(3, 6):
        _set_grads(a, s)
        _set_grads(c, s)
        oa.step()
        oc.step()
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    storages = {oa.state[q]["momentum_buffer"].untyped_storage().data_ptr() for q in a}
    assert all(oc.state[q]["momentum_buffer"].untyped_storage().data_ptr() not in storages for q in c)


@pytest.mark.parametrize("constraint", [None, "power", "soft_cap", "hard_cap"])
def test_a_skipped_step_keeps_weights_momentum_and_constraint_state_bit_for_bit(constraint):
    make_c = {None: lambda: None, "power": lambda: PowerNormalize(0.8),
              "soft_cap": lambda: C.SpectralSoftCap(1.0), "hard_cap": lambda: C.SpectralHardCap(1.0)}[constraint]
    p = _params(SHAPES)
    opt = Muon(p, lr=0.05, weight_decay=0.1, constraint=make_c(), nonfinite="skip")
    for s in range(2):
        _set_grads(p, s)
        opt.step()
    snap_p = [x.detach().clone() for x in p]
    snap_s = [{k: v.clone() for k, v in opt.state[q].items()} for q in p]
    _set_grads(p, 5)
    p[3].grad[1, 2, 3] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(x, y) for x, y in zip(p, snap_p))
    for q, st in zip(p, snap_s):
        assert opt.state[q].keys() == st.keys()
        assert all(torch.equal(opt.state[q][k], v) for k, v in st.items())
    # and the next finite step is the step the optimizer would have taken without it
    ref_p = _params(SHAPES)  # the same start, never sees the bad step
    ref = Muon(ref_p, lr=0.05, weight_decay=0.1, constraint=make_c(), nonfinite="skip")
    for s in range(2):
        _set_grads(ref_p, s)
        ref.step()
    _set_grads(p, 6)
    _set_grads(ref_p, 6)
    opt.step()
    ref.step()
    if constraint is None:  # constraint warm starts may differ; weights without one match exactly
        assert all(torch.equal(x, y) for x, y in zip(p, ref_p))


@needs_cuda
def test_cuda_step_has_no_host_sync():
    p = _params(SHAPES, device="cuda")
    opt = Muon(p, lr=0.03)
    _set_grads(p, 0)
    opt.step()  # prepares the buckets
    grads = []
    for s in range(1, 3):  # made before the guarded region (a pageable copy would sync)
        _set_grads(p, s)
        grads.append([q.grad for q in p])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gs in grads:
            for q, g in zip(p, gs):
                q.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.ns_dtype_resolved == "bfloat16"


@needs_cuda
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_cuda_graph_captures_and_replays_a_step(nonfinite):
    p = _params(SHAPES, device="cuda")
    eager = clone_params(p)
    grads = []
    for s in range(4):
        _set_grads(p, s)
        grads.append([q.grad.clone() for q in p])
    opt = Muon(p, lr=0.03, nonfinite=nonfinite)
    ref = Muon(eager, lr=0.03, nonfinite=nonfinite)
    static = [torch.zeros_like(q) for q in p]
    for q, g in zip(p, static):
        q.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: prepares buckets and state outside the capture
        for g, x in zip(static, grads[0]):
            g.copy_(x)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for q, g in zip(eager, grads[0]):
        q.grad = g.clone()
    ref.step()
    for gs in grads[1:]:
        for g, x in zip(static, gs):
            g.copy_(x)
        graph.replay()
        for q, x in zip(eager, gs):
            q.grad = x.clone()
        ref.step()
    torch.cuda.synchronize()
    for a, b in zip(p, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a non-finite gradient replayed is skipped on the device
    snap = [q.detach().clone() for q in p]
    static[0][0, 0] = float("nan")
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(p, snap))
    if nonfinite == "skip":
        assert opt.skipped_steps == 1
    else:
        with pytest.raises(RuntimeError, match="non-finite gradient in param group 0"):
            opt.check_nonfinite()


@pytest.mark.parametrize("ns_dtype, autocast, expected", [
    ("float32", "bf16", "float32"),  # forced
    ("auto", "none", "float32"),  # a float32 CPU run stays float32 throughout
    ("bfloat16", "none", "bfloat16"),
])
def test_train_config_ns_dtype_reaches_muon(ns_dtype, autocast, expected):
    from lipschitz_ext.training import config as TC
    from lipschitz_ext.training.optimizers import build_optimizer

    cfg = TC.config_from_preset("shakespeare-cpu", d_model=32, n_layers=2, mlp_ratio=2, seq_len=16,
                                ns_dtype=ns_dtype, autocast=autocast)
    model = TC.build_model(cfg, 11)
    assert build_optimizer(model, cfg).ns_dtype_resolved == expected


def test_train_config_refuses_a_bad_ns_dtype():
    from lipschitz_ext.training import config as TC

    with pytest.raises(ValueError, match="--ns-dtype must be one of auto, bfloat16, float32"):
        TC.config_from_preset("shakespeare-cpu", ns_dtype="fp16")
