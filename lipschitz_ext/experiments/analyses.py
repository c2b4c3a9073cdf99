"""Analyses of trained run folders (``lipschitz-eval robustness`` and ``activations``):
embedding-space attacks against the certified radius, and per-layer activation magnitudes.

    lipschitz-eval robustness --checkpoint runs/a --checkpoint runs/b --eps 0.01,0.02,0.05
    lipschitz-eval activations --checkpoint runs/a [--baseline runs/base]

Norms are the certificate's (:mod:`lipschitz_ext.certify`): a sequence is measured by
the largest per-token RMS norm, ``max_t ||x_t||_2 / sqrt(d)``; an attack of size eps
moves every token's embedding by at most eps in RMS. Each command writes a table
(printed and saved as CSV/JSON) and a PNG into ``--out``.
"""

from __future__ import annotations

import math
import os
import torch

from ..certify.certificate import certify
from ..certify.robustness import token_rms, certified_radius, pgd_attack
from ..data import text as data_mod
from ..evaluation.plots import pyplot, save_figure
from ..evaluation.tables import print_table, write_table
from ..nn import LipschitzGPT, activation_stats
from ..ops.fp8_attention import E4M3_MAX
from ..storage.folder import make_output_dir
from ..training.run import load_run_data

__all__ = ["robustness", "activations"]

def _val_batches(cfg, data, n_batches: int, batch_size: int):
    """The fixed validation windows of a run's data (``data.eval_batches``)."""
    return data_mod.eval_batches(data.val, batch_size, cfg.seq_len, n_batches)




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
        scale = float(torch.cat([token_rms(e).flatten() for e in embeds]).mean()) if relative else 1.0
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


