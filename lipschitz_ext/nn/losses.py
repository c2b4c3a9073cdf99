"""Losses of Lipschitz classifiers, in one place.

Logits ``z [B, C]``, labels ``y [B]``, ``s`` = ``logit_scale``:

- ``ce``: ``cross_entropy(s z, y)``.
- ``margin_ce``: ``cross_entropy(s (z + sqrt(2) L eps (1 - onehot(y))), y)`` with ``L`` the
  network's Lipschitz constant (or an estimate of it): the loss only reaches zero once the
  margin exceeds the one a certificate at radius ``eps`` needs, so ``eps`` trades clean
  accuracy for certified accuracy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "classification_loss"]

LOSSES = ("ce", "margin_ce")


def classification_loss(z: torch.Tensor, y: torch.Tensor, *, loss: str = "ce", logit_scale: float = 1.0,
                        margin_eps: float = 0.0, lipschitz: float = 1.0) -> torch.Tensor:
    """``ce`` or ``margin_ce`` (see the module docstring) of logits ``z [B, C]``, labels ``y [B]``."""
    if loss == "margin_ce" and margin_eps > 0:
        z = z + (math.sqrt(2.0) * lipschitz * margin_eps) * (1.0 - F.one_hot(y, z.shape[1]).to(z.dtype))
    elif loss not in LOSSES:
        raise ValueError(f"classification_loss: loss must be one of {LOSSES}, got {loss!r}")
    return F.cross_entropy(logit_scale * z, y)


