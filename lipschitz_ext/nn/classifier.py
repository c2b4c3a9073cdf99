"""An MLP image classifier whose logits have a certified l2 Lipschitz constant.

Norms here are plain l2: an input image is a vector of pixels in ``[0, 1]`` (``x: [B, D]``,
``D = 784`` for 28x28 grey images), the logits ``[B, C]`` are compared in l2, and a weight
``W: [fan_out, fan_in]`` is measured by its spectral norm ``sigma_max(W)``. The model is

    x -> (x - mean) -> W_1 -> act -> W_2 -> act -> ... -> W_K -> logits

with ``mean`` a fixed buffer (input centring, a translation: Lipschitz constant 1) and
``act`` ReLU or MaxMin (both 1-Lipschitz; MaxMin, GroupSort with groups of 2, keeps the
gradient norm), so ``||f(x) - f(x')||_2 <= prod_k sigma_max(W_k) * ||x - x'||_2``; biases
do not change the constant. The optimizer keeps each ``sigma_max(W_k) <= cap`` (see
:meth:`LipschitzMLPClassifier.param_groups_spec`); the certificate is computed from the
weights themselves (``lipschitz_ext.certify.classifier``). With ``constrained=False`` the
same network is the unconstrained baseline.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "INITS", "MaxMin", "LipschitzMLPClassifier"]

#: activation name -> module class (every one 1-Lipschitz in l2)
ACTIVATIONS = ("relu", "maxmin")
#: weight initialisations: ``orthogonal`` (every layer orthogonal with sigma = 1, so the
#: network starts 1-Lipschitz) or ``paper`` (first layer zero, the others orthogonal
#: scaled by sqrt(fan_out / fan_in), as in the paper's MLP experiment)
INITS = ("orthogonal", "paper")


class MaxMin(nn.Module):
    """MaxMin (GroupSort with groups of 2) on the last dim: pairs ``(a, b) -> (max, min)``.

    A permutation of its input on each piece, hence 1-Lipschitz in l2 and gradient-norm
    preserving. ``x: [..., d]`` with ``d`` even.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            raise ValueError(f"MaxMin: the last dim must be even, got {x.shape[-1]}")
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=-1)


class LipschitzMLPClassifier(nn.Module):
    """``in_features -> widths... -> num_classes`` MLP on pixels in [0, 1], centred inside.

    Args:
        in_features: ``D``, pixels per image (flattened).
        widths: hidden widths, e.g. ``(256, 256)``.
        num_classes: ``C``.
        bias: linear biases (the paper's MLP has none).
        activation: one of :data:`ACTIVATIONS`.
        cap: the l2 spectral norm each weight is held under (``constrained=True``).
        constrained: False for the unconstrained baseline (``cap`` unused).
        init: one of :data:`INITS`.
        mean: ``[D]`` input mean subtracted first (zeros if None; set it from the
            training set with :meth:`set_mean`).

    ``forward(x)``: ``x [B, D]`` (or ``[B, *image_shape]``, flattened) -> logits ``[B, C]``.
    """

    def __init__(self, in_features: int, widths: Sequence[int], num_classes: int, *, bias: bool = False,
                 activation: str = "relu", cap: float = 1.0, constrained: bool = True, init: str = "orthogonal",
                 mean: torch.Tensor | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"LipschitzMLPClassifier: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if init not in INITS:
            raise ValueError(f"LipschitzMLPClassifier: init must be one of {INITS}, got {init!r}")
        widths = [int(w) for w in widths]
        if in_features < 1 or num_classes < 2 or any(w < 1 for w in widths):
            raise ValueError(f"LipschitzMLPClassifier: sizes must be positive and num_classes >= 2, got "
                             f"in_features={in_features}, widths={widths}, num_classes={num_classes}")
        if activation == "maxmin" and any(w % 2 for w in widths):
            raise ValueError(f"LipschitzMLPClassifier: maxmin needs even widths, got {widths}")
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"LipschitzMLPClassifier: cap must be finite and > 0, got {cap}")
        self.in_features, self.widths, self.num_classes = int(in_features), widths, int(num_classes)
        self.activation, self.cap, self.constrained, self.init = activation, float(cap), bool(constrained), init
        dims = [self.in_features, *widths, self.num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:]))
        self.act = nn.ReLU() if activation == "relu" else MaxMin()
        self.register_buffer("mean", torch.zeros(self.in_features) if mean is None else mean.detach().clone().float())
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for i, lin in enumerate(self.layers):
            m, n = lin.weight.shape
            if self.init == "paper" and i == 0:
                lin.weight.zero_()
            else:
                nn.init.orthogonal_(lin.weight)
                scale = math.sqrt(m / n) if self.init == "paper" else min(1.0, self.cap)
                lin.weight.mul_(scale)
            if lin.bias is not None:
                lin.bias.zero_()

    @torch.no_grad()
    def set_mean(self, mean: torch.Tensor) -> None:
        """Set the centring vector ``[D]`` (the training set's mean image, pixels in [0, 1])."""
        if tuple(mean.shape) != (self.in_features,):
            raise ValueError(f"set_mean: expected shape ({self.in_features},), got {tuple(mean.shape)}")
        self.mean.copy_(mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1) - self.mean.to(x.dtype)
        for i, lin in enumerate(self.layers):
            h = lin(h)
            if i + 1 < len(self.layers):
                h = self.act(h)
        return h

    def weights(self) -> list[torch.Tensor]:
        """The weight matrices ``[fan_out, fan_in]``, input side first."""
        return [lin.weight for lin in self.layers]

    def param_groups_spec(self) -> list[dict]:
        """One ``hidden`` group per layer for ``lipschitz_ext.optim.build_optimizers``, with its
        cap in the constraints' RMS->RMS frame (``cap * sqrt(fan_in / fan_out)``, i.e. an l2
        spectral norm of ``cap``); biases as ``vector``."""
        spec = []
        for i, lin in enumerate(self.layers):
            m, n = lin.weight.shape
            spec.append({"name": f"layer{i}", "params": [lin.weight], "kind": "hidden",
                         "sigma_max": self.cap * math.sqrt(n / m)})
        biases = [lin.bias for lin in self.layers if lin.bias is not None]
        if biases:
            spec.append({"name": "biases", "params": biases, "kind": "vector"})
        return spec

    def hyperparameters(self) -> dict:
        """The constructor arguments (without ``mean``) that rebuild this model."""
        return {"in_features": self.in_features, "widths": list(self.widths), "num_classes": self.num_classes,
                "bias": self.layers[0].bias is not None, "activation": self.activation, "cap": self.cap,
                "constrained": self.constrained, "init": self.init}
