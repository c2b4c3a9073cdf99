"""One ``sample_inputs`` per ``torch.ops.lipschitz`` op, shared by the correctness,
gradcheck, torch.library.opcheck and torch.compile tests on every available device:
small tall, wide and batched matrices, a warm start ``u`` and per-matrix ``alpha``
where the schema takes them. Each sample is named: a dict from the schema's argument
names to values (``positional`` fills in the defaults in schema order). Sizes stay tiny
so float64 gradcheck (one forward per input entry) takes seconds. The fp8 attention
ops (bf16 / e4m3 only, no float64 gradcheck) are ``FP8_CASES``.
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

L = torch.ops.lipschitz

#: the devices the shared tests run on (the cuda one marked cuda: skipped without a GPU)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

Sample = dict[str, object]


def _mat(*shape: int, dtype: torch.dtype, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype) * scale


def _orthogonalize(dt):
    return [dict(G=_mat(2, 4, 6, dtype=dt), steps=5, coefficients="polar_express"),
            dict(G=_mat(6, 4, dtype=dt), steps=3, coefficients="custom", custom=[3.0, -3.2, 1.2]),
            dict(G=_mat(5, 3, dtype=dt).mT, steps=4, coefficients="you")]  # non-contiguous


def _orthogonalize_gram(dt):
    # 6 steps: a restart inside (before step 2 in every dtype)
    return [dict(G=_mat(2, 4, 9, dtype=dt), steps=6, coefficients="polar_express"),
            dict(G=_mat(9, 3, dtype=dt), steps=3, coefficients="custom", custom=[3.0, -3.2, 1.2]),
            dict(G=_mat(7, 3, dtype=dt).mT, steps=5, coefficients="you")]  # non-contiguous


def _ns_polynomial(dt):
    # inside [-1, 1], where the composites stay bounded (the op's domain after normalization)
    return [dict(s=torch.rand(7, dtype=dt) * 2 - 1, steps=5, coefficients="polar_express"),
            dict(s=torch.rand(2, 3, dtype=dt) * 2 - 1, steps=6, coefficients="jiacheng")]


def _power_iteration(dt):
    return [dict(W=_mat(2, 4, 6, dtype=dt), iters=3),
            dict(W=_mat(6, 4, dtype=dt), iters=16),  # 2 * iters > small side: the Gram-matrix path
            dict(W=_mat(2, 5, 3, dtype=dt), iters=2, u=torch.randn(2, 5, dtype=dt))]  # warm start


def _rank1(name, value):
    def samples(dt):
        return [{"W": _mat(2, 4, 6, dtype=dt), name: value, "iters": 3},
                {"W": _mat(6, 4, dtype=dt), name: value, "iters": 12, "u": torch.randn(6, dtype=dt)}]
    return samples


def _soft_cap(dt):
    return [dict(W=_mat(2, 4, 6, dtype=dt), alpha=0.1), dict(W=_mat(6, 4, dtype=dt), alpha=0.2)]


def _soft_cap_per_matrix(dt):
    return [dict(W=_mat(2, 4, 6, dtype=dt), alpha=torch.tensor([0.1, 0.3], dtype=dt)),
            dict(W=_mat(6, 4, dtype=dt), alpha=torch.tensor(0.2, dtype=dt))]


def _hard_cap(method):
    def samples(dt):
        return [dict(W=_mat(2, 4, 6, dtype=dt), sigma_max=0.5, method=method, steps=8, iters=16),
                dict(W=_mat(6, 4, dtype=dt), sigma_max=0.4, method=method, steps=6, iters=4),
                # aspect >= 2: Gram steps in float32/64
                dict(W=_mat(2, 3, 8, dtype=dt), sigma_max=0.5, method=method, steps=6, iters=8)]
    return samples


def _eigh_certified(dt):
    return [dict(W=_mat(2, 4, 6, dtype=dt), sigma_max=0.5, slack=1e-3),
            dict(W=_mat(6, 4, dtype=dt), sigma_max=0.4, slack=5e-3),
            dict(W=_mat(3, 8, 24, dtype=dt), sigma_max=0.5, slack=1e-3)]


def _orthogonal_project(dt):
    return [dict(W=_mat(2, 4, 6, dtype=dt), sigma_max=1.0, steps=6),
            dict(W=_mat(6, 4, dtype=dt), sigma_max=0.5, steps=8)]


def _svd_cap(dt):
    return [dict(W=_mat(2, 4, 6, dtype=dt), sigma_max=0.5), dict(W=_mat(6, 4, dtype=dt), sigma_max=0.3)]


#: case id -> (op overload, samples(dtype) -> list of named samples)
CASES: dict[str, tuple[torch._ops.OpOverload, Callable[[torch.dtype], list[Sample]]]] = {
    "orthogonalize": (L.orthogonalize.default, _orthogonalize),
    "orthogonalize_gram": (L.orthogonalize_gram.default, _orthogonalize_gram),
    "ns_polynomial": (L.ns_polynomial.default, _ns_polynomial),
    "power_iteration": (L.power_iteration.default, _power_iteration),
    "spectral_normalize": (L.spectral_normalize.default, _rank1("sigma_max", 0.5)),
    "spectral_hammer": (L.spectral_hammer.default, _rank1("sigma_max", 0.5)),
    "spectral_weight_decay": (L.spectral_weight_decay.default, _rank1("lam", 0.3)),
    "spectral_soft_cap": (L.spectral_soft_cap.default, _soft_cap),
    "spectral_soft_cap.per_matrix": (L.spectral_soft_cap.per_matrix, _soft_cap_per_matrix),
    "spectral_hard_cap.msign": (L._spectral_hard_cap.default, _hard_cap("msign")),
    "spectral_hard_cap.polynomial": (L._spectral_hard_cap.default, _hard_cap("polynomial")),
    "spectral_hard_cap.eigh": (L._spectral_hard_cap.default, _hard_cap("eigh")),
    "spectral_hard_cap_eigh_certified": (L._spectral_hard_cap_eigh_certified.default, _eigh_certified),
    "orthogonal_project": (L.orthogonal_project.default, _orthogonal_project),
    "svd_cap": (L.svd_cap.default, _svd_cap),
}

#: ops whose backward is not itself differentiable (a second derivative raises)
FIRST_ORDER_ONLY = ("spectral_hard_cap.eigh", "spectral_hard_cap_eigh_certified", "svd_cap")


def _qkv(B, H, N, d, dtype=torch.bfloat16):
    return tuple(torch.randn(B, H, N, d).to(dtype) for _ in range(3))


def _fp8_attention(dt):
    q, k, v = _qkv(1, 2, 33, 64, dt)
    return [dict(q=q, k=k, v=v, causal=True, softmax_scale=None),
            dict(q=q, k=k, v=v, causal=False, softmax_scale=0.1, q_scale=0.5, k_scale=0.25, backward="saved")]


def _fp8_attention_fwd(dt):
    q, k, v = _qkv(1, 2, 33, 64, dt)
    return [dict(q=q, k=k, v=v, causal=True, softmax_scale=1 / 64, q_scale=0.5, k_scale=0.25, v_scale=1.0),
            dict(q=q, k=k, v=v, causal=False, softmax_scale=0.1, q_scale=1.0, k_scale=1.0, v_scale=0.5),
            dict(q=q, k=k, v=v, causal=True, softmax_scale=0.1, q_scale=1.0, k_scale=1.0, v_scale=0.5,
                 backward="saved")]


def _fp8_attention_bwd(dt):
    q, k, v = _qkv(1, 2, 33, 64, dt)
    g = torch.randn(1, 2, 33, 64).to(dt)
    out, lse = L.fp8_attention_fwd.default(q, k, v, False, 0.1, 1.0, 1.0, 1.0)
    return [dict(grad_out=g, q=q, k=k, v=v, out=None, lse=None, causal=True, softmax_scale=1 / 64),
            dict(grad_out=g, q=q, k=k, v=v, out=out, lse=lse, causal=False, softmax_scale=0.1)]


#: the fp8 attention ops: case id -> (op overload, samples(dtype)); bf16 inputs (the
#: forward also takes e4m3 ones), differentiable in q, k, v through fp8_attention_fwd
FP8_CASES: dict[str, tuple[torch._ops.OpOverload, Callable[[torch.dtype], list[Sample]]]] = {
    "fp8_attention": (L.fp8_attention.default, _fp8_attention),
    "fp8_attention_fwd": (L.fp8_attention_fwd.default, _fp8_attention_fwd),
    "fp8_attention_bwd": (L.fp8_attention_bwd.default, _fp8_attention_bwd),
}


def _case(case: str):
    return CASES[case] if case in CASES else FP8_CASES[case]


def sample_inputs(case: str, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                  requires_grad: bool = True) -> list[Sample]:
    """The named samples of ``case`` on ``device`` in ``dtype`` (default float64; bf16 for the
    fp8 cases), seeded: the same values on every call and device. Floating tensor arguments
    require grad when ``requires_grad`` (the fp8 cases: q, k, v of the forward ops only)."""
    if dtype is None:
        dtype = torch.bfloat16 if case in FP8_CASES else torch.float64
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(sum(map(ord, case)))
    try:
        samples = _case(case)[1](dtype)
    finally:
        torch.random.set_rng_state(gen_state)
    grad_names = ("q", "k", "v") if case in ("fp8_attention", "fp8_attention_fwd") else None
    out = []
    for sample in samples:
        moved = {}
        for name, a in sample.items():
            if isinstance(a, torch.Tensor):
                a = a.detach().to(device)
                if requires_grad and a.is_floating_point() and case not in FP8_CASES:
                    a.requires_grad_()
                elif requires_grad and grad_names is not None and name in grad_names:
                    a.requires_grad_()
            moved[name] = a
        out.append(moved)
    return out


def op_of(case: str) -> torch._ops.OpOverload:
    return _case(case)[0]


def positional(case: str, sample: Sample) -> tuple:
    """``sample``'s values in schema order, each omitted argument at its schema default."""
    args = []
    for arg in op_of(case)._schema.arguments:
        if arg.name in sample:
            args.append(sample[arg.name])
        elif arg.has_default_value():
            args.append(arg.default_value)
        else:
            raise KeyError(f"sample of {case} lacks argument {arg.name!r}")
    return tuple(args)


def tensor_positions(args: tuple) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]


def as_function(case: str, sample: Sample) -> tuple[Callable[..., object], tuple[torch.Tensor, ...]]:
    """``(f, tensors)``: ``f(*tensors)`` calls the op on ``sample`` with its differentiable tensors
    replaced and returns its floating outputs (a certificate flag has no derivative)."""
    op, args = op_of(case), positional(case, sample)
    pos = tensor_positions(args)

    def f(*tensors):
        full = list(args)
        for i, t in zip(pos, tensors):
            full[i] = t
        out = op(*full)
        if isinstance(out, tuple):
            out = tuple(o for o in out if o.is_floating_point())
            return out[0] if len(out) == 1 else out
        return out

    return f, tuple(args[i] for i in pos)
