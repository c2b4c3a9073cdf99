"""The constraints by name: what ``make_constraint`` builds and what the trainer, the
optimizer setup and the certifier need to know about each choice (``CONSTRAINT_SPECS``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import Constraint
from .spectral import (EmbeddingRMSCap, Orthogonal, SpectralHammer, SpectralHardCap, SpectralNormalize,
                       SpectralSoftCap, SpectralWeightDecay, SVDCap, WeightDecay)

#: name -> class, for :func:`make_constraint`.
CONSTRAINTS: dict[str, type[Constraint]] = {
    cls.name: cls
    for cls in (
        WeightDecay,
        SpectralWeightDecay,
        SpectralNormalize,
        SpectralHammer,
        SpectralSoftCap,
        SpectralHardCap,
        Orthogonal,
        SVDCap,
        EmbeddingRMSCap,
    )
}


def make_constraint(name: str, **kwargs) -> Optional[Constraint]:
    """Build a constraint by name: one of :data:`CONSTRAINTS`' keys, or ``"none"`` (returns ``None``)."""
    if name == "none":
        if kwargs:
            raise ValueError(f"make_constraint('none') takes no parameters, got {sorted(kwargs)}")
        return None
    try:
        cls = CONSTRAINTS[name]
    except KeyError:
        raise ValueError(f"make_constraint: unknown constraint {name!r}; choose from {sorted(CONSTRAINTS) + ['none']}") from None
    return cls(**kwargs)


@dataclass(frozen=True)
class ConstraintSpec:
    """What the trainer, the optimizer setup and the certifier need to know about one constraint choice."""

    name: str  # the --constraint CLI name
    takes_cap: bool  # uses a sigma_max cap
    caps_spectrum: bool  # afterwards every singular value <= cap (so a certificate's worst case over the caps applies)
    help: str  # one line for CLI help


#: Every constraint choice the trainer accepts for its hidden and head matrices (``--constraint``),
#: including ``"none"``; ``make_constraint(name)`` builds each (``sigma_max=cap`` when ``takes_cap``).
CONSTRAINT_SPECS: dict[str, ConstraintSpec] = {
    s.name: s
    for s in (
        ConstraintSpec("soft_cap", True, True,
                       "spectral soft cap: an odd polynomial coupled to the update norm maps every singular value under the cap"),
        ConstraintSpec("hard_cap", True, True, "spectral hard cap: singular values clipped to the cap"),
        ConstraintSpec("normalize", True, True, "spectral normalization: W / max(1, sigma_max(W) / cap)"),
        ConstraintSpec("hammer", True, False,
                       "spectral hammer: the top singular value set to the cap (the others may stay above it)"),
        ConstraintSpec("orthogonal", True, True, "projection to the Stiefel manifold: every singular value = cap"),
        ConstraintSpec("svd_cap", True, True, "exact SVD clip of the singular values to the cap (slow; the ground truth)"),
        ConstraintSpec("weight_decay", False, False, "decoupled weight decay only (no cap)"),
        ConstraintSpec("spectral_weight_decay", False, False, "spectral weight decay of the top singular value (no cap)"),
        ConstraintSpec("none", False, False, "unconstrained"),
    )
}


def capping_constraints() -> tuple[str, ...]:
    """Names of the constraints that leave every singular value at or under the cap (``caps_spectrum``)."""
    return tuple(name for name, spec in CONSTRAINT_SPECS.items() if spec.caps_spectrum)
