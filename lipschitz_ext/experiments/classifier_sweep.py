"""Sweeps of certified classifier runs and the accuracy-bound frontier they trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ..evaluation.plots import pyplot, save_figure
from ..storage.files import read_json, write_json

__all__ = ["sweep_classifiers", "frontier_rows", "write_frontier"]

def sweep_classifiers(base: dict, grid: list[dict], out: str, *, jobs: int = 1, quiet: bool = True) -> list[dict]:
    """Run ``lipschitz-classify train`` once per grid point (``base`` fields + the point's),
    ``jobs`` at a time in subprocesses, each into ``out/<name>``; a point whose run folder
    already holds summary.json is not rerun. Returns :func:`frontier_rows` of ``out``."""
    os.makedirs(out, exist_ok=True)
    pending = []
    for point in grid:
        name = "-".join(f"{k}={v}" for k, v in point.items()).replace("/", "_")
        run_dir = os.path.join(out, name)
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            continue
        cfg = {**base, **point, "out": run_dir}
        cmd = [sys.executable, "-m", "lipschitz_ext.cli.classify", "train", "--quiet", "--config-json", json.dumps(cfg)]
        if os.path.exists(os.path.join(run_dir, "latest.pt")):
            cmd = [sys.executable, "-m", "lipschitz_ext.cli.classify", "train", "--quiet", "--resume", run_dir]
        elif os.path.isdir(run_dir):  # an earlier attempt that never checkpointed
            for f in os.listdir(run_dir):
                os.remove(os.path.join(run_dir, f))
        pending.append((name, cmd))
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < max(1, jobs):
            name, cmd = pending.pop(0)
            if not quiet:
                print(f"sweep: {name}", file=sys.stderr)
            running.append((name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL)))
        time.sleep(0.5)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                if item[1].returncode != 0:
                    print(f"sweep: {item[0]} exited with status {item[1].returncode}", file=sys.stderr)
    rows = frontier_rows(out)
    write_frontier(rows, out)
    return rows


def frontier_rows(out: str) -> list[dict]:
    """One row per finished run under ``out``: method, optimizer, lr, cap, accuracy, bound."""
    rows = []
    for name in sorted(os.listdir(out)):
        p = os.path.join(out, name, "summary.json")
        if not os.path.exists(p):
            continue
        s = read_json(p)
        c = s["config"]
        rows.append({"run": name, "optimizer": c["optimizer"], "constraint": c["constraint"], "cap": c["cap"],
                     "lr": c["lr"], "weight_decay": c["weight_decay"], "steps": s["steps"],
                     "wall_seconds": s["wall_seconds"], "clean_accuracy": s["clean_accuracy"],
                     "certified_bound": s["certified_bound"], "certified_accuracy": s["certified_accuracy"]})
    return rows


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], -1.0
    for b, a in sorted(points):
        if a > best:
            front.append((b, a))
            best = a
    return front


def write_frontier(rows: list[dict], out: str) -> None:
    """``out/frontier.png`` (test accuracy vs certified bound: every run faint, and each
    optimizer x constraint's front -- its runs not beaten by one of a lower bound -- as a
    line; colour by constraint, solid Muon, dashed AdamW), ``out/frontier.json`` and
    ``out/frontier.md``."""
    write_json(os.path.join(out, "frontier.json"), rows)
    lines = ["| optimizer | constraint | cap | lr | weight decay | steps | test accuracy | certified bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["optimizer"], r["constraint"], r["cap"], r["lr"])):
        lines.append(f"| {r['optimizer']} | {r['constraint']} | {r['cap']:g} | {r['lr']:g} | {r['weight_decay']:g} | "
                     f"{r['steps']} | {100 * r['clean_accuracy']:.2f}% | {r['certified_bound']:.4g} |")
    with open(os.path.join(out, "frontier.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    methods = dict.fromkeys((r["optimizer"], r["constraint"]) for r in rows)
    colors = {c: f"C{i % 10}" for i, c in enumerate(dict.fromkeys(c for _, c in methods))}
    for o, c in sorted(methods, key=lambda m: (m[1], m[0])):  # colour: constraint; line: optimizer
        pts = [(r["certified_bound"], 100 * r["clean_accuracy"]) for r in rows
               if (r["optimizer"], r["constraint"]) == (o, c)]
        marker = "o" if o == "muon" else "s"
        ax.scatter(*zip(*pts), color=colors[c], alpha=0.3, s=14, marker=marker)
        ax.plot(*zip(*_pareto(pts)), "-" if o == "muon" else "--", marker=marker, color=colors[c],
                label=f"{o} + {c}")
    ax.set_xscale("log")
    ax.set(xlabel="certified l2 Lipschitz bound (pixel space)", ylabel="test accuracy (%)",
           title="accuracy vs certified bound (front of each method)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(out, "frontier.png"))
