"""Weight constraints applied after each optimizer step, in the RMS->RMS frame
(:mod:`lipschitz_ext.constraints.base` says how a constraint is called; each class says
how exact its guarantee is)."""

from .base import COLD_ITERS, Constraint, rms_scale
from .registry import CONSTRAINT_SPECS, CONSTRAINTS, ConstraintSpec, capping_constraints, make_constraint
from .spectral import (EmbeddingRMSCap, Orthogonal, SpectralHammer, SpectralHardCap, SpectralNormalize,
                       SpectralSoftCap, SpectralWeightDecay, SVDCap, WeightDecay)

__all__ = [
    "Constraint",
    "WeightDecay",
    "SpectralWeightDecay",
    "SpectralNormalize",
    "SpectralHammer",
    "SpectralSoftCap",
    "SpectralHardCap",
    "Orthogonal",
    "SVDCap",
    "EmbeddingRMSCap",
    "make_constraint",
    "CONSTRAINTS",
    "ConstraintSpec",
    "CONSTRAINT_SPECS",
    "capping_constraints",
    "rms_scale",
    "COLD_ITERS",
]
