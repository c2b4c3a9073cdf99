"""lipschitz::orthogonalize: Muon's msign by Newton-Schulz (wrapper + fake kernel)."""


from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

__all__ = ["orthogonalize", "ns_polynomial", "ns_max_gain", "COEFFICIENT_SETS"]

#: Named Newton-Schulz coefficient sets understood by :func:`orthogonalize`.
COEFFICIENT_SETS = ("jordan", "you", "jiacheng", "polar_express")

Coefficients = Union[str, Sequence[Sequence[float]]]


def _coefficient_args(coefficients: Coefficients) -> tuple[str, list[float]]:
    if isinstance(coefficients, str):
        return coefficients, []
    flat: list[float] = []
    for i, triple in enumerate(coefficients):
        t = tuple(float(x) for x in triple)
        if len(t) != 3:
            raise ValueError(
                f"orthogonalize: argument 'coefficients' must hold (a, b, c) triples; "
                f"entry {i} has {len(t)} values"
            )
        flat.extend(t)
    return "custom", flat


def orthogonalize(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: Coefficients = "polar_express",
    eps: float = 1e-7,
) -> torch.Tensor:
    """Muon's msign: approximately ``U V^T`` for ``G = U S V^T``, by Newton-Schulz.

    Args:
        G: ``[..., m, n]`` floating tensor; leading dims are independent
            matrices. Tall or wide (the Gram matrix is always the small side).
        steps: number of Newton-Schulz steps (>= 1).
        coefficients: ``"jordan"``, ``"you"``, ``"jiacheng"``, ``"polar_express"``
            (default; with its bf16 safety factor 1.01), or an explicit list of
            ``(a, b, c)`` triples. Step ``i`` uses triple ``min(i, len - 1)``: past
            the end of a table the last triple repeats.
        eps: added to the normalizer ``||G||_F * (1.01 for polar_express else 1)``.

    Returns:
        Tensor of G's shape and dtype. Each singular value ``s`` of ``G`` becomes
        ``p(s / (||G||_F * scale + eps))`` where ``p`` is the composite odd
        polynomial of the steps (near 1 for Polar Express). Computed in bf16 with
        fp32 accumulation on CUDA (float64 stays float64), in float32 (float64
        for float64 input) on CPU. Non-finite input yields NaN output.
    """
    name, custom = _coefficient_args(coefficients)
    return torch.ops.lipschitz.orthogonalize.default(G, int(steps), name, custom, float(eps))


@torch.library.register_fake("lipschitz::orthogonalize")
def _orthogonalize_fake(G, steps=5, coefficients="polar_express", custom=(), eps=1e-7):
    torch._check(G.dim() >= 2, lambda: "orthogonalize: argument 'G' must have rank >= 2")
    torch._check(G.dtype.is_floating_point, lambda: "orthogonalize: argument 'G' must be floating")
    return G.new_empty(G.shape)


def ns_polynomial(
    s: torch.Tensor, steps: int = 5, coefficients: Coefficients = "polar_express"
) -> torch.Tensor:
    """The composite odd polynomial ``p`` of :func:`orthogonalize`'s steps, elementwise.

    ``orthogonalize`` maps each singular value ``sigma`` of ``G`` to
    ``p(sigma / (||G||_F * scale + eps))``; this evaluates ``p`` itself (evaluated in
    float64, returned in ``s``'s dtype and shape).
    """
    name, custom = _coefficient_args(coefficients)
    return torch.ops.lipschitz.ns_polynomial.default(s, int(steps), name, custom)


def ns_max_gain(steps: int = 5, coefficients: Coefficients = "polar_express", grid: int = 200_001) -> float:
    """``p_max``: the largest value the composite polynomial takes on ``(0, 1]``.

    After normalization every singular value lies in ``(0, 1]``, so a Muon update
    ``msign(M)`` has spectral norm at most ``p_max`` (1.14502 for the 5-step "You"
    set). Evaluated on a log-spaced grid from 1e-7 to 1 in float64 (the composite is
    odd and smooth; the grid resolves its peaks to ~1e-6 relative).
    """
    x = torch.logspace(-7, 0, grid, dtype=torch.float64)
    return float(ns_polynomial(x, steps, coefficients).max())


@torch.library.register_fake("lipschitz::ns_polynomial")
def _ns_polynomial_fake(s, steps=5, coefficients="polar_express", custom=()):
    return s.new_empty(s.shape)
