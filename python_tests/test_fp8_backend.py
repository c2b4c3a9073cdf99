"""The "fp8" attention backend of LipschitzAttention and its certified static scales."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lipschitz_ext
from lipschitz_ext.certify.fp8 import configure_fp8_attention
from lipschitz_ext.nn.fp8_scales import fp8_scales_from_certificate
from lipschitz_ext.nn import FP8_BACKEND, Fp8AttentionBackend, GPTConfig, LipschitzGPT, fp8_backend_of


def model(attention: str, **kw) -> LipschitzGPT:
    cfg = GPTConfig(vocab_size=65, d_model=64, n_layers=2, n_heads=1, seq_len=40,
                    attention=attention, zero_init_out=False, **kw)
    return LipschitzGPT(cfg)


@pytest.fixture(autouse=True)
def _reset_backend():
    def reset():
        FP8_BACKEND.scales, FP8_BACKEND.count_saturation, FP8_BACKEND.saturated = (1.0, 1.0, 1.0), False, 0
        FP8_BACKEND.backward, FP8_BACKEND.inputs = "exact", "bf16"

    reset()
    yield
    reset()


@pytest.mark.parametrize("backward", ["exact", "saved"])
def test_fp8_model_matches_reference_backend(backward):
    torch.manual_seed(0)
    m8 = model("fp8", sigma_max=2.0)
    mref = model("reference", sigma_max=2.0)
    mref.load_state_dict(m8.state_dict())
    scales = configure_fp8_attention(m8)
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


@pytest.mark.parametrize("backward", ["exact", "saved"])
def test_fp8_inputs_switch_quantizes_in_the_projections(backward):
    # inputs="fp8": the projections end in e4m3 with the certified scales and the
    # op gets e4m3 tensors; output and gradients equal the default path bit for bit.
    torch.manual_seed(4)
    old = model("fp8", sigma_max=2.0)
    new = model("fp8", sigma_max=2.0)
    new.load_state_dict(old.state_dict())
    scales = configure_fp8_attention(old)
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


def test_fp8_inputs_switch_is_checked_and_reset():
    m = model("fp8")
    fp8 = fp8_backend_of(m)
    assert fp8.inputs == "bf16"  # today's path stays the default
    fp8.inputs = "e4m3"
    with pytest.raises(ValueError, match="attribute 'inputs' must be 'bf16' or 'fp8', got 'e4m3'"):
        m(torch.randint(0, 65, (1, 10)))
    assert fp8.new_instance().inputs == "bf16"
