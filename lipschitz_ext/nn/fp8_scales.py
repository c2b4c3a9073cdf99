"""Static fp8 (e4m3) scales for attention inputs, from a Lipschitz certificate.

A Lipschitz transformer's certificate bounds the per-token RMS of every block's
input (``certify(model).activation_bound``: ``RMS(x_t) = ||x_t||_2 / sqrt(d_model)
<= a`` for every token t). That bounds every entry of ``q_t = W_q x_t`` with no
data in sight:

    |(q_t)_i| = |w_i . x_t| <= ||w_i||_2 ||x_t||_2 <= sigma_max(W_q) * a * sqrt(d_model)

(``w_i`` a row of W_q; a row's 2-norm is at most the spectral norm). The bound
also holds after RoPE: a rotation of the pair (q_2i, q_2i+1) keeps each rotated
entry below the pair's 2-norm, the 2-norm of a 2-row submatrix times x_t, again
<= sigma_max(W_q) ||x_t||_2. A per-head slice of W_q is a submatrix, so the full
matrix's spectral norm bounds every head.

With ``scale >= bound / 448`` no entry of ``x / scale`` exceeds e4m3's largest
value: fp8 attention needs no amax history and never saturates.
"""

from __future__ import annotations

import math

from ..ops.fp8_attention import E4M3_MAX  # the one definition (largest finite e4m3 value)


__all__ = [
    "BF16_MARGIN",
    "E4M3_MAX",
    "fp8_entry_bound",
    "fp8_scales_from_certificate",
    "fp8_static_scales",
]

#: Head-room for rounding in the bf16 projection that produces q, k, v: its output
#: is rounded to bf16 (relative 2^-8 at most) and its fp32 accumulation adds far
#: less, so 1 + 2^-6 covers the computed values, not just the exact products.
BF16_MARGIN = 1.0 + 2.0**-6


def fp8_entry_bound(activation_bound: float, weight_norm: float, d_model: int) -> float:
    """Largest possible ``|entry|`` of ``W x_t`` given ``RMS(x_t) <= activation_bound``.

    Args:
        activation_bound: bound ``a`` on the per-token RMS norm of the block input.
        weight_norm: an upper bound on every row 2-norm of W, e.g. its plain
            spectral norm ``sigma_max(W)`` (NOT the RMS->RMS norm; convert with
            ``sigma_max = ||W||_rms * sqrt(fan_out / fan_in)``).
        d_model: width of ``x_t``.

    Returns:
        ``weight_norm * activation_bound * sqrt(d_model)``.
    """
    for name, val in (("activation_bound", activation_bound), ("weight_norm", weight_norm)):
        if not (math.isfinite(val) and val >= 0):
            raise ValueError(f"fp8_entry_bound: argument '{name}' must be finite and >= 0, got {val}")
    if int(d_model) < 1:
        raise ValueError(f"fp8_entry_bound: argument 'd_model' must be >= 1, got {d_model}")
    return float(weight_norm) * float(activation_bound) * math.sqrt(int(d_model))


def _power_of_two_at_least(x: float) -> float:
    # The smallest power of two >= x (x > 0): dividing by it is exact in any float format.
    m, e = math.frexp(x)  # x = m * 2^e, 0.5 <= m < 1
    return math.ldexp(1.0, e - 1) if m == 0.5 else math.ldexp(1.0, e)


def fp8_static_scales(
    activation_bound: float,
    w_q_norm: float,
    w_k_norm: float,
    w_v_norm: float,
    d_model: int,
    d_head: int,
    margin: float = BF16_MARGIN,
) -> tuple[float, float, float]:
    """Static ``(q_scale, k_scale, v_scale)`` for :func:`lipschitz_ext.ops.fp8_attention`.

    Each scale is the smallest power of two ``>= margin * bound / 448`` with
    ``bound = fp8_entry_bound(activation_bound, w_norm, d_model)``, so
    ``|x / scale| <= 448 / margin`` for every entry the certificate allows: no
    saturation (check with :func:`lipschitz_ext.ops.fp8_saturation_count`).

    Args:
        activation_bound: certified bound on the per-token RMS of the attention
            block's input.
        w_q_norm, w_k_norm, w_v_norm: plain spectral norms (or any bounds on the
            row 2-norms) of the q, k, v projection weights ``[n_heads * d_head,
            d_model]``; a bound for the full matrix covers every head's slice.
        d_model: model width (fan-in of the projections).
        d_head: head dimension, checked against the fp8 kernels' 64 or 128.
        margin: >= 1, head-room for the bf16 rounding of the projections.

    Returns:
        Three positive powers of two. A zero bound (e.g. a zero weight) gives the
        smallest normal float32 scale, which is harmless.
    """
    if int(d_head) not in (64, 128):
        raise ValueError(f"fp8_static_scales: argument 'd_head' must be 64 or 128 (the fp8 kernels' head dims), got {d_head}")
    if not (math.isfinite(margin) and margin >= 1.0):
        raise ValueError(f"fp8_static_scales: argument 'margin' must be finite and >= 1, got {margin}")
    tiny = 2.0**-126
    scales = []
    for w in (w_q_norm, w_k_norm, w_v_norm):
        bound = fp8_entry_bound(activation_bound, w, d_model)
        scales.append(_power_of_two_at_least(max(margin * bound / E4M3_MAX, tiny)))
    return scales[0], scales[1], scales[2]


def fp8_scales_from_certificate(certificate, d_model: int, d_head: int) -> tuple[float, float, float]:
    """Scales valid for every attention layer of a certified model.

    Walks ``certificate.rows`` (a :class:`lipschitz_ext.certify.Certificate`): the
    input bound of each attention branch is the residual-stream bound after the
    previous row (``certificate.input_rms`` for the first), its weight norms are
    the row's ``weight_norms["q" | "k" | "v"]`` (square d_model x d_model maps, so
    RMS->RMS norm = spectral norm). Returns the elementwise max of the per-layer
    :func:`fp8_static_scales`: one triple that no layer saturates.
    """
    a = float(certificate.input_rms)
    best = None
    for row in certificate.rows:
        if row.kind == "attention" and "q" in row.weight_norms:  # positional layers have no Q.K
            n = row.weight_norms
            s = fp8_static_scales(a, n["q"], n["k"], n["v"], d_model, d_head)
            best = s if best is None else tuple(max(x, y) for x, y in zip(best, s))
        a = float(row.activation_bound)
    if best is None:
        raise ValueError("fp8_scales_from_certificate: the certificate has no content-attention rows "
                         "(positional attention, softmax_scale = 0, does not use the fp8 kernel)")
    return best
