"""lipschitz::orthogonalize_gram (Gram Newton-Schulz) against float64 references and against
the standard iteration (lipschitz::orthogonalize) on the same inputs."""

import pytest
import torch

from lipschitz_ext import ops
from reference import TABLES, normalized_svals, ns_matrix_f64, ns_scalar, with_spectrum

SHAPES = [(37, 53), (53, 37), (1, 29), (29, 1), (3, 17, 24), (2, 3, 24, 17), (64, 64), (8, 70)]


def gram(G, **kw):
    return ops.orthogonalize(G, algorithm="gram", **kw)


@pytest.mark.parametrize("steps", [2, 5, 10])
@pytest.mark.parametrize("name", list(TABLES))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_iteration(name, shape, steps):
    G = torch.randn(shape)
    out = gram(G, steps=steps, coefficients=name)
    assert out.shape == G.shape and out.dtype == G.dtype
    torch.testing.assert_close(out.double(), ns_matrix_f64(G, name, steps), atol=5e-4, rtol=1e-3)


def _spectra(k: int) -> dict[str, torch.Tensor]:
    """Awkward spectra of ``k`` singular values (before normalization)."""
    half = k // 2
    return {
        "log-spread": torch.logspace(-4, 0, k),
        "clustered": torch.cat([torch.full((k - 4,), 1e-3), torch.ones(4)]),
        "tiny": torch.logspace(-7, -5, k),
        "rank-deficient": torch.cat([torch.zeros(k - half), torch.rand(half) + 0.1]),
        "equal": torch.ones(k),
    }


def _sv_error(out: torch.Tensor, G: torch.Tensor, steps: int) -> float:
    """max |s_i(out) - p(s_i(G) / (1.01 ||G||_F))| over the sorted singular values (float64)."""
    got = torch.linalg.svdvals(out.double())
    want = ns_scalar(normalized_svals(G, "polar_express"), "polar_express", steps).abs()
    return (got.sort(-1).values - want.sort(-1).values).abs().max().item()


@pytest.mark.parametrize("steps", [5, 10])
@pytest.mark.parametrize("m, n", [(48, 384), (384, 48), (40, 40)])
def test_singular_values_where_the_composite_puts_them(m, n, steps):
    """float32: singular values at the composite polynomial's values (to the standard
    iteration's own accuracy) for clustered, tiny, rank-deficient and log-spread spectra,
    tall, wide and square."""
    torch.manual_seed(1)
    for kind, s in _spectra(min(m, n)).items():
        G = with_spectrum(s, m, n).float()
        err_gram = _sv_error(gram(G, steps=steps), G, steps)
        err_std = _sv_error(ops.orthogonalize(G, steps=steps), G, steps)
        assert err_gram <= max(2 * err_std, 2e-3), (kind, err_gram, err_std)


@pytest.mark.parametrize("m, n", [(32, 256), (256, 32)])
def test_bfloat16_as_accurate_as_standard(m, n):
    """bf16 GEMMs: within the standard bf16 iteration's accuracy (the restart rule's purpose:
    without restarts the Gram matrix's rounding grows past any tolerance)."""
    torch.manual_seed(2)
    for kind, s in _spectra(min(m, n)).items():
        G = with_spectrum(s, m, n).float()
        err_gram = _sv_error(gram(G, compute_dtype=torch.bfloat16), G, 5)
        err_std = _sv_error(ops.orthogonalize(G, compute_dtype=torch.bfloat16), G, 5)
        assert err_gram <= max(2 * err_std, 0.1), (kind, err_gram, err_std)
    out = gram(G.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_close_to_standard_iteration():
    torch.manual_seed(3)
    G = torch.randn(4, 64, 512)
    torch.testing.assert_close(gram(G), ops.orthogonalize(G), atol=1e-4, rtol=1e-3)
    G64 = G.double()
    torch.testing.assert_close(gram(G64, steps=10), ops.orthogonalize(G64, steps=10), atol=1e-10, rtol=1e-10)


def test_restart_rule():
    """docs/kernels.md's rule: float32/float64 before 2, 5, 8, ...; bf16/fp16 before every step
    from 1 to steps - 2."""
    r = torch.ops.lipschitz_internal.gram_ns_restarts
    for dt in (torch.float32, torch.float64):
        assert r(1, dt) == [] and r(2, dt) == [] and r(3, dt) == [2] and r(5, dt) == [2]
        assert r(10, dt) == [2, 5, 8]
    for dt in (torch.bfloat16, torch.float16):
        assert r(2, dt) == [] and r(3, dt) == [1] and r(4, dt) == [1, 2] and r(5, dt) == [1, 2, 3]
        assert r(8, dt) == [1, 2, 3, 4, 5, 6]


def test_batched_non_contiguous_and_tall_wide():
    base = torch.randn(5, 40, 90)
    for G in [base.mT, base[:, ::2, 1::3], base[::2]]:
        torch.testing.assert_close(gram(G), gram(G.contiguous()))
    G = torch.randn(2, 3, 19, 61)
    out = gram(G)
    torch.testing.assert_close(out[1, 2], gram(G[1, 2]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gram(G.mT.contiguous()), out.mT, atol=1e-5, rtol=1e-5)


def test_zero_non_finite_huge_and_empty():
    G = torch.zeros(3, 4, 6)
    G[1] = torch.randn(4, 6)
    G[2, 0, 0] = float("nan")
    out = gram(G, eps=0.0)
    assert (out[0] == 0).all() and torch.isfinite(out[1]).all() and torch.isnan(out[2]).all()
    H = torch.randn(10, 20) * 1e30
    torch.testing.assert_close(gram(H, steps=8), gram(H / 1e30, steps=8), atol=1e-4, rtol=1e-4)
    assert gram(torch.randn(0, 4, 6)).shape == (0, 4, 6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: gram(torch.randn(5)), "orthogonalize_gram: argument 'G' must have rank >= 2"),
        (lambda: gram(torch.randn(4, 4), steps=0), "'steps' must be >= 1"),
        (lambda: gram(torch.randn(4, 4), eps=float("nan")), "'eps' must be finite"),
        (lambda: gram(torch.randn(4, 4), coefficients="newton"), "must be one of"),
        (lambda: ops.orthogonalize(torch.randn(4, 4), algorithm="fast"), "argument 'algorithm' must be one of"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()


def test_auto_follows_the_rule(monkeypatch):
    G = torch.randn(16, 128)
    want = ops.choices.choose("ns_algorithm", G.device, torch.float32, (16, 128))
    op = torch.ops.lipschitz.orthogonalize_gram if want == "gram" else torch.ops.lipschitz.orthogonalize
    assert torch.equal(ops.orthogonalize(G, algorithm="auto"), op(G))


def test_torch_compile_fullgraph():
    def f(G):
        return gram(G * 2.0, steps=5) + 1.0

    G = torch.randn(2, 12, 40)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(G), f(G))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(128, 1024), (1024, 128), (4, 768, 3072), (2, 3, 33, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(shape, dtype):
    G = torch.randn(shape).to(dtype)
    cpu = gram(G, compute_dtype=torch.float32)
    for cdt in (torch.float32, torch.bfloat16):
        gpu = gram(G.cuda(), compute_dtype=cdt)
        assert gpu.dtype == dtype and gpu.shape == G.shape
        err = (gpu.cpu().float() - cpu.float()).norm() / cpu.float().norm()
        assert err < (1e-3 if cdt == torch.float32 and dtype == torch.float32 else 0.05), err
