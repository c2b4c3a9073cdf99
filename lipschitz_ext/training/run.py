"""The run folder ``lipschitz-train`` writes, and the one place that reads it back.

A run folder holds ``config.json`` (the :class:`~lipschitz_ext.training.config.TrainConfig`),
``metrics.jsonl`` (one JSON object per logged step and per eval), ``summary.json``,
checkpoints ``latest.pt`` and ``best.pt`` (lowest validation loss), ``curves.png`` and
``sample.txt``. Every file is written atomically (temporary file, then rename), so a
crash mid-write leaves the previous version intact; the temporary files a killed process
leaves are removed at the next start (:func:`prepare_out_dir`). A new run goes only into
an absent or empty folder (lipschitz-train never overwrites files it did not write), and
``config.json`` holds ``data`` and ``out`` as absolute paths.

While a process trains in a run folder it holds an exclusive lock on
``.lipschitz-train.lock`` there (:func:`lock_run_folder`): a second process is refused with
a message naming the holder. The kernel releases the lock when its holder exits, however
it exits, so the lock of a killed process is taken over by the next run.

JSON files are strict JSON (no ``Infinity``/``NaN``: a non-finite number is written as
``null``). ``metrics.jsonl`` gets one complete line per append; a torn last line (a
process killed mid-write) is dropped when read and repaired when the run is resumed.

Checkpoints are read with ``torch.load(weights_only=True)``: plain tensors, numbers,
strings, lists and dicts only (no allow-listed classes), so opening a run folder never
executes code from it.

A checkpoint is a dict with ``config`` (``asdict(TrainConfig)``), ``model`` and
``optimizer`` state dicts, ``sampler`` state, ``step``, ``best_val``, ``elapsed``
(seconds), ``tokens`` (seen so far), ``tokenizer`` (``Tokenizer.to_dict()``) and
``vocab_size``.

    run = lipschitz_ext.load_run("runs/shakespeare-cpu")   # model, config, tokenizer
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..data import text as data_mod
from ..storage.files import CheckpointError, load_checkpoint_file
from .classifier import is_classifier_run, load_classifier_run
from .config import TrainConfig, build_model

__all__ = ["CHECKPOINT_KEYS", "resolve_data_path", "default_out_dir", "format_summary", "checkpoint_dict",
           "read_checkpoint", "check_weights_fit", "LoadedRun", "load_run", "load_run_data", "run_data"]

#: The keys every lipschitz-train checkpoint holds.
CHECKPOINT_KEYS = ("config", "model", "optimizer", "sampler", "step", "best_val", "elapsed", "tokens", "tokenizer",
                   "vocab_size")


def resolve_data_path(data: str | None, run_dir: str) -> str | None:
    """The ``--data`` of a run folder's config as a path that opens from here.

    New run folders store it absolute. An older, relative one is tried relative to the
    current directory, then relative to ``run_dir``; when neither exists it is returned
    unchanged (loading it then says it is not found). ``None`` and built-in corpus names
    (:func:`lipschitz_ext.data.text.is_builtin`) are returned as they are.
    """
    if data_mod.is_builtin(data) or os.path.isabs(data):
        return data

    def exists(p: str) -> bool:  # the rule of data.load_data: a literal path first, then a shard pattern
        return os.path.exists(p) or (data_mod.is_shard_pattern(p) and bool(glob.glob(p)))

    for candidate in (data, os.path.join(run_dir, data)):
        if exists(candidate):
            return os.path.abspath(candidate)
    return data



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
    ckpt = load_checkpoint_file(path, required)
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


def check_weights_fit(cfg: TrainConfig, vocab_size: int, state: Any, who: str) -> None:
    """Refuse (:class:`CheckpointError`) a checkpoint's ``state`` (its ``model`` state dict)
    whose tensor names and shapes are not those of the model ``cfg`` describes, BEFORE that
    model is built: the model is laid out on the meta device (no memory), so a config that
    claims a huge model beside small weights costs nothing."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{who}: its model weights are not a dict of tensors")
    # the block count first: even on the meta device, a million blocks would be a million modules
    blocks = {k.split(".")[1] for k in state if k.startswith("blocks.") and k.count(".") >= 2}
    if isinstance(cfg.n_layers, int) and cfg.n_layers != len(blocks):
        raise CheckpointError(f"{who}: weights do not fit the model its config describes (config n_layers "
                              f"{cfg.n_layers}, weights of {len(blocks)} blocks)")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_model(cfg, vocab_size).state_dict().items()}
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{who}: its config does not describe a model ({str(exc).splitlines()[0]})") from None
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    wrong = [f"{k} {got[k]} (config: {expected[k]})" for k in expected if k in got and got[k] != expected[k]]
    if missing or extra or wrong:
        detail = "; ".join(x for x in (
            f"missing {', '.join(missing[:3])}" if missing else "", f"unexpected {', '.join(extra[:3])}" if extra else "",
            f"shape of {', '.join(wrong[:3])}" if wrong else "") if x)
        raise CheckpointError(f"{who}: weights do not fit the model its config describes ({detail})")


@dataclass
class LoadedRun:
    """A trained run rebuilt from its folder: ``model`` (eval mode), its ``config``
    (:class:`~lipschitz_ext.training.config.TrainConfig`) and ``tokenizer`` (``encode``/``decode``);
    ``path`` is the checkpoint file and ``step`` the training step it was saved at."""

    model: torch.nn.Module
    config: TrainConfig
    tokenizer: data_mod.Tokenizer
    path: str
    step: int


def load_run(run_dir: str, which: str = "best", device: str | torch.device = "cpu",
             arg: str | None = None) -> LoadedRun:
    """Rebuild the model of a ``lipschitz-train`` run folder from its checkpoint (of a
    ``lipschitz-classify`` run: ``lipschitz_ext.training.classifier.load_classifier_run``'s result).

    ``which``: ``"best"`` (lowest validation loss) or ``"latest"``; when that file is
    missing or unusable the other is used, with a ``note:`` on stderr (:func:`read_checkpoint`). The model is in eval mode on ``device``; the data is not read (the
    tokenizer comes from the checkpoint). Raises :class:`CheckpointError` (a
    ``ValueError``) for a missing or foreign folder or weights that do not fit the config.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"load_run: which must be 'best' or 'latest', got {which!r}")

    if is_classifier_run(run_dir):  # a lipschitz-classify run: its model, config and checkpoint
        return load_classifier_run(run_dir, which, device, arg)
    ckpt, cfg, path = read_checkpoint(run_dir, ("best", "latest") if which == "best" else ("latest", "best"), arg)
    who = f"{arg} {run_dir}" if arg else str(run_dir)
    try:
        tokenizer = data_mod.tokenizer_from_dict(ckpt["tokenizer"])
    except (data_mod.DataError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{who}: {path}: unreadable tokenizer ({exc})") from None
    check_weights_fit(cfg, tokenizer.vocab_size, ckpt["model"], f"{who}: {path}")
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
