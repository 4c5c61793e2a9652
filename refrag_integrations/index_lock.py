"""One writer at a time on an embedded index directory (an exclusive ``flock`` on a lock file).

Chroma's embedded database keeps each collection's vector index in the memory of the process
that opened it and writes it back whole, so two processes writing one directory silently drop
each other's vectors, and so does a process that opened the directory before another one wrote
to it. The lock file ``<index dir>/refrag-writer.lock`` therefore carries the holder's pid and a
write generation that every new writer increments: a process that opened the directory before
another process wrote to it refuses to write (:class:`StaleIndexError`) instead of overwriting.

The lock is per process and reentrant: stores in one process share Chroma's in-memory state, so
they share the lock too. The operating system releases it when the process exits, however it
exits, so a killed writer never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LOCK_FILE = "refrag-writer.lock"
_POLL_S = 0.2


class IndexLockedError(TimeoutError):
    """Another process holds the index's writer lock past the timeout."""


class StaleIndexError(RuntimeError):
    """Another process wrote to the index after this process opened it: writing now would drop its vectors."""


@dataclass
class _Held:
    fd: int
    count: int


_guard = threading.Lock()
_held: dict[str, _Held] = {}
_seen_generation: dict[str, int] = {}  # generation of each directory when this process first opened it


def _key(root: Path) -> str:
    return str(Path(root).resolve())


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def holder_pid(root: Path) -> int | None:
    """The pid recorded by the last process that took the writer lock of ``root`` (None if none)."""
    pid = _read(Path(root) / LOCK_FILE).get("pid")
    return pid if isinstance(pid, int) else None


def note_opened(root: Path) -> None:
    """Record the write generation of ``root`` as this process opens it (call before opening Chroma)."""
    key = _key(root)
    with _guard:
        if key not in _seen_generation:
            _seen_generation[key] = int(_read(Path(root) / LOCK_FILE).get("generation", 0))


def acquire(root: Path, timeout: float, on_wait: Callable[[str], None] | None = None) -> None:
    """Take the writer lock of the index directory ``root`` (reentrant within a process).

    Args:
        root: the embedded index directory (it must exist).
        timeout: seconds to wait for another process to release the lock (0: do not wait).
        on_wait: called once with a message when the lock is busy and this call starts waiting.

    Raises:
        IndexLockedError: another process still holds the lock after ``timeout`` seconds.
        StaleIndexError: another process wrote to ``root`` after this process opened it.
    """
    key = _key(root)
    path = Path(root) / LOCK_FILE
    with _guard:
        if key in _held:
            _held[key].count += 1
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(0.0, timeout)
        waited = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pid = holder_pid(root)
                    if time.monotonic() >= deadline:
                        raise IndexLockedError(
                            f"The index at {root} is being written by another process (pid {pid}, lock file {path}); "
                            f"gave up after {timeout:g} s. Wait for it to finish (or stop it), then run again; "
                            "raise the wait with --lock-timeout / lock_timeout=."
                        ) from None
                    if not waited and on_wait is not None:
                        on_wait(f"waiting for the index at {root}: another process (pid {pid}) is writing it "
                                f"(up to {timeout:g} s)...")
                    waited = True
                    time.sleep(_POLL_S)
            state = _read(path)
            generation = int(state.get("generation", 0))
            seen = _seen_generation.get(key)
            if seen is not None and seen != generation:
                raise StaleIndexError(
                    f"The index at {root} was written by another process (pid {state.get('pid')}) after this process "
                    "opened it, so this process's view of it is out of date and writing now would drop that "
                    "process's vectors. Open the index again in a new process (or take the lock before opening: "
                    "ChunkStore(path, writer=True))."
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "generation": generation + 1}).encode(), 0)
            _seen_generation[key] = generation + 1
        except BaseException:
            os.close(fd)  # closing the descriptor releases the flock, if taken
            raise
        _held[key] = _Held(fd, 1)


def release(root: Path) -> None:
    """Give back one hold of the writer lock of ``root``; the last one unlocks the directory."""
    key = _key(root)
    with _guard:
        held = _held.get(key)
        if held is None:
            return
        held.count -= 1
        if held.count == 0:
            del _held[key]
            os.close(held.fd)


def is_held(root: Path) -> bool:
    """Whether this process holds the writer lock of ``root``."""
    with _guard:
        return _key(root) in _held
