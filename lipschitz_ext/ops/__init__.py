"""Typed Python wrappers over the ``torch.ops.lipschitz`` C++/CUDA ops.

Every op acts on plain matrices ``[..., m, n]`` (leading dims are independent
matrices, processed in one batched pipeline), returns a new tensor, and has a
fake (meta) kernel so it traces under ``torch.compile(fullgraph=True)``. Every op
taking a floating tensor has a registered autograd formula (the same gradient eagerly
and compiled; docs/kernels.md, "Gradients through the ops", lists them).
Argument checks live in C++ and name the offending argument. One file per op
family: ``orthogonalize.py`` here <-> ``csrc/cpu/orthogonalize.cpp`` <->
``csrc/cuda/orthogonalize.cu`` <-> ``python_tests/test_orthogonalize.py``.
"""

from . import choices
from .fp8_attention import E4M3_MAX, fp8_attention, fp8_saturation_count
from .orthogonalize import COEFFICIENT_SETS, ns_max_gain, ns_polynomial, orthogonalize
from .power_iteration import (
    power_iteration,
    spectral_hammer,
    certified_at_most,
    spectral_norm_bound,
    spectral_normalize,
    spectral_weight_decay,
)
from .spectral_cap import (
    HARD_CAP_METHODS,
    POLYNOMIAL_PRESCALE,
    orthogonal_project,
    soft_cap_alpha,
    spectral_hard_cap,
    spectral_soft_cap,
    svd_cap,
)

__all__ = [
    "COEFFICIENT_SETS",
    "choices",
    "E4M3_MAX",
    "HARD_CAP_METHODS",
    "POLYNOMIAL_PRESCALE",
    "fp8_attention",
    "fp8_saturation_count",
    "ns_max_gain",
    "ns_polynomial",
    "orthogonal_project",
    "orthogonalize",
    "power_iteration",
    "soft_cap_alpha",
    "spectral_hammer",
    "spectral_hard_cap",
    "certified_at_most",
    "spectral_norm_bound",
    "spectral_normalize",
    "spectral_soft_cap",
    "spectral_weight_decay",
    "svd_cap",
]
