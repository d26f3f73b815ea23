"""SuperGlobal reranking (delg/global_rerank.py, search.superglobal): hand-computed cases, the search's use of it
(identity of the cached ranking, rows below sg_m, full depth, alpha-QE, missing images, IVF-PQ), bad settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_search import clustered, make_case, numpy_ranks

from delg.config import ConfigError, load_config
from delg.global_rerank import expand_query, refine_candidates, rerank_column, superglobal_scores
from delg.search import SearchError, alpha_qe, main, search_record

REPO = Path(__file__).resolve().parent.parent

# 5 database vectors in 3-d and one query, worked by hand below.  Similarities to q = (1, 0, 0):
#   x0 0.6, x1 0.8, x2 0.8, x3 0.28, x4 0  -> global order x1, x2, x0, x3, x4 (the x1/x2 tie does not matter)
# Among the candidates: x1.x2 = 0.64, x1.x0 = 0.48, x2.x0 = 0.96.
X5 = np.array([[0.6, 0.8, 0.0], [0.8, 0.0, 0.6], [0.8, 0.6, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]], np.float32)
Q1 = np.array([1.0, 0.0, 0.0], np.float32)
GLOBAL = np.array([1, 2, 0, 3, 4])
# Top M=3 (x1, x2, x0), K=1, beta=0.5: each candidate's one neighbour, weight 0.5 * similarity:
#   x1 -> x2 (w 0.32): (x1 + 0.32 x2) / 1.32 = (1.056, 0.192, 0.6) / 1.32
#   x2 -> x0 (w 0.48): (x2 + 0.48 x0) / 1.48 = (1.088, 0.984, 0)   / 1.48
#   x0 -> x2 (w 0.48): (x0 + 0.48 x2) / 1.48 = (0.984, 1.088, 0)   / 1.48
REFINED = np.array([[1.056, 0.192, 0.6], [1.088, 0.984, 0.0], [0.984, 1.088, 0.0]]) / np.array([[1.32], [1.48], [1.48]])
# q . d^r = first coordinate: 0.8, 1.088/1.48 = 0.73514, 0.984/1.48 = 0.66486; the K+1 = 2 best are x1 and x2, so
# q^e = max(d^r_x1, d^r_x2) = (0.8, 0.984/1.48, 0.6/1.32)
Q_EXP = np.array([0.8, 0.984 / 1.48, 0.6 / 1.32])
# q^e . d^r: x1 0.64 + (0.984/1.48)(0.192/1.32) + (0.6/1.32)^2 = 0.94332
#            x2 0.8 (1.088/1.48) + (0.984/1.48)^2              = 1.03015
#            x0 0.8 (0.984/1.48) + (0.984/1.48)(1.088/1.48)    = 1.02066
# score = (q . d^r + q^e . d^r) / 2: x1 0.87166, x2 0.88264, x0 0.84276 -> x2, x1, x0, then x3, x4 unchanged
SG = np.array([0.87166, 0.88264, 0.84276])


def test_hand_computed_refinement_expansion_and_scores() -> None:
    cands = X5[GLOBAL[:3]]
    refined = refine_candidates(cands, 1, 0.5)
    np.testing.assert_allclose(refined, REFINED, atol=1e-6)
    np.testing.assert_allclose(expand_query(refined, refined @ Q1, 2), Q_EXP, atol=1e-6)
    np.testing.assert_allclose(superglobal_scores(Q1, cands, 1, 0.5), SG, atol=1e-5)
    ids, sc = rerank_column(Q1, cands, GLOBAL, X5[GLOBAL] @ Q1, 1, 0.5)
    np.testing.assert_array_equal(ids, [2, 1, 0, 3, 4])  # x1 and x2 swap; x0 stays; x3, x4 (below M) unchanged
    np.testing.assert_allclose(sc, [SG[1], SG[0], SG[2], 0.28, 0], atol=1e-5)


def test_refinement_edge_cases() -> None:
    cands = X5[GLOBAL[:3]]
    # beta = 0 or K = 0: every candidate is its own refinement, and then the score is (q.d + max(top K+1).d) / 2
    np.testing.assert_allclose(refine_candidates(cands, 2, 0.0), cands)
    np.testing.assert_allclose(refine_candidates(cands, 0, 0.5), cands)
    # K beyond M - 1 is cut: with K=9 every other candidate is a neighbour
    np.testing.assert_allclose(refine_candidates(cands, 9, 0.5), refine_candidates(cands, 2, 0.5))
    x0_all = (X5[0] + 0.24 * X5[1] + 0.48 * X5[2]) / 1.72  # x0 with both others (weights 0.5*0.48, 0.5*0.96)
    np.testing.assert_allclose(refine_candidates(cands, 9, 0.5)[2], x0_all, atol=1e-6)
    # a negative similarity weighs 0 (unclipped, y . (-y) = -1 at beta 0.5 would give (y + 0.5 y) / 0.5 = 3 y)
    neg = np.array([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], np.float32)
    np.testing.assert_allclose(refine_candidates(neg, 1, 0.5), neg)
    # a duplicate candidate: the image itself still weighs 1 and its copy beta * 1
    dup = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    np.testing.assert_allclose(refine_candidates(dup, 1, 0.5), dup, atol=1e-7)
    # one candidate (no neighbours, q^e = the candidate: (0.8 + 1) / 2), or none (nothing to reorder)
    np.testing.assert_allclose(superglobal_scores(Q1, X5[1:2], 9, 0.15), [0.9], atol=1e-6)
    ids, sc = rerank_column(Q1, np.zeros((0, 3), np.float32), GLOBAL, X5[GLOBAL] @ Q1, 9, 0.15)
    np.testing.assert_array_equal(ids, GLOBAL)


def test_scores_stay_non_increasing_below_the_candidates() -> None:
    """A re-scored row's score is floored at the first row below M, so that a tie-break by score keeps the order."""
    cands = X5[GLOBAL[:3]]
    scores = np.array([0.8, 0.8, 0.6, 0.86, 0.1], np.float32)  # made-up similarities below M, above two SG scores
    ids, sc = rerank_column(Q1, cands, GLOBAL, scores, 1, 0.5)
    np.testing.assert_array_equal(ids, [2, 1, 0, 3, 4])
    np.testing.assert_allclose(sc, [SG[1], SG[0], 0.86, 0.86, 0.1], atol=1e-5)
    assert np.all(np.diff(sc) <= 0)


def write_case(root: Path, X: np.ndarray, Q: np.ndarray, *overrides: str):
    """make_case's stores holding the given vectors (its random ones overwritten)."""
    from delg.feature_stores import preset_name, store_path
    from delg.store import FeatureStore

    conf, ds, _, _ = make_case(root, len(X), len(Q), X.shape[1], 0, (), *overrides)
    for split, names, vecs in (("db", ds.db_names, X), ("query", ds.query_names, Q)):
        path = store_path(conf, "synth", split)
        path.unlink()
        with FeatureStore(path, "a", preset=preset_name(conf)) as st:
            for n, v in zip(names, vecs):
                st.write(n, {"global": v, "image_size": [10, 10]})
    return conf, ds


def test_search_reranks_the_hand_computed_case(tmp_path: Path) -> None:
    conf, ds = write_case(tmp_path, X5, Q1[None], "search.superglobal=true", "search.sg_m=3", "search.sg_k=1",
                          "search.sg_beta=0.5")
    path = main(conf, ds)
    np.testing.assert_array_equal(np.load(path)[:, 0], [2, 1, 0, 3, 4])
    np.testing.assert_allclose(np.load(path.with_name("global_scores.npy"))[:, 0], [SG[1], SG[0], SG[2], 0.28, 0],
                               atol=1e-5)
    rec = search_record(path)
    assert (rec["superglobal"], rec["sg_m"], rec["sg_k"], rec["sg_beta"]) == (True, 3, 1, 0.5)


def reference(X: np.ndarray, Q: np.ndarray, m: int, k: int, beta: float) -> np.ndarray:
    """The search's expected ranking: exact global order, then rerank_column on each query's top m."""
    order, s = numpy_ranks(X, Q)
    out = order.copy()
    for j in range(Q.shape[0]):
        out[:, j] = rerank_column(Q[j], X[order[:m, j]], order[:, j], s[:, j], k, beta)[0]
    return out


def test_option_changes_the_ranking_identity_and_rows_below_m_keep_the_global_order(tmp_path: Path) -> None:
    conf, ds, X, Q = make_case(tmp_path, 300, 7, 32, 0, (), "search.sg_m=20", "search.sg_k=4")
    assert conf.ranks.depth is None and conf.search.superglobal is False  # defaults: full depth, off
    path = main(conf, ds)
    meta_path = path.with_name("global.meta.json")
    plain, meta_off = np.load(path), json.loads(meta_path.read_text())
    assert meta_off["superglobal"] is False and meta_off["sg_m"] is None  # settings of an off option: no identity
    np.testing.assert_array_equal(plain, numpy_ranks(X, Q)[0])
    before = path.stat().st_mtime_ns
    conf.search.sg_k = 5  # a setting of the option while it is off: the same ranking, reused
    main(conf, ds)
    assert path.stat().st_mtime_ns == before
    conf.search.sg_k = 4

    conf.search.superglobal = True
    sg = np.load(main(conf, ds))  # the meta differs: searched again, not the cached ranking
    meta_on = json.loads(meta_path.read_text())
    assert (meta_on["superglobal"], meta_on["sg_m"], meta_on["sg_k"], meta_on["sg_beta"]) == (True, 20, 4, 0.15)
    assert sg.shape == (300, 7)
    np.testing.assert_array_equal(sg, reference(X, Q, 20, 4, 0.15))
    assert not np.array_equal(sg[:20], plain[:20])  # the option does something on this data
    np.testing.assert_array_equal(sg[20:], plain[20:])  # rows below M: the global order
    np.testing.assert_array_equal(np.sort(sg[:20], 0), np.sort(plain[:20], 0))  # the same images re-ordered
    for key, value in (("sg_k", 2), ("sg_m", 30), ("sg_beta", 0.3)):  # each one is part of the identity
        setattr(conf.search, key, value)
        before = path.stat().st_mtime_ns
        main(conf, ds)
        assert json.loads(meta_path.read_text())[key] == value and path.stat().st_mtime_ns != before
    before = path.stat().st_mtime_ns
    main(conf, ds)  # nothing changed: the cached ranking is reused
    assert path.stat().st_mtime_ns == before
    conf.search.superglobal = False
    np.testing.assert_array_equal(np.load(main(conf, ds)), plain)
    assert json.loads(meta_path.read_text())["superglobal"] is False


def test_depth_cut_qe_and_missing_images(tmp_path: Path) -> None:
    # a cut above M, and a cut below M (the search goes M deep, keeps `depth` rows)
    conf, ds, X, Q = make_case(tmp_path / "a", 200, 5, 32, 3, (), "search.superglobal=true", "search.sg_m=25",
                               "search.sg_k=3", "ranks.depth=40")
    ref = reference(X, Q, 25, 3, 0.15)
    np.testing.assert_array_equal(np.load(main(conf, ds)), ref[:40])
    conf.ranks.depth = 10
    np.testing.assert_array_equal(np.load(main(conf, ds)), ref[:10])
    # sg_m above the database: every image is a candidate
    conf.ranks.depth, conf.search.sg_m = None, 400
    np.testing.assert_array_equal(np.load(main(conf, ds)), reference(X, Q, 200, 3, 0.15))
    # after alpha-QE: SuperGlobal re-scores what the expanded query found, with the expanded query
    conf.search.qe_k, conf.search.sg_m = 2, 25
    order, s = numpy_ranks(X, Q)
    q2 = alpha_qe(Q, np.transpose(X[order[:2]], (1, 0, 2)), s[:2].T, 3.0)
    np.testing.assert_array_equal(np.load(main(conf, ds)), reference(X, q2, 25, 3, 0.15))

    # images without features rank last, never candidates
    rng = np.random.default_rng(4)  # make_case's vectors for seed 4
    X = clustered(rng, 60, 16)
    order = numpy_ranks(X, clustered(rng, 3, 16))[0]
    skip = (int(order[0, 0]), int(order[5, 1]))
    conf, ds, X, Q = make_case(tmp_path / "c", 60, 3, 16, 4, skip, "search.superglobal=true", "search.sg_m=60",
                               "search.sg_k=3")
    ranks = np.load(main(conf, ds))
    scores = np.load(tmp_path / "c" / "ranks" / "global_scores.npy")
    np.testing.assert_array_equal(ranks[-2:], np.array(sorted(skip))[:, None].repeat(3, 1))
    assert np.isneginf(scores[-2:]).all() and np.isfinite(scores[:-2]).all()
    keep = np.array([i for i in range(60) if i not in skip])
    np.testing.assert_array_equal(ranks[:-2], keep[reference(X[keep], Q, 58, 3, 0.15)])


def test_ivfpq_candidates_are_read_back_from_the_index(tmp_path: Path) -> None:
    common = ("search.index=ivfpq", "search.m=8", "search.nbits=6", "search.nlist=16", "search.nprobe=16",
              "ranks.depth=50")
    conf, ds, X, Q = make_case(tmp_path, 2000, 5, 32, 7, (), *common)
    plain = np.load(main(conf, ds))
    conf.search.superglobal, conf.search.sg_m = True, 30
    sg = np.load(main(conf, ds))
    np.testing.assert_array_equal(sg[30:], plain[30:])
    np.testing.assert_array_equal(np.sort(sg[:30], 0), np.sort(plain[:30], 0))
    assert not np.array_equal(sg[:30], plain[:30])


@pytest.mark.parametrize("override,message", [
    ("search.sg_m=-3", "search.sg_m: -3 is not allowed: an integer >= 1"),
    ("search.sg_m=0", "search.sg_m: 0 is not allowed: an integer >= 1"),
    ("search.sg_k=-1", "search.sg_k: -1 is not allowed: an integer >= 0"),
    ("search.sg_k=2.5", "search.sg_k: 2.5 is not allowed: an integer >= 0"),
    ("search.sg_beta=-0.1", "search.sg_beta: -0.1 is not allowed: a finite number >= 0"),
    ("search.superglobal=maybe", "search.superglobal: 'maybe' is not allowed: true or false"),
])
def test_bad_values_are_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_contradictory_settings(tmp_path: Path) -> None:
    conf, ds, _, _ = make_case(tmp_path, 30, 2, 16, 8, (), "search.superglobal=true", "search.sg_m=5", "search.sg_k=9")
    with pytest.raises(SearchError, match=r"^search.sg_k: 9 neighbours .* search.sg_m=5 .*need sg_k < sg_m$"):
        main(conf, ds)
    conf.search.superglobal = False  # off: its settings are not used, nothing to refuse
    main(conf, ds)
    # the full run refuses it before any work, as one line and exit status 2
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "delg.retrieve", f"output_dir={tmp_path / 'cli'}",
                        "search.superglobal=true", "search.sg_m=4", "search.sg_k=4"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: search.sg_k: 4 neighbours"), r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "cli" / "config.yaml").exists()
