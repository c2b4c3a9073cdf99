"""LipschitzMLP: ``W_out (GELU(W_in x) / GELU_MAX_SLOPE)``, a 1-Lipschitz activation."""

from __future__ import annotations

import math

import torch
from torch import nn

from .linear import LipschitzLinear

#: max_x GELU'(x), reached at x = sqrt(2): Phi(sqrt 2) + sqrt(2) phi(sqrt 2) = 1.12890...
GELU_MAX_SLOPE: float = 0.5 * (1.0 + math.erf(1.0)) + math.exp(-1.0) / math.sqrt(math.pi)
#: min_x GELU'(x), reached at x = -sqrt(2): -0.12890... (= 1 - GELU_MAX_SLOPE by symmetry).
GELU_MIN_SLOPE: float = 1.0 - GELU_MAX_SLOPE


class LipschitzMLP(nn.Module):
    """``x [..., d] -> W_out (GELU(W_in x) / 1.12890...)``, hidden width ``mlp_ratio * d``.

    GELU is the exact (erf) form; dividing by its maximal slope (the exact
    constant, not the rounded 1.1289, which would leave a slope of 1 + 5e-7)
    makes the activation 1-Lipschitz with slopes in ``[GELU_MIN_SLOPE, GELU_MAX_SLOPE] /
    GELU_MAX_SLOPE``. No biases.
    """

    def __init__(
        self, d_model: int, mlp_ratio: int = 4, zero_init_out: bool = True, init_scale: float = 1.0
    ) -> None:
        super().__init__()
        hidden = mlp_ratio * d_model
        self.fc_in = LipschitzLinear(d_model, hidden, init_scale=init_scale)
        self.fc_out = LipschitzLinear(
            hidden, d_model, init="zero" if zero_init_out else "orthogonal", init_scale=init_scale
        )
        self.act_divisor = GELU_MAX_SLOPE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.fc_in(x)) / self.act_divisor
        return self.fc_out(h)
