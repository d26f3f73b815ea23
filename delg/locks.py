"""The one file lock of the project: an ``flock`` on a lock file that names its holder.

Used for feature stores (``<store>.h5.lock``, one writer at a time) and for output folders (``<output_dir>/.run.lock``,
held by a command for its whole run).  The kernel drops an ``flock`` when its process dies, so the lock of a crashed
run is taken over by the next one without any clean-up; the file's text (pid, host, command, start time) only serves
the message of a refused process.  Locks are re-entrant within a process when asked: a stage that calls another
stage in-process does not wait for itself.

    with hold(Path("out/.run.lock"), "output folder out", busy=OutputBusyError):
        ...  # a second process asking for the same lock gets OutputBusyError naming this one
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from delg.errors import ProjectError


class LockBusyError(ProjectError, RuntimeError):
    """Another process holds the lock; the message names it."""


# lock file (resolved) -> [fd, count, shared] of the locks this process holds re-entrantly
_HELD: dict[str, list] = {}


def holder(lock_path: Path) -> str:
    """The holder recorded in a lock file, in words (``'pid 123 on host, started ..., command: ...'``)."""
    try:
        info = json.loads(Path(lock_path).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (a sharded / multi-process run, or one that just started)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')}, started {started}, command: {info.get('command')}"


def acquire(lock_path: Path, what: str, *, wait: bool = False, shared: bool = False, reentrant: bool = False,
            busy: type[Exception] = LockBusyError) -> int:
    """Take the lock; returns the descriptor to give to :func:`release`.

    Args:
        lock_path: the lock file (created when missing).
        what: what the lock protects, for the message (``'feature store x.h5'``).
        wait: block until the holder is done instead of raising ``busy``.
        shared: a shared lock (several cooperating processes, e.g. the ranks of one sharded run); an exclusive one
            is refused while any shared one is held, and the other way round.
        reentrant: a second :func:`acquire` of the same file in this process counts up instead of blocking.
        busy: the error raised when another process holds the lock.
    """
    key = str(Path(lock_path).resolve())
    if reentrant and key in _HELD:
        _HELD[key][1] += 1
        return _HELD[key][0]
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        raise busy(f"{what} is in use by {holder(Path(lock_path))}; wait for it to finish or use another "
                   "folder") from None
    if not shared:  # record the holder for the message of the next process (a shared lock has many)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join([Path(sys.executable).name, *sys.argv])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    if reentrant:
        _HELD[key] = [fd, 1, shared]
    return fd


def release(lock_path: Path, fd: int) -> None:
    """Give back a lock taken with :func:`acquire` (the last re-entrant release unlocks)."""
    key = str(Path(lock_path).resolve())
    held = _HELD.get(key)
    if held is not None and held[0] == fd:
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
    if not held or not held[2]:
        try:
            os.ftruncate(fd, 0)  # the holder's text goes with the lock
        except OSError:
            pass
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextmanager
def hold(lock_path: Path, what: str, **kw: object) -> Iterator[None]:
    """:func:`acquire` for the ``with`` block (same arguments)."""
    fd = acquire(lock_path, what, **kw)  # type: ignore[arg-type]
    try:
        yield
    finally:
        release(lock_path, fd)


__all__ = ["LockBusyError", "acquire", "hold", "holder", "release"]
