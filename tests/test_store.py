"""HDF5 feature store: round trip, skip-if-done, overwrite, crash recovery, preset mismatch, locking."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from delg.store import (
    SCRATCH,
    FeatureStore,
    PresetMismatchError,
    StoreBusyError,
    StoreError,
    escape_name,
    store_contents,
    unescape_name,
)

NAMES = ["all_souls_000013", "paris/defense/img 1.jpg", "a%2Fb", ".", "x/y/z"]


def _feats(rng: np.random.Generator, n: int = 7, d: int = 8, dim: int = 16) -> dict[str, np.ndarray]:
    g = rng.standard_normal(dim).astype(np.float32)
    return {
        "global": g / np.linalg.norm(g),
        "keypoints": rng.uniform(0, 100, (n, 2)).astype(np.float32),
        "descriptors": rng.standard_normal((n, d)).astype(np.float32),
        "scores": rng.uniform(0, 3, n).astype(np.float32),
        "image_size": np.array([120, 80]),
    }


def _fill(path, names=NAMES, seed=0, **kw) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feats = {n: _feats(rng) for n in names}
    with FeatureStore(path, "a", preset="feats-test", settings={"max_size": 64}, **kw) as st:
        st.set_model_meta({"backbone": "toy", "global_dim": 16})
        for n in names:
            st.write(n, feats[n])
    return feats


def test_escape_round_trip():
    for n in [*NAMES, "..", SCRATCH, "a b/c%d", "über/ß"]:
        key = escape_name(n)
        assert "/" not in key and key not in (".", "..", SCRATCH)
        assert unescape_name(key) == n
    assert len({escape_name(n) for n in NAMES}) == len(NAMES)


def test_round_trip(tmp_path):
    p = tmp_path / "s.h5"
    feats = _fill(p)
    with FeatureStore(p) as st:
        assert st.names() == sorted(NAMES)
        assert all(st.has(n) for n in NAMES) and not st.has("missing")
        G = st.read_globals(NAMES[::-1])
        np.testing.assert_array_equal(G, np.stack([feats[n]["global"] for n in NAMES[::-1]]))
        assert G.dtype == np.float32 and G.shape == (len(NAMES), 16)
        loc = st.read_local(NAMES[1])
        for k in ("keypoints", "descriptors", "scores"):
            np.testing.assert_array_equal(loc[k], feats[NAMES[1]][k])
        np.testing.assert_array_equal(loc["image_size"], [120, 80])
        assert st.preset == "feats-test" and st.settings == {"max_size": 64}
        assert st.model_meta == {"backbone": "toy", "global_dim": 16}
        assert st.read_globals([]).shape == (0, 16)
        with pytest.raises(KeyError, match="missing"):
            st.read_global("missing")
    # No time-dependent attributes: two stores with the same content compare equal.
    p2 = tmp_path / "s2.h5"
    _fill(p2)
    a1, c1 = store_contents(p)
    a2, c2 = store_contents(p2)
    assert a1 == a2
    assert c1.keys() == c2.keys()
    for n in c1:
        for k in c1[n]:
            np.testing.assert_array_equal(c1[n][k], c2[n][k])


def test_float16(tmp_path):
    p = tmp_path / "h.h5"
    feats = _fill(p, float16=True)
    with h5py.File(p, "r") as f:
        g = f[escape_name(NAMES[0])]
        assert g["global"].dtype == np.float16 and g["descriptors"].dtype == np.float16
        assert g["keypoints"].dtype == np.float32 and g["scores"].dtype == np.float32
    with FeatureStore(p) as st:
        G = st.read_globals(NAMES)
        assert G.dtype == np.float32
        np.testing.assert_allclose(G, np.stack([feats[n]["global"] for n in NAMES]), atol=1e-3)
        np.testing.assert_array_equal(st.read_local(NAMES[0])["keypoints"], feats[NAMES[0]]["keypoints"])


def test_skip_if_done_and_overwrite(tmp_path):
    p = tmp_path / "s.h5"
    feats = _fill(p)
    other = _feats(np.random.default_rng(99))
    with FeatureStore(p, "a", preset="feats-test", settings={"max_size": 64}) as st:
        st.write(NAMES[0], other)  # already done: kept
    with FeatureStore(p) as st:
        np.testing.assert_array_equal(st.read_global(NAMES[0]), feats[NAMES[0]]["global"])
    with FeatureStore(p, "a", preset="feats-test", settings={"max_size": 64}) as st:
        st.write(NAMES[0], other, overwrite=True)
    with FeatureStore(p) as st:
        np.testing.assert_array_equal(st.read_global(NAMES[0]), other["global"])
        np.testing.assert_array_equal(st.read_global(NAMES[1]), feats[NAMES[1]]["global"])
        assert len(st) == len(NAMES)


def test_preset_and_settings_mismatch(tmp_path):
    p = tmp_path / "s.h5"
    _fill(p)
    with pytest.raises(PresetMismatchError, match="feats-other"):
        FeatureStore(p, "a", preset="feats-other")
    with pytest.raises(PresetMismatchError, match="settings"):
        FeatureStore(p, "r", preset="feats-test", settings={"max_size": 128})
    with FeatureStore(p, "a", preset="feats-test") as st, pytest.raises(PresetMismatchError, match="another model"):
        st.set_model_meta({"backbone": "resnet50", "global_dim": 2048})


def test_incomplete_group_dropped(tmp_path):
    p = tmp_path / "s.h5"
    _fill(p, NAMES[:2])
    with h5py.File(p, "a") as f:  # what a kill between the arrays and the rename leaves behind
        g = f.create_group(SCRATCH)
        g["global"] = np.zeros(16, np.float32)
    with FeatureStore(p) as st:
        assert st.names() == sorted(NAMES[:2])
    with FeatureStore(p, "a", preset="feats-test") as st:
        assert SCRATCH not in st.f
        assert st.names() == sorted(NAMES[:2])


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file_moved_aside(tmp_path, damage, capsys):
    p = tmp_path / "s.h5"
    feats = _fill(p, [f"img{i}" for i in range(40)])
    size = p.stat().st_size
    if damage == "truncate":
        with open(p, "r+b") as fh:
            fh.truncate(size // 2)
    else:
        p.write_bytes(b"not an hdf5 file" * 64)
    with pytest.raises(StoreError, match="cannot open"):
        FeatureStore(p, "r")
    with FeatureStore(p, "a", preset="feats-test", settings={"max_size": 64}) as st:
        kept = st.names()
        for n in kept:  # whatever was salvaged is intact, never mixed with garbage
            np.testing.assert_array_equal(st.read_global(n), feats[n]["global"])
        assert len(kept) < 40
        for n in feats:  # redo the rest as an extraction would
            st.write(n, feats[n])
    assert "moved it aside" in capsys.readouterr().err
    assert (tmp_path / "s.corrupt.h5").is_file()
    _, c = store_contents(p)
    assert sorted(c) == sorted(feats)
    for n in feats:
        np.testing.assert_array_equal(c[n]["descriptors"], feats[n]["descriptors"])


def test_writer_lock(tmp_path):
    p = tmp_path / "s.h5"
    _fill(p, NAMES[:1])
    code = (
        "import sys, time; from delg.store import FeatureStore\n"
        f"st = FeatureStore({str(p)!r}, 'a'); print('locked', flush=True); time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(StoreBusyError):
            FeatureStore(p, "a")
    finally:
        proc.kill()
        proc.wait()
    with FeatureStore(p, "a") as st:  # the lock dies with its process
        assert st.names() == [NAMES[0]]


def test_read_only_errors(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        FeatureStore(tmp_path / "none.h5")
    p = tmp_path / "s.h5"
    _fill(p, NAMES[:1])
    with FeatureStore(p) as st, pytest.raises(StoreError, match="read-only"):
        st.write("x", {"global": np.zeros(3)})
    with FeatureStore(p, "a") as st:
        st.write("g", {"global": np.ones(16, np.float32), "image_size": [1, 1]})
    with FeatureStore(p) as st, pytest.raises(StoreError, match="no local features"):
        st.read_local("g")
    json.dumps(FeatureStore(p).attrs())  # attributes are plain JSON-able values


def test_kill_loses_only_the_uncommitted_batch(tmp_path):
    p = tmp_path / "s.h5"
    code = (
        "import os, signal, numpy as np; from delg.store import FeatureStore\n"
        f"st = FeatureStore({str(p)!r}, 'a', preset='feats-test', commit_every=100, commit_seconds=1e9)\n"
        "for i in range(8):\n"
        "    st.write(f'img{i}', {'global': np.eye(8, dtype=np.float32)[i], 'image_size': [1, 1]})\n"
        "    if i == 4: st.commit()\n"
        "st.f.flush()\n"  # even flushed, staged images are not visible under their names
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    res = subprocess.run([sys.executable, "-c", code])
    assert res.returncode == -9
    with FeatureStore(p) as st:
        assert st.names() == [f"img{i}" for i in range(5)]
        np.testing.assert_array_equal(st.read_global("img3"), np.eye(8, dtype=np.float32)[3])
    with FeatureStore(p, "a", preset="feats-test") as st:
        assert SCRATCH not in st.f and len(st) == 5
