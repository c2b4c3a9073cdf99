"""BaselineGPT: the unconstrained pre-LayerNorm reference of the same size."""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import _future_mask, apply_rope
from .config import GPTConfig
from .gpt import check_embeddings, check_tokens


class BaselineAttention(nn.Module):
    """Standard causal attention, ``softmax(q k^T / sqrt(d_head)) v``, RoPE when configured."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads, self.d_head = config.n_heads, config.d_head
        self.rope, self.rope_base = config.rope, config.rope_base
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q, k, v: [B, H, T, d_head]`` of ``x [B, T, d]``, RoPE applied to q and k."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = apply_rope(q, self.rope_base), apply_rope(k, self.rope_base)
        return q, k, v

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits ``[B, H, T, T]`` ``forward`` softmaxes on ``x [B, T, d]``:
        ``q_h k_h^T / sqrt(d_head)`` (RoPE applied when configured), ``-inf`` above
        the diagonal; computed in at least float32 (bf16 logits would round the
        quantity being inspected). For inspection; ``forward`` never materializes them."""
        if x.dim() != 3 or x.shape[-1] != self.n_heads * self.d_head:
            raise ValueError(f"BaselineAttention.attention_logits: x must be [B, T, {self.n_heads * self.d_head}], "
                             f"got {tuple(x.shape)}")
        q, k, _ = self._qkv(x)
        dtype = torch.promote_types(q.dtype, torch.float32)
        logits = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) / math.sqrt(self.d_head)
        return logits.masked_fill(_future_mask(x.shape[1], x.device), float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self._qkv(x)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(B, T, d))


class BaselineMLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.fc_in = nn.Linear(config.d_model, hidden, bias=False)
        self.fc_out = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(nn.functional.gelu(self.fc_in(x)))


class BaselineBlock(nn.Module):
    """``x <- x + attn(LN(x))``, ``x <- x + mlp(LN(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = BaselineAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = BaselineMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class BaselineGPT(nn.Module):
    """Unconstrained GPT with the same sizes as ``LipschitzGPT(config)`` for comparisons.

    Pre-LayerNorm blocks with plain residuals ``x + block(x)``, ``1/sqrt(d_head)``
    attention, GELU MLP, final LayerNorm, bias-free linear head; RoPE on Q, K when
    ``config.rope`` else a learned position table. GPT-2 init: N(0, 0.02), residual
    output projections N(0, 0.02/sqrt(2 n_layers)). ``softmax_scale``, the caps and
    ``attention`` are ignored. Same signatures: ``forward(idx [B, T]) -> [B, T, V]``,
    ``forward_embeddings(x [B, T, d]) -> [B, T, V]`` (x replaces the token embedding,
    positions are still added when ``rope`` is off).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"BaselineGPT: expected a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = None if config.rope else nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(BaselineBlock(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # LayerNorm keeps weight 1, bias 0
            std = 0.02 / math.sqrt(2 * self.config.n_layers) if name.endswith(("o.weight", "fc_out.weight")) else 0.02
            nn.init.normal_(p, std=std)

    def forward_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        check_embeddings(x, self.config, "BaselineGPT.forward_embeddings")
        if self.pos is not None:
            x = x + self.pos.weight[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        check_tokens(idx, self.config, "BaselineGPT.forward")
        return self.forward_embeddings(self.embed(idx))

    def param_groups_spec(self) -> list[dict]:
        """Same layout as ``LipschitzGPT.param_groups_spec`` with ``sigma_max=None`` (no caps).

        Kinds: ``"embedding"`` (token and position tables), ``"hidden"`` (block
        matrices), ``"head"``, ``"vector"`` (LayerNorm gains and biases).
        """
        groups = {k: ([], []) for k in ("embedding", "hidden", "head", "vector")}
        for name, p in self.named_parameters():
            if name.startswith(("embed.", "pos.")):
                kind = "embedding"
            elif name.startswith("head."):
                kind = "head"
            elif p.dim() < 2:
                kind = "vector"
            else:
                kind = "hidden"
            groups[kind][0].append(p)
            groups[kind][1].append(name)
        return [
            {"name": k, "kind": k, "params": ps, "names": ns, "sigma_max": None}
            for k, (ps, ns) in groups.items()
        ]
