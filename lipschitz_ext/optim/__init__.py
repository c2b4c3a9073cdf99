"""Optimizers: batched, constraint-aware Muon and the paper's full optimizer setup.

- :class:`Muon` (``muon.py``): Muon for ``[..., m, n]`` weights, one
  ``orthogonalize`` and one constraint call per same-shape bucket; DDP and FSDP2
  aware (``distributed.py``).
- :class:`ConstrainedAdam` (``adam.py``): Adam, then a constraint (embedding RMS cap).
- :func:`build_optimizers` (``setup.py``): Muon + constraints for hidden and head
  matrices, Adam + embedding RMS cap for embeddings and vectors, for any
  ``nn.Module``; returns an :class:`OptimizerSet`.
"""

from .adam import ConstrainedAdam
from .muon import NS_DTYPES, UPDATE_SCALES, Muon, NonFiniteGradient, resolve_ns_dtype, update_scale_factor
from .setup import OptimizerConfig, OptimizerSet, ParamRole, build_optimizers, classify_parameters

__all__ = [
    "ConstrainedAdam",
    "Muon",
    "NonFiniteGradient",
    "NS_DTYPES",
    "OptimizerConfig",
    "OptimizerSet",
    "ParamRole",
    "UPDATE_SCALES",
    "build_optimizers",
    "classify_parameters",
    "resolve_ns_dtype",
    "update_scale_factor",
]
