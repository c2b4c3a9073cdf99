"""Analyses of trained models (``lipschitz-eval``): robustness to embedding-space
attacks against the certified radius, per-layer activation magnitudes, and attention /
output logit growth.

    lipschitz-eval robustness --checkpoint runs/a --checkpoint runs/b --eps 0.01,0.02,0.05
    lipschitz-eval activations --checkpoint runs/a [--baseline runs/base]

Norms are the certificate's (lipschitz_ext.certify): a sequence is measured by
the largest per-token RMS norm, ``max_t ||x_t||_2 / sqrt(d)``; an attack of
size eps moves every token's embedding by at most eps in RMS. Each command
writes a table (printed and saved as CSV/JSON) and a PNG into ``--out``.
The commands themselves are :mod:`lipschitz_ext.cli`'s.
"""

from __future__ import annotations

import math
import os
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import data as data_mod
from .certify import Certificate, certify
from .ops.fp8_attention import E4M3_MAX
from .plots import pyplot, save_figure
from .run import load_run_data, make_output_dir
from .tables import print_table, write_table

__all__ = ["pgd_attack", "certified_radius", "robustness", "activations", "attention_logits",
           "attention_logit_max", "output_logit_stats", "main"]


def _upcast(z: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors; float32/float64 stay as they are."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _token_rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt()


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float, domain_rms: float | None) -> torch.Tensor:
    """Per-token projection: RMS(delta_t) <= eps and, if given, RMS(x_t + delta_t) <= domain_rms."""
    delta = delta * (eps / _token_rms(delta).clamp_min(1e-12)).clamp(max=1.0)
    if domain_rms is not None:
        y = x + delta
        y = y * (domain_rms / _token_rms(y).clamp_min(1e-12)).clamp(max=1.0)
        delta = y - x
    return delta


def pgd_attack(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
               step_size: float | None = None, domain_rms: float | None = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy in embedding space.

    ``x [B, T, d]`` are clean token embeddings; returns ``x + delta`` with every
    token moved by at most ``eps`` in RMS (the certificate's input norm) and kept
    in the certificate's domain (per-token RMS <= ``domain_rms``). ``eps`` is a
    float or a tensor of per-sequence radii ``[B]``. Label entries ``-100`` are
    ignored, so an attack can target chosen positions. ``steps=1``
    with ``step_size=eps`` is the single-step attack (normalized-gradient FGSM).
    Each step moves every token along its own L2-normalized gradient.
    """
    if not isinstance(eps, torch.Tensor):
        eps = torch.tensor(float(eps), dtype=x.dtype)
    eps = eps.to(device=x.device, dtype=x.dtype)
    if eps.dim() == 1:  # one radius per batch element
        eps = eps.view(-1, 1, 1)
    if bool((eps <= 0).all()):
        return x.clone()
    eps = eps.clamp_min(0)
    step_size = 2.5 * eps / steps if step_size is None else step_size
    d = x.shape[-1]
    if steps > 1:  # random start inside the ball
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        delta = _project(noise * eps, x, eps, domain_rms)
    else:
        delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(_upcast(model.forward_embeddings(x + delta)).flatten(0, 1), y.flatten())
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            g_rms = g.norm(dim=-1, keepdim=True) / math.sqrt(d)
            delta = _project(delta + step_size * g / g_rms.clamp_min(1e-20), x, eps, domain_rms)
    return (x + delta).detach()


def certified_radius(logits: torch.Tensor, bound: float) -> torch.Tensor:
    """Per-token radius within which the top-1 prediction provably cannot change.

    With the certificate's norms, ``max_t ||dz_t||_2/sqrt(V) <= bound * eps``, so at
    each position the logit vector moves by at most ``bound * eps * sqrt(V)`` in L2,
    and the margin ``z_top - z_j`` by at most ``sqrt(2)`` times that. The prediction
    is certified for every ``eps < margin / (sqrt(2) * sqrt(V) * bound)`` (proof in
    docs/certificate.md): :meth:`lipschitz_ext.certify.Certificate.certified_radius`,
    per position. ``logits [..., V]`` -> radius ``[...]``.
    """
    try:
        b = float(bound)
    except (TypeError, ValueError):
        b = math.nan
    if isinstance(bound, bool) or not (math.isfinite(b) and b >= 0):
        raise ValueError(f"certified_radius: bound must be a finite certified Lipschitz bound >= 0 "
                         f"(certify(model).bound of a LipschitzGPT), got {bound!r}; baseline models have none")
    top2 = _upcast(logits).topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    # certify's radius is linear in the margin: its value at margin 1 scales every position's
    per_margin = Certificate.certified_radius(_RadiusOnly(b, {"vocab_size": logits.shape[-1]}), 1.0)
    return torch.where(margin > 0, margin * per_margin, torch.zeros_like(margin))


def _val_batches(cfg, data, n_batches: int, batch_size: int):
    """The fixed validation windows of a run's data (``data.eval_batches``)."""
    return data_mod.eval_batches(data.val, batch_size, cfg.seq_len, n_batches)


class _RadiusOnly(NamedTuple):
    """The two fields :meth:`Certificate.certified_radius` reads (a bound, not a full certificate)."""

    bound: float
    config: dict


# ---------------------------------------------------------------------------
# robustness
# ---------------------------------------------------------------------------
def robustness(run_dirs: list[str], eps_list: list[float], out: str, n_batches: int = 4, batch_size: int = 16,
               pgd_steps: int = 10, relative: bool = True, device: str = "cpu", seed: int = 0) -> list[dict]:
    """Clean, single-step and PGD accuracy per eps, and the certified fraction.

    ``relative=True`` measures eps in units of the model's mean clean token RMS
    (so models whose embeddings have different scales are attacked alike); the
    certified fraction always uses the absolute radius ``eps_abs`` against the
    certificate. A position counts as robust under attack only if it is correct
    both clean and attacked (the zero perturbation is inside every ball), so the
    attacked accuracies never exceed the clean one. For a ``LipschitzGPT`` the
    certificate's domain is ``per-token RMS <= input_rms`` with ``input_rms`` =
    the larger of the configured embedding cap and the largest embedding row RMS
    (so the clean inputs are inside it); the attacks stay in that domain.
    Baselines get ``certified_bound = certified_fraction = None``.
    """
    from .nn import LipschitzGPT

    if not run_dirs:
        raise ValueError("robustness: give at least one --checkpoint run folder")
    bad = [e for e in eps_list if not (math.isfinite(e) and e >= 0)]
    if bad:
        raise ValueError(f"--eps values must be finite and >= 0, got {bad}")
    make_output_dir(out, writes=("robustness.csv", "robustness.png"))  # a file, unwritable path or earlier result: a clear error
    rows: list[dict] = []
    for run in run_dirs:
        model, cfg, data = load_run_data(run, device=device, arg="--checkpoint")
        for p in model.parameters():
            p.requires_grad_(False)
        certified = isinstance(model, LipschitzGPT)
        rho = model.input_rms() if certified else None
        bound = float(certify(model, input_rms=rho).bound) if certified else None
        batches = [(x.to(device), y.to(device)) for x, y in _val_batches(cfg, data, n_batches, batch_size)]
        embeds = [model.embed(x) for x, _ in batches]
        scale = float(torch.cat([_token_rms(e).flatten() for e in embeds]).mean()) if relative else 1.0
        with torch.no_grad():
            clean_logits = [model.forward_embeddings(e) for e in embeds]
        radius = torch.cat([certified_radius(z, bound).flatten() for z in clean_logits]) if certified else None
        correct = torch.cat([(z.argmax(-1) == y).flatten() for z, (_, y) in zip(clean_logits, batches)])
        g = torch.Generator().manual_seed(seed)
        for eps in [0.0] + sorted(set(e for e in eps_list if e > 0)):
            eps_abs = eps * scale
            acc = {}
            for name, steps, step in (("fgsm", 1, eps_abs), ("pgd", pgd_steps, None)):
                hits = 0
                for e, z, (_, y) in zip(embeds, clean_logits, batches):
                    xa = pgd_attack(model, e, y, eps_abs, steps, step, rho, g)
                    with torch.no_grad():
                        hits += ((model.forward_embeddings(xa).argmax(-1) == y) & (z.argmax(-1) == y)).sum().item()
                acc[name] = hits / correct.numel()
            row = {"run": run, "model": cfg.model, "eps": eps, "eps_abs": eps_abs, "certified_bound": bound,
                   "input_rms": rho,
                   "clean_accuracy": correct.float().mean().item(), "fgsm_accuracy": acc["fgsm"],
                   "pgd_accuracy": acc["pgd"],
                   "certified_fraction": None if radius is None else
                   ((radius > eps_abs) & correct).float().mean().item()}
            rows.append(row)
    write_table(rows, os.path.join(out, "robustness.csv"))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(run_dirs):
        rr = [r for r in rows if r["run"] == run]
        label = f"{os.path.basename(os.path.normpath(run))} ({rr[0]['model']}"
        label += f", bound {rr[0]['certified_bound']:.3g})" if rr[0]["certified_bound"] is not None else ")"
        ax.plot([r["eps"] for r in rr], [100 * r["pgd_accuracy"] for r in rr], "o-", color=f"C{i}", label=label + " PGD")
        ax.plot([r["eps"] for r in rr], [100 * r["fgsm_accuracy"] for r in rr], "s--", color=f"C{i}", alpha=0.6)
        if rr[0]["certified_fraction"] is not None:
            ax.plot([r["eps"] for r in rr], [100 * r["certified_fraction"] for r in rr], ":", color=f"C{i}",
                    label=label + " certified")
    ax.set(xlabel="eps (per-token RMS" + (", relative to clean embedding RMS)" if relative else ")"),
           ylabel="validation accuracy (%)", title="accuracy under embedding-space attack (dashed: single step)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(out, "robustness.png"))
    return rows


# ---------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------
def activations(run_dir: str, out: str, baseline: str | None = None, n_batches: int = 4, batch_size: int = 16,
                device: str = "cpu") -> list[dict]:
    """Per-layer max |activation| and RMS on validation batches (and the fraction
    of entries beyond e4m3's 448 at static scale 1), optionally beside a baseline."""
    from .nn import activation_stats

    make_output_dir(out, writes=("activations.csv", "activations.png"))  # a file, unwritable path or earlier result: a clear error
    rows: list[dict] = []
    for role, run in (("model", run_dir), ("baseline", baseline)):
        if run is None:
            continue
        model, cfg, data = load_run_data(run, device=device, arg="--checkpoint" if role == "model" else "--baseline")
        agg: dict[str, dict] = {}
        sat: dict[str, list[int]] = {}
        handles = []

        def hook(name):
            def fn(mod, inp, outp):
                if isinstance(outp, torch.Tensor):
                    s = sat.setdefault(name, [0, 0])
                    s[0] += int((outp.detach().abs() > E4M3_MAX).sum())
                    s[1] += outp.numel()
            return fn

        for name, mod in model.named_modules():
            if name:
                handles.append(mod.register_forward_hook(hook(name)))
        with torch.no_grad():
            for x, _ in _val_batches(cfg, data, n_batches, batch_size):
                stats = activation_stats(model, x.to(device))
                for name, st in stats.items():
                    a = agg.setdefault(name, {"max_abs": 0.0, "sq": 0.0, "n": 0})
                    a["max_abs"] = max(a["max_abs"], float(st["max_abs"]))
                    a["sq"] += float(st["rms"]) ** 2
                    a["n"] += 1
        for h in handles:
            h.remove()
        for name, a in agg.items():
            s = sat.get(name, [0, 1])
            rows.append({"run": run, "role": role, "model": cfg.model, "layer": name, "max_abs": a["max_abs"],
                         "rms": math.sqrt(a["sq"] / a["n"]), "e4m3_saturated_fraction": s[0] / max(s[1], 1)})
    write_table(rows, os.path.join(out, "activations.csv"))
    print_table(rows, ["role", "layer", "max_abs", "rms", "e4m3_saturated_fraction"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(rows)), 4.5))
    for i, role in enumerate(("model", "baseline")):
        rr = [r for r in rows if r["role"] == role]
        if rr:
            ax.semilogy(range(len(rr)), [max(r["max_abs"], 1e-6) for r in rr], "o-", color=f"C{i}",
                        label=f"{rr[0]['model']} max |activation|")
            ax.semilogy(range(len(rr)), [max(r["rms"], 1e-6) for r in rr], "x:", color=f"C{i}", label=f"{rr[0]['model']} RMS")
            ax.set_xticks(range(len(rr)), [r["layer"] for r in rr], rotation=70, fontsize=6)
    ax.axhline(E4M3_MAX, color="k", lw=0.8, ls="--", label=f"e4m3 max ({E4M3_MAX:g})")
    ax.set(ylabel="magnitude", title="activation magnitudes per layer (validation)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(out, "activations.png"))
    return rows


@torch.no_grad()
def attention_logits(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Causal attention logits ``[B, H, T, T]`` of an attention module on its input
    ``x [B, T, d]``: after the softmax scale, before the softmax, ``-inf`` above the
    diagonal. The module computes them (``attention_logits(x)``): ``LipschitzAttention``
    ``(s / d_head) q_h k_h^T`` plus its positional bias; ``BaselineAttention``
    ``q_h k_h^T / sqrt(d_head)``, RoPE on q and k when it uses it."""
    if not hasattr(mod, "attention_logits"):
        raise TypeError(f"attention_logits: unsupported attention module {type(mod).__name__}")
    return mod.attention_logits(x)


def _is_attention(mod: torch.nn.Module) -> bool:
    from .nn import LipschitzAttention
    from .nn.baseline import BaselineAttention

    return isinstance(mod, (LipschitzAttention, BaselineAttention)) or hasattr(mod, "attention_logits")


@torch.no_grad()
def attention_logit_max(model, idx: torch.Tensor) -> float:
    """Largest attention logit (after its scale, before the softmax, causal entries
    only) on ``idx``, over every attention module of the model (Wortsman et al.'s
    attention-logit growth indicator). Raises ``ValueError`` for a model without any."""
    found: list[float] = []
    handles = [mod.register_forward_hook(lambda m, inp, outp: found.append(float(attention_logits(m, inp[0]).max())))
               for mod in model.modules() if _is_attention(mod)]
    try:
        model(idx)
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise ValueError(f"attention_logit_max: {type(model).__name__} has no attention module")
    return max(found)


@torch.no_grad()
def output_logit_stats(model, idx: torch.Tensor) -> dict[str, float]:
    """Output-logit drift indicators: mean logit, max |logit|."""
    z = model(idx).float()
    return {"mean_logit": float(z.mean()), "max_abs_logit": float(z.abs().max())}


def main(argv: list[str] | None = None) -> int:
    """``lipschitz-eval`` (:func:`lipschitz_ext.cli.eval_main`), kept here for entry
    points installed before the command moved to :mod:`lipschitz_ext.cli`."""
    from .cli import eval_main

    return eval_main(argv)


if __name__ == "__main__":  # python -m lipschitz_ext.eval
    sys.exit(main())
