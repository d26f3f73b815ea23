"""Each stage's script works on its own on a fresh output folder: it runs whatever earlier stage it needs, writes
its resolved config, reads relative paths from the caller's folder, and reports bad input in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
FAST = ["progress=false", "num_workers=0", "device=cpu", "extract.long_side=160", "extract.scales=[1.0]",
        "extract.global_scales=[1.0]", "rerank.methods=[sift]", "rerank.top_k=4", "sift.long_side=200"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_rerank_stage_alone_on_a_fresh_folder(tiny_bench: Path, tmp_path: Path) -> None:
    """``python -m loftr_tools.rerank`` with nothing done yet: extraction and search run first."""
    r = _run([sys.executable, "-m", "loftr_tools.rerank", "--config", "tiny", "output_dir=run",
              f"dataset.root={tiny_bench}", *FAST], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "run"  # relative output_dir: under the caller's folder, not the repo
    z = np.load(out / "ranks" / "rerank-sift.npz")
    g = np.load(out / "ranks" / "global.npy")
    assert z["ranks"].shape == g.shape == (26, 6)
    for f in ("ranks/global.config.yaml", "ranks/rerank.config.yaml"):
        assert (out / f).is_file(), f
    assert list((out / "features").glob("*/feats-*-db.h5")) and list((out / "features").glob("*/feats-*-query.h5"))


def test_scripts_report_bad_input_in_one_line(tmp_path: Path) -> None:
    cases = [
        (["bash", str(REPO / "perform_retrieval.sh"), "search.depth=10"], "ranks.depth"),
        (["bash", str(REPO / "perform_retrieval.sh"), "rerank.topk=10"], "nearest valid key"),
        (["bash", str(REPO / "extract_features.sh"), "dataset.type=folders", "dataset.root=no/such/dir"],
         "no/such/dir"),
        (["bash", str(REPO / "train_delg.sh"), "train.epochz=1"], "'train.epochs'"),
        ([sys.executable, "-m", "delg.search", "dataset.type=revisitop", "dataset.name=roxford5k",
          f"dataset.root={tmp_path}"], "gnd_roxford5k"),
        ([sys.executable, "-m", "delg.evaluate", "--gnd", "missing.pkl", "--ranks", "r.npy"], "missing.pkl"),
    ]
    for args, needle in cases:
        r = _run(args, tmp_path)
        assert r.returncode != 0, args
        assert "Traceback" not in r.stderr, (args, r.stderr[-1500:])
        assert needle in r.stderr, (args, r.stderr[-1500:])
