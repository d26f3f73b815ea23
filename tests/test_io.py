"""The one atomic write (delg/io.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from delg.io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_replaces_whole_files_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text("old")
    assert atomic_write_json(p, {"x": 1}, indent=1, newline=True) == p
    assert p.read_text() == json.dumps({"x": 1}, indent=1) + "\n"
    atomic_write_text(p, "é")
    assert p.read_bytes() == "é".encode()
    atomic_write_bytes(tmp_path / "sub" / "b.bin", b"\0", mkdir=True, fsync=True)
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\0"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json", "sub"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    p = tmp_path / "ranks.npy"
    np.save(p, np.arange(3))
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert np.load(p).tolist() == [0, 1, 2]
    assert [x.name for x in tmp_path.iterdir()] == ["ranks.npy"]


def test_temp_keeps_the_suffix_and_is_per_process(tmp_path: Path) -> None:
    # np.save / np.savez append .npy / .npz to a name without it: the temporary file must keep the suffix
    for name, save in (("r.npy", lambda t: np.save(t, np.ones(2))), ("r.npz", lambda t: np.savez(t, a=np.ones(2)))):
        with atomic_path(tmp_path / name) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == Path(name).suffix and str(os.getpid()) in tmp.name
            save(tmp)
        assert (tmp_path / name).is_file()
    with atomic_path(tmp_path / "c.yaml") as t1, atomic_path(tmp_path / "c.yaml") as t2:
        assert t1 != t2  # two writers of one file (sharded ranks) never share a temporary file
        t1.write_text("1")
        t2.write_text("2")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.yaml", "r.npy", "r.npz"]
