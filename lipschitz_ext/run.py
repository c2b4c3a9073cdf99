"""The run folder ``lipschitz-train`` writes, and the one place that reads it back.

A run folder holds ``config.json`` (the :class:`~lipschitz_ext.config.TrainConfig`),
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
import errno
import fcntl
import glob
import json
import math
import os
import pickle
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import data as data_mod
from .config import TrainConfig, build_model

__all__ = ["CheckpointError", "RunFolderError", "LoadedRun", "RunLock", "run_data", "prepare_out_dir", "is_run_folder",
           "resolve_data_path", "lock_run_folder", "check_new_out_dir", "make_output_dir", "check_weights_fit",
           "remove_stale_temporaries", "load_run", "load_run_data", "read_checkpoint", "load_checkpoint_file", "checkpoint_dict",
           "atomic_torch_save", "atomic_write_text", "read_metrics", "append_metric", "truncate_metrics",
           "write_json", "read_json", "release_run_folder", "held_run_locks", "release_run_locks", "json_safe", "default_out_dir", "format_summary", "CHECKPOINT_KEYS"]

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


#: The lock file of a run folder (:func:`lock_run_folder`); not a run file of its own.
LOCK_NAME = ".lipschitz-train.lock"


class RunLock:
    """An exclusive ``flock`` on ``<run folder>/.lipschitz-train.lock``, held while a process
    trains in the folder; the file names the holder (``pid host``) for the message a second
    process gets. The kernel releases a ``flock`` when its holder exits (even by SIGKILL),
    so a killed process never leaves the folder locked. :meth:`release` (or process exit)
    frees it."""

    def __init__(self, path: str, fd: int, previous: str):
        self.path, self.fd, self.previous = path, fd, previous

    def release(self) -> None:
        """Clear the holder line and release the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty file: released cleanly (a holder line left = a killed holder)
        except OSError:
            pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None
            _HELD.pop(self.path, None)


#: the locks this process holds, by lock-file path (one trainer per folder, in-process too)
_HELD: dict[str, RunLock] = {}


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def lock_run_folder(out: str, flag: str = "--out") -> RunLock:
    """Take the exclusive lock of run folder ``out`` (which must exist) for this process.

    Raises :class:`RunFolderError` when another process (or another run in this process)
    holds it, naming the holder. A lock left by a killed process is free (the kernel
    released it): it is taken over, with a ``note:`` on stderr naming the process it was.
    """
    path = os.path.join(os.path.abspath(out), LOCK_NAME)
    if path in _HELD:
        raise RunFolderError(f"{flag} {out}: this process is already training in that folder")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunFolderError(f"{flag} {out}: cannot create its lock file {LOCK_NAME} "
                             f"({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f"pid {holder.split()[0]} on host {holder.split()[1]}" if len(holder.split()) >= 2 else "another process"
            raise RunFolderError(f"{flag} {out}: another lipschitz-train process ({who}) is training in this "
                                 "folder; wait for it to finish (or stop it), or choose another folder") from None
        raise RunFolderError(f"{flag} {out}: cannot lock the run folder ({exc.strerror or exc})") from None
    previous = _holder(fd)
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    except OSError:
        pass  # the lock holds without the holder line (e.g. a full disk); only the message is poorer
    if previous:
        print(f"note: {flag} {out}: took over the lock left by an ended process ({previous})", file=sys.stderr)
    lock = _HELD[path] = RunLock(path, fd, previous)
    return lock


def _folder_entries(path: str) -> list[str]:
    return [n for n in os.listdir(path) if n != LOCK_NAME]


def check_new_out_dir(out: str, flag: str = "--out") -> None:
    """Refuse an ``out`` that exists and is not an empty folder (:class:`RunFolderError`):
    a new run, a sweep or an lr-sensitivity study writes only into a new or empty folder, so
    no file it did not write (a user's ``frontier.csv``, another run) is ever overwritten."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunFolderError(f"{flag} {out}: exists and is not a folder")
    if os.path.isdir(out):
        if is_run_folder(out):
            raise RunFolderError(f"{flag} {out}: is an existing run folder; continue it with --resume {out}, "
                                 f"or choose another {flag}")
        if _folder_entries(out):
            raise RunFolderError(f"{flag} {out}: folder is not empty and is not a lipschitz-train run folder; "
                                 f"choose a new or empty {flag} (its files are left as they are)")


def make_output_dir(out: str, flag: str = "--out", writes: tuple[str, ...] = ()) -> str:
    """Create the output folder ``out`` of an analysis command; :class:`RunFolderError` when
    it is a file, cannot be created or written, or already holds one of the files ``writes``
    names (an earlier result is never written over). Its absolute path."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunFolderError(f"{flag} {out}: exists and is not a folder")
    taken = [n for n in writes if os.path.lexists(os.path.join(out, n))]
    if taken:
        raise RunFolderError(f"{flag} {out}: already holds {', '.join(taken)}; choose another {flag} "
                             "(earlier results are never written over)")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise RunFolderError(f"{flag} {out}: cannot write there ({exc.strerror or exc})") from None
    return os.path.abspath(out)


def prepare_out_dir(out: str, resume: bool = False) -> str:
    """Check and create the run folder ``out`` before any data or model is built, and lock
    it for this process (:func:`lock_run_folder`; :func:`release_run_folder` frees it); its
    absolute path.

    A new run (``resume=False``) needs ``out`` absent or an empty folder: a run folder
    (:func:`is_run_folder`) is refused with a pointer to ``--resume``, any other non-empty
    folder because its files are not lipschitz-train's to overwrite. A file, an unwritable
    folder, an uncreatable path or a folder another process trains in is refused too.
    Raises :class:`RunFolderError` (a ``ValueError``) with a one-line message. Leftover
    temporary files of a killed process are removed (:func:`remove_stale_temporaries`).
    """
    flag = "--resume" if resume else "--out"
    if not resume:
        check_new_out_dir(out, flag)
    elif os.path.exists(out) and not os.path.isdir(out):
        raise RunFolderError(f"{flag} {out}: exists and is not a folder")
    make_output_dir(out, flag)
    lock = lock_run_folder(out, flag)
    try:
        if not resume:  # again under the lock: a second new run with this --out may have started first
            check_new_out_dir(out, flag)
        remove_stale_temporaries(out)
    except BaseException:
        lock.release()
        raise
    return os.path.abspath(out)


def held_run_locks() -> frozenset[str]:
    """The lock files of the run folders this process holds now."""
    return frozenset(_HELD)


def release_run_locks(paths) -> None:
    """Release this process's locks among the lock-file ``paths`` (of :func:`held_run_locks`)."""
    for path in paths:
        lock = _HELD.get(path)
        if lock is not None:
            lock.release()


def release_run_folder(out: str) -> None:
    """Release this process's lock on run folder ``out`` (nothing when it holds none)."""
    lock = _HELD.get(os.path.join(os.path.abspath(out), LOCK_NAME))
    if lock is not None:
        lock.release()


def resolve_data_path(data: str | None, run_dir: str) -> str | None:
    """The ``--data`` of a run folder's config as a path that opens from here.

    New run folders store it absolute. An older, relative one is tried relative to the
    current directory, then relative to ``run_dir``; when neither exists it is returned
    unchanged (loading it then says it is not found). ``None`` and built-in corpus names
    (:func:`lipschitz_ext.data.is_builtin`) are returned as they are.
    """
    if data_mod.is_builtin(data) or os.path.isabs(data):
        return data

    def exists(p: str) -> bool:  # the rule of data.load_data: a literal path first, then a shard pattern
        return os.path.exists(p) or (data_mod.is_shard_pattern(p) and bool(glob.glob(p)))

    for candidate in (data, os.path.join(run_dir, data)):
        if exists(candidate):
            return os.path.abspath(candidate)
    return data


# ---------------------------------------------------------------------------
# atomic writes, metrics, JSON files
# ---------------------------------------------------------------------------
def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_torch_save(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash
    mid-write leaves the previous checkpoint intact (a failed write, e.g. a full disk,
    removes its temporary file and raises the ``OSError``)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (the temporary file
    is removed when the write fails)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (``inf``, ``nan``) replaced by ``None``, through
    dicts, lists and tuples: what strict JSON can hold."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented strict JSON at ``path`` (atomically; non-finite numbers as null)."""
    atomic_write_text(path, _dumps(obj, indent=2) + "\n")


#: The largest JSON file of a run folder read back (config, summary, metrics): a run
#: writes kilobytes to megabytes; a bigger file is not one of its own.
MAX_JSON_BYTES = 256 * 2**20


def _check_size(path: str) -> None:
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, larger than any run-folder file lipschitz-train writes "
                              f"({MAX_JSON_BYTES} bytes at most)")


def read_json(path: str) -> Any:
    """The JSON document at ``path`` (:class:`CheckpointError` for a file over
    ``MAX_JSON_BYTES``)."""
    _check_size(path)
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _parse_metrics(path: str) -> tuple[list[dict], bool]:
    """``(rows, torn)``: the rows of ``path``, and whether its last line was torn (no final
    newline and not a JSON object: a write cut short, dropped). A bad line before the last
    is a :class:`CheckpointError` naming the file and line."""
    _check_size(path)
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().split("\n")
    rows, torn = [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = i == len(lines) - 1  # text after the final newline: an unfinished append
        try:
            row = json.loads(line)
        except ValueError as exc:
            if last:
                torn = True
                continue
            raise CheckpointError(f"{path}: line {i + 1} is not JSON ({exc}); repair or remove that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            if last:
                torn = True
                continue
            raise CheckpointError(f"{path}: line {i + 1} is not a metrics row (a JSON object with a 'step')")
        rows.append(row)
    return rows, torn


def read_metrics(path: str) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file ([] when there is none yet). A torn last line
    (a process killed mid-append) is left out; any other bad line raises
    :class:`CheckpointError` naming the file and the line."""
    if not os.path.exists(path):
        return []
    return _parse_metrics(path)[0]


def append_metric(path: str, row: dict) -> None:
    """Append one row to ``metrics.jsonl``: the whole line in one ``write`` to a file opened
    for appending, so rows never interleave and a crash tears at most the last line."""
    line = (_dumps(row) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):  # a short write (full disk): say so rather than leave half a row
            raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes of a metrics row written", path)
    finally:
        os.close(fd)


def truncate_metrics(path: str, step: int) -> None:
    """Drop the rows logged after ``step`` (a resumed run continues the curve exactly) and a
    torn last line (with a ``note:`` on stderr naming the file)."""
    if not os.path.exists(path):
        atomic_write_text(path, "")
        return
    rows, torn = _parse_metrics(path)
    if torn:
        print(f"note: {path}: dropped a torn last line (a write cut short)", file=sys.stderr)
    kept = [r for r in rows if r["step"] <= step]
    atomic_write_text(path, "".join(_dumps(r) + "\n" for r in kept))


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


def load_checkpoint_file(path: str, required: tuple[str, ...] = ()) -> dict:
    """The checkpoint dict at ``path``, loaded with ``weights_only=True`` from a regular
    file only, holding the keys ``required``; ``ValueError`` saying why it is not one.
    Every run checkpoint (``lipschitz-train`` and ``lipschitz-classify``) is read here."""
    if not os.path.exists(path):
        raise ValueError("missing")
    if os.path.isdir(path):
        raise ValueError("a folder, not a file")
    if not os.path.isfile(path):  # before reading anything: a FIFO or device would block or never end
        raise ValueError("not a regular file")
    if os.path.getsize(path) == 0:
        raise ValueError("empty file")
    try:
        # weights_only: tensors, numbers, strings, lists and dicts; a pickled object that
        # would run code when loaded (a shared or downloaded run folder) is refused, never run
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln or "error:" in ln.lower()),
                   str(exc).splitlines()[0] if str(exc) else "")
        raise ValueError(f"refused: it holds more than tensors and plain values, which loading would have to "
                         f"execute code for ({why[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError, TypeError,
            KeyError) as exc:
        raise ValueError(f"unreadable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                         .rstrip(": ")) from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    return ckpt


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
    (:class:`~lipschitz_ext.config.TrainConfig`) and ``tokenizer`` (``encode``/``decode``);
    ``path`` is the checkpoint file and ``step`` the training step it was saved at."""

    model: torch.nn.Module
    config: TrainConfig
    tokenizer: data_mod.Tokenizer
    path: str
    step: int


def load_run(run_dir: str, which: str = "best", device: str | torch.device = "cpu",
             arg: str | None = None) -> LoadedRun:
    """Rebuild the model of a ``lipschitz-train`` run folder from its checkpoint (of a
    ``lipschitz-classify`` run: ``lipschitz_ext.classify.load_classifier_run``'s result).

    ``which``: ``"best"`` (lowest validation loss) or ``"latest"``; when that file is
    missing or unusable the other is used, with a ``note:`` on stderr (:func:`read_checkpoint`). The model is in eval mode on ``device``; the data is not read (the
    tokenizer comes from the checkpoint). Raises :class:`CheckpointError` (a
    ``ValueError``) for a missing or foreign folder or weights that do not fit the config.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"load_run: which must be 'best' or 'latest', got {which!r}")
    from .classify import is_classifier_run, load_classifier_run  # lazy: classify imports this module

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
