"""LipschitzLinear: a bias-free linear map initialized in the RMS->RMS frame.

The layer itself enforces no cap: its norm is held by the optimizer's constraint, applied
to the weight after every step (:func:`lipschitz_ext.optim.build_optimizers` puts each
LipschitzLinear of a LipschitzGPT under the spectral constraint of its group), and the
certificate (:mod:`lipschitz_ext.certify`) measures the weights as they are, whatever
held them."""

from __future__ import annotations

import math

import torch
from torch import nn


def rms_norm_of(weight: torch.Tensor) -> float:
    """RMS->RMS operator norm ``sqrt(fan_in / fan_out) * sigma_max(W)`` of ``W [fan_out, fan_in]``.

    Exact (float64 singular values).
    """
    fan_out, fan_in = weight.shape
    sigma = torch.linalg.matrix_norm(weight.detach().double(), ord=2).item()
    return math.sqrt(fan_in / fan_out) * sigma


class LipschitzLinear(nn.Module):
    """``y = x W^T`` with ``W [out_features, in_features]`` and no bias.

    Init ``"orthogonal"``: a (semi-)orthogonal matrix scaled by
    ``init_scale * sqrt(fan_out / fan_in)``, so every singular value of
    ``W' = W / sqrt(fan_out / fan_in)`` equals ``init_scale``: the RMS->RMS norm is
    ``init_scale`` exactly. Init ``"zero"``: all zeros (output projections).
    Shapes: ``x [..., in_features] -> [..., out_features]``, any float dtype.

    Enforces nothing itself: the cap after each step is the optimizer's constraint's
    (see the module docstring); ``rms_norm()`` reports where the weight is now.
    """

    def __init__(
        self, in_features: int, out_features: int, init: str = "orthogonal", init_scale: float = 1.0
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"LipschitzLinear: features must be positive, got in={in_features}, out={out_features}"
            )
        if init not in ("orthogonal", "zero"):
            raise ValueError(f"LipschitzLinear: init must be 'orthogonal' or 'zero', got {init!r}")
        if not (math.isfinite(init_scale) and init_scale >= 0):
            raise ValueError(f"LipschitzLinear: init_scale must be finite and >= 0, got {init_scale}")
        self.in_features = in_features
        self.out_features = out_features
        self.init = init
        self.init_scale = float(init_scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    @property
    def rms_scale(self) -> float:
        """``sqrt(fan_out / fan_in)``: the factor between W and its RMS->RMS frame W'."""
        return math.sqrt(self.out_features / self.in_features)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "zero":
            self.weight.zero_()
        else:
            nn.init.orthogonal_(self.weight)
            self.weight.mul_(self.init_scale * self.rms_scale)

    def rms_norm(self) -> float:
        """Current RMS->RMS operator norm (exact, float64 SVD)."""
        return rms_norm_of(self.weight)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``scale * x W^T``. The scalar multiplies the (small) weight rather than the
        ``[..., out_features]`` output: one pass over W instead of one over the
        activations, forward and backward."""
        return nn.functional.linear(x, self.weight if scale == 1.0 else self.weight * scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, init={self.init}"
