"""One ``sample_inputs`` per differentiable ``torch.ops.lipschitz`` op, shared by the
autograd tests (gradcheck, opcheck, torch.compile): small tall, wide and batched
matrices, a warm start ``u`` and per-matrix ``alpha`` where the schema takes them.
Sizes stay tiny so float64 gradcheck (one forward per input entry) takes seconds.
"""

from __future__ import annotations

from typing import Callable

import torch

L = torch.ops.lipschitz


def _mat(*shape: int, dtype: torch.dtype, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype) * scale


def _orthogonalize(dt):
    return [(_mat(2, 4, 6, dtype=dt), 5, "polar_express", [], 1e-7, None),
            (_mat(6, 4, dtype=dt), 3, "custom", [3.0, -3.2, 1.2], 1e-7, None),
            (_mat(5, 3, dtype=dt).mT, 4, "you", [], 1e-7, None)]  # non-contiguous


def _orthogonalize_gram(dt):
    # 6 steps: a restart inside (before step 2 in every dtype)
    return [(_mat(2, 4, 9, dtype=dt), 6, "polar_express", [], 1e-7, None),
            (_mat(9, 3, dtype=dt), 3, "custom", [3.0, -3.2, 1.2], 1e-7, None),
            (_mat(7, 3, dtype=dt).mT, 5, "you", [], 1e-7, None)]  # non-contiguous


def _ns_polynomial(dt):
    # inside [-1, 1], where the composites stay bounded (the op's domain after normalization)
    return [(torch.rand(7, dtype=dt) * 2 - 1, 5, "polar_express", []),
            (torch.rand(2, 3, dtype=dt) * 2 - 1, 6, "jiacheng", [])]


def _power_iteration(dt):
    return [(_mat(2, 4, 6, dtype=dt), 3, None),
            (_mat(6, 4, dtype=dt), 16, None),  # 2 * iters > small side: the Gram-matrix path
            (_mat(2, 5, 3, dtype=dt), 2, torch.randn(2, 5, dtype=dt))]  # warm start


def _rank1(param):
    def samples(dt):
        return [(_mat(2, 4, 6, dtype=dt), param, 3, None),
                (_mat(6, 4, dtype=dt), param, 12, torch.randn(6, dtype=dt))]
    return samples


def _soft_cap(dt):
    return [(_mat(2, 4, 6, dtype=dt), 0.1), (_mat(6, 4, dtype=dt), 0.2)]


def _soft_cap_per_matrix(dt):
    return [(_mat(2, 4, 6, dtype=dt), torch.tensor([0.1, 0.3], dtype=dt)),
            (_mat(6, 4, dtype=dt), torch.tensor(0.2, dtype=dt))]


def _hard_cap(method):
    def samples(dt):
        return [(_mat(2, 4, 6, dtype=dt), 0.5, method, 8, 16),
                (_mat(6, 4, dtype=dt), 0.4, method, 6, 4),
                (_mat(2, 3, 8, dtype=dt), 0.5, method, 6, 8)]  # aspect >= 2: Gram steps in float32/64
    return samples


def _orthogonal_project(dt):
    return [(_mat(2, 4, 6, dtype=dt), 1.0, 6), (_mat(6, 4, dtype=dt), 0.5, 8)]


def _svd_cap(dt):
    return [(_mat(2, 4, 6, dtype=dt), 0.5), (_mat(6, 4, dtype=dt), 0.3)]


#: case id -> (op overload, samples(dtype) -> list of argument tuples)
CASES: dict[str, tuple[torch._ops.OpOverload, Callable[[torch.dtype], list[tuple]]]] = {
    "orthogonalize": (L.orthogonalize.default, _orthogonalize),
    "orthogonalize_gram": (L.orthogonalize_gram.default, _orthogonalize_gram),
    "ns_polynomial": (L.ns_polynomial.default, _ns_polynomial),
    "power_iteration": (L.power_iteration.default, _power_iteration),
    "spectral_normalize": (L.spectral_normalize.default, _rank1(0.5)),
    "spectral_hammer": (L.spectral_hammer.default, _rank1(0.5)),
    "spectral_weight_decay": (L.spectral_weight_decay.default, _rank1(0.3)),
    "spectral_soft_cap": (L.spectral_soft_cap.default, _soft_cap),
    "spectral_soft_cap.per_matrix": (L.spectral_soft_cap.per_matrix, _soft_cap_per_matrix),
    "spectral_hard_cap.msign": (L._spectral_hard_cap.default, _hard_cap("msign")),
    "spectral_hard_cap.polynomial": (L._spectral_hard_cap.default, _hard_cap("polynomial")),
    "spectral_hard_cap.eigh": (L._spectral_hard_cap.default, _hard_cap("eigh")),
    "orthogonal_project": (L.orthogonal_project.default, _orthogonal_project),
    "svd_cap": (L.svd_cap.default, _svd_cap),
}

#: ops whose backward is not itself differentiable (a second derivative raises)
FIRST_ORDER_ONLY = ("spectral_hard_cap.eigh", "svd_cap")


def sample_inputs(case: str, dtype: torch.dtype = torch.float64, requires_grad: bool = True) -> list[tuple]:
    """The argument tuples of ``case`` (seeded: the same tensors on every call); floating
    tensor arguments require grad when ``requires_grad``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(sum(map(ord, case)))
    try:
        samples = CASES[case][1](dtype)
    finally:
        torch.random.set_rng_state(gen_state)
    if requires_grad:
        for args in samples:
            for a in args:
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    a.requires_grad_()
    return samples


def op_of(case: str) -> torch._ops.OpOverload:
    return CASES[case][0]


def tensor_positions(args: tuple) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]


def as_function(case: str, args: tuple) -> tuple[Callable[..., object], tuple[torch.Tensor, ...]]:
    """``(f, tensors)``: ``f(*tensors)`` calls the op with ``args``' differentiable tensors replaced."""
    op, pos = op_of(case), tensor_positions(args)

    def f(*tensors):
        full = list(args)
        for i, t in zip(pos, tensors):
            full[i] = t
        return op(*full)

    return f, tuple(args[i] for i in pos)
