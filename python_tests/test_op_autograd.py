"""Autograd of the ``torch.ops.lipschitz`` ops: every differentiable op has a registered
backward (the vjp of a differentiable recompute of its forward, lipschitz_ext/ops/_recompute.py).

Checked per op, on the named inputs of python_tests/op_samples.py: the recompute equals the
kernel's output (bit for bit on CPU, except the exact caps, recomputed in float64);
float64 gradcheck and gradgradcheck (or a NotImplementedError naming the op for a second
derivative where none is implemented); torch.library.opcheck including its autograd
tests; torch.compile(fullgraph=True) gradients equal to eager ones. PyTorch's autograd
fallback warning ("an autograd kernel was not registered") is an error in this file.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import lipschitz_ext.ops as ops
from op_samples import CASES, DEVICES, FIRST_ORDER_ONLY, as_function, op_of, positional, sample_inputs

pytestmark = pytest.mark.filterwarnings("error:.*autograd kernel was not registered")

# the exact caps are recomputed in float64 (Daleckii-Krein backward): not bit for bit in float32
NOT_BITWISE = {"spectral_hard_cap.eigh": 2e-6, "spectral_hard_cap_eigh_certified": 2e-6, "svd_cap": 2e-6}


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _loss(out) -> torch.Tensor:
    """A scalar that weighs every output entry differently (so no gradient term cancels)."""
    total = 0.0
    for i, o in enumerate(_outputs(out)):
        w = torch.linspace(-1.0, 2.0, o.numel(), dtype=torch.float64).reshape(o.shape) + i
        total = total + (o.double() * w).sum()
    return total


def _grads(f, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    return torch.autograd.grad(_loss(f(*leaves)), leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_recompute_equals_the_kernel(case, dtype):
    op = op_of(case)
    mirror = importlib.import_module("lipschitz_ext.ops._recompute").MIRRORS[op.name()]
    for sample in sample_inputs(case, dtype=dtype, requires_grad=False):
        for got, want in zip(_outputs(mirror(*positional(case, sample))), _outputs(op(**sample))):
            assert got.dtype == want.dtype and got.shape == want.shape
            if not want.is_floating_point():  # a certificate flag: nothing to differentiate
                continue
            tol = NOT_BITWISE.get(case, 0.0) if dtype != torch.bfloat16 else 2e-2
            if dtype == torch.float64 and case in NOT_BITWISE:
                tol = 1e-13
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_float64(case, device):
    for k, sample in enumerate(sample_inputs(case, device)):
        f, tensors = as_function(case, sample)
        assert torch.autograd.gradcheck(f, tensors)
        if k == 0 and case not in FIRST_ORDER_ONLY:
            assert torch.autograd.gradgradcheck(f, tensors)


@pytest.mark.parametrize("name", ops.COEFFICIENT_SETS)
def test_recompute_reads_the_kernels_coefficient_tables(name):
    """The backward's plans come from the C++ ns_plan op: every named set and step count
    (past the end of a table its last triple repeats) gives the kernel's polynomial."""
    R = importlib.import_module("lipschitz_ext.ops._recompute")
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    for steps in (1, 5, 12):
        flat = torch.ops.lipschitz_internal.ns_plan(steps, name, [])
        scale, triples = R.ns_plan(steps, name, [])
        assert [scale, *(c for t in triples for c in t)] == flat and len(triples) == steps
        assert scale == (1.01 if name == "polar_express" else 1.0)
        mirror = R.MIRRORS["lipschitz::ns_polynomial"]
        assert torch.equal(mirror(x, steps, name, []), ops.ns_polynomial(x, steps, name))
    with pytest.raises(RuntimeError, match="ns_plan: argument 'coefficients' must be one of"):
        torch.ops.lipschitz_internal.ns_plan(5, "nope", [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_gradient_finite_at_any_magnitude(case, dtype):
    """Zero, tiny and huge inputs: wherever the output is finite the gradient is too (no
    0 * inf from a branch the forward did not take)."""
    for scale in (0.0, 1e-30, 1e30):
        sample = sample_inputs(case, dtype=dtype, requires_grad=False)[0]
        first = next(iter(sample))  # the matrix argument (W, G or s)
        sample[first] = sample[first] * scale
        f, tensors = as_function(case, sample)
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = _outputs(f(*leaves))
        if all(torch.isfinite(o).all() for o in out):
            for g in torch.autograd.grad(_loss(out), leaves, allow_unused=True):
                assert g is None or torch.isfinite(g).all(), (case, scale)


@pytest.mark.parametrize("case", FIRST_ORDER_ONLY)
def test_second_derivative_of_the_exact_caps_raises(case):
    f, tensors = as_function(case, sample_inputs(case)[0])
    (g,) = torch.autograd.grad(_loss(f(*tensors)), tensors, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward .* is not implemented"):
        g.sum().backward()


@pytest.mark.parametrize("case", ["spectral_hard_cap.eigh", "svd_cap"])
def test_exact_cap_gradient_at_repeated_singular_values(case):
    """2 Q (Q orthogonal: every singular value 2, above the cap) and a rank-deficient matrix:
    eigh's own backward divides by eigenvalue gaps there; the Daleckii-Krein form stays finite."""
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    low_rank = torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 4, dtype=torch.float64)
    method = (lambda W: ops.spectral_hard_cap(W, 1.0, method="eigh")) if case != "svd_cap" else (
        lambda W: ops.svd_cap(W, 1.0))
    for W in (2.0 * Q, low_rank):
        W = W.requires_grad_()
        (g,) = torch.autograd.grad(_loss(method(W)), W)
        assert torch.isfinite(g).all()
        assert torch.autograd.gradcheck(method, (W,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_with_autograd(case, device):
    """opcheck's test_autograd_registration and test_aot_dispatch_dynamic (compiled gradients
    against eager ones) need inputs that require grad: the samples do."""
    for sample in sample_inputs(case, device)[:2]:
        torch.library.opcheck(op_of(case), (), sample)


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_matches_cpu_on_the_samples(case):
    """float64 samples (the CUDA kernels keep float64 in float64): the same values on both devices."""
    op = op_of(case)
    cpu, gpu = sample_inputs(case, "cpu", requires_grad=False), sample_inputs(case, "cuda", requires_grad=False)
    for a, b in zip(cpu, gpu):
        for want, got in zip(_outputs(op(**a)), _outputs(op(**b))):
            assert got.device.type == "cuda" and got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_gradients_equal_eager(case):
    f, tensors = as_function(case, sample_inputs(case, requires_grad=False)[0])
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager, comp = _grads(f, tensors), _grads(compiled, tensors)
    for ge, gc in zip(eager, comp):
        assert gc is not None and torch.isfinite(gc).all()
        torch.testing.assert_close(gc, ge, rtol=1e-12, atol=1e-12)
        assert ge.abs().max() > 0


def test_orthogonalize_times_two_plus_w_compiled_with_inductor():
    """The gradient of orthogonalize(W) * 2 + W used to be all 1.0 compiled (the op's part dropped)."""
    torch.manual_seed(0)
    W0 = torch.randn(3, 3)

    def f(W):
        return ops.orthogonalize(W) * 2 + W

    W = W0.clone().requires_grad_()
    f(W).sum().backward()
    eager = W.grad
    W = W0.clone().requires_grad_()
    torch._dynamo.reset()
    # inductor's caches key the graph, not the op's autograd registration: compile afresh
    with torch._inductor.config.patch(force_disable_caches=True):
        torch.compile(f, fullgraph=True)(W).sum().backward()
    assert W.grad is not None and (eager - 1.0).abs().max() > 0.5
    torch.testing.assert_close(W.grad, eager, rtol=1e-5, atol=1e-5)


def test_public_wrapper_compiled_gradient_equals_eager():
    """spectral_hard_cap(method="polynomial") adds a certified pre-scale and output guard around
    the op (host-side shortcuts eagerly, branch-free under compile): same gradient both ways."""
    torch.manual_seed(0)
    W0 = torch.randn(2, 6, 4, dtype=torch.float64) * 0.6

    def f(W):
        return ops.spectral_hard_cap(W, 0.5, method="polynomial", iters=4)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for ge, gc in zip(_grads(f, (W0,)), _grads(compiled, (W0,))):
        torch.testing.assert_close(gc, ge, rtol=1e-10, atol=1e-10)


def test_fp8_attention_double_backward_raises_naming_the_op():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    (dq,) = torch.autograd.grad(ops.fp8_attention(q, k, v).float().square().sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="lipschitz::fp8_attention_bwd is not differentiable"):
        dq.float().sum().backward()


def test_every_op_taking_a_float_tensor_has_an_autograd_kernel():
    """Every op of the library with a floating tensor argument is covered here or in the fp8
    attention tests; the rest take no tensor (host-side queries) and cannot carry a gradient."""
    covered = {op_of(c).name() for c in CASES} | {
        "lipschitz::fp8_attention", "lipschitz::fp8_attention_fwd", "lipschitz::fp8_attention_bwd"}
    lib = torch.ops.lipschitz
    for name in dir(lib):
        packet = getattr(lib, name)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            takes_tensor = any(isinstance(a.type, torch.TensorType) or "Tensor" in str(a.type)
                               for a in op._schema.arguments)
            assert takes_tensor == (op.name() in covered), op.name()
            if op.name() in covered and op.name() != "lipschitz::fp8_attention":  # that one: composite
                assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd"), op.name()


def test_internal_ops_take_no_tensor():
    """The lipschitz_internal library (host helpers, debug ops) has no user API and no gradient."""
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("lipschitz_internal::")]
    assert {"ns_plan", "hard_cap_polynomial_plan", "gram_ns_restarts", "triangle_tiles", "ns_backend",
            "fp8_attention_bwd_setting", "fp8_attention_bwd_cudnn_fallbacks", "fp8_attention_bwd_path"} == set(names)
    for name in names:
        for a in getattr(torch.ops.lipschitz_internal, name).default._schema.arguments:
            assert "Tensor" not in str(a.type), (name, a.name)
    public = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lipschitz::")}
    assert not public & set(names)


def test_public_api_lists_the_kernels_wrappers_only():
    """ops.__all__ holds the kernels' wrappers (and their result types); host math and
    constants live in ops.host (still importable from ops); the package ships py.typed."""
    import pathlib

    import lipschitz_ext.ops.host as host

    for name in ops.__all__:
        obj = getattr(ops, name)
        assert callable(obj), name
    for name in ("COEFFICIENT_SETS", "E4M3_MAX", "ns_max_gain", "certified_at_most", "spectral_norm_bound",
                 "HARD_CAP_METHODS", "POLYNOMIAL_PRESCALE", "soft_cap_alpha", "fp8_saturation_count", "choices"):
        assert name not in ops.__all__, name
        assert hasattr(ops, name), name
    for name in host.__all__:
        assert name not in ops.__all__ and hasattr(host, name), name
    assert ops.COEFFICIENT_SETS is host.COEFFICIENT_SETS and ops.ns_max_gain is host.ns_max_gain
    assert (pathlib.Path(ops.__file__).parent.parent / "py.typed").is_file()
