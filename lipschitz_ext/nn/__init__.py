"""Lipschitz transformer modules (and an unconstrained baseline of the same size).

Norms: activations are sequences ``[B, T, d]`` measured by the largest per-token
RMS ``max_t ||x_t||_2 / sqrt(d)``; weights ``[fan_out, fan_in]`` by the RMS->RMS
operator norm ``sqrt(fan_in / fan_out) * sigma_max(W)``. See ``docs/certificate.md``.
"""

from .attention import (
    ATTENTION_BACKENDS,
    POS_BIAS_KINDS,
    LipschitzAttention,
    alibi_slopes,
    apply_rope,
    get_attention_backend,
    reference_attention,
    register_attention_backend,
    relative_bias,
    sdpa_attention,
)
from .baseline import BaselineGPT
from .classifier import LipschitzMLPClassifier, MaxMin
from .config import GPTConfig
from .embedding import LipschitzEmbedding
from .fp8 import FP8_BACKEND, Fp8AttentionBackend, fp8_backend_of
from .gpt import LipschitzBlock, LipschitzGPT
from .linear import LipschitzLinear, rms_norm_of
from .mlp import GELU_MAX_SLOPE, GELU_MIN_SLOPE, LipschitzMLP
from .stats import activation_stats

__all__ = [
    "ATTENTION_BACKENDS",
    "POS_BIAS_KINDS",
    "FP8_BACKEND",
    "Fp8AttentionBackend",
    "BaselineGPT",
    "LipschitzMLPClassifier",
    "MaxMin",
    "GELU_MAX_SLOPE",
    "GELU_MIN_SLOPE",
    "GPTConfig",
    "LipschitzAttention",
    "LipschitzBlock",
    "LipschitzEmbedding",
    "LipschitzGPT",
    "LipschitzLinear",
    "LipschitzMLP",
    "activation_stats",
    "fp8_backend_of",
    "alibi_slopes",
    "apply_rope",
    "get_attention_backend",
    "reference_attention",
    "register_attention_backend",
    "relative_bias",
    "rms_norm_of",
    "sdpa_attention",
]
