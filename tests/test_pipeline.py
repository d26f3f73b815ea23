"""The main job end to end (delg.retrieve): tiny embedded benchmark, skips, caches, a new photo, fault injection,
and the LightGlue lift on real photos."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from delg.config import load_config
from delg.retrieve import main

REPO = Path(__file__).resolve().parent.parent
FAST = ["progress=false", "num_workers=0", "device=cpu", "extract.max_size=160", "extract.scales=[0.7071, 1.0, 1.4142]",
        "rerank.methods=[sift]", "rerank.top_k=8", "sift.long_side=320", "report.max_queries=3"]


def _conf(tmp: Path, bench: Path, *extra: str):
    return load_config("configs/tiny.yaml", [f"output_dir={tmp}", f"dataset.root={bench}", *FAST, *extra])


@pytest.fixture(scope="module")
def tiny_run(tiny_bench: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    main(_conf(out, tiny_bench, "rerank.methods=[sift, loftr, delg]", "loftr.weights=nowhere/outdoor_ds.ckpt"))
    return out


def test_results_json_layout(tiny_run: Path) -> None:
    res = json.loads((tiny_run / "results.json").read_text())
    assert res["dataset"] == "minibench-tiny" and res["n_queries"] == 6 and res["complete"] is True
    assert set(res["protocol"]) >= {"query_crop", "junk_before_rerank", "top_k", "checkpoint"}
    assert res["protocol"]["query_crop"] is True and res["protocol"]["top_k"] == 8
    assert set(res["methods"]) == {"global", "sift"}  # loftr (no weights) and delg (untrained head) skipped
    skipped = {s["method"]: s["reason"] for s in res["skipped_methods"]}
    assert "nowhere/outdoor_ds.ckpt" in skipped["loftr"]
    assert "untrained" in skipped["delg"]
    for m in res["methods"].values():
        for p in ("E", "M", "H"):
            assert set(m[p]) == {"mAP", "mP@1", "mP@5", "mP@10"} and 0 <= m[p]["mAP"] <= 100


def test_rankings_are_permutations_and_rerank_rule(tiny_run: Path) -> None:
    g = np.load(tiny_run / "ranks" / "global.npy")
    r = np.load(tiny_run / "ranks" / "rerank-sift.npz")
    ranks, inl = r["ranks"], r["inliers"]
    assert ranks.shape == g.shape == (26, 6)
    for q in range(6):
        assert sorted(ranks[:, q]) == list(range(26))
        assert set(ranks[:8, q]) == set(g[:8, q])  # the top K is reordered, not replaced
        assert (ranks[8:, q] == g[8:, q]).all()  # below K: untouched
        assert (np.diff(inl[:, q]) <= 0).all()  # ordered by inliers


def test_report_html(tiny_run: Path) -> None:
    html = (tiny_run / "report.html").read_text()
    assert html.count("<section>") == 3  # report.max_queries
    assert "query (cropped)" in html and "data:image/jpeg;base64," in html
    assert "inl." in html and "img class='matches'" in html  # inlier counts and drawn matches


def test_rerun_reuses_features_and_inlier_cache(tiny_run: Path, tiny_bench: Path, capsys: pytest.CaptureFixture) -> None:
    before = json.loads((tiny_run / "results.json").read_text())["methods"]
    main(_conf(tiny_run, tiny_bench))
    out = capsys.readouterr().out
    assert "0 matched" in out  # every pair came from the inlier cache
    assert json.loads((tiny_run / "results.json").read_text())["methods"] == before


def test_search_with_a_new_photo(tiny_run: Path, tiny_bench: Path, capsys: pytest.CaptureFixture) -> None:
    import pickle

    gnd = pickle.loads((tiny_bench / "gnd_minibench.pkl").read_bytes())
    photo = tiny_bench / "jpg" / f"{gnd['qimlist'][0]}.jpg"
    out = main(_conf(tiny_run, tiny_bench, f"query={photo}"))
    data = json.loads(out.read_text())
    assert data["verifier"] == "sift" and len(data["matches"]) >= 8
    # the best match after verification is a positive of that query
    best = Path(data["matches"][0]["path"]).stem
    pos = {gnd["imlist"][i] for i in [*gnd["gnd"][0]["easy"], *gnd["gnd"][0]["hard"]]}
    assert best in pos
    assert "top matches for" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- fault injection
RUNNER = """
import sys, time
import torch
torch.set_num_threads(1)
phase, args = sys.argv[1], sys.argv[2:]
if phase == "extract":  # slow the forward passes so that the kill lands mid-extraction
    import delg.extract as E
    orig = E.load_model
    def slow(conf):
        m = orig(conf)
        f = m.extract
        m.extract = lambda *a, **k: (time.sleep(0.05), f(*a, **k))[1]
        return m
    E.load_model = slow
else:  # slow the matching so that the kill lands mid-reranking
    import loftr_tools.sift as S
    f = S.SiftVerifier.match
    S.SiftVerifier.match = lambda self, a, b: (time.sleep(0.1), f(self, a, b))[1]
from delg.retrieve import cli
sys.exit(cli(args))
"""


def _run_until(args: list[str], phase: str, ready, timeout: float = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, phase, *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed during {phase}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def _progress_done(out: Path) -> int:
    for p in out.glob("features/*/*-db.progress.json"):
        try:
            return int(json.loads(p.read_text())["done"])
        except (ValueError, KeyError):
            return 0
    return 0


def _cached_pairs(out: Path) -> int:
    for p in out.glob("matches/*.sqlite"):
        try:
            with sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=1) as db:
                tables = [t for (t,) in db.execute("select name from sqlite_master where type='table'")]
                return sum(db.execute(f"select count(*) from {t}").fetchone()[0] for t in tables)
        except sqlite3.Error:
            return 0
    return 0


def _corrupt_copy(src: Path, dst: Path) -> dict[str, list[str]]:
    """~5% bad files (zero bytes, truncated, garbage) and one missing; returns the names per split."""
    import pickle

    shutil.copytree(src, dst)
    gnd = pickle.loads((dst / "gnd_minibench.pkl").read_bytes())
    db, q = gnd["imlist"], gnd["qimlist"]
    jpg = dst / "jpg"
    (jpg / f"{db[2]}.jpg").write_bytes(b"")
    data = (jpg / f"{db[5]}.jpg").read_bytes()
    (jpg / f"{db[5]}.jpg").write_bytes(data[: len(data) // 3])
    (jpg / f"{db[9]}.jpg").write_bytes(os.urandom(2000))
    (jpg / f"{db[13]}.jpg").unlink()
    qdata = (jpg / f"{q[1]}.jpg").read_bytes()
    (jpg / f"{q[1]}.jpg").write_bytes(qdata[: len(qdata) // 4])
    return {"db": [db[2], db[5], db[9], db[13]], "query": [q[1]]}


@pytest.mark.slow
def test_fault_injection_with_kills(tiny_bench: Path, tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bad = _corrupt_copy(tiny_bench, bench)
    out, ref = tmp_path / "killed", tmp_path / "reference"
    args = ["--config", "configs/tiny.yaml", f"output_dir={out}", f"dataset.root={bench}", *FAST]

    _run_until(args, "extract", lambda: 3 <= _progress_done(out))
    _run_until(args, "rerank", lambda: _cached_pairs(out) >= 6)
    res_path = main(_conf(out, bench))
    main(_conf(ref, bench))  # uninterrupted run on the same files: the same images are unreadable

    res, res_ref = json.loads(res_path.read_text()), json.loads((ref / "results.json").read_text())
    assert res["methods"] == res_ref["methods"]
    assert res["complete"] is False and res["n_queries"] == 5
    skipped = {(s["split"], s["name"]) for s in res["skipped"]}
    assert skipped == {("db", n) for n in bad["db"]} | {("query", n) for n in bad["query"]}
    missing = next(s for s in res["skipped"] if s["name"] == bad["db"][3])
    assert "not found" in missing["reason"]
    # skipped database images rank last for every query, in the global and the reranked rankings
    import pickle

    imlist = pickle.loads((bench / "gnd_minibench.pkl").read_bytes())["imlist"]
    bad_ids = {imlist.index(n) for n in bad["db"]}
    g = np.load(out / "ranks" / "global.npy")
    r = np.load(out / "ranks" / "rerank-sift.npz")["ranks"]
    for ranks in (g, r):
        assert all(set(ranks[-4:, c]) == bad_ids for c in range(ranks.shape[1]))


# ---------------------------------------------------------------------------------------------- real photos
@pytest.mark.slow
def test_lightglue_lifts_real_photos(shared_data: Path, tmp_path: Path) -> None:
    """45 real photos of 8 landmarks + 16 distractors: DISK+LightGlue reranking of the top 20 lifts Medium mAP by
    at least 15 points over the global EfficientNet-Lite0 GeM ranking, and beats the issue's plain implementation
    (64.2 -> 86.2 with 1024 DISK keypoints).

    1024 keypoints at 512 px (67.0 -> 87.0, 12 minutes on 2 CPU cores; every photo is also a database image, so
    each unordered pair is matched once): 512 keypoints at 384 px reach only 78.9, 1024 at 384 px 86.0."""
    conf = load_config("configs/demo.yaml", [
        f"output_dir={tmp_path}", "dataset.type=folders", f"dataset.root={shared_data / 'images'}",
        f"dataset.distractors={shared_data / 'images_distractors'}", "rerank.methods=[lightglue]", "rerank.top_k=20",
        "lightglue.max_keypoints=1024", "lightglue.long_side=512", "progress=false", "report.enabled=false",
        "device=cpu"])
    res = json.loads(main(conf).read_text())
    g, lg = res["methods"]["global"]["M"]["mAP"], res["methods"]["lightglue"]["M"]["mAP"]
    assert res["n_queries"] == 45
    assert lg - g >= 15, f"global {g:.1f} -> lightglue {lg:.1f}"
    assert lg > 86.2, f"global {g:.1f} -> lightglue {lg:.1f}: below the plain implementation's 86.2"
