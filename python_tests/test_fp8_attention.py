"""lipschitz::fp8_attention against float64 attention and an independent fp8
emulation (python_tests/fp8_reference.py); e4m3 inputs; per-row accuracy against
float64 attention; the choice of the backward kernel (the backward_kernel argument
and LIPSCHITZ_FP8_ATTN_BWD behind its default); the "fp8" attention backend of
LipschitzAttention and its certified static scales.

The CPU op is the spec: e4m3 inputs quantized with the op's own rule must give
the bf16-input result bit for bit. CUDA tests (skipped without CUDA) compare the
kernels with the CPU emulation and with bf16 SDPA, and hold them to the same
statements."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lipschitz_ext
from fp8_reference import BF16_U, bad_rows, emulate_fp8_attention, exact_attention, row_max_error, sqnr_db
from lipschitz_ext import ops
from lipschitz_ext.certify import configure_fp8_attention
from lipschitz_ext.nn import FP8_BACKEND, Fp8AttentionBackend, GPTConfig, LipschitzGPT, fp8_backend_of
from lipschitz_ext.nn.fp8_scales import fp8_entry_bound, fp8_scales_from_certificate, fp8_static_scales
from lipschitz_ext.ops.fp8_attention import fp8_attention_bwd_path, fp8_attention_e4m3_inputs, quantize_e4m3
from op_samples import DEVICES, op_of, sample_inputs

# Awkward sizes: a single key, below/above the 64-row query block and the 128-key tile.
SEQ_LENS = [1, 63, 130, 300]
SCALES = dict(q_scale=1 / 64, k_scale=0.03, v_scale=2.0**-5)  # one not a power of two


FP8 = torch.float8_e4m3fn
# (B, H, N, d, causal): one query row, one tile, a row past the tile, N not a multiple of 128.
AWKWARD = [(1, 1, 1, 64, True), (1, 2, 1, 128, False), (2, 3, 129, 64, True), (2, 3, 129, 128, False),
           (1, 2, 200, 64, False), (2, 1, 300, 128, True), (1, 2, 383, 64, True)]


def qkv(B, H, N, d, device="cpu", std=1.0, dtype=torch.bfloat16):
    return [(std * torch.randn(B, H, N, d, device=device)).to(dtype) for _ in range(3)]


def fwd(q, k, v, causal, scale, **scales):
    s = dict(q_scale=1.0, k_scale=1.0, v_scale=1.0)
    s.update(scales)
    return torch.ops.lipschitz.fp8_attention_fwd.default(
        q, k, v, causal, scale, s["q_scale"], s["k_scale"], s["v_scale"]
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("N", SEQ_LENS)
def test_matches_emulation_and_exact_attention(N, d, causal):
    q, k, v = qkv(1, 2, N, d)
    out = ops.fp8_attention(q, k, v, causal=causal, **SCALES)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    emulated, _ = emulate_fp8_attention(q, k, v, causal, 1 / d, **SCALES)
    # Same rounding steps: equal up to float32 summation order (an fp8 tie may
    # flip), i.e. a bf16 ulp of the output here and there.
    torch.testing.assert_close(out.float(), emulated.float(), atol=1e-2, rtol=1e-2)
    ref = exact_attention(q, k, v, causal, 1 / d)
    assert sqnr_db(out, ref) >= 25.0
    # FA3's bar against the ideal fp8 emulation (row max known before P's cast).
    ideal, _ = emulate_fp8_attention(q, k, v, causal, 1 / d, tile=None, **SCALES)
    err, err_ideal = (out.double() - ref).abs().max(), (ideal.double() - ref).abs().max()
    assert err <= 2 * err_ideal + 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_sqnr_at_n1024_and_report_longer(causal):
    d = 64
    for N, floor in [(1024, 25.0), (2048, 22.0)]:
        q, k, v = qkv(1, 2, N, d)
        out = ops.fp8_attention(q, k, v, causal=causal)
        got = sqnr_db(out, exact_attention(q, k, v, causal, 1 / d))
        print(f"fp8_attention SQNR N={N} causal={causal}: {got:.1f} dB")
        assert got >= floor


def test_lse_is_the_log_sum_exp():
    q, k, v = qkv(2, 2, 200, 64)
    for causal in (True, False):
        _, lse = fwd(q, k, v, causal, 0.125, **SCALES)
        assert lse.shape == (2, 2, 200) and lse.dtype == torch.float32
        q8, k8 = (
            (x.float() * float(torch.tensor(1 / s, dtype=torch.float32))).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s
            for x, s in ((q, SCALES["q_scale"]), (k, SCALES["k_scale"]))
        )
        s = (q8 @ k8.mT) * 0.125
        if causal:
            s = s.masked_fill(torch.ones(200, 200, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
        _, lse_emulated = emulate_fp8_attention(q, k, v, causal, 0.125, **SCALES)
        torch.testing.assert_close(lse, lse_emulated, atol=1e-5, rtol=0)


def test_softmax_scale_default_is_one_over_d():
    q, k, v = qkv(1, 2, 70, 128)
    torch.testing.assert_close(ops.fp8_attention(q, k, v), ops.fp8_attention(q, k, v, softmax_scale=1 / 128), atol=0, rtol=0)
    # Sharper than 1/d: 1/sqrt(d), and 0.3 (peaked rows, where q/k rounding
    # moves the winning key's weight most).
    for scale in (1 / math.sqrt(128), 0.3):
        sharp = ops.fp8_attention(q, k, v, causal=False, softmax_scale=scale)
        ref = exact_attention(q, k, v, False, scale)
        ideal, _ = emulate_fp8_attention(q, k, v, False, scale, tile=None)
        assert (sharp.double() - ref).abs().max() <= 2 * (ideal.double() - ref).abs().max() + 1e-3
        assert sqnr_db(sharp, ref) >= (25.0 if scale < 0.1 else 20.0)


def test_non_contiguous_and_batched():
    base = [torch.randn(2, 90, 3, 64).bfloat16() for _ in range(3)]  # [B, N, H, d] memory
    q, k, v = (x.transpose(1, 2) for x in base)
    assert not q.is_contiguous()
    got = ops.fp8_attention(q, k, v, **SCALES)
    want = ops.fp8_attention(q.contiguous(), k.contiguous(), v.contiguous(), **SCALES)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    one = ops.fp8_attention(q[1:2, 2:3], k[1:2, 2:3], v[1:2, 2:3], **SCALES)
    torch.testing.assert_close(got[1:2, 2:3], one, atol=0, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128])
def test_gradients_match_float64_autograd(d, causal):
    N = 150
    q, k, v = qkv(1, 2, N, d)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = ops.fp8_attention(*leaves, causal=causal, **SCALES)
    g = torch.randn_like(out)
    out.backward(g)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    exact_attention(*ref_leaves, causal, 1 / d).backward(g.double())
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == torch.bfloat16 and got.grad.shape == got.shape
        # bf16 tolerance: the gradient is computed in float32 and rounded once.
        torch.testing.assert_close(got.grad.double(), want.grad, atol=2e-3 * want.grad.abs().max().item(), rtol=1e-2)


def flash_backward_f64(q, k, v, g, out, lse, causal, scale):
    """FlashAttention's backward formulas in float64 on given (out, lse)."""
    q, k, v, g, out = (x.double() for x in (q, k, v, g, out))
    s = (q @ k.mT) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.exp(s - lse.double().unsqueeze(-1))
    ds = p * (g @ v.mT - (g * out).sum(-1, keepdim=True))
    return ds @ k * scale, ds.mT @ q * scale, p.mT @ g


@pytest.mark.parametrize("causal", [True, False])
def test_saved_statistics_backward(causal):
    d, N = 64, 150
    q, k, v = qkv(1, 2, N, d)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = ops.fp8_attention(*leaves, causal=causal, backward="saved", **SCALES)
    g = torch.randn_like(out)
    out.backward(g)
    _, lse = fwd(q, k, v, causal, 1 / d, **SCALES)
    want = flash_backward_f64(q, k, v, g, out.detach(), lse, causal, 1 / d)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    exact_attention(*ref_leaves, causal, 1 / d).backward(g.double())
    for got, w, ref in zip(leaves, want, ref_leaves):
        # The formulas on the fp8 statistics, to bf16 rounding ...
        torch.testing.assert_close(got.grad.double(), w, atol=2e-3 * w.abs().max().item(), rtol=1e-2)
        # ... which sit within fp8-sized error of exact attention's gradient.
        assert (got.grad.double() - ref.grad).abs().max() <= 0.15 * ref.grad.abs().max()


def test_single_key_gradient_is_exactly_zero_for_q_and_k():
    # softmax over one key is constant: exact attention's dq, dk vanish (an fp8
    # statistic in the backward would not give zero here).
    q, k, v = (x.requires_grad_() for x in qkv(1, 1, 1, 64))
    ops.fp8_attention(q, k, v).sum().backward()
    assert q.grad.abs().max() == 0 and k.grad.abs().max() == 0
    torch.testing.assert_close(v.grad.float(), torch.ones_like(v.grad.float()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["fp8_attention", "fp8_attention_fwd", "fp8_attention_bwd"])
def test_opcheck(case, device):
    """The named samples of python_tests/op_samples.py, with and without inputs that require grad."""
    for requires_grad in (False, True):
        for sample in sample_inputs(case, device, requires_grad=requires_grad):
            torch.library.opcheck(op_of(case), (), sample)


def test_torch_compile_fullgraph():
    q, k, v = qkv(1, 2, 40, 64)
    fn = torch.compile(lambda a, b, c: ops.fp8_attention(a, b, c, q_scale=0.5), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(q, k, v), ops.fp8_attention(q, k, v, q_scale=0.5), atol=0, rtol=0)


def test_saturation_counter_and_clamping():
    q, k, v = qkv(1, 2, 50, 64)
    assert ops.fp8_saturation_count(q, k, v) == 0
    q_scale = 1 / 256  # |q| > 1.75 saturates
    want = int((q.float() * 256).abs().gt(448).sum())
    assert want > 0
    assert ops.fp8_saturation_count(q, k, v, q_scale=q_scale) == want
    # Saturated entries are clamped to +-448 (not NaN, unlike a raw e4m3 cast).
    out = ops.fp8_attention(q, k, v, q_scale=q_scale)
    assert torch.isfinite(out.float()).all()
    emulated, _ = emulate_fp8_attention(q, k, v, True, 1 / 64, q_scale=q_scale)
    torch.testing.assert_close(out.float(), emulated.float(), atol=1e-2, rtol=1e-2)
    bad = q.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert ops.fp8_saturation_count(bad, k, v) == 1
    with pytest.raises(ValueError, match="scales must be finite and > 0"):
        ops.fp8_saturation_count(q, k, v, v_scale=0.0)


def test_static_scales_never_saturate_on_worst_case_inputs():
    d_model, d_head, a = 128, 64, 1.7
    W = [torch.randn(2 * d_head, d_model, dtype=torch.float64) * s for s in (0.05, 0.2, 1.3)]
    norms = [float(torch.linalg.matrix_norm(w, ord=2)) for w in W]
    scales = fp8_static_scales(a, *norms, d_model=d_model, d_head=d_head)
    for s in scales:
        assert s > 0 and math.frexp(s)[0] == 0.5  # a power of two
    for w, norm, s in zip(W, norms, scales):
        bound = fp8_entry_bound(a, norm, d_model)
        assert bound / s <= 448.0
        assert bound / s > 448.0 / 2 / 1.1  # the smallest such power of two (up to the margin)
        # Worst cases: x along the top right singular vector, and along each row.
        _, _, Vh = torch.linalg.svd(w)
        rows = w / w.norm(dim=1, keepdim=True)
        x = torch.cat([Vh[:1], rows]) * a * math.sqrt(d_model)  # RMS(x_t) == a
        assert torch.allclose(x.pow(2).mean(1).sqrt(), torch.full((x.shape[0],), a, dtype=torch.float64))
        y = (x @ w.T).bfloat16()
        assert y.double().abs().max() <= bound * (1 + 2**-7)
        assert ops.fp8_saturation_count(y, y, y, s, s, s) == 0


def test_static_scales_argument_errors():
    with pytest.raises(ValueError, match="d_head"):
        fp8_static_scales(1.0, 1.0, 1.0, 1.0, d_model=64, d_head=32)
    with pytest.raises(ValueError, match="activation_bound"):
        fp8_static_scales(float("inf"), 1.0, 1.0, 1.0, d_model=64, d_head=64)
    with pytest.raises(ValueError, match="weight_norm"):
        fp8_static_scales(1.0, -1.0, 1.0, 1.0, d_model=64, d_head=64)
    assert fp8_static_scales(1.0, 0.0, 1.0, 1.0, d_model=64, d_head=64)[0] > 0


def test_argument_errors():
    q, k, v = qkv(1, 2, 16, 64)
    with pytest.raises(RuntimeError, match="argument 'q' must be bfloat16"):
        ops.fp8_attention(q.float(), k, v)
    with pytest.raises(RuntimeError, match="argument 'v' must be bfloat16"):
        ops.fp8_attention(q, k, v.half())
    with pytest.raises(RuntimeError, match="argument 'q' must have rank 4"):
        ops.fp8_attention(q[0], k[0], v[0])
    with pytest.raises(RuntimeError, match="argument 'k' must have rank 4"):
        ops.fp8_attention(q, k[0], v)
    with pytest.raises(RuntimeError, match="head dim .* must be 64 or 128"):
        a = torch.randn(1, 2, 16, 32).bfloat16()
        ops.fp8_attention(a, a, a)
    with pytest.raises(RuntimeError, match="must have the same shape"):
        ops.fp8_attention(q, k[:, :, :8], v)
    with pytest.raises(RuntimeError, match="must have the same shape"):
        ops.fp8_attention(q, k, v[:, :1])
    with pytest.raises(RuntimeError, match="'q_scale' must be finite and > 0"):
        ops.fp8_attention(q, k, v, q_scale=0.0)
    with pytest.raises(RuntimeError, match="'softmax_scale' must be finite and > 0"):
        ops.fp8_attention(q, k, v, softmax_scale=float("nan"))
    with pytest.raises(RuntimeError, match="sequence length"):
        e = torch.randn(1, 2, 0, 64).bfloat16()
        ops.fp8_attention(e, e, e)
    with pytest.raises(RuntimeError, match="argument 'backward' must be"):
        ops.fp8_attention(q, k, v, backward="fast")
    with pytest.raises(RuntimeError, match="argument 'grad_out' must match"):
        torch.ops.lipschitz.fp8_attention_bwd(q[:, :1], q, k, v, None, None, True, 0.1)
    out, lse = fwd(q, k, v, True, 0.1)
    with pytest.raises(RuntimeError, match="both 'out' and 'lse' or neither"):
        torch.ops.lipschitz.fp8_attention_bwd(q, q, k, v, out, None, True, 0.1)
    with pytest.raises(RuntimeError, match="argument 'lse' must be float32"):
        torch.ops.lipschitz.fp8_attention_bwd(q, q, k, v, out, lse.double(), True, 0.1)


# ---------------------------------------------------------------- CUDA ----

CUDA_SEQ_LENS = [1, 63, 64, 65, 127, 128, 129, 200, 1000, 2048]

# The CPU emulation rounds exactly like the kernel (inputs to e4m3, P to e4m3 after
# clamping) but cannot reproduce the tensor cores' fp32 accumulation: Hopper's fp8
# wgmma adds partial products with a reduced-precision accumulator (about 14 mantissa
# bits, as DeepSeek-V3's report measures) in its own order. Logits then differ by
# ~1e-4 relative (log-sum-exp by up to 2e-3 measured on an H100 at logits ~ 10), and a
# logit that moves across an e4m3 rounding boundary of P (3 mantissa bits) changes
# that P entry by 1/8. So kernel-vs-emulation is compared elementwise on all but a
# tiny fraction of entries; the accuracy criterion proper is FlashAttention-3's,
# against exact attention: max|out - ref| <= 2 max|out_emulated - ref| + atol.
LSE_TOL = dict(atol=5e-3, rtol=5e-4)


def assert_matches_emulation(out, want, atol=1e-2, rtol=1e-2, min_fraction=0.995):
    out, want = out.float(), want.float()
    close = (out - want).abs() <= atol + rtol * want.abs()
    assert close.float().mean().item() >= min_fraction, (
        f"{(~close).sum().item()} of {close.numel()} entries differ from the emulation; "
        f"max |diff| {(out - want).abs().max().item():.3g}")


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("N", CUDA_SEQ_LENS)
def test_cuda_kernel_matches_cpu_emulation(N, d, causal):
    q, k, v = qkv(2, 3, N, d)
    out, lse = fwd(q.cuda(), k.cuda(), v.cuda(), causal, 1 / d, **SCALES)
    want, want_lse = fwd(q, k, v, causal, 1 / d, **SCALES)
    assert_matches_emulation(out.cpu(), want)
    torch.testing.assert_close(lse.cpu(), want_lse, **LSE_TOL)
    ref = exact_attention(q, k, v, causal, 1 / d)
    err, err_emulated = (out.cpu().double() - ref).abs().max(), (want.double() - ref).abs().max()
    assert err <= 2 * err_emulated + 1e-3
    if N <= 1024:
        assert sqnr_db(out.cpu(), ref) >= 25.0


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_against_sdpa_and_long_sequences(d):
    for N, causal in [(4096, True), (4096, False), (777, False)]:
        q, k, v = qkv(1, 4, N, d, device="cuda")
        out = ops.fp8_attention(q, k, v, causal=causal)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1 / d)
        got = sqnr_db(out.float(), sdpa.float())
        print(f"fp8 vs bf16 SDPA: d={d} N={N} causal={causal}: {got:.1f} dB")
        assert got >= 22.0


@pytest.mark.cuda
def test_cuda_non_contiguous_and_large_values():
    base = [4 * torch.randn(2, 300, 3, 128, device="cuda").bfloat16() for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in base)
    out = ops.fp8_attention(q, k, v, causal=False, q_scale=1 / 32, k_scale=1 / 32, v_scale=1 / 16)
    want = ops.fp8_attention(q.cpu(), k.cpu(), v.cpu(), causal=False, q_scale=1 / 32, k_scale=1 / 32, v_scale=1 / 16)
    assert_matches_emulation(out.cpu(), want, atol=2e-2)
    ref = exact_attention(q.cpu(), k.cpu(), v.cpu(), False, 1 / 128)
    err, err_emulated = (out.cpu().double() - ref).abs().max(), (want.double() - ref).abs().max()
    assert err <= 2 * err_emulated + 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("backward", ["exact", "saved"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_gradients(d, causal, backward):
    q, k, v = qkv(2, 2, 333, d)
    leaves = [x.cuda().requires_grad_() for x in (q, k, v)]
    out = ops.fp8_attention(*leaves, causal=causal, backward=backward, **SCALES)
    g = torch.randn_like(out)
    out.backward(g)
    if backward == "exact":
        ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
        exact_attention(*ref_leaves, causal, 1 / d).backward(g.cpu().double())
        want = [x.grad for x in ref_leaves]
    else:
        _, lse = fwd(*(x.detach() for x in leaves), causal, 1 / d, **SCALES)
        want = flash_backward_f64(q, k, v, g.cpu(), out.detach().cpu(), lse.cpu(), causal, 1 / d)
    for got, w in zip(leaves, want):
        torch.testing.assert_close(got.grad.cpu().double(), w, atol=5e-3 * w.abs().max().item(), rtol=2e-2)


# Two diagnostics that split the kernel in halves, so a failure points at one.
@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_pv_path_alone(d):
    # q = 0: every score is 0, P = 1 (256 exactly in e4m3), out = the running
    # mean of v8. Exercises V^T's pre-pass, its key permutation and the P.V wgmma.
    N = 300
    q = torch.zeros(1, 2, N, d).bfloat16()
    k, v = qkv(1, 2, N, d)[1:]
    for causal in (True, False):
        got = ops.fp8_attention(q.cuda(), k.cuda(), v.cuda(), causal=causal, v_scale=2.0**-4)
        want = ops.fp8_attention(q, k, v, causal=causal, v_scale=2.0**-4)
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_qk_path_alone(d):
    # v = 0: out = 0 and the log-sum-exp depends only on Q K^T and the softmax
    # statistics. Exercises the q/k pre-pass, the swizzled loads and the Q.K wgmma.
    N = 300
    q, k = qkv(1, 2, N, d)[:2]
    v = torch.zeros(1, 2, N, d).bfloat16()
    for causal in (True, False):
        out, lse = fwd(q.cuda(), k.cuda(), v.cuda(), causal, 0.2, q_scale=0.25, k_scale=0.5)
        _, want = fwd(q, k, v, causal, 0.2, q_scale=0.25, k_scale=0.5)
        assert out.abs().max().item() == 0
        torch.testing.assert_close(lse.cpu(), want, **LSE_TOL)


def test_meta_key_next_to_cpu_query_is_refused():
    """Mixed meta/CPU inputs went to the fake kernel and returned garbage."""
    q, k, v = qkv(1, 2, 8, 16)
    with pytest.raises(ValueError, match="argument 'k' must be on q's device"):
        ops.fp8_attention(q, k.to("meta"), v)


# ------------------------------------------------------------ e4m3 inputs ----

def quantized(q, k, v, scales=SCALES):
    return (quantize_e4m3(q, scales["q_scale"]), quantize_e4m3(k, scales["k_scale"]),
            quantize_e4m3(v, scales["v_scale"]))


def fwd_scaled(q, k, v, causal, scale, scales=SCALES, backward="exact"):
    return torch.ops.lipschitz.fp8_attention_fwd.default(
        q, k, v, causal, scale, scales["q_scale"], scales["k_scale"], scales["v_scale"], backward)


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
    out, lse = fwd_scaled(q, k, v, causal, 1 / d)
    out8, lse8 = fwd_scaled(*quantized(q, k, v), causal, 1 / d)
    assert out8.dtype == torch.bfloat16 and lse8.dtype == torch.float32
    assert torch.equal(out8, out) and torch.equal(lse8, lse)
    # The independent reference, given the same e4m3 tensors.
    want, want_lse = emulate_fp8_attention(*quantized(q, k, v), causal, 1 / d, **SCALES)
    torch.testing.assert_close(out8.float(), want.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse8, want_lse, atol=1e-5, rtol=0)


def test_e4m3_inputs_from_float32_match_the_reference_quantizing_float32():
    # Quantizing float32 directly (no bf16 rounding first): the spec is the same rule.
    q, k, v = qkv(2, 2, 150, 64, dtype=torch.float32)
    out, lse = fwd_scaled(*quantized(q, k, v), True, 1 / 64)
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
    torch.library.opcheck(fwd_op, (), dict(q=q8, k=k8, v=v8, causal=True, softmax_scale=1 / 64, **SCALES),
                          test_utils=utils)
    torch.library.opcheck(fwd_op, (), dict(q=q8, k=k8, v=v8, causal=False, softmax_scale=0.1, **SCALES,
                                           backward="saved"), test_utils=utils)
    torch.library.opcheck(torch.ops.lipschitz.fp8_attention.default,
                          (), dict(q=q8, k=k8, v=v8, causal=True, softmax_scale=None, **SCALES, backward="exact"),
                          test_utils=utils)
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

def test_backward_path_rule(monkeypatch):
    monkeypatch.delenv("LIPSCHITZ_FP8_ATTN_BWD", raising=False)
    # (backward_kernel, compute major, cuDNN version, cudnn_sdp_enabled, empty) -> path
    cases = [
        (("flash", 9, 90100, True, False), "flash"),
        (("default", 9, 90100, True, False), "flash"),  # LIPSCHITZ_FP8_ATTN_BWD unset
        (("math", 9, 90100, True, False), "math"),
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
        assert torch.ops.lipschitz_internal.fp8_attention_bwd_path(*args) == want, args
    assert fp8_attention_bwd_path("cudnn", 9, 90100, True) == "cudnn"
    with pytest.raises(RuntimeError, match="argument 'backward_kernel' must be 'default', 'math', 'flash' or "
                                           "'cudnn', got 'cuDNN'"):
        fp8_attention_bwd_path("cuDNN", 9, 90100, True)
    with pytest.raises(RuntimeError, match="argument 'backward_kernel' must be .* got ''"):
        fp8_attention_bwd_path("", 9, 90100, True)


def test_backward_setting_from_environment(monkeypatch):
    monkeypatch.delenv("LIPSCHITZ_FP8_ATTN_BWD", raising=False)
    assert torch.ops.lipschitz_internal.fp8_attention_bwd_setting() == "flash"
    monkeypatch.setenv("LIPSCHITZ_FP8_ATTN_BWD", "cudnn")
    assert torch.ops.lipschitz_internal.fp8_attention_bwd_setting() == "cudnn"
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
    with pytest.raises(RuntimeError, match="LIPSCHITZ_FP8_ATTN_BWD must be 'flash', 'cudnn' or 'math', got 'fast'"):
        torch.ops.lipschitz_internal.fp8_attention_bwd_setting()
    assert torch.ops.lipschitz_internal.fp8_attention_bwd_cudnn_fallbacks() == 0  # only CUDA calls can fall back


# ------------------------------------- CUDA: e4m3 inputs, rows, cuDNN ----

@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("N", [1, 63, 128, 129, 300, 1000])
def test_cuda_e4m3_inputs_equal_bf16_inputs(N, d):
    # Same e4m3 bytes reach the same kernel: bit for bit, also against the torch quantization.
    q, k, v = qkv(2, 3, N, d, device="cuda")
    for causal in (True, False):
        out, lse = fwd_scaled(q, k, v, causal, 1 / d)
        out8, lse8 = fwd_scaled(*quantized(q, k, v), causal, 1 / d)
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
            fallbacks = torch.ops.lipschitz_internal.fp8_attention_bwd_cudnn_fallbacks()
            out.backward(g.bfloat16())
            assert torch.ops.lipschitz_internal.fp8_attention_bwd_cudnn_fallbacks() == fallbacks, "cuDNN fell back to FA2"
            grads[setting] = [x.grad.double() for x in leaves]
        for a, b in zip(grads["cudnn"], grads["flash"]):
            torch.testing.assert_close(a, b, atol=5e-3 * b.abs().max().item(), rtol=2e-2)

class _RecordBwdKernel(TorchDispatchMode):
    """Records the `kernel` argument of each lipschitz::fp8_attention_bwd call."""

    def __init__(self):
        super().__init__()
        self.kernels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.lipschitz.fp8_attention_bwd.default:
            self.kernels.append(kwargs.get("kernel", args[8] if len(args) > 8 else "default"))
        return func(*args, **kwargs)


@pytest.mark.parametrize("inputs", ["bf16", "e4m3"])
@pytest.mark.parametrize("kernel", ["default", "math"])
def test_backward_kernel_is_saved_for_the_backward(kernel, inputs):
    q, k, v = qkv(1, 2, 70, 64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    attend = ops.fp8_attention if inputs == "bf16" else fp8_attention_e4m3_inputs
    out = attend(*leaves, backward_kernel=kernel, **SCALES)
    with _RecordBwdKernel() as rec:
        out.float().sum().backward()
    assert rec.kernels == [kernel]
    grads = [x.grad for x in leaves]
    again = [x.clone().requires_grad_() for x in (q, k, v)]
    attend(*again, **SCALES).float().sum().backward()  # the CPU backward is the math one either way
    assert all(torch.equal(a, b.grad) for a, b in zip(grads, again))


@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_unknown_backward_kernel_is_refused_naming_the_argument(device):
    q, k, v = qkv(1, 2, 33, 64, device=device)
    for call in (lambda: ops.fp8_attention(q, k, v, backward_kernel="fa3"),
                 lambda: fp8_attention_e4m3_inputs(q, k, v, backward_kernel="fa3"),
                 lambda: torch.ops.lipschitz.fp8_attention_fwd(q, k, v, True, 0.1, 1.0, 1.0, 1.0, "exact", "fa3")):
        with pytest.raises(RuntimeError, match="argument 'backward_kernel' must be"):
            call()
    g = torch.randn(q.shape, device=device).bfloat16()
    with pytest.raises(RuntimeError, match="argument 'kernel' must be"):
        torch.ops.lipschitz.fp8_attention_bwd(g, q, k, v, None, None, True, 0.1, "fa3")


@pytest.mark.parametrize("kernel", ["flash", "cudnn"])
def test_cpu_takes_the_math_backward_kernel_only(kernel):
    q, k, v = qkv(1, 2, 33, 64)
    with pytest.raises(RuntimeError, match=f"argument 'backward_kernel' must be 'default' or 'math' on CPU .*'{kernel}'"):
        ops.fp8_attention(q, k, v, backward_kernel=kernel)
    with pytest.raises(RuntimeError, match=f"argument 'kernel' must be 'default' or 'math' on CPU .*'{kernel}'"):
        torch.ops.lipschitz.fp8_attention_bwd(q, q, k, v, None, None, True, 0.1, kernel)


@pytest.mark.cuda
@pytest.mark.parametrize("backward", ["exact", "saved"])
def test_cuda_backward_kernel_argument_equals_the_environment_switch(backward, monkeypatch):
    q, k, v = qkv(2, 2, 200, 64, device="cuda")
    g = torch.randn(q.shape, generator=torch.Generator("cuda").manual_seed(5), device="cuda").bfloat16()

    def grads(**kw):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ops.fp8_attention(*leaves, backward=backward, **SCALES, **kw).backward(g)
        return [x.grad for x in leaves]

    for kernel in ("flash", "cudnn", "math"):
        monkeypatch.setenv("LIPSCHITZ_FP8_ATTN_BWD", kernel)
        by_env = grads()
        monkeypatch.setenv("LIPSCHITZ_FP8_ATTN_BWD", "flash" if kernel != "flash" else "math")
        with _RecordBwdKernel() as rec:
            by_arg = grads(backward_kernel=kernel)
        assert rec.kernels == [kernel]
        # the same kernel both ways, up to its atomics' summation order
        for a, b in zip(by_arg, by_env):
            torch.testing.assert_close(a.double(), b.double(), atol=1e-3 * b.abs().max().item(), rtol=1e-2)


# -------------------------------------------- the fp8 backend of the model ----


def model(attention: str, **kw) -> LipschitzGPT:
    cfg = GPTConfig(vocab_size=65, d_model=64, n_layers=2, n_heads=1, seq_len=40,
                    attention=attention, zero_init_out=False, **kw)
    return LipschitzGPT(cfg)


def twin_models(seed: int, attention: str) -> tuple[LipschitzGPT, LipschitzGPT, tuple]:
    """An "fp8" model (sigma_max 2), a copy of its weights with ``attention``, and the
    fp8 model's certified scales."""
    torch.manual_seed(seed)
    m8 = model("fp8", sigma_max=2.0)
    other = model(attention, sigma_max=2.0)
    other.load_state_dict(m8.state_dict())
    return m8, other, configure_fp8_attention(m8)


@pytest.fixture
def reset_fp8_backend():
    def reset():
        FP8_BACKEND.scales, FP8_BACKEND.count_saturation, FP8_BACKEND.saturated = (1.0, 1.0, 1.0), False, 0
        FP8_BACKEND.backward, FP8_BACKEND.inputs = "exact", "bf16"

    reset()
    yield
    reset()


@pytest.mark.usefixtures("reset_fp8_backend")
@pytest.mark.parametrize("backward", ["exact", "saved"])
def test_fp8_model_matches_reference_backend(backward):
    m8, mref, scales = twin_models(0, "reference")
    fp8 = fp8_backend_of(m8)  # the model's own backend
    assert fp8.scales == scales
    fp8.backward = backward
    idx = torch.randint(0, 65, (2, 40))
    fp8.count_saturation = True
    out, ref = m8(idx), mref(idx)
    assert fp8.saturated == 0
    assert out.dtype == ref.dtype == torch.float32
    err = (out - ref).detach().double()
    assert 10 * math.log10(ref.detach().double().pow(2).sum() / err.pow(2).sum()) >= 25.0
    # Gradients flow through the bf16 backward and agree with the float32 model's.
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p8), pr in zip(m8.named_parameters(), mref.parameters()):
        cos = torch.nn.functional.cosine_similarity(p8.grad.flatten(), pr.grad.flatten(), dim=0)
        assert cos > 0.99, name


@pytest.mark.usefixtures("reset_fp8_backend")
def test_certified_scales_bound_the_real_entries():
    torch.manual_seed(1)
    m = model("fp8", sigma_max=1.5)
    with torch.no_grad():  # grow the weights past the init so the bound is not trivial
        for blk in m.blocks:
            for lin in (blk.attn.q, blk.attn.k, blk.attn.v):
                lin.weight.mul_(1.4)
    qs, ks, vs = configure_fp8_attention(m)
    for s in (qs, ks, vs):
        assert math.frexp(s)[0] == 0.5
    seen = []
    hooks = [blk.attn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach())) for blk in m.blocks]
    m(torch.randint(0, 65, (3, 40)))
    for h in hooks:
        h.remove()
    for blk, x in zip(m.blocks, seen):
        for lin, s in ((blk.attn.q, qs), (blk.attn.k, ks), (blk.attn.v, vs)):
            assert lin(x).abs().max().item() / s <= 448.0


@pytest.mark.usefixtures("reset_fp8_backend")
def test_scales_from_certificate_walks_the_rows():
    m = model("sdpa")
    cert = lipschitz_ext.certify.certify(m)
    got = fp8_scales_from_certificate(cert, 64, 64)
    # Every weight at RMS->RMS norm 1 (1 + 1e-9 in the certificate) and inputs of
    # RMS <= 1: bound 8 * 1.02 / 448 -> 2^-5.
    assert got == (2.0**-5, 2.0**-5, 2.0**-5)
    cert.rows = [r for r in cert.rows if r.kind != "attention"]
    with pytest.raises(ValueError, match="no content-attention rows"):
        fp8_scales_from_certificate(cert, 64, 64)


@pytest.mark.usefixtures("reset_fp8_backend")
def test_saturation_counter_counts_when_scales_are_too_small():
    torch.manual_seed(2)
    m = model("fp8")
    backend = Fp8AttentionBackend()
    configure_fp8_attention(m, backend=backend)
    fp8 = fp8_backend_of(m)
    assert fp8.scales == (1.0, 1.0, 1.0)  # only the given backend changed
    fp8.scales = (2.0**-12,) * 3
    fp8.count_saturation = True
    out = m(torch.randint(0, 65, (2, 30)))
    assert fp8.saturated > 0
    assert torch.isfinite(out).all()


@pytest.mark.usefixtures("reset_fp8_backend")
def test_two_models_keep_separate_scales():
    torch.manual_seed(3)
    a, b = model("fp8", sigma_max=2.0), model("fp8", sigma_max=1.0)
    with torch.no_grad():  # a's weights above b's: a larger certified bound, other scales
        for blk in a.blocks:
            for lin in (blk.attn.q, blk.attn.k, blk.attn.v):
                lin.weight.mul_(1.9)
    fa, fb = fp8_backend_of(a), fp8_backend_of(b)
    assert isinstance(fa, Fp8AttentionBackend) and fa is not fb and fa is not FP8_BACKEND
    # every layer of one model uses the model's one instance
    assert all(blk.attn.attention_backend() is fa for blk in a.blocks)
    sa, sb = configure_fp8_attention(a), configure_fp8_attention(b)
    assert sa != sb  # different caps, different certified scales
    assert (fa.scales, fb.scales, FP8_BACKEND.scales) == (sa, sb, (1.0, 1.0, 1.0))
    # a forward of one model uses its scales: counting saturation on b leaves a's counter alone
    fb.scales, fb.count_saturation, fa.count_saturation = (2.0**-12,) * 3, True, True
    a(torch.randint(0, 65, (1, 20)))
    b(torch.randint(0, 65, (1, 20)))
    assert fa.saturated == 0 and fb.saturated > 0
    # a copy owns a copy; models without fp8 have none; bad input is refused
    import copy

    c = copy.deepcopy(a)
    assert fp8_backend_of(c) is not fa and fp8_backend_of(c).scales == sa
    assert fp8_backend_of(model("sdpa")) is None
    with pytest.raises(TypeError, match="fp8_backend_of: expected an nn.Module"):
        fp8_backend_of("model")
    with pytest.raises(ValueError, match="does not use the 'fp8' attention backend"):
        configure_fp8_attention(model("sdpa"))


class _RecordFp8Inputs(TorchDispatchMode):
    """Records the dtype of q at each call of lipschitz::fp8_attention_fwd."""

    def __init__(self):
        super().__init__()
        self.q_dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.lipschitz.fp8_attention_fwd.default:
            self.q_dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.usefixtures("reset_fp8_backend")
@pytest.mark.parametrize("backward", ["exact", "saved"])
def test_fp8_inputs_switch_quantizes_in_the_projections(backward):
    # inputs="fp8": the projections end in e4m3 with the certified scales and the
    # op gets e4m3 tensors; output and gradients equal the default path bit for bit.
    old, new, scales = twin_models(4, "fp8")
    assert configure_fp8_attention(new) == scales
    fp8_backend_of(new).inputs = "fp8"
    for m in (old, new):
        fp8_backend_of(m).backward = backward
    idx = torch.randint(0, 65, (2, 40))
    seen = {}
    for name, m in (("bf16", old), ("fp8", new)):
        with _RecordFp8Inputs() as rec:
            out = m(idx)
        seen[name] = (out, rec.q_dtypes)
        out.square().mean().backward()
    assert seen["bf16"][1] == [torch.bfloat16] * 2 and seen["fp8"][1] == [torch.float8_e4m3fn] * 2
    assert torch.equal(seen["bf16"][0], seen["fp8"][0])
    for (name, a), b in zip(old.named_parameters(), new.parameters()):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.usefixtures("reset_fp8_backend")
def test_fp8_inputs_switch_is_checked_and_reset():
    m = model("fp8")
    fp8 = fp8_backend_of(m)
    assert fp8.inputs == "bf16"  # today's path stays the default
    fp8.inputs = "e4m3"
    with pytest.raises(ValueError, match="attribute 'inputs' must be 'bf16' or 'fp8', got 'e4m3'"):
        m(torch.randint(0, 65, (1, 10)))
    assert fp8.new_instance().inputs == "bf16"


def test_cpu_kernels_ignore_a_callers_autocast_region():
    """Forward and backward pick their own dtypes: inside ``torch.autocast("cpu")`` the output and
    the gradients are exactly those computed outside."""
    torch.manual_seed(9)
    base = [torch.randn(1, 2, 64, 64, dtype=torch.bfloat16) for _ in range(3)]

    def run():
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = ops.fp8_attention(q, k, v)
        out.float().square().sum().backward()
        return out, q.grad, k.grad, v.grad

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = run()
    for a, b in zip(plain, inside):
        assert torch.equal(a, b)
