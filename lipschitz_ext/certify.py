"""Certified Lipschitz bounds for LipschitzGPT (theorem and proof: docs/certificate.md).

Usage::

    import lipschitz_ext
    cert = lipschitz_ext.certify(model)          # the module itself is callable
    print(cert); cert.to_json()
    lower = lipschitz_ext.certify.empirical_lipschitz(model, x, steps=200)

``lipschitz_ext.certify`` is this module, made callable (``__call__`` = :func:`certify`),
so both the function call and the attribute access above work;
``from lipschitz_ext.certify import certify, empirical_lipschitz, Certificate`` also works.

Norms (input and output): a sequence ``z [T, n]`` is measured by
``||z|| = max_t ||z_t||_2 / sqrt(n)`` (largest per-token RMS), per batch element.
Domain: inputs ``x`` of ``forward_embeddings`` with ``max_t rms(x_t) <= input_rms``
(default 1, what the embedding produces when its rows are capped at RMS 1).
The bound holds for every sequence length and batch size.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import types
from dataclasses import asdict, dataclass, field

import torch

from .nn.attention import LipschitzAttention
from .nn.gpt import LipschitzGPT
from .nn.mlp import GELU_MAX_SLOPE, GELU_MIN_SLOPE, LipschitzMLP

__all__ = [
    "Certificate",
    "CertificateRow",
    "attention_bounds",
    "certify",
    "empirical_lipschitz",
    "mlp_block_bound",
    "mlp_bounds",
    "sequence_norm",
    "worst_case_certificate",
]

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


def attention_bounds(attn: LipschitzAttention, a: float) -> tuple[float, float, dict[str, float]]:
    """Bounds for the attention branch on inputs with per-token RMS <= ``a``.

    Returns ``(lipschitz, gain, weight_norms)``: ``lipschitz`` bounds the branch's
    Lipschitz constant in the max-per-token-RMS norm on that domain (Theorem 1 of
    docs/certificate.md), ``gain`` bounds ``||attn(x)|| / a`` (so outputs have per-token
    RMS <= gain * a), ``weight_norms`` are the RMS->RMS norms of W_q, W_k, W_v, W_o (only W_v,
    W_o for positional attention, ``softmax_scale = 0``, whose bound is ``phi V`` on every domain).
    """
    H, dh = attn.n_heads, attn.d_head
    Wv, Wo = attn.v.weight.detach().double(), attn.o.weight.detach().double()
    rows = lambda W: W.view(H, dh, -1)  # noqa: E731  head h = rows h*dh:(h+1)*dh
    sv = _sigmas(rows(Wv))
    # M_h = W_o[:, head h] W_v[head h, :]: the head's value-to-output map
    Wo_cols = Wo.view(Wo.shape[0], H, dh).permute(1, 0, 2)
    m = _product_sigmas(Wo_cols, rows(Wv)) if dh < Wo.shape[0] else _sigmas(Wo_cols @ rows(Wv))
    s_o = _sigma(Wo)
    if attn.q is None:  # positional attention: fixed mixing weights, no query/key terms
        lip, gain = _attention_terms(attn, a, sv, m, s_o)
        return lip, gain, {"v": _sigma(Wv), "o": s_o}
    Wq, Wk = attn.q.weight.detach().double(), attn.k.weight.detach().double()
    sq, sk = _sigmas(rows(Wq)), _sigmas(rows(Wk))
    s_q = _sigma(Wq)
    lip, gain = _attention_terms(attn, a, sv, m, s_o, sq, sk, s_q)
    norms = {"q": s_q, "k": _sigma(Wk), "v": _sigma(Wv), "o": s_o}  # square: RMS->RMS = sigma
    return lip, gain, norms


def _attention_terms(attn: LipschitzAttention, a: float, sv: torch.Tensor, m: torch.Tensor, s_o: float,
                     sq: torch.Tensor | None = None, sk: torch.Tensor | None = None,
                     s_q: float | None = None) -> tuple[float, float]:
    """Theorem 1 from the norms: per-head ``sv, sq, sk`` (``||W_v^h||`` ...), ``m`` (``||M_h||``),
    whole-matrix ``s_o``, ``s_q``. Non-decreasing in every norm and in ``a``, so upper bounds
    of the norms give an upper bound (what :func:`worst_case_certificate` relies on)."""
    f = abs(attn.out_factor)
    v_path = min(s_o * sv.norm().item(), m.sum().item())
    if attn.q is None:
        return f * v_path, f * v_path
    c = abs(attn.softmax_scale) * attn.n_heads * a * a  # = |s| a^2 d / d_head: the logit scale
    qkv = sq * sk * sv
    dq_path = c * min(
        s_o * min(s_q * (sk * sv).max().item(), qkv.norm().item()),
        min((sq * sk * m).sum().item(), s_q * (sk * m).norm().item()),
    )
    dk_path = c * min(s_o * qkv.norm().item(), (sq * sk * m).sum().item())
    return f * (v_path + dq_path + dk_path), f * v_path


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
    lip, gain = _mlp_terms(mlp, n_in, n_out, n_prod)
    return lip, gain, {"in": n_in, "out": n_out, "out@in": n_prod}


def _mlp_terms(mlp: LipschitzMLP, n_in: float, n_out: float, n_prod: float) -> tuple[float, float]:
    """``(lipschitz, gain)`` of :func:`mlp_bounds` from the norms (non-decreasing in each)."""
    lo, hi = GELU_MIN_SLOPE / mlp.act_divisor, GELU_MAX_SLOPE / mlp.act_divisor
    center, radius = (hi + lo) / 2, (hi - lo) / 2
    lip = abs(center) * n_prod + radius * n_out * n_in
    gain = (n_prod + n_out * n_in) / (2 * mlp.act_divisor)
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


@dataclass
class CertificateRow:
    """One residual sub-layer (or the head) of the certificate.

    ``weight_norms``: RMS->RMS norms of its matrices; ``branch_bound``: Lipschitz bound
    of the branch alone on its input domain; ``block_bound``: of the residual sub-layer
    ``(1-alpha) x + alpha branch(x)`` (for the head: its norm); ``running_bound``: of the
    network up to and including this row; ``activation_bound``: per-token RMS bound of
    this row's output (its input domain radius is the previous row's value).
    """

    name: str
    kind: str
    weight_norms: dict[str, float]
    branch_bound: float
    block_bound: float
    running_bound: float
    activation_bound: float


@dataclass
class Certificate:
    """A Lipschitz bound for ``model.forward_embeddings``.

    Statement: for all inputs ``x, y`` of shape ``[T, d_model]`` (any T <= seq_len; batch
    elements are independent) with ``max_t rms(x_t) <= input_rms`` and the same for y,
    ``||f(x) - f(y)||_out <= bound * ||x - y||_in`` where ``f = forward_embeddings`` in exact
    arithmetic, ``||.||_in = max_t ||x_t||_2 / sqrt(d_model)`` and
    ``||.||_out = max_t ||f_t||_2 / sqrt(vocab_size)``. Also ``||f(x)||_out <= logit_bound``
    and every residual-stream token has RMS <= ``activation_bound`` (the max over layers).
    It holds for ``model.forward(idx)`` too when ``embedding_in_domain`` (every embedding
    row has RMS <= input_rms). Computed from the weights at the time of the call.
    """

    bound: float
    activation_bound: float
    logit_bound: float
    input_rms: float
    embedding_max_rms: float
    embedding_in_domain: bool
    rows: list[CertificateRow]
    input_norm: str = INPUT_NORM
    output_norm: str = OUTPUT_NORM
    domain: str = ""
    config: dict = field(default_factory=dict)
    seconds: float = 0.0

    def certified_radius(self, margin: float) -> float:
        """Input radius (in ``||.||_in``) within which a logit margin ``margin`` at every
        position cannot flip any position's top-1 prediction: ``margin / (sqrt(2 V) * bound)``.

        Both the clean and the perturbed input must lie in the domain (docs/certificate.md,
        Corollary 4). ``margin`` = smallest over positions of (top logit - runner-up).
        """
        V = self.config.get("vocab_size")
        if margin <= 0 or self.bound == 0:
            return 0.0 if margin <= 0 else math.inf
        return margin / (math.sqrt(2 * V) * self.bound)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        head = (
            f"Lipschitz certificate: bound = {self.bound:.6g}   (logits RMS <= {self.logit_bound:.6g}, "
            f"residual-stream RMS <= {self.activation_bound:.6g})\n"
            f"  input norm : {self.input_norm}\n  output norm: {self.output_norm}\n"
            f"  domain     : {self.domain}\n"
            f"  embedding rows: max RMS {self.embedding_max_rms:.6g} "
            f"({'inside' if self.embedding_in_domain else 'OUTSIDE'} the domain)\n"
        )
        cols = f"  {'layer':<16} {'weight RMS->RMS norms':<44} {'branch':>9} {'block':>9} {'running':>10} {'act':>8}"
        lines = [head + cols, "  " + "-" * (len(cols) - 2)]
        for r in self.rows:
            wn = " ".join(f"{k}={v:.3g}" for k, v in r.weight_norms.items())
            lines.append(
                f"  {r.name:<16} {wn:<44} {r.branch_bound:>9.4g} {r.block_bound:>9.4g} "
                f"{r.running_bound:>10.5g} {r.activation_bound:>8.4g}"
            )
        return "\n".join(lines)


def certify(model: LipschitzGPT, input_rms: float = 1.0) -> Certificate:
    """Certify a Lipschitz bound of ``model.forward_embeddings`` (see :class:`Certificate`).

    Args:
        model: a ``LipschitzGPT`` (any dtype/device; weights are read, not modified).
        input_rms: domain radius: inputs with per-token RMS <= input_rms (default 1).

    Returns:
        A :class:`Certificate`. Spectral norms are exact (float64 Gram eigensolve,
        rounded up by ``SIGMA_MARGIN``); the bound is
        the composition of the per-sub-layer bounds of docs/certificate.md (Theorem 3).
    """
    if not isinstance(model, LipschitzGPT):
        raise TypeError(
            f"certify: expected a LipschitzGPT, got {type(model).__name__} (models with "
            "LayerNorm and plain residuals have no certificate here)"
        )
    if not (math.isfinite(input_rms) and input_rms > 0):
        raise ValueError(f"certify: input_rms must be finite and > 0, got {input_rms}")
    # The eigensolves are small (<= d x d): one thread is as fast, and multi-threaded
    # LAPACK on a busy CPU stalled for minutes in OpenMP barriers (seen on a shared 2-core VM).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _certify(model, float(input_rms))
    finally:
        torch.set_num_threads(threads)


def _certify(model: LipschitzGPT, input_rms: float, worst_case: bool = False) -> Certificate:
    # worst_case: every norm replaced by its cap (per-head and product norms by the bounds
    # the caps imply); the terms are non-decreasing in the norms, so this bounds the
    # certificate of every weight setting within the caps.
    start = time.perf_counter()
    cfg = model.config
    rows: list[CertificateRow] = []
    lip, a, a_max = 1.0, float(input_rms), float(input_rms)
    for i, block in enumerate(model.blocks):
        alpha = block.alpha
        for kind, branch in (("attention", block.attn), ("mlp", block.mlp)):
            if kind == "attention":
                if worst_case:
                    c = float(cfg.attn_cap)
                    per_head = torch.full((branch.n_heads,), c, dtype=torch.float64)
                    # ||W^h|| <= ||W|| <= c, ||M_h|| <= ||W_o|| ||W_v^h|| <= c^2
                    qk = (per_head, per_head, c) if branch.q is not None else ()
                    b_lip, gain = _attention_terms(branch, a, per_head, per_head * c, c, *qk)
                    norms = {k: c for k in (("q", "k", "v", "o") if qk else ("v", "o"))}
                else:
                    b_lip, gain, norms = attention_bounds(branch, a)
                block_lip = (1 - alpha) + alpha * b_lip
            else:
                if worst_case:
                    c = float(cfg.mlp_cap)
                    b_lip, gain = _mlp_terms(branch, c, c, c * c)
                    norms = {"in": c, "out": c, "out@in": c * c}
                    block_lip = (1 - alpha) + alpha * b_lip  # Theorem 2' is never above this
                else:
                    b_lip, gain, norms = mlp_bounds(branch)
                    block_lip = mlp_block_bound(branch, alpha)
            lip *= block_lip
            a = ((1 - alpha) + alpha * gain) * a
            a_max = max(a_max, a)
            rows.append(CertificateRow(f"blocks.{i}.{'attn' if kind == 'attention' else 'mlp'}",
                                       kind, norms, b_lip, block_lip, lip, a))
    if worst_case:
        head_norm = float(cfg.head_sigma_max)
    else:
        Wh = model.head.weight
        head_norm = math.sqrt(Wh.shape[1] / Wh.shape[0]) * _sigma(Wh)
    lip *= head_norm
    rows.append(CertificateRow("head", "head", {"head": head_norm}, head_norm, head_norm, lip, head_norm * a))
    emb_rms = float(input_rms) if worst_case else model.embed.max_row_rms()
    domain = (f"inputs x [B, T, d_model] of forward_embeddings with max_t ||x_t||_2 / sqrt(d_model) "
              f"<= {input_rms:g}, any T <= seq_len; exact arithmetic (float rounding not included)")
    if worst_case:
        domain += (f"; any weights with RMS->RMS norms <= attention cap {cfg.attn_cap:g}, MLP cap "
                   f"{cfg.mlp_cap:g}, head cap {cfg.head_sigma_max:g}")
    return Certificate(
        bound=lip,
        activation_bound=a_max,
        logit_bound=head_norm * a,
        input_rms=float(input_rms),
        embedding_max_rms=emb_rms,
        embedding_in_domain=emb_rms <= input_rms,
        rows=rows,
        domain=domain,
        config=model.config.to_dict(),
        seconds=time.perf_counter() - start,
    )


def worst_case_certificate(model: LipschitzGPT, input_rms: float | None = None) -> Certificate:
    """The certificate every weight setting within ``model``'s caps stays under.

    For any weights whose RMS->RMS norms are at most the config's caps (``attn_cap`` for
    W_q, W_k, W_v, W_o, ``mlp_cap`` for W_in, W_out, ``head_sigma_max`` for the head, which
    is what the hard cap and the other capping constraints keep after every step), the
    value :func:`certify` returns is at most the ``bound`` of this certificate, on the
    domain of per-token RMS <= ``input_rms`` (default ``embed_max_rms``, where the capped
    embedding puts every token). The weights themselves are not read.

    It is the product of the worst sub-layer bounds (Theorems 1 and 2 with every norm at its
    cap; Theorem 2' needs the weights and is dropped). ``lipschitz-train --target-bound``
    scales the head cap by ``target / bound`` of this certificate, so the run's bound
    stays under the target whatever the weights become.
    """
    if not isinstance(model, LipschitzGPT):
        raise TypeError(f"worst_case_certificate: expected a LipschitzGPT, got {type(model).__name__}")
    r = float(model.config.embed_max_rms if input_rms is None else input_rms)
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"worst_case_certificate: input_rms must be finite and > 0, got {input_rms}")
    return _certify(model, r, worst_case=True)


def _project(z: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each token down to per-token RMS <= radius (the domain)."""
    rms = z.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return z * torch.clamp(radius / rms.clamp_min(1e-300), max=1.0)


def empirical_lipschitz(
    model: LipschitzGPT,
    x: torch.Tensor,
    steps: int = 100,
    lr: float = 0.02,
    radius: float = 1e-4,
    input_rms: float = 1.0,
) -> float:
    """Lower bound on the Lipschitz constant of ``forward_embeddings`` by gradient ascent.

    Starting from ``x [B, T, d]`` (each batch element is an independent restart) and a
    random direction ``u``, ascends (Adam, ``lr`` in units of ``input_rms``) the ratio
    ``||f(p) - f(q)||_out / ||p - q||_in`` with ``p = proj(x)``, ``q = proj(x + r u / ||u||_in)``,
    ``r = radius * input_rms``, where ``proj`` scales each token into the domain
    (per-token RMS <= input_rms) and the norms are the certificate's. Runs in float64 on a
    copy of the model. Every evaluated pair lies in the domain, so the returned maximum
    over all steps and restarts is a true lower bound (up to float64 rounding).
    """
    if x.dim() != 3:
        raise ValueError(f"empirical_lipschitz: x must be [B, T, d], got {tuple(x.shape)}")
    f = copy.deepcopy(model).double().eval()
    for p in f.parameters():
        p.requires_grad_(False)
    r = radius * input_rms
    xv = x.detach().double().clone().requires_grad_(True)
    u = torch.randn_like(xv).requires_grad_(True)
    opt = torch.optim.Adam([{"params": [xv], "lr": lr * input_rms}, {"params": [u], "lr": lr}])
    best = 0.0
    for _ in range(max(1, steps)):
        p = _project(xv, input_rms)
        q = _project(xv + r * u / sequence_norm(u)[:, None, None], input_rms)
        den = sequence_norm(p - q).clamp_min(1e-300)
        ratio = sequence_norm(f.forward_embeddings(p) - f.forward_embeddings(q)) / den
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


class _CallableModule(types.ModuleType):
    """Lets ``lipschitz_ext.certify(model)`` call :func:`certify` while the module stays a module."""

    def __call__(self, model: LipschitzGPT, input_rms: float = 1.0) -> Certificate:
        return certify(model, input_rms=input_rms)


sys.modules[__name__].__class__ = _CallableModule
