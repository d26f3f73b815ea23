"""scripts/paper_standin.sh: the stand-in data keeps the real names and a consistent ground truth; the quick
subset of the paper configs runs end to end through the script; a failing config makes it exit non-zero."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from delg import paper_standin as ps

REPO = Path(__file__).resolve().parent.parent


def _real(shared: Path, name: str) -> dict:
    with (shared / "revisitop" / f"gnd_{name}.pkl").open("rb") as f:
        return pickle.load(f)


def test_subset_ground_truth_is_the_real_one_restricted(shared_data: Path) -> None:
    real = _real(shared_data, "roxford5k")
    keep = ps.subset_database(real, db_per_query=1, db_others=10)
    sub = ps.remap_gnd(real, keep)
    assert sub["qimlist"] == real["qimlist"] and len(sub["imlist"]) == len(keep) < len(real["imlist"])
    kept = set(keep)
    for g_real, g_sub in zip(real["gnd"], sub["gnd"]):
        for kind in ("easy", "hard", "junk"):
            # the subset's lists name exactly the real images of that kind that the subset kept
            assert sorted(sub["imlist"][i] for i in g_sub[kind]) == sorted(
                real["imlist"][i] for i in g_real[kind] if i in kept)
            assert len(g_sub[kind]) >= min(1, len(g_real[kind]))
    full = ps.subset_database(real, None, 0)
    assert full == list(range(len(real["imlist"])))


def test_landmark_groups_join_queries_sharing_positives() -> None:
    gnd = [{"easy": [0], "hard": [1]}, {"easy": [1], "hard": []}, {"easy": [5], "hard": []}, {"easy": [], "hard": [0]}]
    assert ps.landmark_groups(gnd) == [0, 0, 1, 0]


def test_query_box_scaled_and_grown() -> None:
    assert ps._query_box([0, 0, 1024, 512], (128, 96), 0.125, 32) == [0.0, 0.0, 127.0, 64.0]
    x1, y1, x2, y2 = ps._query_box([500, 300, 510, 310], (128, 96), 0.125, 32)
    assert x2 - x1 == pytest.approx(32) and y2 - y1 == pytest.approx(32) and x1 <= 63.1 <= x2


def test_cli_settings() -> None:
    args, ov = ps.parse_args(["--out", "d", "--quick", "configs=a,b.yaml", "db_per_query=all", "rerank.top_k=2"])
    assert args["configs"] == ["a", "b"] and args["sizes"].db_per_query is None and args["quick"]
    assert ov == ["rerank.top_k=2"]
    with pytest.raises(SystemExit):
        ps.parse_args(["--out", "d", "colour=red"])
    with pytest.raises(ps.StandinError, match="distractors"):
        ps.Sizes(distractors=-1).check()


@pytest.mark.slow
def test_quick_subset_through_the_script(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "standin"
    # the script runs <repo>/.venv/bin/python, else the python3 on PATH: make that this test's interpreter
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "SHARED_DATA": str(shared_data), "OMP_NUM_THREADS": "2", "PATH": path}
    r = subprocess.run(["bash", str(REPO / "scripts" / "paper_standin.sh"), "--out", str(out), "--quick"],
                       capture_output=True, text=True, timeout=3600, env=env, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    for name in ps.QUICK_CONFIGS:
        line = next(s for s in r.stdout.splitlines() if s.startswith(name + " "))
        assert " ok " in line, line
        res = json.loads((out / name / "results.json").read_text())
        if "methods" in res:  # retrieval
            assert res["n_queries"] == 70
            assert {"global", "loftr", "lightglue", "delg"} <= set(res["methods"]), res.get("skipped_methods")
            for m, r_m in res["methods"].items():
                assert math.isfinite(r_m["M"]["mAP"]) and 0 <= r_m["M"]["mAP"] <= 100, m
        else:  # training
            assert Path(res["checkpoint"]).is_file() and all(math.isfinite(v) for v in res["final_loss"].values())
    gnd = _real(shared_data, "roxford5k")
    ours = pickle.loads((out / "data" / "roxford5k" / "gnd_roxford5k.pkl").read_bytes())
    assert ours["qimlist"] == gnd["qimlist"] and set(ours["imlist"]) <= set(gnd["imlist"])

    # A failing config (its checkpoint missing) fails alone, with its line, and the exit status says so.
    r = subprocess.run(["bash", str(REPO / "scripts" / "paper_standin.sh"), "--out", str(out), "--quick",
                        "configs=roxford5k_seed_r50", f"model.checkpoint={tmp_path / 'missing.pyth'}"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 1
    line = next(s for s in r.stdout.splitlines() if s.startswith("roxford5k_seed_r50 "))
    assert "FAILED" in line and "missing.pyth" in line, line


def test_missing_shared_data_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(ps.StandinError, match="gnd_roxford5k.pkl"):
        ps.main(tmp_path / "o", configs=["roxford5k_seed_r50"])


def test_every_paper_config_gets_its_stand_in() -> None:
    """Each config is run as what it is: GLDv2 training, or retrieval on its dataset, with the stand-in checkpoint of
    its kind (seed pycls for the seed configs, our 2048-d for the others) and distractors only for +1M."""
    w = {k: Path(f"/w/{k}") for k in ("seed_r50", "seed_r101", "r50", "r101", "loftr", "imagenet")}
    st = ps.Standin(Path("/o"), {n: Path(f"/d/{n}") for n in ps.DATASETS}, Path("/dis"), Path("/c.csv"),
                    Path("/img"), w, {})
    names = ps.paper_configs()
    assert len(names) == 21 and "_retrieval" not in names
    for name in names:
        kind, ov = ps.config_overrides(name, ps._raw_yaml(ps.PAPER_CONFIGS / f"{name}.yaml"), st, ps.Sizes(),
                                       Path(f"/o/{name}"))
        assert f"output_dir={Path('/o') / name}" in ov
        ckpt = [o.split("=", 1)[1] for o in ov if o.startswith("model.checkpoint=")]
        if "gldv2" in name or name.startswith("seed_"):
            assert kind == "train" and "train.csv=/c.csv" in ov and "train.epochs=1" in ov
            assert ckpt == (["/w/seed_r50"] if name.startswith("seed_") else [])
        else:
            assert kind == "retrieval" and f"dataset.root=/d/{name.split('_')[0]}" in ov
            assert ("dataset.distractors=/dis" in ov) == ("_r1m_" in name)
            # the shared distractor store stays inside --out (never the repository's outputs/paper/features)
            assert ("extract.distractor_dir=/o/features" in ov) == ("_r1m_" in name)
            depth = "r101" if "r101" in name else "r50"
            assert ckpt == [f"/w/seed_{depth}" if "_seed_" in name else f"/w/{depth}"], (name, ckpt)
