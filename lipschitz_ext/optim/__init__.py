"""Optimizers: batched, constraint-aware Muon and the paper's full optimizer setup.

- :class:`Muon` (``muon.py``): Muon for ``[..., m, n]`` weights, one
  ``orthogonalize`` and one constraint call per same-shape bucket; DDP and FSDP2
  aware (``distributed.py``).
- :func:`build_optimizers` (``setup.py``): Muon + constraints for hidden and head
  matrices, Adam + embedding RMS cap for embeddings and vectors, for any
  ``nn.Module``; returns an :class:`OptimizerSet`.
"""

from .muon import UPDATE_SCALES, Muon, update_scale_factor

__all__ = ["Muon", "UPDATE_SCALES", "update_scale_factor"]
