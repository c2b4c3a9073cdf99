"""LipschitzAttention: ``W_o (1/3) softmax(s Q K^T / d_head, causal) V`` with RoPE.

Backends are plain functions ``fn(q, k, v, softmax_scale, bias=None) -> out`` with
``q, k, v, out [B, H, T, d_head]`` computing causal
``softmax(softmax_scale * q k^T / d_head + bias) v``, where ``bias [H, T, T]`` (finite,
the same for every batch element, independent of the input) is passed only when the
module has a positional bias; they live in
:data:`ATTENTION_BACKENDS` and more can be added with
:func:`register_attention_backend` (e.g. an fp8 kernel) without touching this file.
A registered backend object with a ``new_instance()`` method carries state (the fp8
backend's static scales): each module then calls it once and keeps its own instance
(``LipschitzGPT`` shares one per model), so two models never share that state.
The ``"fp8"`` backend (:mod:`lipschitz_ext.nn.fp8`) can end the q/k/v projections
(after RoPE) in e4m3 with its certified static scales, so its kernel receives fp8
inputs (its ``inputs = "fp8"`` switch; bit-identical to the default ``"bf16"``).
"""

from __future__ import annotations

import math

from collections.abc import Callable

import torch
from torch import nn

from .linear import LipschitzLinear

AttentionBackend = Callable[..., torch.Tensor]

#: Kinds of positional logit bias ``LipschitzAttention`` supports (see :func:`alibi_slopes`).
POS_BIAS_KINDS = ("none", "alibi", "learned")


def _future_mask(T: int, device: torch.device) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention through ``F.scaled_dot_product_attention`` with ``scale = s / d_head``."""
    scale = softmax_scale / q.shape[-1]
    if bias is None:
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    T = q.shape[-2]
    mask = bias.to(q.dtype).masked_fill(_future_mask(T, q.device), float("-inf"))
    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention in plain math (materializes the ``[B, H, T, T]`` logits)."""
    T = q.shape[-2]
    logits = (q @ k.transpose(-2, -1)) * (softmax_scale / q.shape[-1])
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    logits = logits.masked_fill(_future_mask(T, q.device), float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def alibi_slopes(n_heads: int, strongest: float = 1.0, ratio: float = 0.25) -> torch.Tensor:
    """Per-head recency slopes ``strongest * ratio**h`` (h = 0..H-1), float32 ``[H]``.

    ALiBi's geometric family, shifted so the first head starts nearly on the
    previous token (slope 1 per position) and the last one sees a long window.
    """
    return strongest * ratio ** torch.arange(n_heads, dtype=torch.float32)


def relative_bias(table: torch.Tensor, T: int) -> torch.Tensor:
    """``table [H, max_len]`` (bias by distance ``t - s``) -> ``bias [H, T, T]``.

    Entries above the diagonal (future keys) are filled with the distance-0 value;
    backends mask them anyway.
    """
    if T > table.shape[-1]:
        raise ValueError(f"relative_bias: sequence length {T} exceeds the table's {table.shape[-1]} distances")
    pos = torch.arange(T, device=table.device)
    return table[:, (pos[:, None] - pos[None, :]).clamp_min(0)]


#: name -> backend; see the module docstring for the calling convention.
ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": sdpa_attention,
    "reference": reference_attention,
}


def register_attention_backend(name: str, fn: AttentionBackend, *, overwrite: bool = False) -> None:
    """Add ``fn(q, k, v, softmax_scale, bias=None) -> out`` (all ``[B, H, T, d_head]``) under ``name``.

    The function must compute causal ``softmax(softmax_scale * q k^T / d_head + bias) v``:
    the certificate assumes exactly that map. ``bias`` is only passed to models with a
    positional bias; a backend that cannot add one may take four arguments and is then
    refused for such models.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_attention_backend: name must be a non-empty str, got {name!r}")
    if not callable(fn):
        raise TypeError(f"register_attention_backend: fn for {name!r} is not callable")
    if name in ATTENTION_BACKENDS and not overwrite:
        raise ValueError(f"register_attention_backend: {name!r} is already registered")
    ATTENTION_BACKENDS[name] = fn


def get_attention_backend(name: str) -> AttentionBackend:
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {sorted(ATTENTION_BACKENDS)}"
        ) from None


def apply_rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding on ``x [B, H, T, d_head]`` (d_head even), position t = 0..T-1.

    Rotates the pairs ``(x[..., i], x[..., i + d_head/2])`` by ``t * base^(-2i/d_head)``:
    an orthogonal map per position, so norms are preserved.
    """
    T, dh = x.shape[-2], x.shape[-1]
    half = dh // 2
    # angles in float64 then cast: positions up to 1e5 keep full precision
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2.0 / dh)
    angles = torch.arange(T, dtype=torch.float64, device=x.device)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class LipschitzAttention(nn.Module):
    """Causal multi-head attention ``x [B, T, d] -> [B, T, d]`` without any normalization.

    ``y = out_factor * W_o concat_h(softmax(s * mask(q_h k_h^T) / d_head) v_h)`` with
    ``out_factor = 1/3``, ``s = softmax_scale``, ``q = RoPE(W_q x)``, ``k = RoPE(W_k x)``,
    ``v = W_v x``; head h uses rows ``h*d_head:(h+1)*d_head`` of W_q, W_k, W_v and the
    matching columns of W_o. All four maps are bias-free ``LipschitzLinear(d, d)``.

    ``pos_bias`` adds a per-head logit bias ``b_h(t - s)`` that depends only on the
    distance between query t and key s: ``"alibi"`` fixes it to ``-slope_h (t - s)``
    (:func:`alibi_slopes`), ``"learned"`` learns a table ``[H, max_len]`` initialized
    the same way. Because it does not depend on the input it costs nothing in the
    Lipschitz certificate (docs/certificate.md, Theorem 1 holds for any such bias),
    while it lets a head focus on nearby tokens without large, expensive Q.K logits.

    ``softmax_scale = 0`` makes the attention *positional*: every head mixes the values
    with the input-independent weights ``softmax(b_h)`` (uniform over the past without a
    bias). There are then no W_q, W_k (``self.q = self.k = None``): they could not change
    the output, and their certificate terms vanish, so the branch is the linear map
    ``x -> out_factor W_o concat_h(P_h v_h)``.
    """

    out_factor: float = 1.0 / 3.0

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        softmax_scale: float = 1.0,
        backend: str = "sdpa",
        rope: bool = True,
        rope_base: float = 10000.0,
        zero_init_out: bool = True,
        init_scale: float = 1.0,
        pos_bias: str = "none",
        max_len: int = 1024,
    ) -> None:
        super().__init__()
        if pos_bias not in POS_BIAS_KINDS:
            raise ValueError(f"LipschitzAttention: pos_bias must be one of {POS_BIAS_KINDS}, got {pos_bias!r}")
        if d_model % n_heads != 0:
            raise ValueError(
                f"LipschitzAttention: d_model ({d_model}) must be divisible by n_heads ({n_heads})"
            )
        if rope and (d_model // n_heads) % 2 != 0:
            raise ValueError("LipschitzAttention: rope needs an even head dimension")
        get_attention_backend(backend)  # fail at construction, not at the first forward
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        if not (math.isfinite(softmax_scale) and softmax_scale >= 0):
            raise ValueError(f"LipschitzAttention: softmax_scale must be finite and >= 0, got {softmax_scale}")
        self.softmax_scale = float(softmax_scale)
        self.positional = self.softmax_scale == 0.0
        self.backend = backend
        # instances of stateful backends (see the module docstring), by backend name
        self.own_backends: dict[str, AttentionBackend] = {}
        self.rope, self.rope_base = rope, float(rope_base)
        self.q = None if self.positional else LipschitzLinear(d_model, d_model, init_scale=init_scale)
        self.k = None if self.positional else LipschitzLinear(d_model, d_model, init_scale=init_scale)
        self.v = LipschitzLinear(d_model, d_model, init_scale=init_scale)
        self.o = LipschitzLinear(
            d_model, d_model, init="zero" if zero_init_out else "orthogonal", init_scale=init_scale
        )
        self.pos_bias = pos_bias
        if pos_bias != "none":
            table = -alibi_slopes(n_heads)[:, None] * torch.arange(max_len, dtype=torch.float32)
            if pos_bias == "learned":
                self.bias_table = nn.Parameter(table)
            else:
                self.register_buffer("bias_table", table)
        else:
            self.bias_table = None

    def attention_backend(self) -> AttentionBackend:
        """The backend ``forward`` calls: this module's own instance of a stateful
        backend (made on first use by its ``new_instance()``), else the registered one."""
        fn = self.own_backends.get(self.backend)
        if fn is None:
            fn = get_attention_backend(self.backend)
            new = getattr(fn, "new_instance", None)
            if callable(new):
                fn = self.own_backends[self.backend] = new()
        return fn

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)

    @torch.no_grad()
    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits ``[B, H, T, T]`` this module softmaxes on ``x [B, T, d]``:
        ``(s / d_head) q_h k_h^T`` (RoPE applied) plus the positional bias, ``-inf``
        above the diagonal. For inspection (e.g. the attention-logit growth in
        ``lipschitz-eval lr-sensitivity``); ``forward`` never materializes them."""
        B, T = x.shape[:2]
        if self.positional:
            dtype = torch.promote_types(x.dtype, torch.float32)
            return self._positional_logits(T, x.device).to(dtype).expand(B, -1, -1, -1).clone()
        q, k = self._heads(self.q(x)), self._heads(self.k(x))
        if self.rope:
            q, k = apply_rope(q, self.rope_base), apply_rope(k, self.rope_base)
        logits = (q @ k.transpose(-2, -1)) * (self.softmax_scale / self.d_head)
        if self.bias_table is not None:
            logits = logits + relative_bias(self.bias_table, T).to(logits.dtype)
        return logits.masked_fill(_future_mask(T, x.device), float("-inf"))

    def _positional_logits(self, T: int, device: torch.device) -> torch.Tensor:
        """``[H, T, T]``: the bias (zeros without one), ``-inf`` above the diagonal."""
        if self.bias_table is None:
            bias = torch.zeros(self.n_heads, T, T, device=device)
        else:
            bias = relative_bias(self.bias_table, T)
        return bias.masked_fill(_future_mask(T, device), float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        if self.positional:
            v = self.v(x)
            # one [H, T, T] mixing matrix for the whole batch, softmaxed in >= float32
            logits = self._positional_logits(T, x.device).to(torch.promote_types(v.dtype, torch.float32))
            weights = torch.softmax(logits, dim=-1).to(v.dtype)
            # one GEMM per head over the batch ([T, T] x [T, B d_head]) rather than B x H small
            # ones, so the bias gradient is reduced inside the GEMM, not over a [B, H, T, T] tensor
            out = torch.einsum("hts,bshd->bthd", weights, v.view(B, T, self.n_heads, self.d_head))
            return self.o(out.reshape(B, T, self.d_model), scale=self.out_factor)
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        if self.rope:
            q, k = apply_rope(q, self.rope_base), apply_rope(k, self.rope_base)
        backend = self.attention_backend()
        if self.bias_table is None:
            out = backend(q, k, v, self.softmax_scale)
        else:
            out = backend(q, k, v, self.softmax_scale, bias=relative_bias(self.bias_table, T))
        out = out.transpose(1, 2).reshape(B, T, self.d_model)
        return self.o(out, scale=self.out_factor)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, softmax_scale={self.softmax_scale}, "
            f"backend={self.backend!r}, rope={self.rope}, pos_bias={self.pos_bias!r}"
        )
