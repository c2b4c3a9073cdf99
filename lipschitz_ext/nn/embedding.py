"""LipschitzEmbedding: a token table whose rows have per-token RMS <= max_rms."""

from __future__ import annotations

import math

import torch
from torch import nn


class LipschitzEmbedding(nn.Module):
    """Token embedding ``idx [B, T] (long) -> x [B, T, d]`` (rows of ``weight [V, d]``).

    Rows are initialized at RMS ``max_rms * (1 - 1e-6)`` (random directions), so the
    model's inputs start inside the certificate's domain (per-token RMS <= 1 by
    default). Keeping them there during training is the constraint's job
    (``EmbeddingRMSCap``); :meth:`max_row_rms` reports the current state and
    ``lipschitz_ext.certify`` checks it.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, max_rms: float = 1.0) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(
                f"LipschitzEmbedding: sizes must be positive, got {num_embeddings} x {embedding_dim}"
            )
        if not (math.isfinite(max_rms) and max_rms > 0):
            raise ValueError(f"LipschitzEmbedding: max_rms must be finite and > 0, got {max_rms}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.max_rms = float(max_rms)
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        rms = self.weight.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
        # a hair below the cap so float32 rounding cannot push a row outside the domain
        self.weight.mul_(self.max_rms * (1.0 - 1e-6) / rms)

    def max_row_rms(self) -> float:
        """Largest per-token RMS ``max_v ||E_v||_2 / sqrt(d)`` of the table (float64)."""
        w = self.weight.detach().double()
        return w.pow(2).mean(dim=1).sqrt().max().item()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(idx, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, max_rms={self.max_rms}"
