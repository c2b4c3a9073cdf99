"""The published certifier's formula, kept to compare against: it is not a sound bound."""

from __future__ import annotations

import math

import torch

from ..nn.gpt import LipschitzGPT
from .bounds import _sigma
from .certificate import _check_finite

__all__ = ["PAPER_MLP_DIVISOR", "paper_bound"]

PAPER_MLP_DIVISOR = 1.1289


def paper_bound(model: LipschitzGPT) -> float:
    """The published certifier's bound (docs/theory.md, section 5), **UNSOUND**: for comparison only.

    With RMS->RMS norms ``||W||`` of the current weights, ``alpha`` = each block's residual weight
    (``1/(2L)`` in the paper's model), ``a = 1`` and ``Lip = 1`` at the start, per block::

        L_att = (1/3) ||W_o|| (||W_v|| + 2 ||W_v|| a^2 ||W_q|| ||W_k||) * s     (a: the input's radius)
        Lip  <- (1 - alpha) Lip + alpha Lip L_att;   a <- (1 - alpha) a + alpha (||W_o|| ||W_v|| / 3) a
        L_mlp = ||W_out|| ||W_in|| / 1.1289
        Lip  <- (1 - alpha) Lip + alpha Lip L_mlp;   a <- (1 - alpha) a + alpha L_mlp a

    and finally ``Lip * ||W_head||``. ``s`` is the softmax scale, which as published also
    multiplies the V path (so positional attention, ``s = 0``, gets ``L_att = 0``).

    Why it is not a bound (docs/certificate.md, "Where this departs from the published
    certifier"): the MLP term divides the 1-Lipschitz normalized GELU by 1.1289 a second time
    (the MLP ``x -> W_out GELU(W_in x)/1.1289`` with unit 1-D weights has slope 1 at
    ``x = sqrt 2``, above the 0.886 claimed); with several heads the V path can reach
    ``sqrt(H) ||W_o|| ||W_v||``; the logit scale lacks the factor ``H = d / d_head``; and
    ``s < 1`` shrinks the V path, ``s = 0`` removes it. It can sit below the true
    Lipschitz constant: use :func:`certify` for a sound bound.
    """
    if not isinstance(model, LipschitzGPT):
        raise TypeError(f"paper_bound: expected a LipschitzGPT, got {type(model).__name__}")
    _check_finite(model, "paper_bound")

    def n(lin: torch.nn.Module) -> float:
        W = lin.weight.detach().double()
        return math.sqrt(W.shape[1] / W.shape[0]) * _sigma(W)

    lip, a = 1.0, 1.0
    for block in model.blocks:
        alpha, attn, mlp = block.alpha, block.attn, block.mlp
        n_v, n_o = n(attn.v), n(attn.o)
        qk = 0.0 if attn.q is None else n(attn.q) * n(attn.k)
        s = float(attn.softmax_scale)
        l_att = (1 / 3) * n_o * (n_v + 2 * n_v * a * a * qk) * s
        lip = (1 - alpha) * lip + alpha * lip * l_att
        a = (1 - alpha) * a + alpha * (n_o * n_v / 3) * a
        l_mlp = n(mlp.fc_out) * n(mlp.fc_in) / PAPER_MLP_DIVISOR
        lip = (1 - alpha) * lip + alpha * lip * l_mlp
        a = (1 - alpha) * a + alpha * l_mlp * a
    lip *= n(model.head)
    if not math.isfinite(lip):
        raise ValueError("paper_bound: the published formula overflows float64 for these weights")
    return lip


