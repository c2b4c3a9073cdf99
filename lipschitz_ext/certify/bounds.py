"""Per-block Lipschitz bounds of LipschitzGPT's parts in the certificate's norms
(largest per-token RMS): spectral norms with a rounding margin, the attention and MLP
branches' bounds and gains (theorems and proofs: docs/certificate.md)."""

from __future__ import annotations

import math

import torch

from ..nn.attention import LipschitzAttention
from ..nn.mlp import GELU_MAX_SLOPE, GELU_MIN_SLOPE, LipschitzMLP

__all__ = ["INPUT_NORM", "OUTPUT_NORM", "SIGMA_MARGIN", "sequence_norm", "attention_bounds", "mlp_bounds",
           "mlp_block_bound", "mlp_block_gain"]

INPUT_NORM = "max over positions t of ||x_t||_2 / sqrt(d_model)  (largest per-token RMS)"
OUTPUT_NORM = "max over positions t of ||logits_t||_2 / sqrt(vocab_size)  (largest per-token RMS)"


#: Relative margin added to every computed spectral norm. It covers float64 rounding
#: in forming the Gram matrix (<= n * eps * ||W||_F^2 <= n^2 * eps * ||W||_2^2) and in
#: the symmetric eigensolver (backward stable): < 1e-10 for n <= 4096.
SIGMA_MARGIN = 1e-9


def _sigmas(W: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each ``[..., m, n]`` matrix, float64, rounded up.

    ``sigma_max(W)^2 = lambda_max`` of the Gram matrix on the small side: one symmetric
    eigensolve of ``min(m, n)^2`` (much faster on CPU than an SVD, same float64 accuracy
    for the largest singular value).
    """
    W = W.detach().double()
    G = W.mT @ W if W.shape[-1] <= W.shape[-2] else W @ W.mT
    lam = torch.linalg.eigvalsh(G)[..., -1].clamp_min(0.0)
    return lam.sqrt() * (1.0 + SIGMA_MARGIN)


def _sigma(W: torch.Tensor) -> float:
    return _sigmas(W).item()


def _product_sigmas(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``sigma_max(A_i @ B_i)`` for ``A [k, m, r]``, ``B [k, r, n]`` with small inner size r,
    through reduced QR factors (an ``r x r`` problem instead of ``m x n``)."""
    A, B = A.detach().double(), B.detach().double()
    Ra = torch.linalg.qr(A, mode="r").R
    Rb = torch.linalg.qr(B.mT, mode="r").R
    return _sigmas(Ra @ Rb.mT)


def sequence_norm(z: torch.Tensor) -> torch.Tensor:
    """``max_t ||z_t||_2 / sqrt(n)`` of ``z [..., T, n]`` -> ``[...]`` (the certificate's norm)."""
    return z.pow(2).mean(dim=-1).sqrt().amax(dim=-1)


def _shape_of(attn: LipschitzAttention) -> tuple[float, float, int, bool]:
    """``(out_factor, |softmax_scale|, n_heads, positional)`` of a module."""
    return abs(attn.out_factor), abs(attn.softmax_scale), attn.n_heads, attn.q is None


def attention_bounds(attn: LipschitzAttention, a: float, max_len: int | None = None,
                     refined: bool = True) -> tuple[float, float, dict[str, float]]:
    """Bounds for the attention branch on inputs with per-token RMS <= ``a``.

    Returns ``(lipschitz, gain, weight_norms)``: ``lipschitz`` bounds the branch's
    Lipschitz constant in the max-per-token-RMS norm on that domain (Theorem 5 of
    docs/certificate.md when ``refined``, else the earlier Theorem 1, which it never exceeds),
    ``gain`` bounds ``||attn(x)|| / a`` (so outputs have per-token
    RMS <= gain * a), ``weight_norms`` are the RMS->RMS norms of W_q, W_k, W_v, W_o (only W_v,
    W_o for positional attention, ``softmax_scale = 0``, whose bound is ``phi V`` on every domain).

    ``max_len``: the longest sequence the bound must cover (``seq_len``). Theorem 5 uses the
    per-head product norms ``rho_h = max_r sigma(W_q^hT R_r W_k^h)`` over the RoPE relative
    rotations ``R_r`` of the causal distances ``r < max_len``; with RoPE and no ``max_len``
    they are not used (rotations of every distance would be needed).
    """
    return _attention_bounds(attn, a, max_len, refined)[:3]


def _attention_bounds(attn: LipschitzAttention, a: float, max_len: int | None,
                      refined: bool) -> tuple[float, float, dict[str, float], torch.Tensor | None]:
    """:func:`attention_bounds` and the per-head ``rho_h`` it used (None when not used)."""
    H, dh = attn.n_heads, attn.d_head
    Wv, Wo = attn.v.weight.detach().double(), attn.o.weight.detach().double()
    rows = lambda W: W.view(H, dh, -1)  # noqa: E731  head h = rows h*dh:(h+1)*dh
    sv = _sigmas(rows(Wv))
    # M_h = W_o[:, head h] W_v[head h, :]: the head's value-to-output map
    Wo_cols = Wo.view(Wo.shape[0], H, dh).permute(1, 0, 2)
    m = _product_sigmas(Wo_cols, rows(Wv)) if dh < Wo.shape[0] else _sigmas(Wo_cols @ rows(Wv))
    s_o = _sigma(Wo)
    if attn.q is None:  # positional attention: fixed mixing weights, no query/key terms
        lip, gain = _attention_terms(_shape_of(attn), a, sv, m, s_o)
        return lip, gain, {"v": _sigma(Wv), "o": s_o}, None
    Wq, Wk = attn.q.weight.detach().double(), attn.k.weight.detach().double()
    sq, sk = _sigmas(rows(Wq)), _sigmas(rows(Wk))
    s_q = _sigma(Wq)
    rho = None
    if refined and (max_len is not None or not attn.rope):
        # + an absolute margin: the QR factors' rounding is relative to q_h k_h, not to rho_h
        rho = torch.minimum(_qk_product_sigmas(attn, max_len or 1) + SIGMA_MARGIN * sq * sk, sq * sk)
    lip, gain = _attention_terms(_shape_of(attn), a, sv, m, s_o, sq, sk, s_q, rho=rho, refined=refined)
    norms = {"q": s_q, "k": _sigma(Wk), "v": _sigma(Wv), "o": s_o}  # square: RMS->RMS = sigma
    if rho is not None:
        norms["max_h qk"] = rho.max().item()
    return lip, gain, norms, rho


def _rope_relative_rotations(attn: LipschitzAttention, max_len: int) -> torch.Tensor:
    """``R_t^T R_s`` for every causal distance ``r = t - s`` in ``[0, max_len)``: ``[max_len, d_h, d_h]``,
    float64. ``apply_rope`` rotates pair ``(i, i + d_h/2)`` of position t by ``+t theta_i``, so
    ``R_t^T R_s`` rotates it by ``(s - t) theta_i = -r theta_i`` (the test reference rebuilds
    ``R_t`` from ``apply_rope`` itself and checks this)."""
    dh, half = attn.d_head, attn.d_head // 2
    inv_freq = attn.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2.0 / dh)
    r = torch.arange(max_len, dtype=torch.float64)
    ang = -r[:, None] * inv_freq[None, :]  # [n, half]
    cos, sin = ang.cos(), ang.sin()
    G = torch.zeros(ang.shape[0], dh, dh, dtype=torch.float64)
    i = torch.arange(half)
    G[:, i, i], G[:, i + half, i + half] = cos, cos
    G[:, i, i + half], G[:, i + half, i] = -sin, sin
    return G


def _qk_product_sigmas(attn: LipschitzAttention, max_len: int) -> torch.Tensor:
    """``rho_h = max_r sigma(W_q^hT R_r W_k^h)`` per head ``[H]`` (``R_r = I`` without RoPE), through
    the ``d_h x d_h`` triangular factors of ``W_q^hT = Q_a A``, ``W_k^hT = Q_b B``:
    ``sigma(W_q^hT R W_k^h) = sigma(A R B^T)``. The logit of head h is
    ``(s/d_h) x_t^T W_q^hT R_{t,s} W_k^h x_s``, so ``rho_h`` bounds its bilinear form."""
    H, dh = attn.n_heads, attn.d_head
    Wq = attn.q.weight.detach().double().view(H, dh, -1)
    Wk = attn.k.weight.detach().double().view(H, dh, -1)
    A = torch.linalg.qr(Wq.mT, mode="r").R  # [H, dh, dh]
    B = torch.linalg.qr(Wk.mT, mode="r").R
    if not attn.rope:
        return _sigmas(A @ B.mT)
    G = _rope_relative_rotations(attn, max_len)
    return _sigmas(A[:, None] @ G[None] @ B.mT[:, None]).amax(dim=-1)


def _attention_terms(shape: tuple[float, float, int, bool], a: float, sv: torch.Tensor, m: torch.Tensor,
                     s_o: float, sq: torch.Tensor | None = None, sk: torch.Tensor | None = None,
                     s_q: float | None = None, rho: torch.Tensor | None = None,
                     refined: bool = True) -> tuple[float, float]:
    """Theorem 5 (``refined``) or Theorem 1 from the norms: per-head ``sv, sq, sk``
    (``||W_v^h||`` ...), ``m`` (``||M_h||``), ``rho`` (``rho_h``, optional: ``<= q_h k_h``),
    whole-matrix ``s_o``, ``s_q``; ``shape`` from :func:`_shape_of` (or the config). Non-decreasing
    in every norm and in ``a``, so upper bounds of the norms give an upper bound (what
    :func:`worst_case_certificate` relies on)."""
    f, scale, H, positional = shape
    v_path = min(s_o * sv.norm().item(), m.sum().item())
    if positional:
        return f * v_path, f * v_path
    c = scale * H * a * a  # = |s| a^2 d / d_head: the logit scale
    qkv = sq * sk * sv
    dq_path = c * min(
        s_o * min(s_q * (sk * sv).max().item(), qkv.norm().item()),
        min((sq * sk * m).sum().item(), s_q * (sk * m).norm().item()),
    )
    if not refined:
        dk_path = c * min(s_o * qkv.norm().item(), (sq * sk * m).sum().item())
        return f * (v_path + dq_path + dk_path), f * v_path
    if rho is not None:  # the head's bilinear form, bounded as one product
        dq_path = min(dq_path, c * min(s_o * (rho * sv).norm().item(), (rho * m).sum().item()))
    # Theorem 5 (b): the key path reads the query token x_t, shared by all heads, so it gets
    # the same query-budget sharing (and the same bound) as the query path
    return f * (v_path + 2 * dq_path), f * v_path


#: Most ellipsoids a :class:`TokenDomain` keeps; beyond it the two smallest are merged into an
#: outer ellipsoid (sound, slightly looser): bounds the cost at d x d matrices times this.

def mlp_bounds(mlp: LipschitzMLP) -> tuple[float, float, dict[str, float]]:
    """Bounds for the MLP branch (per token, any input): ``(lipschitz, gain, weight_norms)``.

    With normalized slopes in ``[lo, hi] = [GELU_MIN_SLOPE, GELU_MAX_SLOPE] / divisor``,
    center ``c`` and radius ``r``: ``lipschitz = |c| ||W_out W_in|| + r ||W_out|| ||W_in||``
    (RMS->RMS norms) and, since ``GELU(z) = z Phi(z)`` with ``Phi`` in [0, 1],
    ``gain = (||W_out W_in|| + ||W_out|| ||W_in||) / (2 divisor)``.
    """
    W_in, W_out = mlp.fc_in.weight.detach().double(), mlp.fc_out.weight.detach().double()
    n_in = math.sqrt(W_in.shape[1] / W_in.shape[0]) * _sigma(W_in)
    n_out = math.sqrt(W_out.shape[1] / W_out.shape[0]) * _sigma(W_out)
    n_prod = _sigma(W_out @ W_in)  # d -> d: RMS->RMS norm = sigma
    lip, gain = _mlp_terms(mlp.act_divisor, n_in, n_out, n_prod)
    return lip, gain, {"in": n_in, "out": n_out, "out@in": n_prod}


def _mlp_terms(divisor: float, n_in: float, n_out: float, n_prod: float) -> tuple[float, float]:
    """``(lipschitz, gain)`` of :func:`mlp_bounds` from the norms (non-decreasing in each);
    ``divisor`` is the activation's ``act_divisor`` (``GELU_MAX_SLOPE``)."""
    lo, hi = GELU_MIN_SLOPE / divisor, GELU_MAX_SLOPE / divisor
    center, radius = (hi + lo) / 2, (hi - lo) / 2
    lip = abs(center) * n_prod + radius * n_out * n_in
    gain = (n_prod + n_out * n_in) / (2 * divisor)
    return lip, gain


def mlp_block_bound(mlp: LipschitzMLP, alpha: float) -> float:
    """Lipschitz bound of the MLP sub-layer ``x -> (1 - alpha) x + alpha Mlp(x)`` (per token,
    any input; Theorem 2' of docs/certificate.md).

    Its Jacobian is ``(1 - alpha) I + alpha W_out D W_in`` with ``D = c I + E``, ``|E| <= r``, so
    ``||(1 - alpha) I + alpha c W_out W_in|| + alpha r ||W_out|| ||W_in||`` bounds it. That is
    never above ``(1 - alpha) + alpha L_mlp`` (triangle inequality) and is below it whenever
    the top singular directions of ``W_out W_in`` are not a positive eigen-direction.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"mlp_block_bound: alpha must be in (0, 1], got {alpha}")
    lip, _, norms = mlp_bounds(mlp)
    W_in, W_out = mlp.fc_in.weight.detach().double(), mlp.fc_out.weight.detach().double()
    lo, hi = GELU_MIN_SLOPE / mlp.act_divisor, GELU_MAX_SLOPE / mlp.act_divisor
    center, radius = (hi + lo) / 2, (hi - lo) / 2
    J0 = alpha * center * (W_out @ W_in)
    J0.diagonal().add_(1.0 - alpha)
    tight = _sigma(J0) + alpha * radius * norms["out"] * norms["in"]
    return min(tight, (1.0 - alpha) + alpha * lip)


def mlp_block_gain(mlp: LipschitzMLP, alpha: float) -> float:
    """Gain of the MLP sub-layer ``x -> (1 - alpha) x + alpha Mlp(x)``: per-token RMS out <=
    gain * RMS in (Theorem 6 of docs/certificate.md), never above ``(1 - alpha) + alpha G_mlp``.

    ``GELU(k z)/(k kappa) = z Phi(k z)/kappa`` with ``Phi`` in [0, 1], so the sub-layer is
    ``[(1 - alpha) I + alpha W_out G W_in] x`` with ``G = (I + E)/(2 kappa)``, ``|E| <= 1``:
    ``||(1 - alpha) I + alpha/(2 kappa) W_out W_in|| + alpha/(2 kappa) ||W_out|| ||W_in||`` bounds it.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"mlp_block_gain: alpha must be in (0, 1], got {alpha}")
    _, gain, norms = mlp_bounds(mlp)
    W_in, W_out = mlp.fc_in.weight.detach().double(), mlp.fc_out.weight.detach().double()
    half = alpha / (2 * mlp.act_divisor)
    J0 = half * (W_out @ W_in)
    J0.diagonal().add_(1.0 - alpha)
    tight = _sigma(J0) + half * norms["out"] * norms["in"]
    return min(tight, (1.0 - alpha) + alpha * gain)


