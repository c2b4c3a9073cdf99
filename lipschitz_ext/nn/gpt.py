"""LipschitzBlock and LipschitzGPT: a transformer with convex residuals and no normalization."""

from __future__ import annotations

import torch
from torch import nn

from .attention import LipschitzAttention, get_attention_backend
from .config import GPTConfig
from .embedding import LipschitzEmbedding
from .linear import LipschitzLinear
from .mlp import LipschitzMLP


def check_embeddings(x: torch.Tensor, config: GPTConfig, who: str) -> None:
    if x.dim() != 3 or x.shape[-1] != config.d_model:
        raise ValueError(f"{who}: x must be [B, T, {config.d_model}], got {tuple(x.shape)}")
    if x.shape[1] > config.seq_len:
        raise ValueError(f"{who}: sequence length {x.shape[1]} exceeds seq_len={config.seq_len}")


def check_tokens(idx: torch.Tensor, config: GPTConfig, who: str) -> None:
    if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32):
        raise ValueError(f"{who}: idx must be an integer tensor [B, T], got {idx.dtype} {tuple(idx.shape)}")
    if idx.shape[1] > config.seq_len:
        raise ValueError(f"{who}: sequence length {idx.shape[1]} exceeds seq_len={config.seq_len}")


class LipschitzBlock(nn.Module):
    """``x <- (1-a) x + a attn(x)``, then ``x <- (1-a) x + a mlp(x)``,
    ``a = residual_scale / (2 n_layers)`` (``1/(2 n_layers)`` by default).

    Shapes ``x [B, T, d] -> [B, T, d]``. Convex residuals keep the per-token RMS
    bounded without any normalization layer.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.alpha = config.residual_scale / (2 * config.n_layers)
        self.attn = LipschitzAttention(
            config.d_model,
            config.n_heads,
            softmax_scale=config.softmax_scale,
            backend=config.attention,
            rope=config.rope,
            rope_base=config.rope_base,
            zero_init_out=config.zero_init_out,
            init_scale=min(1.0, config.attn_cap),
            pos_bias=config.pos_bias,
            max_len=config.seq_len,
        )
        self.mlp = LipschitzMLP(
            config.d_model, config.mlp_ratio, zero_init_out=config.zero_init_out,
            init_scale=min(1.0, config.mlp_cap),
            act_scale=config.mlp_act_scale,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        # lerp(x, f, a) = (1 - a) x + a f in one fused pass
        x = torch.lerp(x, self.attn(x).to(x.dtype), a)  # residual stream keeps x.dtype under autocast
        return torch.lerp(x, self.mlp(x).to(x.dtype), a)


class LipschitzGPT(nn.Module):
    """Lipschitz transformer: embedding -> n_layers LipschitzBlocks -> capped linear head.

    ``forward(idx [B, T] long) -> logits [B, T, vocab_size]``;
    ``forward_embeddings(x [B, T, d_model]) -> logits`` (what ``lipschitz_ext.certify``
    bounds). No LayerNorm, QK-norm or logit softcap. Hidden matrices start at
    RMS->RMS norm ``min(1, cap)`` (cap: ``attn_sigma_max`` / ``mlp_sigma_max``, default
    ``sigma_max``; output projections at zero when ``zero_init_out``), the head at ``min(1, head_sigma_max)``, embedding rows at
    RMS ``embed_max_rms``.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"LipschitzGPT: expected a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.embed = LipschitzEmbedding(config.vocab_size, config.d_model, config.embed_max_rms)
        self.blocks = nn.ModuleList(LipschitzBlock(config) for _ in range(config.n_layers))
        # one instance of a stateful attention backend (fp8 scales) for all layers of this model
        shared = self.blocks[0].attn.attention_backend() if len(self.blocks) else None
        for block in self.blocks:
            if shared is not get_attention_backend(config.attention):
                block.attn.own_backends[config.attention] = shared
        self.head = LipschitzLinear(
            config.d_model, config.vocab_size, init_scale=min(1.0, config.head_sigma_max)
        )

    def input_rms(self) -> float:
        """Radius of the certificate domain that holds every token this model embeds: the
        embedding cap, or the largest row RMS if a row is above it (per-token RMS)."""
        return max(float(self.config.embed_max_rms), self.embed.max_row_rms())

    def forward_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        check_embeddings(x, self.config, "LipschitzGPT.forward_embeddings")
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        check_tokens(idx, self.config, "LipschitzGPT.forward")
        return self.forward_embeddings(self.embed(idx))

    def hidden_linears(self) -> list[tuple[str, LipschitzLinear]]:
        """``(qualified name, module)`` of every hidden matrix, in forward order."""
        return [
            (name, m) for name, m in self.named_modules() if isinstance(m, LipschitzLinear) and m is not self.head
        ]

    def _hidden_groups(self, hidden: list[tuple[str, LipschitzLinear]]) -> list[dict]:
        # One "hidden" group when attention and MLP share a cap (the optimizer batches all
        # same-shape matrices of a group); "attention" and "mlp" groups when they differ.
        cfg = self.config
        if cfg.attn_cap == cfg.mlp_cap:
            parts = [("hidden", hidden, cfg.attn_cap)]
        else:
            in_attn = {id(m) for b in self.blocks for m in b.attn.modules()}
            attn = [(n, m) for n, m in hidden if id(m) in in_attn]
            mlp = [(n, m) for n, m in hidden if id(m) not in in_attn]
            parts = [("attention", attn, cfg.attn_cap), ("mlp", mlp, cfg.mlp_cap)]
        return [
            {"name": name, "kind": "hidden", "params": [m.weight for _, m in mods],
             "names": [f"{n}.weight" for n, _ in mods], "sigma_max": cap}
            for name, mods, cap in parts
        ]

    def param_groups_spec(self) -> list[dict]:
        """The model's weights grouped by role, for building optimizer param groups.

        Returns a list of dicts with keys ``name`` (group name), ``kind``
        (``"embedding"``, ``"hidden"`` or ``"head"``; the hidden matrices form one group
        ``"hidden"``, or two, ``"attention"`` and ``"mlp"``, when ``attn_sigma_max`` and
        ``mlp_sigma_max`` give them different caps), ``params`` (list of
        Parameters), ``names`` (their qualified names) and ``sigma_max`` (the intended cap:
        per-token RMS for the embedding, RMS->RMS operator norm for matrices). Every
        parameter appears in exactly one group; matrices are in PyTorch layout
        ``[fan_out, fan_in]`` (the embedding table is ``[vocab_size, d_model]``, one
        token per row). Learned positional-bias tables (``pos_bias="learned"``) form a
        ``"vector"`` group (unconstrained: they do not enter the certificate).
        """
        hidden = self.hidden_linears()
        tables = [
            (f"{n}.bias_table", m.bias_table)
            for n, m in self.named_modules()
            if isinstance(m, LipschitzAttention) and isinstance(m.bias_table, nn.Parameter)
        ]
        vector = [
            {"name": "pos_bias", "kind": "vector", "params": [p for _, p in tables],
             "names": [n for n, _ in tables], "sigma_max": None}
        ] if tables else []
        return vector + [
            {
                "name": "embedding",
                "kind": "embedding",
                "params": [self.embed.weight],
                "names": ["embed.weight"],
                "sigma_max": self.config.embed_max_rms,
            },
            *self._hidden_groups(hidden),
            {
                "name": "head",
                "kind": "head",
                "params": [self.head.weight],
                "names": ["head.weight"],
                "sigma_max": self.config.head_sigma_max,
            },
        ]
