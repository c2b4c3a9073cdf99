"""``lipschitz-eval``: robustness, activation magnitudes, the accuracy-bound
frontier and learning-rate sensitivity, from ``lipschitz-train`` run folders.

    lipschitz-eval robustness --checkpoint runs/a --checkpoint runs/b --eps 0.01,0.02,0.05
    lipschitz-eval activations --checkpoint runs/a [--baseline runs/base]
    lipschitz-eval frontier runs/sweep/*/
    lipschitz-eval lr-sensitivity --lrs 0.003,0.01,0.03,0.1,0.3,1,3 --out runs/lrs

Norms are the certificate's (lipschitz_ext.certify): a sequence is measured by
the largest per-token RMS norm, ``max_t ||x_t||_2 / sqrt(d)``; an attack of
size eps moves every token's embedding by at most eps in RMS. Each command
writes a table (printed and saved as CSV/JSON) and a PNG into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import math
import os
import pickle
import sys
from typing import Any

import torch
import torch.nn.functional as F

from . import data as data_mod
from . import train as train_mod

__all__ = ["load_run", "pgd_attack", "certified_radius", "robustness", "activations", "frontier",
           "attention_logits", "attention_logit_max", "output_logit_stats", "lr_sensitivity", "main"]


class CheckpointError(ValueError):
    """A run folder that is missing, incomplete or incompatible."""


def load_run(run_dir: str, which: str = "best", device: str | torch.device = "cpu", arg: str | None = None):
    """Rebuild the model of a ``lipschitz-train`` run folder from its checkpoint.

    Returns ``(model, cfg, data)``: the model in eval mode on ``device``, the
    run's :class:`~lipschitz_ext.train.TrainConfig` and its data (same split).
    ``arg`` (e.g. ``"--baseline"``) prefixes error messages, to say which input was bad.
    Raises :class:`CheckpointError` (a ``ValueError``) for a missing folder, a folder
    without ``best.pt``/``latest.pt``, or a file that is not a lipschitz-train checkpoint.
    """
    who = f"{arg} {run_dir}" if arg else str(run_dir)
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"{who}: run folder not found")
    path = os.path.join(run_dir, f"{which}.pt")
    if not os.path.exists(path):
        path = os.path.join(run_dir, "latest.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"{who}: holds no checkpoint (best.pt / latest.pt); is it a lipschitz-train run?")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        cfg = train_mod.TrainConfig(**ckpt["config"])
        state = ckpt["model"]
    except (KeyError, TypeError, RuntimeError, EOFError, OSError, ValueError, AttributeError,
            pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{who}: {path} is not a lipschitz-train checkpoint ({exc})") from None
    data = data_mod.load_data(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.vocab_size)
    if data.tokenizer.to_dict() != ckpt.get("tokenizer"):
        raise CheckpointError(f"{who}: its data ({cfg.data or 'built-in corpus'}) no longer matches the "
                              "checkpoint's vocabulary")
    model = train_mod.build_model(cfg, data.vocab_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{who}: {path}: weights do not fit the model its config describes ({exc})") from None
    return model.to(device).eval(), cfg, data


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
    docs/certificate.md). ``logits [..., V]`` -> radius ``[...]``.
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
    V = logits.shape[-1]
    radius = margin / (math.sqrt(2.0) * math.sqrt(V) * b)  # bound 0: a constant map, radius inf
    return torch.where(margin > 0, radius, torch.zeros_like(radius))


def _val_batches(cfg, data, n_batches: int, batch_size: int):
    return data_mod.eval_batches(data.val, batch_size, cfg.seq_len, n_batches)


def _write_table(rows: list[dict], path: str) -> None:
    """``rows`` as CSV at ``path`` and as JSON (a list of objects, ``None`` kept as null)
    beside it with the extension ``.json``."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=1)


def _print_table(rows: list[dict], cols: list[str]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    from .certify import certify
    from .nn import LipschitzGPT

    if not run_dirs:
        raise ValueError("robustness: give at least one --checkpoint run folder")
    bad = [e for e in eps_list if not (math.isfinite(e) and e >= 0)]
    if bad:
        raise ValueError(f"--eps values must be finite and >= 0, got {bad}")
    os.makedirs(out, exist_ok=True)
    rows: list[dict] = []
    for run in run_dirs:
        model, cfg, data = load_run(run, device=device, arg="--checkpoint")
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
    _write_table(rows, os.path.join(out, "robustness.csv"))
    plt = _plt()
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
    fig.tight_layout()
    fig.savefig(os.path.join(out, "robustness.png"), dpi=110)
    plt.close(fig)
    return rows


# ---------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------
E4M3_MAX = 448.0


def activations(run_dir: str, out: str, baseline: str | None = None, n_batches: int = 4, batch_size: int = 16,
                device: str = "cpu") -> list[dict]:
    """Per-layer max |activation| and RMS on validation batches (and the fraction
    of entries beyond e4m3's 448 at static scale 1), optionally beside a baseline."""
    from .nn import activation_stats

    os.makedirs(out, exist_ok=True)
    rows: list[dict] = []
    for role, run in (("model", run_dir), ("baseline", baseline)):
        if run is None:
            continue
        model, cfg, data = load_run(run, device=device, arg="--checkpoint" if role == "model" else "--baseline")
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
    _write_table(rows, os.path.join(out, "activations.csv"))
    _print_table(rows, ["role", "layer", "max_abs", "rms", "e4m3_saturated_fraction"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(rows)), 4.5))
    for i, role in enumerate(("model", "baseline")):
        rr = [r for r in rows if r["role"] == role]
        if rr:
            ax.semilogy(range(len(rr)), [max(r["max_abs"], 1e-6) for r in rr], "o-", color=f"C{i}",
                        label=f"{rr[0]['model']} max |activation|")
            ax.semilogy(range(len(rr)), [max(r["rms"], 1e-6) for r in rr], "x:", color=f"C{i}", label=f"{rr[0]['model']} RMS")
            ax.set_xticks(range(len(rr)), [r["layer"] for r in rr], rotation=70, fontsize=6)
    ax.axhline(E4M3_MAX, color="k", lw=0.8, ls="--", label="e4m3 max (448)")
    ax.set(ylabel="magnitude", title="activation magnitudes per layer (validation)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "activations.png"), dpi=110)
    plt.close(fig)
    return rows


# ---------------------------------------------------------------------------
# frontier
# ---------------------------------------------------------------------------
def frontier(run_dirs: list[str], out: str) -> list[dict]:
    """Validation accuracy vs certified bound of finished runs, one curve per constraint."""
    if not run_dirs:
        raise ValueError("frontier: give at least one RUN_DIR")
    rows, skipped = [], []
    for run in run_dirs:
        if not os.path.isdir(run):
            raise CheckpointError(f"RUN_DIR {run}: run folder not found")
        sp, cp = os.path.join(run, "summary.json"), os.path.join(run, "config.json")
        if not (os.path.exists(sp) and os.path.exists(cp)):
            raise CheckpointError(f"RUN_DIR {run}: no summary.json/config.json (an unfinished or foreign run?)")
        with open(sp, encoding="utf-8") as fh:
            s = json.load(fh)
        with open(cp, encoding="utf-8") as fh:
            c = json.load(fh)
        if s.get("certified_bound") is None:
            skipped.append(run)
            continue  # unconstrained baselines have no bound to plot against
        rows.append({"constraint": c["constraint"], "sigma_max": c["sigma_max"], "run": run,
                     **{k: s.get(k) for k in ("certified_bound", "val_accuracy", "val_loss", "max_activation",
                                              "steps", "wall_seconds")}})
    if not rows:
        raise CheckpointError(f"no certified (LipschitzGPT) runs among the given folders; baselines have no "
                              f"certified bound: {', '.join(skipped)}")
    os.makedirs(out, exist_ok=True)
    train_mod.write_frontier(rows, out)
    return rows


# ---------------------------------------------------------------------------
# learning-rate sensitivity (Wortsman et al. 2023, "Small-scale proxies for
# large-scale Transformer training instabilities")
# ---------------------------------------------------------------------------
@torch.no_grad()
def attention_logits(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Causal attention logits ``[B, H, T, T]`` of an attention module on its input
    ``x [B, T, d]``: after the softmax scale, before the softmax, ``-inf`` above the
    diagonal. A module with its own ``attention_logits(x)`` (``LipschitzAttention``:
    ``(s / d_head) q_h k_h^T`` plus its positional bias) is asked directly;
    ``BaselineAttention``: ``q_h k_h^T / sqrt(d_head)``, RoPE on q and k when it uses it."""
    from .nn.attention import apply_rope
    from .nn.baseline import BaselineAttention

    if hasattr(mod, "attention_logits"):
        return mod.attention_logits(x)
    if not isinstance(mod, BaselineAttention):
        raise TypeError(f"attention_logits: unsupported attention module {type(mod).__name__}")
    B, T, d = x.shape
    q, k, _ = mod.qkv(x).view(B, T, 3, mod.n_heads, mod.d_head).permute(2, 0, 3, 1, 4)
    if mod.rope:
        q, k = apply_rope(q, mod.rope_base), apply_rope(k, mod.rope_base)
    logits = (_upcast(q) @ _upcast(k).transpose(-2, -1)) / math.sqrt(mod.d_head)
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    return logits.masked_fill(future, float("-inf"))


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


def lr_sensitivity(base: "train_mod.TrainConfig", multipliers: list[float], out: str,
                   sizes: list[tuple[int, int]] = ((32, 2), (64, 2)), models=("lipschitz", "baseline"),
                   quiet: bool = True) -> list[dict]:
    """Final validation loss vs learning rate for each (model, size); all of a
    model's learning rates are multiplied by each multiplier. ``sizes`` are
    ``(d_model, n_layers)``. Logs the attention-logit maximum and output-logit drift."""
    os.makedirs(out, exist_ok=True)
    rows: list[dict] = []
    for model in models:
        for d, L in sizes:
            for m in multipliers:
                cfg = dataclasses.replace(
                    base, model=model, d_model=d, n_layers=L, lr=base.lr * m, head_lr=base.head_lr * m,
                    embed_lr=base.embed_lr * m, baseline_lr=base.baseline_lr * m,
                    out=os.path.join(out, f"{model}-d{d}-L{L}-x{m:g}"))
                summ = train_mod.train(cfg, quiet=quiet)
                row = {"model": model, "d_model": d, "n_layers": L, "lr_multiplier": m,
                       "lr": cfg.baseline_lr if model == "baseline" else cfg.lr, "status": summ["status"],
                       "val_loss": summ["val_loss"], "val_accuracy": summ["val_accuracy"],
                       "certified_bound": summ["certified_bound"]}
                if summ["status"] != "diverged":
                    net, rcfg, data = load_run(cfg.out, which="latest")
                    x, _ = next(iter(_val_batches(rcfg, data, 1, 8)))
                    row["attention_logit_max"] = attention_logit_max(net, x)
                    row.update(output_logit_stats(net, x))
                with open(os.path.join(cfg.out, "lr_sensitivity.json"), "w", encoding="utf-8") as fh:
                    json.dump(row, fh, indent=1)  # this run's own record, beside its metrics.jsonl
                rows.append(row)
                _write_table(rows, os.path.join(out, "lr_sensitivity.csv"))
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (model, (d, L)) in enumerate((mm, s) for mm in models for s in sizes):
        rr = [r for r in rows if r["model"] == model and r["d_model"] == d and r["n_layers"] == L]
        style = dict(color=f"C{0 if model == 'lipschitz' else 1}", ls="-" if (d, L) == sizes[0] else "--", marker="o")
        label = f"{model} d={d} L={L}"
        ok = [r for r in rr if r["val_loss"] is not None and math.isfinite(r["val_loss"])]
        ax[0].plot([r["lr_multiplier"] for r in ok], [r["val_loss"] for r in ok], label=label, **style)
        ok = [r for r in rr if r.get("attention_logit_max") is not None]
        ax[1].plot([r["lr_multiplier"] for r in ok], [r["attention_logit_max"] for r in ok], label=label, **style)
    ax[0].set(xscale="log", xlabel="learning-rate multiplier (x each model's default lrs)",
              ylabel="final validation loss", title="LR sensitivity")
    ax[1].set(xscale="log", yscale="symlog", xlabel="learning-rate multiplier", ylabel="max attention logit",
              title="attention-logit growth")
    for a in ax:
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lr_sensitivity.png"), dpi=110)
    plt.close(fig)
    return rows


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lipschitz-eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("robustness", help="attacks in embedding space and certified radii")
    r.add_argument("--checkpoint", action="append", required=True, metavar="RUN_DIR",
                   help="a lipschitz-train run folder (repeat for several on one plot)")
    r.add_argument("--eps", type=_floats, default=[0.01, 0.02, 0.05, 0.1, 0.2])
    r.add_argument("--pgd-steps", type=int, default=10)
    r.add_argument("--absolute", action="store_true", help="eps in absolute RMS units, not relative")
    a = sub.add_parser("activations", help="per-layer activation magnitudes")
    a.add_argument("--checkpoint", required=True, metavar="RUN_DIR")
    a.add_argument("--baseline", metavar="RUN_DIR", help="a BaselineGPT run to compare with")
    f = sub.add_parser("frontier", help="validation accuracy vs certified bound")
    f.add_argument("runs", nargs="+", metavar="RUN_DIR")
    s = sub.add_parser("lr-sensitivity", help="final validation loss vs learning rate")
    s.add_argument("--preset", default="shakespeare-cpu", choices=sorted(train_mod.PRESETS))
    s.add_argument("--lrs", type=_floats, default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
                   help="learning-rate multipliers (>= 3 orders of magnitude)")
    s.add_argument("--sizes", default="32x2,64x2", help="model sizes d_modelxn_layers, comma-separated")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--data")
    for sp in (r, a, s):
        sp.add_argument("--batches", type=int, default=4, help="validation batches" if sp is not s else argparse.SUPPRESS)
    for sp in (r, a, f, s):
        sp.add_argument("--out", default=None, help="output folder (default runs/eval-<cmd>)")
        sp.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    out = args.out or os.path.join("runs", f"eval-{args.cmd}")
    try:
        if args.cmd == "robustness":
            rows = robustness(args.checkpoint, args.eps, out, n_batches=args.batches, pgd_steps=args.pgd_steps,
                              relative=not args.absolute, device=args.device)
            _print_table(rows, ["run", "eps", "clean_accuracy", "fgsm_accuracy", "pgd_accuracy", "certified_fraction"])
        elif args.cmd == "activations":
            activations(args.checkpoint, out, args.baseline, n_batches=args.batches, device=args.device)
        elif args.cmd == "frontier":
            rows = frontier([d for pat in args.runs for d in (glob.glob(pat) or [pat])], out)
            _print_table(rows, ["constraint", "sigma_max", "certified_bound", "val_accuracy", "run"])
        else:
            sizes = [tuple(int(v) for v in sz.split("x")) for sz in args.sizes.split(",")]
            base = train_mod.config_from_preset(args.preset, steps=args.steps, eval_every=args.steps,
                                                device=args.device, **({"data": args.data} if args.data else {}))
            rows = lr_sensitivity(base, args.lrs, out, sizes=sizes)
            _print_table(rows, ["model", "d_model", "n_layers", "lr_multiplier", "val_loss", "attention_logit_max",
                                "max_abs_logit"])
    except (CheckpointError, data_mod.DataError, ValueError, FileNotFoundError) as exc:
        print(f"lipschitz-eval: error: {exc}", file=sys.stderr)
        return 2
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
