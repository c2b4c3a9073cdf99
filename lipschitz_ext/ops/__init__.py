"""Typed Python wrappers over the ``torch.ops.lipschitz`` C++/CUDA ops.

Every op acts on plain matrices ``[..., m, n]`` (leading dims are independent
matrices, processed in one batched pipeline), returns a new tensor, and has a
fake (meta) kernel so it traces under ``torch.compile(fullgraph=True)``. Every op
taking a floating tensor has a registered autograd formula (the same gradient eagerly
and compiled; docs/kernels.md, "Gradients through the ops", lists them).
Argument checks live in C++ and name the offending argument. One file per op
family: ``orthogonalize.py`` here <-> ``csrc/cpu/orthogonalize.cpp`` <->
``csrc/cuda/orthogonalize.cu`` <-> ``python_tests/test_orthogonalize.py``.

The rule: each op's documented guarantee holds for the registered op
``torch.ops.lipschitz.X`` itself, called directly. Where a guarantee needs host
work the op cannot do, the registered op is private (a leading underscore,
``torch.ops.lipschitz._X``) and the wrapper here is the only public door.
Host helpers and debug ops are the ``torch.ops.lipschitz_internal`` library, no
user API.

``__all__`` lists the kernels' wrappers only. Host-side math and constants next
to them (coefficient tables, certified bounds, the e4m3 range, the soft-cap
coupling) are :mod:`lipschitz_ext.ops.host`; the measured algorithm choices are
:mod:`lipschitz_ext.ops.choices`. Both stay importable from here too.
"""

from . import choices, host
from .fp8_attention import E4M3_MAX, fp8_attention, fp8_attention_e4m3_inputs, fp8_saturation_count
from .orthogonalize import COEFFICIENT_SETS, ns_max_gain, ns_polynomial, orthogonalize
from .power_iteration import (
    Rank1Result,
    SingularTriplet,
    certified_at_most,
    power_iteration,
    spectral_hammer,
    spectral_hammer_with_u,
    spectral_norm_bound,
    spectral_normalize,
    spectral_normalize_with_u,
    spectral_weight_decay,
    spectral_weight_decay_with_u,
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
    "Rank1Result",
    "SingularTriplet",
    "fp8_attention",
    "fp8_attention_e4m3_inputs",
    "ns_polynomial",
    "orthogonal_project",
    "orthogonalize",
    "power_iteration",
    "spectral_hammer",
    "spectral_hammer_with_u",
    "spectral_hard_cap",
    "spectral_normalize",
    "spectral_normalize_with_u",
    "spectral_soft_cap",
    "spectral_weight_decay",
    "spectral_weight_decay_with_u",
    "svd_cap",
]
