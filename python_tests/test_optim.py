"""Tests of lipschitz_ext.optim.Muon on one process (CPU)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from optim_helpers import PowerNormalize, clone_params, one_thread  # noqa: F401 (autouse fixture)

import lipschitz_ext.optim.muon as muon_mod
from lipschitz_ext.ops import ns_max_gain, orthogonalize
from lipschitz_ext.optim import Muon, update_scale_factor


def _params(shapes, dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(*s, dtype=dtype) / math.sqrt(s[-1])) for s in shapes]


def _grads(shapes, steps, dtype=torch.float32):
    return [[torch.randn(*s, dtype=dtype) for s in shapes] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


SHAPES = [(6, 10), (10, 6), (6, 10), (1, 9), (9, 1), (12, 12)]


def _torch_ns_as_ours(grad, coeffs, steps, eps):
    """torch.optim.Muon's Newton-Schulz replaced by ours in float64 (same numerics both sides)."""
    return orthogonalize(grad.double(), steps, [coeffs], eps).to(grad.dtype)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_exactly_with_same_newton_schulz(monkeypatch, adjust, nesterov):
    # With both sides on the same float64 Newton-Schulz, momentum, Nesterov,
    # lr adjustment and decoupled weight decay must agree to rounding.
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", _torch_ns_as_ours)
    ours = _params(SHAPES, torch.float64)
    ref = clone_params(ours)
    grads = _grads(SHAPES, 4, torch.float64)
    kw = dict(lr=0.03, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
    _run(Muon(ours, coefficients="jordan", update_scale=adjust, **kw), ours, grads)
    _run(torch.optim.Muon(ref, adjust_lr_fn=adjust, **kw), ref, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_matches_torch_muon_within_bf16_tolerance():
    # Unpatched torch.optim.Muon runs Newton-Schulz in bf16; ours in fp32 on CPU.
    ours = _params(SHAPES)
    ref = clone_params(ours)
    start = clone_params(ours)
    grads = _grads(SHAPES, 3)
    _run(Muon(ours, lr=0.02, coefficients="jordan", update_scale="original", weight_decay=0.05), ours, grads)
    _run(torch.optim.Muon(ref, lr=0.02, weight_decay=0.05), ref, grads)
    for a, b, s in zip(ours, ref, start):
        da, db = (a - s).detach(), (b - s).detach()
        assert (da - db).norm() <= 0.03 * db.norm(), (a.shape, (da - db).norm() / db.norm())


def test_batched_equals_per_matrix():
    stacked = _params([(3, 5, 8), (2, 2, 8, 5)])
    singles = [torch.nn.Parameter(m.detach().clone()) for p in stacked for m in p.reshape(-1, *p.shape[-2:])]
    grads = _grads([(3, 5, 8), (2, 2, 8, 5)], 3)
    single_grads = [[m for g in gs for m in g.reshape(-1, *g.shape[-2:])] for gs in grads]
    for constraint in (None, PowerNormalize(0.8)):
        a, b = clone_params(stacked), clone_params(singles)
        c2 = None if constraint is None else PowerNormalize(0.8)
        _run(Muon(a, lr=0.1, weight_decay=0.1, constraint=constraint), a, grads)
        _run(Muon(b, lr=0.1, weight_decay=0.1, constraint=c2), b, single_grads)
        flat = [m for p in a for m in p.detach().reshape(-1, *p.shape[-2:])]
        for x, y in zip(flat, b):
            torch.testing.assert_close(x, y.detach(), rtol=1e-6, atol=1e-6)


def test_one_orthogonalize_and_one_constraint_call_per_bucket(monkeypatch):
    calls = []

    def counting(G, *args, **kw):
        calls.append(tuple(G.shape))
        return orthogonalize(G, *args, **kw)

    monkeypatch.setattr(muon_mod, "orthogonalize", counting)
    shapes = [(6, 10), (10, 6), (6, 10), (4, 6, 10), (10, 6), (3, 3)]
    params = _params(shapes)
    con = PowerNormalize()
    opt = Muon(params, lr=0.05, weight_decay=0.2, constraint=con)
    _run(opt, params, _grads(shapes, 1))
    assert sorted(calls) == sorted([(6, 6, 10), (2, 10, 6), (1, 3, 3)])
    assert sorted(c["shape"] for c in con.calls) == sorted(calls)
    p_max = ns_max_gain(5, "polar_express")
    for c in con.calls:
        # update_scale="fan_ratio": the RMS->RMS bound is lr * p_max * 1.05 for every shape.
        assert c["update_norm"] == pytest.approx(0.05 * p_max * 1.05, rel=1e-12)
        assert c["decay"] == pytest.approx(0.05 * 0.2) and c["lr"] == 0.05
        assert c["state_keys"] == []  # first step: the constraint creates its state


@pytest.mark.parametrize("update_scale", ["fan_ratio", "none", "original", "match_rms_adamw"])
def test_update_norm_bounds_the_step_in_rms_frame(update_scale):
    # mu passed to the constraint must bound ||delta W / sqrt(m/n)||_2 (float64 SVD).
    shapes = [(8, 24), (24, 8), (16, 16)]
    params = _params(shapes)
    start = clone_params(params)
    con = PowerNormalize(sigma_max=1e6)  # never binds: isolates the update
    opt = Muon(params, lr=0.07, constraint=con, update_scale=update_scale, coefficients="you")
    _run(opt, params, _grads(shapes, 1))
    mus = {c["shape"][1:]: c["update_norm"] for c in con.calls}
    for p, s in zip(params, start):
        m, n = p.shape
        d = (p - s).detach().double() / math.sqrt(m / n)
        sig = torch.linalg.matrix_norm(d, ord=2).item()
        assert sig <= mus[(m, n)] / 1.05 * (1 + 1e-5)
        scale = update_scale_factor(update_scale, m, n)
        assert mus[(m, n)] == pytest.approx(0.07 * ns_max_gain(5, "you") * scale / math.sqrt(m / n) * 1.05)


def test_state_layout_per_parameter():
    shapes = [(6, 10), (3, 6, 10), (10, 6)]
    params = _params(shapes)
    opt = Muon(params, constraint=PowerNormalize())
    _run(opt, params, _grads(shapes, 2))
    for p in params:
        st = opt.state[p]
        k = math.prod(p.shape[:-2])
        assert st["momentum_buffer"].shape == p.shape
        assert st["constraint.u"].shape == (k, p.shape[-1])
        assert torch.equal(st["constraint.calls"], torch.full((k,), 2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bit_identically(dtype):
    shapes = [(6, 10), (3, 6, 10), (10, 6), (5, 5)]
    grads = _grads(shapes, 6, dtype)

    def make(params):
        return Muon(
            [{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "nesterov": False}],
            lr=0.05, weight_decay=0.1, constraint=PowerNormalize(0.9),
        )

    base = _params(shapes, dtype)
    a = clone_params(base)
    opt_a = make(a)
    _run(opt_a, a, grads)

    b = clone_params(base)
    opt_b = make(b)
    _run(opt_b, b, grads[:3])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in b], "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    c = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt_c = make(c)
    opt_c.load_state_dict(saved["opt"])
    assert opt_c.state[c[0]]["constraint.u"].dtype == torch.float32  # not cast to the weight dtype
    _run(opt_c, c, grads[3:])
    for x, y in zip(a, c):
        assert torch.equal(x, y)


def test_lr_scheduler_and_zero_grad():
    params = _params([(6, 10)])
    start = clone_params(params)
    opt = Muon(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    params[0].grad = torch.randn(6, 10)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    moved = params[0].detach().clone()
    assert not torch.equal(moved, start[0])
    params[0].grad = torch.randn(6, 10)
    opt.step()
    assert torch.equal(params[0].detach(), moved)
    opt.zero_grad()
    assert params[0].grad is None


def test_params_without_grad_are_skipped():
    params = _params([(6, 10), (6, 10)])
    start = clone_params(params)
    opt = Muon(params)
    params[0].grad = torch.randn(6, 10)
    opt.step()
    assert torch.equal(params[1], start[1]) and not torch.equal(params[0], start[0])
    assert len(opt.state[params[1]]) == 0


def test_rejects_vectors_complex_and_bad_options():
    with pytest.raises(ValueError, match=r"Muon: parameter 1 of param group 0 has shape \(7,\)"):
        Muon([torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(7))])
    with pytest.raises(ValueError, match="complex"):
        Muon([torch.nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="not contiguous"):
        Muon([torch.nn.Parameter(torch.randn(4, 3).t())])
    with pytest.raises(ValueError, match="update_scale"):
        Muon([torch.nn.Parameter(torch.randn(3, 4))], update_scale="sqrt")
    with pytest.raises(ValueError, match="nonfinite"):
        Muon([torch.nn.Parameter(torch.randn(3, 4))], nonfinite="zero")
    with pytest.raises(ValueError, match="momentum"):
        Muon([torch.nn.Parameter(torch.randn(3, 4))], momentum=1.0)
    with pytest.raises(TypeError, match="apply_"):
        Muon([torch.nn.Parameter(torch.randn(3, 4))], constraint=object())


def test_sparse_grad_raises():
    p = torch.nn.Parameter(torch.randn(4, 5))
    opt = Muon([p])
    p.grad = torch.randn(4, 5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_grad_raise_skip_ignore(bad):
    # The check runs on the device (no host sync): the bad step is skipped there and
    # "raise" reports it at the next step(), before that step touches anything.
    params = _params([(4, 5), (5, 4)])
    start = clone_params(params)
    g = [torch.randn(4, 5), torch.randn(5, 4)]
    g[1][2, 3] = bad

    opt = Muon(params)
    for p, x in zip(params, g):
        p.grad = x.clone()
    opt.step()
    assert all(torch.equal(p, s) for p, s in zip(params, start))  # skipped: nothing touched
    with pytest.raises(RuntimeError, match=r"non-finite gradient in param group 0 .*\(5, 4\)"):
        opt.step()
    assert all(torch.equal(p, s) for p, s in zip(params, start))  # raised before touching anything
    # the momentum of the skipped step is the fresh (zero) buffer
    assert all(not opt.state[p]["momentum_buffer"].any() for p in params)
    opt = Muon(params)
    opt.step()
    with pytest.raises(RuntimeError, match=r"non-finite gradient in param group 0 .*\(5, 4\)"):
        opt.check_nonfinite()  # at once (one sync)
    opt.check_nonfinite()  # reported once
    assert all(torch.equal(p, s) for p, s in zip(params, start))

    opt = Muon(params, nonfinite="skip")
    opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(p, s) for p, s in zip(params, start))
    assert all(not opt.state[p]["momentum_buffer"].any() for p in params)
    opt.step()  # skip never raises
    assert opt.skipped_steps == 2 and all(torch.equal(p, s) for p, s in zip(params, start))

    opt = Muon(params, nonfinite="ignore")
    opt.step()
    assert torch.isnan(params[1]).all() and torch.isfinite(params[0]).all()


def test_bf16_weights_keep_their_dtype():
    p = torch.nn.Parameter(torch.randn(6, 10, dtype=torch.bfloat16))
    opt = Muon([p], lr=0.05)
    p.grad = torch.randn(6, 10, dtype=torch.bfloat16)
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["momentum_buffer"].dtype == torch.bfloat16


def test_momentum_warmup_through_group():
    # The paper ramps momentum 0.85 -> 0.95; the step reads group["momentum"] every time.
    shapes = [(6, 10)]
    grads = _grads(shapes, 2)
    a = _params(shapes)
    b = clone_params(a)
    oa, ob = Muon(a, momentum=0.85), Muon(b, momentum=0.85)
    _run(oa, a, grads[:1])
    _run(ob, b, grads[:1])
    oa.param_groups[0]["momentum"] = 0.95
    _run(oa, a, grads[1:])
    _run(ob, b, grads[1:])
    assert not torch.equal(a[0], b[0])
    buf_expected = torch.lerp(torch.lerp(torch.zeros(6, 10), grads[0][0], 0.15), grads[1][0], 0.05)
    torch.testing.assert_close(oa.state[a[0]]["momentum_buffer"], buf_expected)


def _unit_spectral(shape, seed=0):
    """A matrix with every singular value 1 (RMS->RMS norm 1 when square)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.linalg.qr(torch.randn(*shape, generator=g, dtype=torch.float64))[0]
                              .float().contiguous())


def test_lr_zero_leaves_capped_weights_exactly_unchanged():
    from lipschitz_ext import constraints as C

    for c in (C.SpectralSoftCap(1.0), C.SpectralHardCap(1.0), PowerNormalize(1.0)):
        p = _unit_spectral((8, 8))
        start = p.detach().clone()
        opt = Muon([p], lr=0.0, weight_decay=0.1, constraint=c)
        for _ in range(3):
            p.grad = torch.randn(8, 8)
            opt.step()
        assert torch.equal(p, start), type(c).__name__
        # momentum still accumulates: the buffer is the EMA of the gradients
        assert opt.state[p]["momentum_buffer"].abs().sum() > 0


@pytest.mark.parametrize("key,value", [("lr", -0.1), ("lr", float("nan")), ("lr", float("inf")),
                                       ("momentum", 1.5), ("weight_decay", -1.0), ("eps", -1.0),
                                       ("update_norm_safety", 0.0), ("lr", "fast")])
def test_bad_hyper_set_later_is_refused_at_step(key, value):
    p = torch.nn.Parameter(torch.randn(4, 5))
    start = p.detach().clone()
    opt = Muon([p], lr=0.05)
    opt.param_groups[0][key] = value
    p.grad = torch.randn(4, 5)
    with pytest.raises((ValueError, TypeError), match=rf"Muon: {key} of param group 0"):
        opt.step()
    assert torch.equal(p, start)


def test_huge_finite_gradients_are_not_called_nonfinite():
    # float32 entries ~4e18 in a 16x16 matrix: the sum of squares (~256 * 1.6e37) overflows
    # float32 but every entry is finite; the step must equal the float64 step of the gradient.
    g = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) * 4e18
    assert torch.isinf(torch._foreach_norm([g])[0])  # the fused 2-norm the check used to take
    for ns_dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-3)):  # bf16: lr 0.05 x 2% of an entry
        p = torch.nn.Parameter(torch.randn(16, 16, generator=torch.Generator().manual_seed(2)) / 4)
        ref = p.detach().double().clone()
        opt = Muon([p], lr=0.05, nesterov=False, momentum=0.0, ns_dtype=ns_dtype)
        p.grad = g.clone()
        opt.step()
        assert opt.skipped_steps == 0
        scale = update_scale_factor("fan_ratio", 16, 16)
        ref -= 0.05 * scale * orthogonalize(g.double() / 4e18, 5, "polar_express", 1e-7)
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach().double(), ref, atol=tol, rtol=tol)


def _stepped(shapes, opt_cls=Muon, **kw):
    params = _params(shapes)
    opt = opt_cls(params, **kw)
    _run(opt, params, _grads(shapes, 2))
    return params, opt


def test_load_state_dict_refuses_foreign_state_at_load_time():
    _, src = _stepped([(6, 10), (3, 4)], constraint=PowerNormalize(0.9))
    sd = src.state_dict()
    dst_params = _params([(6, 10), (4, 3)])
    dst = Muon(dst_params, constraint=PowerNormalize(0.9))
    with pytest.raises(ValueError, match=r"Muon.load_state_dict: state 'momentum_buffer' of parameter 1 "
                                         r"has shape \(3, 4\), the parameter \(4, 3\)"):
        dst.load_state_dict(sd)
    # same shapes but another matrix count for the constraint state
    _, src3 = _stepped([(2, 6, 10)], constraint=PowerNormalize(0.9))
    sd3 = src3.state_dict()
    sd3["state"][0]["momentum_buffer"] = torch.zeros(3, 6, 10)
    with pytest.raises(ValueError, match=r"state 'constraint.u' of parameter 0 has leading dim 2"):
        Muon(_params([(3, 6, 10)]), constraint=PowerNormalize(0.9)).load_state_dict(sd3)
    with pytest.raises(ValueError, match="1 param groups, this optimizer 2"):
        Muon([{"params": _params([(6, 10)])}, {"params": _params([(3, 4)])}]).load_state_dict(sd)
    with pytest.raises(ValueError, match="param group 0 has 2 parameters in the state dict, 1 here"):
        Muon(_params([(6, 10)])).load_state_dict(sd)
    with pytest.raises(ValueError, match="expected a dict with 'state' and 'param_groups'"):
        Muon(_params([(6, 10)])).load_state_dict({"model": 1})


def test_load_state_dict_refuses_adam_state_and_vice_versa():
    from lipschitz_ext.optim import ConstrainedAdam

    shapes = [(6, 10), (3, 4)]
    _, adam = _stepped(shapes, ConstrainedAdam, lr=1e-3)
    muon = Muon(_params(shapes))
    with pytest.raises(ValueError, match=r"Muon.load_state_dict: param group 0 lacks \['coefficients', 'momentum'"):
        muon.load_state_dict(adam.state_dict())
    # groups made to look like Muon's: the per-parameter state still gives it away
    sd = adam.state_dict()
    sd["param_groups"][0] = {**muon.state_dict()["param_groups"][0], "params": sd["param_groups"][0]["params"]}
    with pytest.raises(ValueError, match=r"state of parameter 0 lacks \['momentum_buffer'\]"):
        muon.load_state_dict(sd)
    _, m2 = _stepped(shapes)
    with pytest.raises(ValueError, match=r"ConstrainedAdam.load_state_dict: param group 0 lacks \['betas'"):
        ConstrainedAdam(_params(shapes), lr=1e-3).load_state_dict(m2.state_dict())
    # a saved bad lr is refused at load too
    sd = m2.state_dict()
    sd["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Muon: lr of param group 0 must be >= 0"):
        Muon(_params(shapes)).load_state_dict(sd)


def test_constrained_adam_refuses_bad_lr_set_later():
    from lipschitz_ext.optim import ConstrainedAdam

    p = torch.nn.Parameter(torch.randn(4, 5))
    opt = ConstrainedAdam([p], lr=1e-3)
    opt.param_groups[0]["lr"] = -1e-3
    p.grad = torch.randn(4, 5)
    with pytest.raises(ValueError, match="ConstrainedAdam: lr of param group 0 must be finite and >= 0"):
        opt.step()


def test_constrained_adam_lr_zero_leaves_weights_exactly_unchanged():
    from lipschitz_ext import constraints as C
    from lipschitz_ext.optim import ConstrainedAdam

    p = _unit_spectral((8, 8), seed=2)
    start = p.detach().clone()
    opt = ConstrainedAdam([p], lr=0.0, constraint=C.SpectralSoftCap(1.0))
    for _ in range(3):
        p.grad = torch.randn(8, 8)
        opt.step()
    assert torch.equal(p, start)
