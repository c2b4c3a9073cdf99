"""Host-side math and constants next to the kernels: no op of their own.

Coefficient tables and the update-norm bound of Newton-Schulz, certified
spectral-norm bounds (float64 Cholesky tests), the e4m3 range and saturation
count of the fp8 attention, the spectral caps' methods and coupling. Each lives
in its op family's module; this one gathers them under one clearly host-side name.
"""

from .fp8_attention import E4M3_MAX, fp8_saturation_count, quantize_e4m3
from .choices import native_bf16_matmul
from .orthogonalize import ALGORITHMS, BACKENDS, COEFFICIENT_SETS, COMPUTE_DTYPES, ns_max_gain
from .power_iteration import certified_at_most, spectral_norm_bound
from .spectral_cap import HARD_CAP_METHODS, POLYNOMIAL_PRESCALE, soft_cap_alpha

__all__ = [
    "ALGORITHMS",
    "BACKENDS",
    "COEFFICIENT_SETS",
    "COMPUTE_DTYPES",
    "E4M3_MAX",
    "HARD_CAP_METHODS",
    "POLYNOMIAL_PRESCALE",
    "certified_at_most",
    "fp8_saturation_count",
    "native_bf16_matmul",
    "ns_max_gain",
    "quantize_e4m3",
    "soft_cap_alpha",
    "spectral_norm_bound",
]
