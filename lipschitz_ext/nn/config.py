"""GPTConfig: the hyper-parameters shared by LipschitzGPT and BaselineGPT."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .attention import POS_BIAS_KINDS


@dataclass
class GPTConfig:
    """Size and Lipschitz budget of a GPT-style model.

    Fields:
        vocab_size: number of tokens (V).
        d_model: width d of the residual stream.
        n_layers: number of blocks L (each: attention then MLP).
        n_heads: attention heads H; ``d_head = d_model // n_heads``.
        seq_len: longest sequence ``forward`` accepts.
        softmax_scale: ``s`` in ``softmax(s * Q K^T / d_head)`` (Lipschitz model); 0 makes
            the attention positional (mixing weights from ``pos_bias`` only, no W_q, W_k).
        mlp_ratio: MLP hidden width is ``mlp_ratio * d_model``.
        attention: attention backend name (see ``lipschitz_ext.nn.ATTENTION_BACKENDS``).
        sigma_max: intended RMS->RMS cap of every hidden matrix (Q, K, V, O, MLP in/out).
        attn_sigma_max: cap of the attention matrices (Q, K, V, O); None = ``sigma_max``.
        mlp_sigma_max: cap of the MLP matrices (in, out); None = ``sigma_max``.
        head_sigma_max: intended RMS->RMS cap of the output layer (an inverse temperature).
        embed_max_rms: intended per-token RMS cap of the embedding table.
        zero_init_out: zero-initialize the attention output and MLP output matrices.
        rope: rotary position embedding on Q and K (base ``rope_base``).
        rope_base: RoPE frequency base.
        residual_scale: ``r`` in the convex residual weight ``alpha = r / (2 n_layers)``
            (1 = the paper's default; at most ``2 n_layers`` so the residual stays convex).
        mlp_act_scale: ``k`` in the MLP activation ``GELU(k z) / (k * 1.1289...)``: same slopes
            and certificate for every k > 0; k > 1 keeps it nonlinear on small inputs.
        pos_bias: positional logit bias of every attention layer, ``"none"``, ``"alibi"``
            (fixed recency slopes) or ``"learned"`` (a per-head table over distances,
            ALiBi-initialized); input-independent, so free in the certificate.

    The caps are *intended* values for the optimizer/constraint (reported by
    ``LipschitzGPT.param_groups_spec``); the certificate always reads the actual weights.
    """

    vocab_size: int
    d_model: int = 256
    n_layers: int = 3
    n_heads: int = 4
    seq_len: int = 256
    softmax_scale: float = 1.0
    mlp_ratio: int = 4
    attention: str = "sdpa"
    sigma_max: float = 1.0
    attn_sigma_max: float | None = None
    mlp_sigma_max: float | None = None
    head_sigma_max: float = 1.0
    embed_max_rms: float = 1.0
    zero_init_out: bool = True
    rope: bool = True
    rope_base: float = 10000.0
    pos_bias: str = "none"
    residual_scale: float = 1.0
    mlp_act_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig: '{name}' must be a positive int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.rope and (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(
                f"GPTConfig: rope=True needs an even head dimension, got d_head = "
                f"{self.d_model // self.n_heads}"
            )
        optional = ("attn_sigma_max", "mlp_sigma_max")  # None = sigma_max
        for name in ("softmax_scale", "sigma_max", "head_sigma_max", "embed_max_rms", "rope_base", "mlp_act_scale",
                     *optional):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"GPTConfig: '{name}' must be a number, got {value!r}")
            if name == "softmax_scale" and math.isfinite(value) and value == 0:
                continue  # positional attention (no Q.K logits)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"GPTConfig: '{name}' must be finite and > 0, got {value!r}")
        if isinstance(self.residual_scale, bool) or not isinstance(self.residual_scale, (int, float)) or not (
            0 < self.residual_scale <= 2 * self.n_layers
        ):
            raise ValueError(
                f"GPTConfig: 'residual_scale' must be in (0, 2 * n_layers] = (0, {2 * self.n_layers}] so that "
                f"alpha = residual_scale / (2 n_layers) <= 1, got {self.residual_scale!r}"
            )
        if self.zero_init_out and self.residual_scale >= 2 * self.n_layers:
            raise ValueError(
                f"GPTConfig: residual_scale={self.residual_scale} gives alpha = 1 with {self.n_layers} layer(s): "
                "no skip path, and with zero_init_out every branch output and gradient is zero; "
                "use a smaller residual_scale or zero_init_out=False"
            )
        if self.pos_bias not in POS_BIAS_KINDS:
            raise ValueError(f"GPTConfig: 'pos_bias' must be one of {POS_BIAS_KINDS}, got {self.pos_bias!r}")
        if not isinstance(self.attention, str) or not self.attention:
            raise ValueError(f"GPTConfig: 'attention' must be a backend name, got {self.attention!r}")

    @property
    def attn_cap(self) -> float:
        """RMS->RMS cap of the attention matrices (``attn_sigma_max`` or ``sigma_max``)."""
        return self.sigma_max if self.attn_sigma_max is None else float(self.attn_sigma_max)

    @property
    def mlp_cap(self) -> float:
        """RMS->RMS cap of the MLP matrices (``mlp_sigma_max`` or ``sigma_max``)."""
        return self.sigma_max if self.mlp_sigma_max is None else float(self.mlp_sigma_max)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)
