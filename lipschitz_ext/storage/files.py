"""Files that survive a crash: atomic writes (temporary file, then rename), strict JSON
(a non-finite number is written as ``null``), the append-only metrics log whose torn last
line is dropped when read, and the one reader of checkpoint files (``weights_only=True``,
regular files only), so opening a run folder never executes code from it."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import sys
from typing import Any

import torch

__all__ = ["CheckpointError", "atomic_torch_save", "atomic_write_text", "json_safe", "write_json", "MAX_JSON_BYTES",
           "read_json", "read_metrics", "append_metric", "truncate_metrics", "load_checkpoint_file"]

class CheckpointError(ValueError):
    """A run folder that is missing, incomplete or incompatible."""




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

