"""The one atomic write: a temporary file in the target's folder, then ``os.replace``.

Readers (and a second process) see either the old file or the whole new one, never a truncated file; a kill
mid-write leaves at most a stray ``.<name>.<pid>-<random>.tmp<suffix>`` beside the target.  The temporary name is
per process and per call, so concurrent writers of the same file (sharded ranks writing one config) never write
into each other's temporary file; the last ``os.replace`` wins.  The temporary file keeps the target's suffix
because some writers append one when it is missing (``np.save`` adds ``.npy``, ``np.savez`` adds ``.npz``).

    with atomic_path(path) as tmp:          # any writer that takes a path (np.save, torch.save, faiss, h5py)
        np.save(tmp, arr)
    atomic_write_text(path, text)
    atomic_write_json(path, data, indent=1)
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False, mkdir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally it replaces ``path`` atomically.

    Args:
        path: the target file.
        fsync: flush the temporary file to disk before the rename (checkpoints: survive a power cut).
        mkdir: create the target's folder first.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = False, mkdir: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path, fsync, mkdir) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, fsync: bool = False, mkdir: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync, mkdir)


def atomic_write_json(path: str | Path, data: Any, fsync: bool = False, mkdir: bool = False, newline: bool = False,
                      **dumps: Any) -> Path:
    """``json.dumps(data, **dumps)`` (plus ``"\\n"`` with ``newline``) written to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, **dumps) + ("\n" if newline else ""), fsync, mkdir)


def file_sha1(path: str | Path, length: int = 40) -> str:
    """Hex sha1 of a file's bytes, read in 4 MiB blocks, cut to ``length`` characters (content identity of weights
    and checkpoints in cache keys and store presets)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:length]
