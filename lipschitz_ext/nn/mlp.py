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
    """``x [..., d] -> W_out (GELU(k W_in x) / (k 1.12890...))``, hidden width ``mlp_ratio * d``,
    activation scale ``k = act_scale`` (1 by default).

    GELU is the exact (erf) form; dividing by its maximal slope (the exact
    constant, not the rounded 1.1289, which would leave a slope of 1 + 5e-7)
    makes the activation 1-Lipschitz with slopes in ``[GELU_MIN_SLOPE, GELU_MAX_SLOPE] /
    GELU_MAX_SLOPE``. No biases.
    """

    def __init__(
        self, d_model: int, mlp_ratio: int = 4, zero_init_out: bool = True, init_scale: float = 1.0,
        act_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(act_scale) and act_scale > 0):
            raise ValueError(f"LipschitzMLP: act_scale must be finite and > 0, got {act_scale}")
        hidden = mlp_ratio * d_model
        self.fc_in = LipschitzLinear(d_model, hidden, init_scale=init_scale)
        self.fc_out = LipschitzLinear(
            hidden, d_model, init="zero" if zero_init_out else "orthogonal", init_scale=init_scale
        )
        self.act_divisor = GELU_MAX_SLOPE
        # GELU(k z) / k has the slopes of GELU (in [GELU_MIN_SLOPE, GELU_MAX_SLOPE]) and
        # |GELU(k z) / k| <= |z| for every k > 0, so the certificate does not change with
        # k; k > 1 makes the activation bend at the small pre-activations a norm-capped
        # network has (RMS ~0.3 deep in the stack, where plain GELU is nearly linear).
        self.act_scale = float(act_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.act_scale
        # fc_in's output stays the pre-activation z (what activation stats report); the
        # 1 / (k * divisor) rides on fc_out's weight instead of on [..., hidden]
        h = nn.functional.gelu(self.fc_in(x) * k)
        return self.fc_out(h, scale=1.0 / (k * self.act_divisor))
