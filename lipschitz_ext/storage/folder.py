"""Run folders as places to write: the exclusive lock of the one process that writes a
folder (released by the kernel however its holder exits), the rules for a new output
folder (absent or empty: files nobody asked to replace are never overwritten), and the
removal of the temporary files a killed process leaves."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import sys
import tempfile

__all__ = ["RunFolderError", "RUN_MARKERS", "is_run_folder", "remove_stale_temporaries", "LOCK_NAME", "RunLock",
           "lock_run_folder", "check_new_out_dir", "make_output_dir", "prepare_out_dir", "held_run_locks",
           "release_run_locks", "release_run_folder"]

class RunFolderError(ValueError):
    """An ``--out`` that lipschitz-train may not (or cannot) write a run into."""


#: Files whose presence marks a folder as a lipschitz-train run folder.
RUN_MARKERS = ("config.json", "latest.pt", "best.pt")

#: The temporary files of :func:`atomic_torch_save` / :func:`atomic_write_text` (``<name>.tmp-<pid>``).
_TMP_RE = re.compile(r"^.+\.tmp-(\d+)$")




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

