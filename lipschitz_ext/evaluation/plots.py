"""The figures of runs and experiments: training curves and the accuracy-bound frontier."""

from __future__ import annotations

import os

from ..storage.files import read_metrics


__all__ = ["pyplot", "save_figure", "plot_curves", "plot_frontier"]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib  # optional until a figure is drawn; the backend must be set before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    return plt


def save_figure(fig, path: str) -> str:
    """Lay ``fig`` out, write it to ``path`` (PNG at 110 dpi) and close it; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_curves(run_dir: str) -> str | None:
    """curves.png: train/val loss, val accuracy and certified bound vs step."""
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if not rows:
        return None
    plt = pyplot()
    train = [r for r in rows if "train_loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train", alpha=0.7)
    ax[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax[0].set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax[0].legend()
    ax[1].plot([r["step"] for r in evals], [100 * r["val_accuracy"] for r in evals], "o-", color="C2")
    ax[1].set(xlabel="step", ylabel="%", title="validation top-1 accuracy")
    bounds = [(r["step"], r["certified_bound"]) for r in evals if r.get("certified_bound") is not None]
    if bounds:
        ax[2].semilogy(*zip(*bounds), "o-", color="C3")
        ax[2].set(xlabel="step", ylabel="Lipschitz bound", title="certified bound")
    else:
        ax[2].text(0.5, 0.5, "no certificate\n(unconstrained model)", ha="center", va="center")
        ax[2].set_axis_off()
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    path = save_figure(fig, os.path.join(run_dir, "curves.png"))
    return path


def plot_frontier(rows: list[dict], out: str) -> str:
    """``out/frontier.png``: validation accuracy vs certified bound, one curve per constraint
    (rows with ``constraint``, ``certified_bound``, ``val_accuracy``)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for c in dict.fromkeys(r["constraint"] for r in rows):
        pts = sorted((r["certified_bound"], 100 * r["val_accuracy"]) for r in rows
                     if r["constraint"] == c and r["certified_bound"] is not None and r["val_accuracy"] is not None)
        if pts:
            ax.plot(*zip(*pts), "o-", label=c)
    ax.set_xscale("log")
    ax.set(xlabel="certified Lipschitz bound", ylabel="validation accuracy (%)", title="accuracy vs certified bound")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    path = save_figure(fig, os.path.join(out, "frontier.png"))
    return path
