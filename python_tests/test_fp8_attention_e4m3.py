"""lipschitz::fp8_attention with e4m3 inputs, per-row accuracy
against float64 attention (item 4), and the choice of the backward kernel (item 3).

The CPU op is the spec: e4m3 inputs quantized with the op's own rule must give
the bf16-input result bit for bit. CUDA tests (skipped without CUDA) hold the
kernels to the same statements."""

import pytest
import torch

from fp8_reference import BF16_U, bad_rows, emulate_fp8_attention, exact_attention, row_max_error
from lipschitz_ext import ops
from lipschitz_ext.ops.fp8_attention import fp8_attention_bwd_path, fp8_attention_e4m3_inputs, quantize_e4m3

SCALES = dict(q_scale=1 / 64, k_scale=0.03, v_scale=2.0**-5)  # one not a power of two
FP8 = torch.float8_e4m3fn
# (B, H, N, d, causal): one query row, one tile, a row past the tile, N not a multiple of 128.
AWKWARD = [(1, 1, 1, 64, True), (1, 2, 1, 128, False), (2, 3, 129, 64, True), (2, 3, 129, 128, False),
           (1, 2, 200, 64, False), (2, 1, 300, 128, True), (1, 2, 383, 64, True)]


def qkv(B, H, N, d, device="cpu", dtype=torch.bfloat16):
    return [torch.randn(B, H, N, d, device=device).to(dtype) for _ in range(3)]


def quantized(q, k, v, scales=SCALES):
    return (quantize_e4m3(q, scales["q_scale"]), quantize_e4m3(k, scales["k_scale"]),
            quantize_e4m3(v, scales["v_scale"]))


def fwd(q, k, v, causal, scale, scales=SCALES, backward="exact"):
    return torch.ops.lipschitz.fp8_attention_fwd.default(
        q, k, v, causal, scale, scales["q_scale"], scales["k_scale"], scales["v_scale"], backward)


# ------------------------------------------------------------ e4m3 inputs ----

def test_quantize_e4m3_is_the_kernels_rule():
    x = torch.randn(4, 300) * 3
    x[0, :4] = torch.tensor([1e6, -1e6, 448 * 0.03 * 1.01, -0.0])  # saturate both ways, a signed zero
    got = quantize_e4m3(x, 0.03)
    assert got.dtype == FP8 and got.shape == x.shape
    inv = float(torch.tensor(1 / 0.03, dtype=torch.float32))
    want = (x * inv).clamp(-448, 448).to(FP8)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert got[0, :3].float().tolist() == [448.0, -448.0, 448.0]  # clamped, never NaN
    with pytest.raises(ValueError, match="argument 'scale' must be finite and > 0"):
        quantize_e4m3(x, 0.0)
    with pytest.raises(TypeError, match="argument 'x' must be a floating tensor"):
        quantize_e4m3(torch.ones(3, dtype=torch.long), 1.0)


@pytest.mark.parametrize("B,H,N,d,causal", AWKWARD)
def test_e4m3_inputs_equal_quantized_bf16_inputs(B, H, N, d, causal):
    q, k, v = qkv(B, H, N, d)
    out, lse = fwd(q, k, v, causal, 1 / d)
    out8, lse8 = fwd(*quantized(q, k, v), causal, 1 / d)
    assert out8.dtype == torch.bfloat16 and lse8.dtype == torch.float32
    assert torch.equal(out8, out) and torch.equal(lse8, lse)
    # The independent reference, given the same e4m3 tensors.
    want, want_lse = emulate_fp8_attention(*quantized(q, k, v), causal, 1 / d, **SCALES)
    torch.testing.assert_close(out8.float(), want.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse8, want_lse, atol=1e-5, rtol=0)


def test_e4m3_inputs_from_float32_match_the_reference_quantizing_float32():
    # Quantizing float32 directly (no bf16 rounding first): the spec is the same rule.
    q, k, v = qkv(2, 2, 150, 64, dtype=torch.float32)
    out, lse = fwd(*quantized(q, k, v), True, 1 / 64)
    want, want_lse = emulate_fp8_attention(q, k, v, True, 1 / 64, **SCALES)
    torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=0)
    assert len(bad_rows(out, q, k, v, True, 1 / 64, **SCALES)) == 0


def test_e4m3_inputs_non_contiguous_and_the_public_op():
    base = [torch.randn(2, 90, 3, 64).bfloat16() for _ in range(3)]  # [B, N, H, d] memory
    q, k, v = (x.transpose(1, 2) for x in base)
    q8, k8, v8 = quantized(q, k, v)
    assert not q8.is_contiguous()
    got = ops.fp8_attention(q8, k8, v8, causal=False, **SCALES)
    assert torch.equal(got, ops.fp8_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=False, **SCALES))
    assert torch.equal(got, ops.fp8_attention(q8.contiguous(), k8.contiguous(), v8.contiguous(), causal=False,
                                              **SCALES))


def test_e4m3_input_argument_errors():
    q, k, v = qkv(1, 2, 16, 64)
    q8, k8, v8 = quantized(q, k, v)
    with pytest.raises(RuntimeError, match="argument 'k' must be float8_e4m3fn like 'q'"):
        ops.fp8_attention(q8, k, v8)
    with pytest.raises(RuntimeError, match="argument 'v' must be bfloat16 like 'q'"):
        ops.fp8_attention(q, k, v8)
    with pytest.raises(RuntimeError, match="argument 'q' must be bfloat16 or float8_e4m3fn"):
        ops.fp8_attention(q.to(torch.float8_e5m2), k.to(torch.float8_e5m2), v.to(torch.float8_e5m2))
    with pytest.raises(RuntimeError, match="must have the same shape"):
        ops.fp8_attention(q8, k8[:, :, :8], v8)
    with pytest.raises(RuntimeError, match="argument 'k' must have rank 4"):
        ops.fp8_attention(q8, k8[0], v8)
    with pytest.raises(RuntimeError, match="head dim .* must be 64 or 128"):
        a = quantize_e4m3(torch.randn(1, 2, 16, 32), 1.0)
        ops.fp8_attention(a, a, a)
    with pytest.raises(RuntimeError, match="'v_scale' must be finite and > 0"):
        ops.fp8_attention(q8, k8, v8, v_scale=float("inf"))
    # e4m3 tensors carry no useful gradient: refused by name, in the wrapper and the op.
    with pytest.raises(ValueError, match="argument 'v' is float8_e4m3fn and requires grad"):
        ops.fp8_attention(q8, k8, v8.clone().requires_grad_())
    out = torch.ops.lipschitz.fp8_attention.default(q8.clone().requires_grad_(), k8, v8, True, None,
                                                    1.0, 1.0, 1.0, "exact")
    with pytest.raises(RuntimeError, match="e4m3 inputs are not differentiable"):
        out.float().sum().backward()
    with pytest.raises(RuntimeError, match="arguments 'q', 'k', 'v' must be bfloat16: the gradient"):
        torch.ops.lipschitz.fp8_attention_bwd(q, q8, k8, v8, None, None, True, 0.1)
    with pytest.raises(TypeError, match="argument 'k' must be a bfloat16 tensor"):
        fp8_attention_e4m3_inputs(q, k.float(), v)
    with pytest.raises(ValueError, match="argument 'q' must have rank 4"):
        fp8_attention_e4m3_inputs(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="argument 'k_scale' must be finite and > 0"):
        fp8_attention_e4m3_inputs(q, k, v, k_scale=-1.0)


def test_opcheck_e4m3_inputs():
    q, k, v = qkv(1, 2, 33, 64)
    q8, k8, v8 = quantized(q, k, v)
    # opcheck's test_schema compares inputs with torch.allclose, which torch does not
    # implement for float8 ("mul_cpu_reduced_float"): the other three utilities run,
    # and what test_schema would show (inputs untouched, outputs fresh) is checked here.
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    fwd_op = torch.ops.lipschitz.fp8_attention_fwd.default
    torch.library.opcheck(fwd_op, (q8, k8, v8, True, 1 / 64, *SCALES.values()), test_utils=utils)
    torch.library.opcheck(fwd_op, (q8, k8, v8, False, 0.1, *SCALES.values(), "saved"), test_utils=utils)
    torch.library.opcheck(torch.ops.lipschitz.fp8_attention.default,
                          (q8, k8, v8, True, None, *SCALES.values(), "exact"), test_utils=utils)
    before = [x.view(torch.uint8).clone() for x in (q8, k8, v8)]
    out, lse = fwd_op(q8, k8, v8, True, 1 / 64, *SCALES.values())
    assert all(torch.equal(x.view(torch.uint8), b) for x, b in zip((q8, k8, v8), before))
    ptrs = {x.untyped_storage().data_ptr() for x in (q8, k8, v8)}
    assert out.untyped_storage().data_ptr() not in ptrs and lse.untyped_storage().data_ptr() not in ptrs
    with torch.device("meta"):
        m = torch.empty(2, 3, 40, 128, dtype=FP8)
    out, lse = torch.ops.lipschitz.fp8_attention_fwd.default(m, m, m, True, 0.1, 1.0, 1.0, 1.0)
    assert (out.dtype, out.shape, lse.dtype, lse.shape) == (torch.bfloat16, m.shape, torch.float32, (2, 3, 40))


@pytest.mark.parametrize("backward", ["exact", "saved"])
@pytest.mark.parametrize("causal", [True, False])
def test_e4m3_inputs_path_equals_bf16_path_with_gradients(causal, backward):
    # The model's fp8-input path against today's: same output and gradients, bit for bit.
    q, k, v = qkv(2, 2, 150, 64)
    old = [x.clone().requires_grad_() for x in (q, k, v)]
    new = [x.clone().requires_grad_() for x in (q, k, v)]
    out_old = ops.fp8_attention(*old, causal=causal, backward=backward, **SCALES)
    out_new = fp8_attention_e4m3_inputs(*new, causal=causal, backward=backward, **SCALES)
    assert torch.equal(out_old, out_new)
    g = torch.randn_like(out_old)
    out_old.backward(g)
    out_new.backward(g)
    for a, b in zip(old, new):
        assert torch.equal(a.grad, b.grad)


def test_e4m3_inputs_path_under_torch_compile():
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 40, 64))
    fn = torch.compile(lambda a, b, c: fp8_attention_e4m3_inputs(a, b, c, q_scale=0.5), fullgraph=True,
                       backend="eager")
    out = fn(q, k, v)
    assert torch.equal(out, ops.fp8_attention(q.detach(), k.detach(), v.detach(), q_scale=0.5))
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()


# ---------------------------------------------------------- per-row error ----

@pytest.mark.parametrize("B,H,N,d,causal", AWKWARD)
def test_every_row_within_fa3_bound(B, H, N, d, causal):
    q, k, v = qkv(B, H, N, d)
    out = ops.fp8_attention(q, k, v, causal=causal, **SCALES)
    rows = bad_rows(out, q, k, v, causal, 1 / d, **SCALES)
    assert len(rows) == 0, f"rows {rows.tolist()[:10]} exceed the per-row bound"


def test_every_row_within_fa3_bound_non_contiguous_and_e4m3():
    base = [torch.randn(2, 257, 3, 128).bfloat16() for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in base)
    for causal in (True, False):
        out = ops.fp8_attention(*quantized(q, k, v), causal=causal, **SCALES)
        assert len(bad_rows(out, q, k, v, causal, 1 / 128, **SCALES)) == 0


def test_per_row_check_catches_a_single_wrong_row():
    # A mask off by one in one row (row 1 also sees key 2) changes 64 of 115200
    # entries: a fraction-of-entries test passes it, the per-row bound does not.
    B, H, N, d = 2, 3, 300, 64
    q, k, v = qkv(B, H, N, d)
    out = ops.fp8_attention(q, k, v, causal=True, **SCALES)
    wrong = out.clone()
    wrong[1, 2, 1] = exact_attention(q[1, 2, :3], k[1, 2, :3], v[1, 2, :3], False, 1 / d)[1].bfloat16()
    changed = (wrong.float() - out.float()).abs() > 1e-2 + 1e-2 * out.float().abs()
    assert changed.float().mean() < 0.005  # what the CUDA tests' fraction check tolerates
    assert bad_rows(wrong, q, k, v, True, 1 / d, **SCALES).tolist() == [[1, 2, 1]]
    assert len(bad_rows(out, q, k, v, True, 1 / d, **SCALES)) == 0


def test_row_error_helpers():
    ref = torch.zeros(2, 3, 4, dtype=torch.float64)
    out = ref.clone()
    out[1, 2, 3] = -0.5
    assert row_max_error(out, ref).tolist() == [[0, 0, 0], [0, 0, 0.5]]
    assert BF16_U == 2.0**-8


# ---------------------------------------------------- backward kernel choice ----

def test_backward_path_rule():
    # (setting, compute major, cuDNN version, cudnn_sdp_enabled, empty) -> path
    cases = [
        (("flash", 9, 90100, True, False), "flash"),
        (("", 9, 90100, True, False), "flash"),
        (("cudnn", 9, 90100, True, False), "cudnn"),
        (("cudnn", 8, 90000, True, False), "cudnn"),
        (("cudnn", 9, 8907, True, False), "flash"),    # cuDNN 8.9: too old
        (("cudnn", 9, 0, True, False), "flash"),       # torch without cuDNN
        (("cudnn", 9, 90100, False, False), "flash"),  # torch.backends.cuda.enable_cudnn_sdp(False)
        (("cudnn", 7, 90100, True, False), "math"),    # pre-Ampere: no FlashAttention either
        (("flash", 0, 0, True, False), "math"),        # CPU
        (("cudnn", 9, 90100, True, True), "math"),     # empty batch
    ]
    for args, want in cases:
        assert torch.ops.lipschitz.fp8_attention_bwd_path(*args) == want, args
    assert fp8_attention_bwd_path("cudnn", 9, 90100, True) == "cudnn"
    with pytest.raises(RuntimeError, match="LIPSCHITZ_FP8_ATTN_BWD must be 'flash' or 'cudnn', got 'cuDNN'"):
        fp8_attention_bwd_path("cuDNN", 9, 90100, True)


def test_backward_setting_from_environment(monkeypatch):
    monkeypatch.delenv("LIPSCHITZ_FP8_ATTN_BWD", raising=False)
    assert torch.ops.lipschitz.fp8_attention_bwd_setting() == "flash"
    monkeypatch.setenv("LIPSCHITZ_FP8_ATTN_BWD", "cudnn")
    assert torch.ops.lipschitz.fp8_attention_bwd_setting() == "cudnn"
    if not torch.cuda.is_available():
        assert fp8_attention_bwd_path() == "math"
    # The CPU backward is the math one whatever the setting.
    q, k, v = qkv(1, 2, 70, 64)
    grads = []
    for setting in ("cudnn", "flash"):
        monkeypatch.setenv("LIPSCHITZ_FP8_ATTN_BWD", setting)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ops.fp8_attention(*leaves, backward="saved", **SCALES).float().sum().backward()
        grads.append([x.grad for x in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    monkeypatch.setenv("LIPSCHITZ_FP8_ATTN_BWD", "fast")
    with pytest.raises(RuntimeError, match="LIPSCHITZ_FP8_ATTN_BWD must be 'flash' or 'cudnn', got 'fast'"):
        torch.ops.lipschitz.fp8_attention_bwd_setting()
    assert torch.ops.lipschitz.fp8_attention_bwd_cudnn_fallbacks() == 0  # only CUDA calls can fall back


# ---------------------------------------------------------------- CUDA ----

@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("N", [1, 63, 128, 129, 300, 1000])
def test_cuda_e4m3_inputs_equal_bf16_inputs(N, d):
    # Same e4m3 bytes reach the same kernel: bit for bit, also against the torch quantization.
    q, k, v = qkv(2, 3, N, d, device="cuda")
    for causal in (True, False):
        out, lse = fwd(q, k, v, causal, 1 / d)
        out8, lse8 = fwd(*quantized(q, k, v), causal, 1 / d)
        assert torch.equal(out8, out) and torch.equal(lse8, lse)
        q8 = quantized(q, k, v)[0]
        assert torch.equal(q8.cpu().view(torch.uint8), quantized(q.cpu(), k.cpu(), v.cpu())[0].view(torch.uint8))


@pytest.mark.cuda
@pytest.mark.parametrize("B,H,N,d,causal", AWKWARD + [(1, 4, 2048, 128, True), (1, 4, 2048, 64, False)])
def test_cuda_every_row_within_fa3_bound(B, H, N, d, causal):
    q, k, v = qkv(B, H, N, d)
    for inputs in ((q, k, v), quantized(q, k, v)):
        out = ops.fp8_attention(*(x.cuda() for x in inputs), causal=causal, **SCALES).cpu()
        rows = bad_rows(out, q, k, v, causal, 1 / d, **SCALES)
        assert len(rows) == 0, f"rows {rows.tolist()[:10]} exceed the per-row bound"


@pytest.mark.cuda
def test_cuda_every_row_non_contiguous_e4m3():
    base = [torch.randn(2, 257, 3, 128).bfloat16() for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in base)
    q8, k8, v8 = (x.cuda() for x in quantized(q, k, v))
    assert not q8.is_contiguous()
    for causal in (True, False):
        out = ops.fp8_attention(q8, k8, v8, causal=causal, **SCALES).cpu()
        assert len(bad_rows(out, q, k, v, causal, 1 / 128, **SCALES)) == 0
        # storage offset: not 16-byte aligned rows' base, copied to an aligned one
        odd = torch.empty(q8.numel() + 1, dtype=FP8, device="cuda")[1:].view(q8.shape)
        odd.copy_(q8)
        assert torch.equal(ops.fp8_attention(odd, k8, v8, causal=causal, **SCALES).cpu(), out)


@pytest.mark.cuda
@pytest.mark.parametrize("backward", ["exact", "saved"])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_cudnn_backward_matches_flash(d, backward, monkeypatch):
    # LIPSCHITZ_FP8_ATTN_BWD=cudnn against the default FlashAttention-2 backward and float64.
    monkeypatch.setenv("LIPSCHITZ_FP8_ATTN_BWD", "cudnn")
    assert fp8_attention_bwd_path() == "cudnn"  # torch's CUDA wheels ship cuDNN 9
    q, k, v = qkv(2, 2, 333, d, device="cuda")
    for causal in (True, False):
        grads = {}
        for setting in ("cudnn", "flash"):
            monkeypatch.setenv("LIPSCHITZ_FP8_ATTN_BWD", setting)
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out = ops.fp8_attention(*leaves, causal=causal, backward=backward, **SCALES)
            g = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(5), device="cuda")
            fallbacks = torch.ops.lipschitz.fp8_attention_bwd_cudnn_fallbacks()
            out.backward(g.bfloat16())
            assert torch.ops.lipschitz.fp8_attention_bwd_cudnn_fallbacks() == fallbacks, "cuDNN fell back to FA2"
            grads[setting] = [x.grad.double() for x in leaves]
        for a, b in zip(grads["cudnn"], grads["flash"]):
            torch.testing.assert_close(a, b, atol=5e-3 * b.abs().max().item(), rtol=2e-2)
