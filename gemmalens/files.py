"""Files that survive crashes: atomic replacement, append-only JSON lines, and the lock on an output folder.

* ``write_atomic``: a temporary file of this writer's own (pid and thread in its name), synced, renamed into
  place, the folder synced: a reader sees the old file or the new one, never half of one.
* ``JsonLines``: a file of one JSON object per line, appended and synced line by line. A torn last line (the
  process died mid-write) is cut off when the file is next opened, never glued to; a damaged line elsewhere is
  reported with its number.
* ``FolderLock``: one gemmalens run per folder. The lock is the kernel's (``flock``), so it goes with the
  process however it ends; the file says who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import FolderBusy, GemmalensError

LOCK = ".gemmalens.lock"


class WriteError(GemmalensError):
    """A file could not be written (disk full, permissions...): what and where."""


def write_failed(path: str | Path, error: OSError) -> WriteError:
    """One paragraph for a failed write: the file, the reason, what to do."""
    reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (error.strerror or str(error))
    return WriteError(f"cannot write {path}: {reason}; everything written before it is kept: free space (or fix the "
                      "folder) and continue the run with --resume")


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: hidden, and unique to this process and thread,
    so two writers never write into each other's temporary file."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")


def sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Any]:
    """A binary file to write ``path`` through: a synced temporary file renamed into place once the block ends
    without an error; otherwise removed, and ``path`` untouched."""
    path = Path(path)
    partial = partial_path(path)
    try:
        with open(partial, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        sync_folder(path.parent)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise write_failed(path, error) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a synced temporary file and a rename."""
    with atomic_file(path) as handle:
        handle.write(data)


def dump_json(path: str | Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


class CorruptLine(GemmalensError):
    """A line of a JSON-lines file that is not one JSON object (not the torn end a crash leaves)."""


def read_json_lines(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The objects of a JSON-lines file and the bytes of a torn last line (a crash mid-write; cut off by
    ``JsonLines`` on the next open). A damaged line before the end raises ``CorruptLine`` naming it."""
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    complete, _, torn = data.rpartition(b"\n") if not data.endswith(b"\n") else (data[:-1], b"", b"")
    rows = []
    for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CorruptLine(f"{path}:{number}: not a JSON object ({error}); the file was edited or damaged: "
                              "remove that line (its prompt is then generated again by --resume)") from None
        if not isinstance(row, dict):
            raise CorruptLine(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows, len(torn)


class JsonLines:
    """Appends JSON objects to a file, one synced line each; opening cuts a torn last line off, and a line that
    could not be written whole (disk full) is taken back."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.torn = 0
        try:
            self.descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                self.torn = len(data) - (data.rfind(b"\n") + 1)
                os.ftruncate(self.descriptor, len(data) - self.torn)
                os.fsync(self.descriptor)
            self.size = len(data) - self.torn
        except OSError as error:
            raise write_failed(self.path, error) from None

    def append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            written = 0
            while written < len(line):
                written += os.pwrite(self.descriptor, line[written:], self.size + written)
            os.fsync(self.descriptor)
        except OSError as error:
            try:
                os.ftruncate(self.descriptor, self.size)  # no part of the line stays
            except OSError:
                pass
            raise write_failed(self.path, error) from None
        self.size += len(line)

    def close(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None


class FolderLock:
    """An exclusive lock on a folder for this process: ``acquire`` raises ``FolderBusy`` naming the holder."""

    def __init__(self, folder: str | Path, purpose: str = "gemmalens"):
        self.folder = Path(folder)
        self.purpose = purpose
        self.handle = None

    def acquire(self) -> "FolderLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.folder / LOCK, "a+", encoding="utf-8")
        except OSError as error:
            raise WriteError(f"cannot use {self.folder} as an output folder: it is not writable "
                             f"({error.strerror or error}); choose another (--output-dir, --activations-dir)") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            try:
                who = json.loads(holder)
                said = (f"pid {who.get('pid')} on {who.get('host')}, started {who.get('started')}: "
                        f"{who.get('command')}")
            except json.JSONDecodeError:
                said = "a process that left no details"
            raise FolderBusy(f"{self.folder} is in use by another gemmalens run ({said}); wait for it to end, or "
                             "choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the lock; the file stays, read by the next holder's refusals
            self.handle = None


ASIDE = ".replaced"


def set_aside(folder: str | Path, names: list[str], run: str | None) -> Path | None:
    """Moves an earlier run's outputs (those of ``names`` that exist in ``folder``, glob patterns allowed) into
    ``folder/.replaced/<run>``, replacing an older set-aside run; returns where, or None if there was nothing."""
    folder = Path(folder)
    found = sorted({p for name in names for p in folder.glob(name)})
    if not found:
        return None
    aside = folder / ASIDE / (run or "earlier")
    shutil.rmtree(folder / ASIDE, ignore_errors=True)
    aside.mkdir(parents=True)
    for path in found:
        os.replace(path, aside / path.name)
    sync_folder(folder)
    return aside


def drop_aside(folder: str | Path) -> None:
    """Removes the outputs ``set_aside`` kept (the run that replaced them is complete)."""
    shutil.rmtree(Path(folder) / ASIDE, ignore_errors=True)
