"""Experiments of several training runs: the sweep over constraints and caps, the
accuracy-bound frontier of finished runs, and learning-rate sensitivity
(Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities")."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

from ..data import text as data_mod
from ..evaluation.logits import attention_logit_max, output_logit_stats
from ..evaluation.plots import plot_frontier, pyplot, save_figure
from ..evaluation.tables import write_table
from ..storage.files import CheckpointError, read_json, write_json
from ..storage.folder import check_new_out_dir, make_output_dir
from ..training.config import TrainConfig
from ..training.loop import train
from ..training.run import load_run_data


__all__ = ["sweep", "write_frontier", "frontier", "lr_sensitivity"]


def sweep(base: TrainConfig, sigma_maxes: list[float], constraints: list[str], out: str,
          quiet: bool = False) -> list[dict]:
    """Train one run per setting into ``out/<constraint>-s<sigma>``; write
    ``frontier.csv`` and ``frontier.png`` (val accuracy vs certified bound). ``sigma``
    caps the hidden groups that ``base`` gives no cap of their own (``attn_sigma_max``,
    ``mlp_sigma_max``). ``out`` must be new or empty (a ``frontier.csv`` or run already
    there is never overwritten)."""
    check_new_out_dir(out)
    make_output_dir(out)
    rows = []
    for c in constraints:
        for s in sigma_maxes:
            cfg = dataclasses.replace(base, constraint=c, sigma_max=s, out=os.path.join(out, f"{c}-s{s:g}"))
            summ = train(cfg, quiet=quiet)
            rows.append({"constraint": c, "sigma_max": s, "run": cfg.out, **{k: summ[k] for k in (
                "val_accuracy", "val_loss", "certified_bound", "max_activation", "steps", "wall_seconds")}})
            write_frontier(rows, out)
    return rows


def write_frontier(rows: list[dict], out: str) -> None:
    """``out/frontier.csv`` (one row per run) and ``out/frontier.png``."""
    cols = ["constraint", "sigma_max", "certified_bound", "val_accuracy", "val_loss", "max_activation",
            "steps", "wall_seconds", "run"]
    with open(os.path.join(out, "frontier.csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in cols})
    plot_frontier(rows, out)


def _read_json_object(path: str) -> dict:
    """The JSON object in ``path``; a corrupt or non-object file is a CheckpointError naming it."""
    try:
        obj = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


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
        s, c = _read_json_object(sp), _read_json_object(cp)
        missing = [k for k in ("constraint", "sigma_max") if k not in c]
        if missing:
            raise CheckpointError(f"{cp}: no {', '.join(missing)} (not a lipschitz-train config?)")
        if s.get("certified_bound") is None:
            skipped.append(run)
            continue  # unconstrained baselines have no bound to plot against
        rows.append({"constraint": c["constraint"], "sigma_max": c["sigma_max"], "run": run,
                     **{k: s.get(k) for k in ("certified_bound", "val_accuracy", "val_loss", "max_activation",
                                              "steps", "wall_seconds")}})
    if not rows:
        raise CheckpointError(f"no certified (LipschitzGPT) runs among the given folders; baselines have no "
                              f"certified bound: {', '.join(skipped)}")
    make_output_dir(out, writes=("frontier.csv", "frontier.png"))
    write_frontier(rows, out)
    return rows


def lr_sensitivity(base: TrainConfig, multipliers: list[float], out: str,
                   sizes: list[tuple[int, int]] = ((32, 2), (64, 2)), models=("lipschitz", "baseline"),
                   quiet: bool = True) -> list[dict]:
    """Final validation loss vs learning rate for each (model, size); all of a
    model's learning rates are multiplied by each multiplier. ``sizes`` are
    ``(d_model, n_layers)``. Logs the attention-logit maximum and output-logit drift.
    ``out`` must be new or empty (its runs and tables are never written over a user's files)."""
    if not multipliers or not all(isinstance(m, (int, float)) and math.isfinite(m) and m > 0 for m in multipliers):
        raise ValueError(f"--lrs must be one or more finite multipliers > 0, comma-separated, got {multipliers}")
    check_new_out_dir(out)
    make_output_dir(out)
    rows: list[dict] = []
    for model in models:
        for d, L in sizes:
            for m in multipliers:
                cfg = dataclasses.replace(
                    base, model=model, d_model=d, n_layers=L, lr=base.lr * m, head_lr=base.head_lr * m,
                    embed_lr=base.embed_lr * m, baseline_lr=base.baseline_lr * m,
                    out=os.path.join(out, f"{model}-d{d}-L{L}-x{m:g}"))
                summ = train(cfg, quiet=quiet)
                row = {"model": model, "d_model": d, "n_layers": L, "lr_multiplier": m,
                       "lr": cfg.baseline_lr if model == "baseline" else cfg.lr, "status": summ["status"],
                       "val_loss": summ["val_loss"], "val_accuracy": summ["val_accuracy"],
                       "certified_bound": summ["certified_bound"]}
                if summ["status"] != "diverged":
                    net, rcfg, data = load_run_data(cfg.out, which="latest")
                    x, _ = next(iter(data_mod.eval_batches(data.val, 8, rcfg.seq_len, 1)))
                    row["attention_logit_max"] = attention_logit_max(net, x)
                    row.update(output_logit_stats(net, x))
                write_json(os.path.join(cfg.out, "lr_sensitivity.json"), row)  # this run's record, beside its metrics
                rows.append(row)
                write_table(rows, os.path.join(out, "lr_sensitivity.csv"))
    plt = pyplot()
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
    save_figure(fig, os.path.join(out, "lr_sensitivity.png"))
    return rows
