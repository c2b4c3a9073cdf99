"""The run folder ``lipschitz-train`` writes, and the one place that reads it back.

A run folder holds ``config.json`` (the :class:`~lipschitz_ext.config.TrainConfig`),
``metrics.jsonl`` (one JSON object per logged step and per eval), ``summary.json``,
checkpoints ``latest.pt`` and ``best.pt`` (lowest validation loss), ``curves.png`` and
``sample.txt``. Every file is written atomically (temporary file, then rename), so a
crash mid-write leaves the previous version intact; the temporary files a killed process
leaves are removed at the next start (:func:`prepare_out_dir`). A new run goes only into
an absent or empty folder (lipschitz-train never overwrites files it did not write), and
``config.json`` holds ``data`` and ``out`` as absolute paths.

A checkpoint is a dict with ``config`` (``asdict(TrainConfig)``), ``model`` and
``optimizer`` state dicts, ``sampler`` state, ``step``, ``best_val``, ``elapsed``
(seconds), ``tokens`` (seen so far), ``tokenizer`` (``Tokenizer.to_dict()``) and
``vocab_size``.

    run = lipschitz_ext.load_run("runs/shakespeare-cpu")   # model, config, tokenizer
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pickle
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import data as data_mod
from .config import TrainConfig, build_model

__all__ = ["CheckpointError", "RunFolderError", "LoadedRun", "run_data", "prepare_out_dir", "is_run_folder", "resolve_data_path",
           "remove_stale_temporaries", "load_run", "load_run_data", "read_checkpoint", "checkpoint_dict",
           "atomic_torch_save", "atomic_write_text", "read_metrics", "append_metric", "truncate_metrics",
           "write_json", "read_json", "default_out_dir", "format_summary", "CHECKPOINT_KEYS"]

#: The keys every lipschitz-train checkpoint holds.
CHECKPOINT_KEYS = ("config", "model", "optimizer", "sampler", "step", "best_val", "elapsed", "tokens", "tokenizer",
                   "vocab_size")


class CheckpointError(ValueError):
    """A run folder that is missing, incomplete or incompatible."""


class RunFolderError(ValueError):
    """An ``--out`` that lipschitz-train may not (or cannot) write a run into."""


#: Files whose presence marks a folder as a lipschitz-train run folder.
RUN_MARKERS = ("config.json", "latest.pt", "best.pt")

#: The temporary files of :func:`atomic_torch_save` / :func:`atomic_write_text` (``<name>.tmp-<pid>``).
_TMP_RE = re.compile(r"^.+\.tmp-(\d+)$")


# ---------------------------------------------------------------------------
# the run folder itself
# ---------------------------------------------------------------------------
def is_run_folder(path: str) -> bool:
    """Whether ``path`` is a folder holding a lipschitz-train run (a config or a checkpoint)."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in RUN_MARKERS)


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Remove the ``*.tmp-<pid>`` files an earlier process killed mid-write left in
    ``run_dir`` (never this process's own); the paths removed."""
    removed = []
    for name in os.listdir(run_dir):
        m = _TMP_RE.match(name)
        path = os.path.join(run_dir, name)
        if m and int(m.group(1)) != os.getpid() and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


def prepare_out_dir(out: str, resume: bool = False) -> str:
    """Check and create the run folder ``out`` before any data or model is built; its
    absolute path.

    A new run (``resume=False``) needs ``out`` absent or an empty folder: a run folder
    (:func:`is_run_folder`) is refused with a pointer to ``--resume``, any other non-empty
    folder because its files are not lipschitz-train's to overwrite. A file, an unwritable
    folder or an uncreatable path is refused too. Raises :class:`RunFolderError` (a
    ``ValueError``) with a one-line message. Leftover temporary files of a killed process
    are removed (:func:`remove_stale_temporaries`).
    """
    flag = "--resume" if resume else "--out"
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunFolderError(f"{flag} {out}: exists and is not a folder")
    if not resume and os.path.isdir(out):
        if is_run_folder(out):
            raise RunFolderError(f"--out {out}: is an existing run folder; continue it with --resume {out}, "
                                 "or choose another --out")
        if os.listdir(out):
            raise RunFolderError(f"--out {out}: folder is not empty and is not a lipschitz-train run folder; "
                                 "choose a new or empty --out (its files are left as they are)")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise RunFolderError(f"{flag} {out}: cannot write a run there ({exc.strerror or exc})") from None
    remove_stale_temporaries(out)
    return os.path.abspath(out)


def resolve_data_path(data: str | None, run_dir: str) -> str | None:
    """The ``--data`` of a run folder's config as a path that opens from here.

    New run folders store it absolute. An older, relative one is tried relative to the
    current directory, then relative to ``run_dir``; when neither exists it is returned
    unchanged (loading it then says it is not found). ``None`` and built-in corpus names
    (:func:`lipschitz_ext.data.is_builtin`) are returned as they are.
    """
    if data_mod.is_builtin(data) or os.path.isabs(data):
        return data

    def exists(p: str) -> bool:
        return bool(glob.glob(p)) if any(ch in p for ch in "*?[") else os.path.exists(p)

    for candidate in (data, os.path.join(run_dir, data)):
        if exists(candidate):
            return os.path.abspath(candidate)
    return data


# ---------------------------------------------------------------------------
# atomic writes, metrics, JSON files
# ---------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash
    mid-write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON at ``path`` (atomically)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str) -> Any:
    """The JSON document at ``path``."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_metrics(path: str) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file ([] when there is none yet)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def append_metric(path: str, row: dict) -> None:
    """Append one row to ``metrics.jsonl``."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def truncate_metrics(path: str, step: int) -> None:
    """Drop the rows logged after ``step`` (a resumed run continues the curve exactly)."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def default_out_dir(cfg: TrainConfig) -> str:
    """``runs/<preset>-<model>-<date-time>``."""
    return os.path.join("runs", f"{cfg.preset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")


def format_summary(out: str, s: dict) -> str:
    """The one-line console summary of a finished run."""
    acc = "n/a" if s["val_accuracy"] is None else f"{100 * s['val_accuracy']:.2f}%"
    loss = "n/a" if s["val_loss"] is None else f"{s['val_loss']:.4f}"
    bound = s["certified_bound"]
    bound_s = "n/a (unconstrained model)" if bound is None else f"{bound:.4g}"
    line = (f"{out}: {s['status']} after {s['steps']} steps in {s['wall_seconds']:.0f} s | "
            f"val accuracy {acc} ({s.get('eval_protocol', 'spread')} windows) | val loss {loss} | "
            f"certified bound {bound_s}")
    scored = {p: r["val_accuracy"] for p, r in (s.get("protocols") or {}).items() if "val_accuracy" in r}
    if scored:
        line += "\n  accuracy by protocol: " + ", ".join(f"{p} {100 * a:.2f}%" for p, a in scored.items())
    if s.get("paper_bound") is not None:
        line += f"\n  published bound formula (unsound, for comparison): {s['paper_bound']:.4g}"
    return line


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------
def checkpoint_dict(cfg: TrainConfig, model: torch.nn.Module, optimizer, sampler, *, step: int, best_val: float,
                    elapsed: float, tokens: int, tokenizer) -> dict:
    """The checkpoint of a run at ``step`` (see the module docstring for its keys)."""
    return {"config": dataclasses.asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(), "step": step, "best_val": best_val, "elapsed": elapsed,
            "tokens": tokens, "tokenizer": tokenizer.to_dict(), "vocab_size": tokenizer.vocab_size}


def _load_one(path: str, required: tuple[str, ...]) -> tuple[dict, TrainConfig]:
    """The checkpoint at ``path`` and its config; ``ValueError`` saying why it is not one."""
    if not os.path.exists(path):
        raise ValueError("missing")
    if os.path.isdir(path):
        raise ValueError("a folder, not a file")
    if os.path.getsize(path) == 0:
        raise ValueError("empty file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError, TypeError,
            pickle.UnpicklingError) as exc:
        raise ValueError(f"unreadable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                         .rstrip(": ")) from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    try:
        cfg = TrainConfig(**ckpt["config"])
    except (TypeError, KeyError) as exc:
        raise ValueError(f"its config is not a TrainConfig ({exc})") from None
    return ckpt, cfg


def read_checkpoint(run_dir: str, names: tuple[str, ...] = ("best", "latest"), arg: str | None = None,
                    required: tuple[str, ...] = ("config", "model", "tokenizer")) -> tuple[dict, TrainConfig, str]:
    """``(checkpoint, config, path)`` of the first of ``names`` (``best``, ``latest``) in
    ``run_dir`` that is a readable checkpoint holding the keys ``required``.

    The one place run checkpoints are read. A missing, empty, truncated, foreign or
    incomplete file (or a folder of that name) falls back to the next of ``names``, and a
    ``note:`` line on stderr says which file was used instead. ``arg`` (e.g.
    ``"--resume"``) prefixes error messages. Raises :class:`CheckpointError` (a
    ``ValueError``) for a missing folder, or when none of ``names`` is usable (saying why
    for each).
    """
    who = f"{arg} {run_dir}" if arg else str(run_dir)
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"{who}: run folder not found")
    problems = []
    for n in names:
        path = os.path.join(run_dir, f"{n}.pt")
        try:
            ckpt, cfg = _load_one(path, required)
        except ValueError as exc:
            problems.append((path, str(exc)))
            continue
        bad = [f"{os.path.basename(p)} ({why})" for p, why in problems if why != "missing"]
        if bad:
            print(f"note: {who}: {', '.join(bad)} not usable; using {path}", file=sys.stderr)
        return ckpt, cfg, path
    if all(why == "missing" for _, why in problems):
        files = " / ".join(os.path.basename(p) for p, _ in problems)
        raise CheckpointError(f"{who}: holds no checkpoint ({files}); is it a lipschitz-train run?")
    detail = "; ".join(f"{os.path.basename(p)} missing" if why == "missing" else
                       f"{os.path.basename(p)} is not a lipschitz-train checkpoint ({why})" for p, why in problems)
    raise CheckpointError(f"{who}: no usable checkpoint: {detail}")


@dataclass
class LoadedRun:
    """A trained run rebuilt from its folder: ``model`` (eval mode), its ``config``
    (:class:`~lipschitz_ext.config.TrainConfig`) and ``tokenizer`` (``encode``/``decode``);
    ``path`` is the checkpoint file and ``step`` the training step it was saved at."""

    model: torch.nn.Module
    config: TrainConfig
    tokenizer: data_mod.Tokenizer
    path: str
    step: int


def load_run(run_dir: str, which: str = "best", device: str | torch.device = "cpu",
             arg: str | None = None) -> LoadedRun:
    """Rebuild the model of a ``lipschitz-train`` run folder from its checkpoint.

    ``which``: ``"best"`` (lowest validation loss) or ``"latest"``; when that file is
    missing or unusable the other is used, with a ``note:`` on stderr (:func:`read_checkpoint`). The model is in eval mode on ``device``; the data is not read (the
    tokenizer comes from the checkpoint). Raises :class:`CheckpointError` (a
    ``ValueError``) for a missing or foreign folder or weights that do not fit the config.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"load_run: which must be 'best' or 'latest', got {which!r}")
    ckpt, cfg, path = read_checkpoint(run_dir, ("best", "latest") if which == "best" else ("latest", "best"), arg)
    who = f"{arg} {run_dir}" if arg else str(run_dir)
    try:
        tokenizer = data_mod.tokenizer_from_dict(ckpt["tokenizer"])
    except (data_mod.DataError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{who}: {path}: unreadable tokenizer ({exc})") from None
    model = build_model(cfg, tokenizer.vocab_size)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{who}: {path}: weights do not fit the model its config describes ({exc})") from None
    return LoadedRun(model.to(device).eval(), cfg, tokenizer, path, int(ckpt.get("step", 0)))


def load_run_data(run_dir: str, which: str = "best", device: str | torch.device = "cpu", arg: str | None = None):
    """``(model, cfg, data)``: :func:`load_run`'s model and config, and the run's data
    (same train/val split). Raises :class:`CheckpointError` when the data no longer has
    the checkpoint's vocabulary."""
    run = load_run(run_dir, which, device, arg)
    cfg, data = run_data(run, run_dir, arg)
    return run.model, cfg, data


def run_data(run: LoadedRun, run_dir: str, arg: str | None = None):
    """``(cfg, data)`` of a loaded run: its config with the data path resolved, and the data
    (same train/val split). Raises :class:`CheckpointError` when the data no longer has the
    checkpoint's vocabulary."""
    cfg = dataclasses.replace(run.config, data=resolve_data_path(run.config.data, run_dir))
    data = data_mod.load_data(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.vocab_size)
    if data.tokenizer.to_dict() != run.tokenizer.to_dict():
        who = f"{arg} {run_dir}" if arg else str(run_dir)
        raise CheckpointError(f"{who}: its data ({cfg.data or 'built-in corpus'}) no longer matches the "
                              "checkpoint's vocabulary")
    return cfg, data
