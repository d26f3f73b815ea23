"""Damaged files in an output folder, damaged user inputs, store checksums and freshness (issue #13, part 2).

One finished run of the tiny benchmark (SIFT only, no report) is made once per module; each test copies its output
folder, damages one file and runs again: a cache is moved aside with one line and recomputed (same results), a bad
user input is one line naming the file (exit 2), and nothing ends in a traceback or a silently wrong number.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import h5py
import numpy as np
import pytest

from delg.config import load_config, run_stage
from delg.errors import ProjectError

# One scale, small images, a short top K: the module's one full run costs seconds, each rerun a fraction of that.
FAST = ["progress=false", "num_workers=0", "device=cpu", "extract.long_side=128", "extract.scales=[1.0]",
        "extract.global_scales=[1.0]", "rerank.methods=[sift]", "rerank.top_k=4", "sift.long_side=256",
        "report.enabled=false"]


def _conf(out: Path, bench: Path, *extra: str):
    return load_config("configs/tiny.yaml", [f"output_dir={out}", f"dataset.root={bench}", *FAST, *extra])


def _argv(out: Path, bench: Path, *extra: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", f"output_dir={out}", f"dataset.root={bench}", *FAST, *extra]


@pytest.fixture(scope="module")
def done_run(tiny_bench: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from delg.retrieve import main

    out = tmp_path_factory.mktemp("done")
    main(_conf(out, tiny_bench))
    return out


@pytest.fixture
def run_copy(done_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(done_run, dst, ignore=shutil.ignore_patterns("*.lock"))
    return dst


def _methods(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["methods"]


def _rerun(out: Path, bench: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str]:
    """Run the main job as its CLI does; returns (exit code, stderr)."""
    from delg.retrieve import main

    capsys.readouterr()
    rc = run_stage(main, _argv(out, bench, *extra))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def _one_line_about(err: str, path: Path) -> str:
    lines = [ln for ln in err.splitlines() if str(path) in ln]
    assert len(lines) == 1, err
    return lines[0]


def _feature_file(out: Path, pattern: str) -> Path:
    (p,) = list((out / "features").glob(f"*/{pattern}"))
    return p


# ---------------------------------------------------------------------------------------------- damaged caches
def test_truncated_faiss_index_is_rebuilt(run_copy: Path, done_run: Path, tiny_bench: Path, capsys) -> None:
    idx = _feature_file(run_copy, "*.faiss")
    idx.write_bytes(idx.read_bytes()[:100])
    (run_copy / "ranks" / "global.meta.json").unlink()  # the ranking must be recomputed: the index is read
    rc, err = _rerun(run_copy, tiny_bench, capsys)
    assert rc == 0
    line = _one_line_about(err, idx)
    assert "unreadable FAISS index" in line and "moved it aside" in line
    assert list(idx.parent.glob("*.damaged-*.faiss")) and idx.is_file()  # kept for inspection, a new one saved
    assert _methods(run_copy) == _methods(done_run)


def test_truncated_global_ranks_are_recomputed(run_copy: Path, done_run: Path, tiny_bench: Path, capsys) -> None:
    g = run_copy / "ranks" / "global.npy"
    g.write_bytes(g.read_bytes()[:150])
    rc, err = _rerun(run_copy, tiny_bench, capsys)
    assert rc == 0 and "cached ranking unreadable" in _one_line_about(err, g)
    np.testing.assert_array_equal(np.load(g), np.load(done_run / "ranks" / "global.npy"))
    assert _methods(run_copy) == _methods(done_run)


def test_garbage_skipped_json_is_recomputed(run_copy: Path, done_run: Path, tiny_bench: Path, capsys) -> None:
    db = _feature_file(run_copy, "*-db.h5")
    sk = db.with_name(db.stem + ".skipped.json")
    sk.write_text("{not json")
    rc, err = _rerun(run_copy, tiny_bench, capsys)
    assert rc == 0 and "unreadable list of skipped images" in _one_line_about(err, sk)
    assert not sk.exists()  # every image was readable: the re-try found nothing to list
    assert _methods(run_copy) == _methods(done_run)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_inlier_cache_is_recomputed(run_copy: Path, done_run: Path, tiny_bench: Path, capsys,
                                            damage: str) -> None:
    (db,) = list((run_copy / "matches").glob("inliers-*.sqlite"))
    con = sqlite3.connect(db)  # fold the write-ahead log into the file, so that the damage hits the pairs
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("PRAGMA journal_mode=DELETE")
    con.close()
    for extra in ("-wal", "-shm"):
        assert not db.with_name(db.name + extra).exists()
    data = db.read_bytes()
    assert len(data) > 8192
    db.write_bytes(b"this is no database " * 300 if damage == "garbage" else data[: len(data) // 2])
    rc, err = _rerun(run_copy, tiny_bench, capsys)
    assert rc == 0 and "unreadable inlier cache" in _one_line_about(err, db)
    assert _methods(run_copy) == _methods(done_run)
    con = sqlite3.connect(db)  # the new cache holds the recomputed pairs
    assert con.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] > 0
    con.close()


# ---------------------------------------------------------------------------------------------- user inputs
def test_failed_run_leaves_no_stale_results(run_copy: Path, tiny_bench: Path, capsys) -> None:
    old = (run_copy / "results.json").read_text()
    ck = run_copy / "text.pth"
    ck.write_text("not a checkpoint\n")
    rc, err = _rerun(run_copy, tiny_bench, capsys, f"model.checkpoint={ck}")
    assert rc == 2 and err.count("\n") == 1 and "text.pth" in err and "not a readable torch checkpoint" in err
    assert not (run_copy / "results.json").exists()
    assert (run_copy / "results.previous.json").read_text() == old


@pytest.mark.parametrize("content", [b"", b"hello, I am text\n"])
def test_bad_checkpoint_is_one_line(tmp_path: Path, content: bytes) -> None:
    from delg.model.checkpoints import CheckpointError, read_model_checkpoint

    ck = tmp_path / "model.pth"
    ck.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.checkpoint: .*model\.pth (is empty|is not a readable)") as e:
        read_model_checkpoint(ck)
    assert "\n" not in str(e.value)


def test_rerank_global_ranks_user_file(done_run: Path, tiny_bench: Path, tmp_path: Path) -> None:
    from loftr_tools.rerank import main as rerank_main

    good = np.load(done_run / "ranks" / "global.npy")
    cases = {
        "object.npy": (np.empty(good.shape, object), "cannot read a ranking"),
        "shape.npy": (good[:, :3], "columns"),
        "float.npy": (good.astype(np.float32), "float32"),
    }
    for name, (arr, needle) in cases.items():
        p = tmp_path / name
        np.save(p, arr, allow_pickle=True)
        with pytest.raises(ProjectError, match="rerank.global_ranks") as e:
            rerank_main(_conf(tmp_path / "out", tiny_bench, f"rerank.global_ranks={p}"))
        assert str(p) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def test_evaluate_cli_bad_inputs(done_run: Path, tiny_bench: Path, tmp_path: Path, capsys) -> None:
    from delg.evaluate import cli as evaluate_cli

    gnd = next(tiny_bench.glob("gnd_*.pkl"))
    ranks = done_run / "ranks" / "global.npy"
    obj = tmp_path / "obj.npz"
    np.savez(obj, ranks=np.empty((3, 6), object))
    empty, text = tmp_path / "empty.mat", tmp_path / "text.mat"
    empty.write_bytes(b"")
    text.write_text("MATLAB? no, text\n" * 20)
    for args, needle in (
        (["--gnd", str(gnd), "--ranks", str(obj)], str(obj)),
        (["--gnd", str(empty), "--ranks", str(ranks)], str(empty)),
        (["--gnd", str(text), "--ranks", str(ranks)], str(text)),
    ):
        capsys.readouterr()
        code = evaluate_cli(args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err and err.startswith("error: ")


# ---------------------------------------------------------------------------------------------- store content
def _write_vec(path: Path, name: str, vec: np.ndarray) -> None:
    """Overwrite an image's global descriptor in place (same dtype, same size: the file size does not change)."""
    with h5py.File(path, "r+") as f:
        ds = f[name]["global"]
        ds[...] = vec.astype(ds.dtype)


def test_in_place_edit_of_a_store_is_detected(run_copy: Path, tiny_bench: Path, capsys) -> None:
    q = _feature_file(run_copy, "*-query.h5")
    size = q.stat().st_size
    with h5py.File(q, "r") as f:
        key = next(iter(f.keys()))
        v = f[key]["global"][()]
    _write_vec(q, key, np.roll(v, 1))  # still a unit vector: only the checksum can tell
    assert q.stat().st_size == size
    rc, err = _rerun(run_copy, tiny_bench, capsys)
    assert rc == 2 and err.count("\n") == 1 and str(q) in err and "does not match the checksum" in err


def test_impossible_values_are_named(tmp_path: Path) -> None:
    from delg.store import CHECKSUMS, FeatureStore, StoreDamagedError

    p = tmp_path / "s.h5"
    v = np.eye(8, dtype=np.float32)
    with FeatureStore(p, "a", preset="feats-test") as st:
        for i in range(3):
            st.write(f"img{i}", {"global": v[i], "image_size": [1, 1]})
    with h5py.File(p, "r+") as f:  # a store without checksums (written before them): values are still checked
        for k in f.keys():
            del f[k].attrs[CHECKSUMS]
        f["img1"]["global"][0] = np.nan
        f["img2"]["global"][...] = 2.4 * v[2]
    with FeatureStore(p) as st:
        np.testing.assert_array_equal(st.read_global("img0"), v[0])
        with pytest.raises(StoreDamagedError, match=r"s\.h5: image 'img1': global descriptor holds NaN"):
            st.read_globals(["img0", "img1"])
        with pytest.raises(StoreDamagedError, match=r"s\.h5: image 'img2': global descriptor has norm 2\.4"):
            st.read_global("img2")


def test_store_identity_changes_with_same_size_content(tmp_path: Path) -> None:
    """The index key follows the content written (a checksum kept at commit), not the file size."""
    from delg.store import FeatureStore

    p = tmp_path / "s.h5"
    v = np.eye(8, dtype=np.float32)
    with FeatureStore(p, "a", preset="feats-test") as st:
        for i in range(3):
            st.write(f"img{i}", {"global": v[i], "image_size": [1, 1]})
    with FeatureStore(p) as st:
        before = st.identity()
    with FeatureStore(p, "a", preset="feats-test") as st:  # one image redone: another vector of the same size
        st.write("img1", {"global": v[5], "image_size": [1, 1]}, overwrite=True)
    with FeatureStore(p) as st:
        after = st.identity()
        np.testing.assert_array_equal(st.read_global("img1"), v[5])
    assert after != before and after.startswith("content:")
    with FeatureStore(p, "a", preset="feats-test") as st:  # back to the first content: the same identity
        st.write("img1", {"global": v[1], "image_size": [1, 1]}, overwrite=True)
    with FeatureStore(p) as st:
        assert st.identity() == before


def test_cached_ranking_follows_query_content(run_copy: Path, tiny_bench: Path) -> None:
    """A query redone with a same-size result (checksums updated as the store does) invalidates the ranking."""
    from delg import search
    from delg.store import FeatureStore

    q = _feature_file(run_copy, "*-query.h5")
    size = q.stat().st_size
    conf = _conf(run_copy, tiny_bench)
    before = np.load(run_copy / "ranks" / "global.npy")
    with FeatureStore(q) as st:
        names = st.names()
        far = st.read_global(names[1])
    with h5py.File(q, "r+") as f:  # the same bytes a redo would write, written in place
        f[names[0]]["global"][...] = far
    with h5py.File(q, "r+") as f:  # and its checksum and the file's content, as a commit writes them
        from delg.store import CHECKSUMS, CONTENT, _token, array_digest

        sums = json.loads(f[names[0]].attrs[CHECKSUMS])
        old_tok = _token(names[0], sums)
        sums["global"] = array_digest(far)
        f[names[0]].attrs[CHECKSUMS] = json.dumps(sums, sort_keys=True, separators=(",", ":"))
        f.attrs[CONTENT] = f"{int(f.attrs[CONTENT], 16) ^ old_tok ^ _token(names[0], sums):016x}"
    assert q.stat().st_size == size
    search.main(conf)
    after = np.load(run_copy / "ranks" / "global.npy")
    col = json.loads((run_copy / "ranks" / "global.meta.json").read_text())
    assert "query_globals" in col and not np.array_equal(after, before)


# ---------------------------------------------------------------------------------------------- overwrite, folders
def test_overwrite_redoes_extraction(run_copy: Path, tiny_bench: Path, monkeypatch) -> None:
    import delg.extract as E
    from delg import search
    from delg.data.dataset import load_dataset

    conf = _conf(run_copy, tiny_bench)
    ds = load_dataset(conf)
    calls: list[list[str]] = []
    monkeypatch.setattr(E, "main", lambda sub, dataset: calls.append(list(sub.extract.splits)))
    search.ensure_features(conf, ds)
    assert calls == []  # complete stores: nothing to do
    search.ensure_features(_conf(run_copy, tiny_bench, "overwrite=true"), ds)
    assert calls == [["db", "query"]]
    search.ensure_features(_conf(run_copy, tiny_bench, "overwrite=true"), ds)
    assert calls == [["db", "query"]]  # once per process


def test_folder_dataset_extracts_each_image_once(tiny_bench: Path, tmp_path: Path, monkeypatch) -> None:
    import delg.extract as E
    from delg.retrieve import main
    from delg.store import FeatureStore

    root = tmp_path / "photos"
    imgs = sorted((tiny_bench / "jpg").glob("*.jpg"))[:6]
    for i, p in enumerate(imgs):
        (root / f"lm{i // 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / f"lm{i // 2}" / p.name)
    n = []
    orig = E.extract_multiscale
    monkeypatch.setattr(E, "extract_multiscale", lambda *a, **k: n.append(1) or orig(*a, **k))
    out = tmp_path / "out"
    conf = load_config("configs/tiny.yaml", ["dataset.type=folders", f"dataset.root={root}", f"output_dir={out}",
                                             *FAST, "rerank.methods=[]"])
    main(conf)
    assert len(n) == 6  # not 12: the queries are the database images, read whole
    stores = sorted(p.name.rsplit("-", 1)[-1] for p in (out / "features").glob("*/*.h5"))
    assert stores == ["db.h5"]
    (db,) = list((out / "features").glob("*/*-db.h5"))
    with FeatureStore(db) as st:
        names = st.names()
        X = st.read_globals(names)
    ranks = np.load(out / "ranks" / "global.npy")
    # the ranking is the exact one of the stored descriptors (queries = their own database rows)
    sims = X @ X.T
    for j in range(len(names)):
        np.testing.assert_allclose(sims[j, ranks[:, j]], np.sort(sims[j])[::-1], atol=1e-5)


def test_symlinks_are_listed_and_reported(tmp_path: Path, tiny_bench: Path) -> None:
    from delg.data.folders import load_folders
    from delg.data.images import list_images

    root, other = tmp_path / "root", tmp_path / "other"
    imgs = sorted((tiny_bench / "jpg").glob("*.jpg"))[:4]
    (root / "a").mkdir(parents=True)
    (other / "b").mkdir(parents=True)
    shutil.copy(imgs[0], root / "a" / "1.jpg")
    shutil.copy(imgs[1], root / "a" / "2.jpg")
    shutil.copy(imgs[2], other / "b" / "3.jpg")
    shutil.copy(imgs[3], other / "b" / "4.jpg")
    (root / "b").symlink_to(other / "b")  # a symlinked landmark folder
    (root / "a" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")  # a symlink to a missing file
    (root / "a" / "loop").symlink_to(root)  # a loop is read once
    with pytest.warns(UserWarning, match="already listed"):
        names = [p.relative_to(root).as_posix() for p in list_images(root)]
    assert names == ["a/1.jpg", "a/2.jpg", "a/gone.jpg", "b/3.jpg", "b/4.jpg"]
    with pytest.warns(UserWarning):
        ds = load_folders(root)
    assert ds.db_names == names and "b/3.jpg" in ds.query_names
    assert "1 symlinks point to missing files" in ds.notes["broken_symlinks"] and "a/gone.jpg" in ds.notes["broken_symlinks"]


def test_large_png_is_decoded_once(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image, ImageFile

    from delg.data.images import image_size
    from delg.extract import ExtractSettings, ImageLoader, Item

    p = tmp_path / "big.png"
    rgba = np.zeros((1200, 1600, 4), np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(p)
    decodes: list[str] = []
    orig = ImageFile.ImageFile.load

    def counting(self):
        if self.tile:  # pixels still to decode
            decodes.append(type(self).__name__)
        return orig(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    assert image_size(p) == (1600, 1200)
    assert decodes == []  # the size comes from the header
    xs = ExtractSettings(scales=(1.0,), global_scales=(1.0,), long_side=256, local=False, max_keypoints=1,
                         attention_threshold=0.0)
    sample = ImageLoader([Item("big", p)], xs)[0]
    assert tuple(sample["image"].shape) == (3, 192, 256) and decodes == ["PngImageFile"]


def test_overwrite_redoes_on_demand_distractor_locals(tiny_bench: Path, tmp_path: Path, monkeypatch) -> None:
    """overwrite=true redoes the distractor store, so the local features extracted on demand beside it are redone
    too (each once per process), not kept from the earlier extraction."""
    from types import SimpleNamespace

    import delg.extract as E

    imgs = sorted((tiny_bench / "jpg").glob("*.jpg"))[:2]
    ds = SimpleNamespace(name="t", distractor_id="distractors-x", n_distractors=2, n_db=2,
                         db_names=["distractors/a", "distractors/b"], db_paths=imgs)
    n = []
    orig = E.extract_multiscale
    monkeypatch.setattr(E, "extract_multiscale", lambda *a, **k: n.append(1) or orig(*a, **k))
    E.OnDemandLocals(_conf(tmp_path, tiny_bench), ds).read_local("distractors/a")
    E.OnDemandLocals(_conf(tmp_path, tiny_bench), ds).read_local("distractors/a")
    assert len(n) == 1  # kept across runs
    redo = E.OnDemandLocals(_conf(tmp_path, tiny_bench, "overwrite=true"), ds)
    redo.read_local("distractors/a")
    redo.read_local("distractors/a")
    assert len(n) == 2  # redone once with overwrite=true
