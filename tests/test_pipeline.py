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
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from delg.config import load_config
from delg.retrieve import main

REPO = Path(__file__).resolve().parent.parent
FAST = ["progress=false", "num_workers=0", "device=cpu", "extract.long_side=160", "extract.scales=[0.7071, 1.0, 1.4142]",
        "rerank.methods=[sift]", "rerank.top_k=8", "sift.long_side=320", "report.max_queries=3"]


def _conf(tmp: Path, bench: Path, *extra: str):
    return load_config("configs/tiny.yaml", [f"output_dir={tmp}", f"dataset.root={bench}", *FAST, *extra])


@pytest.fixture(scope="module")
def tiny_run(tiny_bench: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    main(_conf(out, tiny_bench, "rerank.methods=[sift, loftr, delg]", "loftr.weights=nowhere/outdoor_ds.ckpt"))
    return out


def test_results_json_layout(tiny_run: Path, tiny_bench: Path) -> None:
    res = json.loads((tiny_run / "results.json").read_text())
    assert res["dataset"] == "minibench-tiny" and res["n_queries"] == 6 and res["complete"] is True
    assert set(res["protocol"]) >= {"query_crop", "junk_before_rerank", "top_k", "checkpoint"}
    assert res["protocol"]["query_crop"] is True and res["protocol"]["top_k"] == 8
    search = res["protocol"]["search"]  # what the global search used: exact, the whole database ranked
    assert search["index"] == "flat" and search["exact"] is True and search["gpu"] is False
    assert search["depth"] == res["n_db"] and search["ranking_cut"] is False and search["depth_setting"] is None
    ex = res["protocol"]["extraction"]  # the weights' colour order and the extraction settings behind the numbers
    assert ex["model"]["input_colour"] == "rgb" and ex["model"]["mean"] == [0.485, 0.456, 0.406]
    assert ex["global_aggregation"] == "l2_per_scale" and ex["scales"] == [0.7071, 1.0, 1.4142]
    assert set(res["methods"]) == {"global", "sift"}  # loftr (no weights) and delg (untrained head) skipped
    skipped = {s["method"]: s["reason"] for s in res["skipped_methods"]}
    assert "nowhere/outdoor_ds.ckpt" in skipped["loftr"]
    assert "untrained" in skipped["delg"]
    # Each verifier's resolved settings, its own RANSAC included, skipped ones too (what they would have run with).
    ver = res["protocol"]["verifiers"]
    assert set(ver) == {"sift", "loftr", "delg"}
    defaults = load_config(None)
    assert ver["sift"]["settings"]["long_side"] == 320 and ver["sift"]["ransac"] == dict(defaults.sift.ransac)
    assert ver["sift"]["cache_identity"]  # it ran: the inlier cache's identity digest is recorded
    assert ver["delg"]["ransac"] == dict(defaults.delg_local.ransac) and ver["delg"]["ransac"]["model"] == "affine"
    assert ver["loftr"]["settings"]["long_side"] == defaults.loftr.long_side
    # The numbers are those of the saved rankings: recomputed from ranks/*.np[yz] with the evaluator they match
    # exactly (every protocol, mAP and mP@k), and reranking changed the ranking it was given.
    from delg.data.dataset import load_dataset
    from delg.evaluate import evaluate

    gnd = load_dataset(_conf(tiny_run, tiny_bench)).gnd
    g = np.load(tiny_run / "ranks" / "global.npy")
    r = np.load(tiny_run / "ranks" / "rerank-sift.npz")["ranks"]
    assert res["methods"]["global"] == evaluate(gnd, g, n_db=res["n_db"])
    assert res["methods"]["sift"] == evaluate(gnd, r, n_db=res["n_db"])
    assert not (g == r).all()
    for m in res["methods"].values():
        assert all(set(m[p]) == {"mAP", "mP@1", "mP@5", "mP@10"} for p in ("E", "M", "H"))


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


class _ReportParser(HTMLParser):
    """report.html as data: the results table's rows, and per query section its title, the query cell's caption
    and per method the hits (thumbnail src, caption) and the titles of the drawn match pictures."""

    def __init__(self) -> None:
        super().__init__()
        self.table: list[list[str]] = []
        self.sections: list[dict] = []
        self._text: list[str] | None = None  # text being collected, and where it goes
        self._into: tuple | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        cls = a.get("class")
        if tag == "tr":
            self.table.append([])
        elif tag in ("td", "h3") or (tag == "div" and cls in ("method", "cap")):
            self._text, self._into = [], (tag, cls)
        elif tag == "section":
            self.sections.append({"title": None, "query": None, "methods": {}})
        elif tag == "img" and self.sections:
            sec = self.sections[-1]
            if cls == "matches":
                sec["methods"][sec["current"]]["matches"].append(a["title"])
            elif "current" in sec:
                sec["methods"][sec["current"]]["hits"].append([a["src"], None])

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._text is None or tag != self._into[0]:
            return
        text, (kind, cls) = "".join(self._text), self._into
        self._text = self._into = None
        if kind == "td":
            self.table[-1].append(text)
        elif kind == "h3":
            self.sections[-1]["title"] = text
        elif cls == "method":
            self.sections[-1]["current"] = text
            self.sections[-1]["methods"][text] = {"hits": [], "matches": []}
        elif "current" not in self.sections[-1]:
            self.sections[-1]["query"] = text  # the query cell comes before any method
        else:
            self.sections[-1]["methods"][self.sections[-1]["current"]]["hits"][-1][1] = text


def test_report_html(tiny_run: Path, tiny_bench: Path) -> None:
    from delg.data.dataset import load_dataset
    from delg.report import _data_uri, _thumb

    ds = load_dataset(_conf(tiny_run, tiny_bench))
    res = json.loads((tiny_run / "results.json").read_text())
    page = _ReportParser()
    page.feed((tiny_run / "report.html").read_text())
    # the table: one row per method, its numbers those of results.json
    rows = {row[0]: row[1:] for row in page.table if row}
    assert list(rows) == ["global", "sift"]
    for m, cells in rows.items():
        r = res["methods"][m]
        want = [r[p]["mAP"] for p in ("E", "M", "H")] + [r["M"][k] for k in ("mP@1", "mP@5", "mP@10")]
        assert cells == [f"{v:.2f}" for v in want], m
    # which database image each thumbnail shows (every db image of the benchmark looks different)
    uri_of = {}
    for i, path in enumerate(ds.db_paths):
        uri_of.setdefault(_data_uri(_thumb(path, None, 160)), i)
    assert len(uri_of) == ds.n_db
    ranks = {"global": np.load(tiny_run / "ranks" / "global.npy")}
    z = np.load(tiny_run / "ranks" / "rerank-sift.npz")
    ranks["sift"], inl = z["ranks"], z["inliers"]
    assert len(page.sections) == 3  # report.max_queries
    for q, sec in enumerate(page.sections):
        assert sec["title"] == f"query {q}: {ds.query_names[q]}" and sec["query"] == "query (cropped)"
        assert list(sec["methods"]) == ["global", "sift"]
        g = ds.gnd.gnd[q]
        for m, block in sec["methods"].items():
            shown = [uri_of[src] for src, _ in block["hits"]]
            assert shown == ranks[m][:10, q].tolist(), (q, m)  # report.top_n hits in ranking order
            for pos, (db, (_, cap)) in enumerate(zip(shown, block["hits"])):
                lab = "easy" if db in g.easy else "hard" if db in g.hard else "junk" if db in g.junk else "neg"
                want = f"{pos + 1}. {lab}"
                if m == "sift" and pos < 8:  # the verified top K carries its inlier count
                    want += f" · {inl[pos, q]} inl."
                assert cap == want, (q, m, pos)
        # the inlier matches of sift's first report.draw_matches hits are drawn, each titled with its count
        titles = sec["methods"]["sift"]["matches"]
        assert len(titles) == 3 and sec["methods"]["global"]["matches"] == []
        for pos, title in enumerate(titles):
            if inl[pos, q] > 0:  # (a count under the verifier's min_inliers is shown as 0 in the ranking)
                assert title == f"{inl[pos, q]} inliers", (q, pos)


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
    # the reranker's rule (loftr_tools.ranking): the verified top K (rerank.top_k=8) by (inliers, similarity) desc
    top = [(-m["inliers"], -m["similarity"]) for m in data["matches"][:8]]
    assert top == sorted(top) and all(m["inliers"] is None for m in data["matches"][8:])
    # the best match after verification is a positive of that query
    best = Path(data["matches"][0]["path"]).stem
    pos = {gnd["imlist"][i] for i in [*gnd["gnd"][0]["easy"], *gnd["gnd"][0]["hard"]]}
    assert best in pos
    assert "top matches for" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- fault injection
# The default pipeline (configs/demo.yaml: extraction, global search, DISK+LightGlue and SIFT reranking, evaluation,
# report) on a copy of the default embedded benchmark, with sizes cut so that it fits a few minutes on 2 CPU cores.
# pairwise reranking: the kills are counted in pairs of the top K (resuming the steps beyond pairwise through the
# same inlier cache is tested in tests/test_expansion.py)
FAULT_ARGS = ["progress=false", "num_workers=0", "device=cpu", "extract.long_side=160",
              "extract.scales=[0.7071, 1.0, 1.4142]", "rerank.methods=[lightglue, sift]", "rerank.top_k=8",
              "lightglue.long_side=192", "lightglue.max_keypoints=128", "sift.long_side=320", "report.max_queries=3",
              "rerank.order=inliers", "rerank.qe_rounds=0", "rerank.propagate=false"]
RUNNER = """
import os, sys, time
from pathlib import Path
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
elif phase == "rerank":  # slow the SIFT matching so that the kill lands mid-reranking
    import loftr_tools.sift as S
    f = S.SiftVerifier.match
    S.SiftVerifier.match = lambda self, a, b: (time.sleep(0.1), f(self, a, b))[1]
elif phase == "reference":  # a clean run in which some images are treated as unreadable, wherever they are read
    import delg.data.images as I, delg.extract as E, delg.report as R
    refused, real = set(os.environ["DELG_TEST_UNREADABLE"].split(",")), I.load_pil
    def load_pil(path, crop=None):
        if Path(path).stem in refused:
            raise I.ImageReadError(f"{path}: treated as unreadable")
        return real(path, crop)
    I.load_pil = E.load_pil = R.load_pil = load_pil
from delg.retrieve import cli
sys.exit(cli(args))
"""


def _runner(args: list[str], phase: str, log: Path, **env: str) -> subprocess.Popen:
    """``delg.retrieve`` with ``args`` in a subprocess running RUNNER's ``phase``; its output goes to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", RUNNER, phase, *args], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def _run_until(args: list[str], phase: str, ready, log: Path, timeout: float = 600) -> None:
    """Start a run and SIGKILL it as soon as ``ready()``; fails if the run ends first."""
    proc = _runner(args, phase, log)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed during {phase}:\n{_tail(log)}")
        assert ready(), f"{phase}: not ready to be killed after {timeout:.0f} s:\n{_tail(log)}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


def _run_reference(args: list[str], unreadable: set[str], log: Path) -> None:
    proc = _runner(args, "reference", log, DELG_TEST_UNREADABLE=",".join(sorted(unreadable)))
    assert proc.wait() == 0, _tail(log)


def _progress(out: Path, split: str = "db") -> tuple[int, int]:
    """(done, total) of the extraction of ``split``, (0, 0) before it starts."""
    for p in out.glob(f"features/*/*-{split}.progress.json"):
        try:
            data = json.loads(p.read_text())
            return int(data["done"]), int(data["total"])
        except (ValueError, KeyError, OSError):
            return 0, 0
    return 0, 0


def _cached_pairs(out: Path, method: str) -> int:
    """Pairs in the inlier cache of ``method`` (committed rows: what a kill right now would keep)."""
    for p in out.glob(f"matches/inliers-{method}-*.sqlite"):
        try:
            with sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=1) as db:
                return int(db.execute("select count(*) from pairs").fetchone()[0])
        except sqlite3.Error:  # not created yet
            return 0
    return 0


@pytest.fixture(scope="module")
def default_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default preset of the embedded benchmark (``python -m delg.minibench``, ``make demo``'s): the checkout's
    build (datasets/minibench/default) when it is current and intact, else built here (about a minute)."""
    from delg.data.minibench import VERSION, build, content_checksum, default_root, read_build_info

    src = default_root("default")
    info = read_build_info(src) or {}
    if (info.get("preset"), info.get("version")) == ("default", VERSION) and content_checksum(src)[0] == info.get("checksum"):
        return src
    return build(tmp_path_factory.mktemp("minibench") / "default", preset="default")


# What is done to each bad file: (split, position in the split's list as a fraction, kind). 8 damaged files and
# one missing of the 166 (146 database images, 20 queries): about 5%, spread so that some come before the kill
# during extraction and some after it.
DAMAGE = [("db", 0.03, "zero"), ("db", 0.12, "corrupted"), ("db", 0.3, "truncated"), ("db", 0.45, "missing"),
          ("db", 0.6, "zero"), ("db", 0.75, "corrupted"), ("db", 0.95, "truncated"),
          ("query", 0.2, "corrupted"), ("query", 0.7, "truncated")]


def _damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "missing":
        path.unlink()
    elif kind == "zero":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) * 2 // 5])
    elif kind == "corrupted":  # the header stays; garbage replaces 1 KB of the image data in the middle
        # It starts with a stray start-of-image marker, which the decoder rejects: random bytes alone leave about
        # one JPEG in ten readable (a damaged picture, not an unreadable file).
        mid = len(data) // 2
        garbage = b"\xff\xd8" + np.random.default_rng(len(data)).integers(0, 256, 1022, dtype=np.uint8).tobytes()
        path.write_bytes(data[:mid] + garbage + data[mid + len(garbage):])
    else:
        raise ValueError(kind)


def _corrupt_copy(src: Path, dst: Path) -> dict[tuple[str, str], str]:
    """Copy the benchmark and damage the files of DAMAGE; returns {(split, name): kind}."""
    import pickle

    shutil.copytree(src, dst)
    gnd = pickle.loads((dst / "gnd_minibench.pkl").read_bytes())
    lists = {"db": gnd["imlist"], "query": gnd["qimlist"]}
    bad = {}
    for split, where, kind in DAMAGE:
        name = lists[split][round(where * (len(lists[split]) - 1))]
        _damage(dst / "jpg" / f"{name}.jpg", kind)
        bad[(split, name)] = kind
    return bad


@pytest.mark.slow
def test_fault_injection_with_kills(default_bench: Path, tmp_path: Path) -> None:
    """The issue's fault-injection run: ~5% bad files and one missing, a kill during extraction and one during
    reranking, each followed by a rerun; it completes, reports every bad file, ranks skipped database images last,
    leaves skipped queries out and counts them, and its metrics equal those of an uninterrupted run on the clean
    benchmark in which the same images are treated as unreadable."""
    import pickle

    clean, bench = tmp_path / "clean", tmp_path / "bench"
    shutil.copytree(default_bench, clean)
    bad = _corrupt_copy(default_bench, bench)
    gnd = pickle.loads((bench / "gnd_minibench.pkl").read_bytes())
    n_db, n_q = len(gnd["imlist"]), len(gnd["qimlist"])
    assert (n_db, n_q) == (146, 20)
    assert 0.04 <= len(bad) / (n_db + n_q) <= 0.06
    bad_db = {gnd["imlist"].index(n) for s, n in bad if s == "db"}
    bad_q = {gnd["qimlist"].index(n) for s, n in bad if s == "query"}
    keep = [j for j in range(n_q) if j not in bad_q]
    out, ref = tmp_path / "killed", tmp_path / "reference"
    args = ["--config", "configs/demo.yaml", f"dataset.root={bench}", *FAULT_ARGS]

    # a kill during extraction, when some but not all database images are done
    _run_until([*args, f"output_dir={out}"], "extract", lambda: _progress(out)[0] >= 30, tmp_path / "extract.log")
    done, total = _progress(out)
    assert 30 <= done < total - len(bad_db) and total == n_db
    # a rerun, killed during the SIFT reranking (after the LightGlue one), when some but not all pairs are done
    n_pairs = len(keep) * 8
    _run_until([*args, f"output_dir={out}"], "rerank", lambda: _cached_pairs(out, "sift") >= 20,
               tmp_path / "rerank.log")
    assert _progress(out) == (n_db - len(bad_db), n_db) and _progress(out, "query") == (n_q - len(bad_q), n_q)
    assert 20 <= _cached_pairs(out, "sift") < n_pairs
    assert _cached_pairs(out, "lightglue") == n_pairs
    # the final rerun completes
    res_path = main(load_config("configs/demo.yaml", [f"output_dir={out}", f"dataset.root={bench}", *FAULT_ARGS]))
    assert _cached_pairs(out, "sift") == n_pairs
    # the reference: uninterrupted, on the clean copy, the same images treated as unreadable
    _run_reference(["--config", "configs/demo.yaml", f"output_dir={ref}", f"dataset.root={clean}", *FAULT_ARGS],
                   {n for _, n in bad}, tmp_path / "reference.log")

    res, res_ref = json.loads(res_path.read_text()), json.loads((ref / "results.json").read_text())
    assert set(res["methods"]) == {"global", "lightglue", "sift"}
    assert res["methods"] == res_ref["methods"]
    assert res["complete"] is False and res_ref["complete"] is False
    assert res["n_queries"] == len(keep) == n_q - 2 and res["n_queries_skipped"] == 2
    assert res["n_db"] == n_db and res["n_db_skipped"] == len(bad_db) == 7
    assert res["verifier_failures"] == []
    # every bad file is reported, with its reason
    reasons = {(s["split"], s["name"]): s["reason"] for s in res["skipped"]}
    assert set(reasons) == set(bad) == {(s["split"], s["name"]) for s in res_ref["skipped"]}
    for key, kind in bad.items():
        assert ("not found" if kind == "missing" else "cannot decode") in reasons[key], (kind, reasons[key])
    # skipped database images rank last for every query, in the global and the reranked rankings, and the
    # rankings are those of the reference
    ranks = {"global": np.load(out / "ranks" / "global.npy")[:, keep]}
    ranks |= {m: np.load(out / "ranks" / f"rerank-{m}.npz")["ranks"] for m in ("lightglue", "sift")}
    ranks_ref = {"global": np.load(ref / "ranks" / "global.npy")[:, keep]}
    ranks_ref |= {m: np.load(ref / "ranks" / f"rerank-{m}.npz")["ranks"] for m in ("lightglue", "sift")}
    for m, r in ranks.items():
        assert r.shape == (n_db, len(keep)), m
        assert all(set(r[-len(bad_db):, c]) == bad_db for c in range(r.shape[1])), m
        np.testing.assert_array_equal(r, ranks_ref[m], err_msg=m)
    assert (out / "report.html").is_file()


# ---------------------------------------------------------------------------------------------- real photos
@pytest.mark.slow
def test_default_pipeline_reaches_92_on_real_photos(shared_data: Path, tmp_path: Path) -> None:
    """Issue 12's target: perform_retrieval.sh with its defaults (configs/demo.yaml) on the 45 real photos of 8
    landmarks + 16 distractors (day/night, far views) reaches Medium mAP >= 92 with DISK + LightGlue (global
    EfficientNet-Lite0 GeM 67.0; pairwise reranking of the top 12 alone about 83; see README "Beyond pairwise
    reranking"). Run exactly as a user would (the shell script, its default config); the report is left out to save
    CI time (it changes no number). The whole run's time is reported by bench/beyond_pairwise.py, not asserted."""
    cmd = ["bash", str(REPO / "perform_retrieval.sh"), "dataset.type=folders", f"dataset.root={shared_data / 'images'}",
           f"dataset.distractors={shared_data / 'images_distractors'}", f"output_dir={tmp_path}", "progress=false",
           "report.enabled=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    g, lg = res["methods"]["global"]["M"]["mAP"], res["methods"]["lightglue"]["M"]["mAP"]
    assert res["n_queries"] == 45 and res["complete"] is True
    assert lg >= 92.0, f"global {g:.1f} -> lightglue {lg:.1f}: below issue 12's 92"
    assert res["methods"]["sift"]["M"]["mAP"] > g  # the second verifier of the defaults lifts too
    rec = res["protocol"]["verifiers"]["lightglue"]["beyond_pairwise"]  # what produced it, recorded
    assert rec["order"] == "fused" and rec["qe_rounds"] == 1 and rec["propagate"] is True
    assert rec["queries_with_hits"] >= 40 and rec["graph_edges"] > 0
