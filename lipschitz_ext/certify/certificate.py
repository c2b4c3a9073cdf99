"""The certificate of a LipschitzGPT: ``certify(model) -> Certificate`` (per-layer rows, the
global bound), ``worst_case_certificate`` over every weight setting within the caps, and
the checks that refuse a model whose function the certificate cannot see.

Norms (input and output): a sequence ``z [T, n]`` is measured by
``||z|| = max_t ||z_t||_2 / sqrt(n)`` (largest per-token RMS), per batch element.
Domain: inputs ``x`` of ``forward_embeddings`` with ``max_t rms(x_t) <= input_rms``
(default 1, what the embedding produces when its rows are capped at RMS 1).
The bound holds for every sequence length and batch size.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.nn.modules import module as torch_module

from ..nn.attention import ATTENTION_BACKENDS, LipschitzAttention, reference_attention, sdpa_attention
from ..nn.config import GPTConfig
from ..nn.embedding import LipschitzEmbedding
from ..nn.fp8 import FP8_BACKEND
from ..nn.gpt import LipschitzBlock, LipschitzGPT
from ..nn.linear import LipschitzLinear
from ..nn.mlp import LipschitzMLP
from ..nn.mlp import GELU_MAX_SLOPE
from .bounds import (INPUT_NORM, OUTPUT_NORM, _attention_bounds, _attention_terms, _mlp_terms, _sigma, mlp_block_bound, mlp_block_gain,
                     mlp_bounds)
from .domain import _head_maps, TokenDomain, attention_bound_on_domain

__all__ = ["CertificateRow", "Certificate", "check_certifiable", "certify", "worst_case_certificate"]

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


def _check_finite(model: torch.nn.Module, who: str) -> None:
    """Refuse a model with a NaN/inf parameter or buffer, naming the first one."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            bad = int((~torch.isfinite(t.detach())).sum())
            raise ValueError(f"{who}: {name} has {bad} NaN/inf entr{'y' if bad == 1 else 'ies'} (of {t.numel()}); "
                             "a model with non-finite weights has no Lipschitz bound")


def _known_parts() -> tuple[tuple[type, ...], dict[str, object]]:
    """The module classes a LipschitzGPT is built of, and the attention backends the
    certificate covers (name -> the package's own function)."""
    modules = (LipschitzGPT, LipschitzBlock, LipschitzAttention, LipschitzMLP, LipschitzEmbedding, LipschitzLinear,
               torch.nn.ModuleList)
    return modules, {"sdpa": sdpa_attention, "reference": reference_attention, "fp8": FP8_BACKEND}


def check_certifiable(model: torch.nn.Module, who: str = "certify",
                      known: tuple[type, ...] | None = None) -> None:
    """Refuse (``ValueError`` naming what and where) a model whose function is not what its
    weights say: a forward hook or forward pre-hook on any of its modules, a global module
    hook (``torch.nn.modules.module.register_module_forward_hook`` and kin), a module of a
    class the certificate does not know (a subclass, a parametrization, an added module), a
    ``forward`` replaced on an instance, or an attention backend other than the package's
    own. A certificate of the weights alone would not bound such a model.

    ``known``: the module classes the caller's certificate covers (default: LipschitzGPT's
    own modules)."""
    for kind in ("_global_forward_hooks", "_global_forward_pre_hooks"):
        if getattr(torch_module, kind, None):
            raise ValueError(f"{who}: a global module forward {'pre-' if 'pre' in kind else ''}hook is registered "
                             "(torch.nn.modules.module); it changes every module's output, which a certificate "
                             "of the weights cannot see: remove it first")
    modules, backends = _known_parts()
    covers = "LipschitzGPT's own modules only"
    if known is not None:
        modules, covers = known, ", ".join(k.__name__ for k in known) + " only"
    for name, m in model.named_modules():
        where = name or "the model"
        if type(m) not in modules:
            raise ValueError(f"{who}: {where} is a {type(m).__module__}.{type(m).__qualname__}, a module the "
                             f"certificate does not know (it covers {covers})")
        if m._forward_hooks or m._forward_pre_hooks:
            kind = "forward hook" if m._forward_hooks else "forward pre-hook"
            raise ValueError(f"{who}: {where} has a {kind}; it can change the output, which a certificate of "
                             "the weights cannot see: remove it first")
        if "forward" in vars(m):
            raise ValueError(f"{who}: {where} has its forward replaced on the instance; the certificate covers "
                             "the class's own forward only")
        if isinstance(m, LipschitzAttention):
            fn = ATTENTION_BACKENDS.get(m.backend)
            if m.backend not in backends or fn is not backends[m.backend]:
                raise ValueError(f"{who}: {where} uses attention backend {m.backend!r}, which is not the package's "
                                 f"own {', '.join(backends)}; the certificate covers those only")


def _check_radius(input_rms: object, who: str) -> float:
    if isinstance(input_rms, bool) or not isinstance(input_rms, (int, float)):
        raise TypeError(f"{who}: input_rms must be a number, got {type(input_rms).__name__}")
    if not (math.isfinite(input_rms) and input_rms > 0):
        raise ValueError(f"{who}: input_rms must be finite and > 0, got {input_rms}")
    return float(input_rms)


def certify(model: LipschitzGPT, input_rms: float = 1.0, *, refined: bool = True, domain: bool = True) -> Certificate:
    """Certify a Lipschitz bound of ``model.forward_embeddings`` (see :class:`Certificate`).

    Args:
        model: a ``LipschitzGPT`` (any dtype/device; weights are read, not modified).
        input_rms: domain radius: inputs with per-token RMS <= input_rms (default 1).
        refined: Theorems 5 and 6 of docs/certificate.md (default); ``False`` gives the earlier
            bound (Theorems 1, 2', 3 only), which the refined one never exceeds.
        domain: with ``refined``, also Theorem 7 (default): each token's reachable set (a sum of
            ellipsoids, :class:`TokenDomain`) is followed through the layers and its projected radii
            replace ``||W|| a``; never looser than ``domain=False`` (Theorems 5 and 6 alone).

    Returns:
        A :class:`Certificate`. Spectral norms are exact (float64 Gram eigensolve,
        rounded up by ``SIGMA_MARGIN``); the bound is
        the composition of the per-sub-layer bounds of docs/certificate.md (Theorem 3).

    Raises:
        TypeError: ``model`` is not a ``LipschitzGPT``.
        ValueError: the model has forward hooks, forward pre-hooks (its own or global), a
            module the certificate does not know or a foreign attention backend
            (:func:`check_certifiable`: the weights would not describe the function);
            ``input_rms`` is not finite and > 0; a parameter or buffer (named in the
            message) has NaN/inf entries; or a number of the certificate overflows float64
            (e.g. ``input_rms=1e300``: the radius enters squared). Every number of a returned
            certificate is finite: an overflow is refused, never returned as inf or NaN.
    """
    if not isinstance(model, LipschitzGPT):
        raise TypeError(
            f"certify: expected a LipschitzGPT, got {type(model).__name__} (models with "
            "LayerNorm and plain residuals have no certificate here)"
        )
    r = _check_radius(input_rms, "certify")
    check_certifiable(model, "certify")
    _check_finite(model, "certify")
    # The eigensolves are small (<= d x d): one thread is as fast, and multi-threaded
    # LAPACK on a busy CPU stalled for minutes in OpenMP barriers (seen on a shared 2-core VM).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _checked(_certify(model, r, refined, domain), "certify")
    finally:
        torch.set_num_threads(threads)


def _checked(cert: Certificate, who: str) -> Certificate:
    """``cert`` if every number in it is finite, else a ValueError naming the first row that overflowed."""
    for r in cert.rows:
        values = (r.branch_bound, r.block_bound, r.running_bound, r.activation_bound, *r.weight_norms.values())
        if not all(math.isfinite(v) for v in values):
            raise ValueError(
                f"{who}: the certificate overflows float64 at {r.name} (input_rms={cert.input_rms:g}): the domain "
                "radius or the weight norms are too large for a finite bound; use a smaller input_rms")
    if not all(math.isfinite(v) for v in (cert.bound, cert.activation_bound, cert.logit_bound)):
        raise ValueError(f"{who}: the certificate overflows float64 (input_rms={cert.input_rms:g})")
    return cert


def _compose(cfg: GPTConfig, input_rms: float, sublayer, head_norm: float, emb_rms: float,
             domain_extra: str = "") -> Certificate:
    """Theorem 3: compose ``sublayer(i, kind, a, alpha) -> (norms, branch_lip, block_lip, block_gain)`` over
    the ``2 n_layers`` sub-layers, then the head of RMS->RMS norm ``head_norm``."""
    start = time.perf_counter()
    alpha = cfg.residual_scale / (2 * cfg.n_layers)
    rows: list[CertificateRow] = []
    lip, a, a_max = 1.0, float(input_rms), float(input_rms)
    for i in range(cfg.n_layers):
        for kind in ("attention", "mlp"):
            norms, b_lip, block_lip, block_gain = sublayer(i, kind, a, alpha)
            lip *= block_lip
            a = block_gain * a
            a_max = max(a_max, a)
            rows.append(CertificateRow(f"blocks.{i}.{'attn' if kind == 'attention' else 'mlp'}",
                                       kind, norms, b_lip, block_lip, lip, a))
    lip *= head_norm
    rows.append(CertificateRow("head", "head", {"head": head_norm}, head_norm, head_norm, lip, head_norm * a))
    domain = (f"inputs x [B, T, d_model] of forward_embeddings with max_t ||x_t||_2 / sqrt(d_model) "
              f"<= {input_rms:g}, any T <= seq_len; exact arithmetic (float rounding not included)") + domain_extra
    return Certificate(
        bound=lip,
        activation_bound=a_max,
        logit_bound=head_norm * a,
        input_rms=float(input_rms),
        embedding_max_rms=emb_rms,
        embedding_in_domain=emb_rms <= input_rms,
        rows=rows,
        domain=domain,
        config=cfg.to_dict(),
        seconds=time.perf_counter() - start,
    )


def _certify(model: LipschitzGPT, input_rms: float, refined: bool = True, domain: bool = True) -> Certificate:
    # Theorem 7 (refined and domain): every token's reachable set, followed through the sub-layers
    dom = TokenDomain(model.config.d_model, input_rms) if refined and domain else None

    def sublayer(i: int, kind: str, a: float, alpha: float):
        block = model.blocks[i]
        al = block.alpha
        if kind == "attention":
            b_lip, gain, norms, rho = _attention_bounds(block.attn, a, model.config.seq_len, refined)
            block_gain = (1 - al) + al * gain
            if dom is not None:
                b_lip = attention_bound_on_domain(block.attn, a, dom, max_len=model.config.seq_len, theorem5=b_lip,
                                                  rho=rho)
                dom.attention(al, abs(block.attn.out_factor), _head_maps(block.attn))
                block_gain = min(block_gain, dom.radius() / a)
            return norms, b_lip, (1 - al) + al * b_lip, block_gain
        b_lip, gain, norms = mlp_bounds(block.mlp)
        block_gain = mlp_block_gain(block.mlp, al) if refined else (1 - al) + al * gain
        if dom is not None:
            dom.mlp(al, block.mlp.act_divisor, block.mlp.fc_in.weight, block.mlp.fc_out.weight)
            block_gain = min(block_gain, dom.radius() / a)
        return norms, b_lip, mlp_block_bound(block.mlp, al), block_gain

    Wh = model.head.weight
    head_norm = math.sqrt(Wh.shape[1] / Wh.shape[0]) * _sigma(Wh)
    extra = ("" if refined and domain else "; Theorems 5-6 without the token domain (domain=False)" if refined
             else "; earlier bound (Theorems 1-3 only, refined=False)")
    return _compose(model.config, input_rms, sublayer, head_norm, model.embed.max_row_rms(), extra)


def _worst_case(cfg: GPTConfig, input_rms: float, refined: bool = True) -> Certificate:
    # every norm replaced by its cap (per-head and product norms by the bounds the caps
    # imply); the terms are non-decreasing in the norms, so this bounds the certificate
    # of every weight setting within the caps.
    positional = cfg.softmax_scale == 0
    shape = (abs(LipschitzAttention.out_factor), abs(float(cfg.softmax_scale)), cfg.n_heads, positional)

    def sublayer(i: int, kind: str, a: float, alpha: float):
        if kind == "attention":
            c = float(cfg.attn_cap)
            per_head = torch.full((cfg.n_heads,), c, dtype=torch.float64)
            # ||W^h|| <= ||W|| <= c, ||M_h|| <= ||W_o|| ||W_v^h|| <= c^2, rho_h <= q_h k_h <= c^2
            qk = () if positional else (per_head, per_head, c)
            b_lip, gain = _attention_terms(shape, a, per_head, per_head * c, c, *qk, refined=refined)
            norms = {k: c for k in (("v", "o") if positional else ("q", "k", "v", "o"))}
        else:
            c = float(cfg.mlp_cap)
            b_lip, gain = _mlp_terms(GELU_MAX_SLOPE, c, c, c * c)
            norms = {"in": c, "out": c, "out@in": c * c}
        # Theorems 2' and 6 are never above the triangle-inequality forms (their products can sit at c^2)
        return norms, b_lip, (1 - alpha) + alpha * b_lip, (1 - alpha) + alpha * gain

    extra = (f"; any weights with RMS->RMS norms <= attention cap {cfg.attn_cap:g}, MLP cap "
             f"{cfg.mlp_cap:g}, head cap {cfg.head_sigma_max:g}")
    return _compose(cfg, input_rms, sublayer, float(cfg.head_sigma_max), float(input_rms), extra)


def worst_case_certificate(cfg_or_model: GPTConfig | LipschitzGPT, input_rms: float | None = None, *,
                           refined: bool = True) -> Certificate:
    """The certificate every weight setting within the caps of a config stays under.

    ``cfg_or_model`` is a ``GPTConfig`` or a ``LipschitzGPT`` (then its ``config`` is used;
    its weights are not read, so both give the same certificate). For any weights whose
    RMS->RMS norms are at most the config's caps (``attn_cap`` for W_q, W_k, W_v, W_o,
    ``mlp_cap`` for W_in, W_out, ``head_sigma_max`` for the head, which
    is what the hard cap and the other capping constraints keep after every step), the
    value :func:`certify` returns is at most the ``bound`` of this certificate, on the
    domain of per-token RMS <= ``input_rms`` (default ``embed_max_rms``, where the capped
    embedding puts every token).

    It is the product of the worst sub-layer bounds (Theorems 5 and 2 with every norm at its
    cap, per-head products ``rho_h`` at ``c_att^2``; Theorems 2' and 6 need the weights and are
    dropped; ``refined=False``: Theorem 1 instead of 5, the earlier worst case). ``lipschitz-train --target-bound``
    scales the head cap by ``target / bound`` of this certificate, so the run's bound
    stays under the target whatever the weights become.

    Raises:
        TypeError: ``cfg_or_model`` is neither a ``GPTConfig`` nor a ``LipschitzGPT``.
        ValueError: ``input_rms`` not finite and > 0, or the certificate overflows float64.
    """
    if isinstance(cfg_or_model, LipschitzGPT):
        cfg = cfg_or_model.config
    elif isinstance(cfg_or_model, GPTConfig):
        cfg = cfg_or_model
    else:
        raise TypeError("worst_case_certificate: expected a GPTConfig or a LipschitzGPT, got "
                        f"{type(cfg_or_model).__name__}")
    r = _check_radius(cfg.embed_max_rms if input_rms is None else input_rms, "worst_case_certificate")
    return _checked(_worst_case(cfg, r, refined), "worst_case_certificate")


#: The divisor of the published MLP term (docs/theory.md, section 5): max GELU' rounded.
