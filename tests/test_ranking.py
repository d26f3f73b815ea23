"""The pure ranking rules (loftr_tools.ranking), the one writer of reranked rankings and the one reranking loop
(loftr_tools.rerank.write_reranked / rerank_methods), checked on values."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from loftr_tools.ranking import PROTOCOLS, floor_inliers, protocol_variants, reorder_topk, topk_rows

# three database images per query, two queries; rows = rank, columns = queries
RANKS = np.array([[2, 0], [0, 1], [1, 2]])
SCORES = np.array([[0.9, 0.8], [0.7, 0.6], [0.5, 0.4]])


def test_top_k_rule_cuts_to_the_ranking_and_never_below_zero() -> None:
    assert [topk_rows(k, 26) for k in (8, 26, 100, 0, -3)] == [8, 26, 26, 0, 0]
    assert topk_rows(5, 0) == 0


def test_inlier_floor_zeroes_counts_below_min_inliers_only() -> None:
    inl = np.array([[3, 7], [10, 0], [6, 6]])
    np.testing.assert_array_equal(floor_inliers(inl, 7), [[0, 7], [10, 0], [0, 0]])  # 7 itself is kept
    np.testing.assert_array_equal(floor_inliers(inl, 0), inl)
    assert inl[0, 0] == 3  # a copy: the raw counts (what the cache holds) stay as they are


def test_reorder_is_inliers_then_similarity_then_global_rank() -> None:
    # column 0: counts 5, 9, 5 -> image 0 (9) first, then the tie 5/5 by similarity: 2 (0.9) before 1 (0.5)
    # column 1: all 0 -> the global order is kept
    new, inl = reorder_topk(RANKS, np.array([[5, 0], [9, 0], [5, 0]]), SCORES)
    assert new[:, 0].tolist() == [0, 2, 1] and inl[:, 0].tolist() == [9, 5, 5]
    assert new[:, 1].tolist() == [0, 1, 2] and inl[:, 1].tolist() == [0, 0, 0]
    # only the top K = 2 rows move; the third stays where the global ranking put it
    new, inl = reorder_topk(RANKS, np.array([[1, 0], [4, 3]]), SCORES)
    assert new[:, 0].tolist() == [0, 2, 1] and new[:, 1].tolist() == [1, 0, 2] and inl.shape == (2, 2)


def test_protocol_variants_move_each_protocol_s_junk_to_the_bottom() -> None:
    assert list(protocol_variants(RANKS, SCORES, None)) == ["all"]
    assert protocol_variants(RANKS, SCORES, None)["all"][0] is RANKS  # no junk protocol: the input itself
    g0 = SimpleNamespace(easy=np.array([0]), hard=np.array([1]), junk=np.array([2]))
    g1 = SimpleNamespace(easy=np.array([], int), hard=np.array([], int), junk=np.array([], int))
    v = protocol_variants(RANKS, SCORES, [g0, g1])
    assert tuple(v) == PROTOCOLS
    # query 0 ranks 2, 0, 1: easy ignores junk+hard {2, 1}, medium junk {2}, hard junk+easy {2, 0}
    assert v["easy"][0][:, 0].tolist() == [0, 2, 1] and v["easy"][1][:, 0].tolist() == [0.7, 0.9, 0.5]
    assert v["medium"][0][:, 0].tolist() == [0, 1, 2]
    assert v["hard"][0][:, 0].tolist() == [1, 2, 0] and v["hard"][1][:, 0].tolist() == [0.5, 0.9, 0.7]
    for p in PROTOCOLS:  # query 1 has no junk: untouched
        assert v[p][0][:, 1].tolist() == [0, 1, 2]


def test_write_reranked_layouts_round_trip(tmp_path: Path) -> None:
    from loftr_tools.rerank import write_reranked

    inl = np.array([[4, 1]])
    path = write_reranked(tmp_path, "sift", RANKS, inl)
    assert path == tmp_path / "ranks" / "rerank-sift.npz"
    with np.load(path) as z:
        assert sorted(z.files) == ["inliers", "ranks"]
        np.testing.assert_array_equal(z["ranks"], RANKS)
        np.testing.assert_array_equal(z["inliers"], inl)
    per = {p: RANKS[:, ::-1] if p == "hard" else RANKS for p in PROTOCOLS}
    path = write_reranked(tmp_path, "sift", per, {p: inl for p in PROTOCOLS})
    with np.load(path) as z:
        assert sorted(z.files) == sorted([f"ranks_{p}" for p in PROTOCOLS] + [f"inliers_{p}" for p in PROTOCOLS])
        np.testing.assert_array_equal(z["ranks_hard"], RANKS[:, ::-1])
    assert [p.name for p in (tmp_path / "ranks").iterdir()] == ["rerank-sift.npz"]  # no temporary file left


def test_one_loop_writes_each_method_and_lists_unavailable_ones(tmp_path: Path) -> None:
    from delg.config import load_config
    from loftr_tools.base import VerifierUnavailable
    from loftr_tools.rerank import rerank_methods

    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, size=(120, 160, 3)).astype(np.uint8)
    paths = []
    for name, im in (("a", img), ("b", np.roll(img, 9, axis=1)), ("c", rng.uniform(0, 255, (120, 160, 3)).astype(np.uint8))):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(im).save(paths[-1])
    ds = SimpleNamespace(name="t", query_names=["a"], query_paths=[paths[0]], query_bbx=[None], db_names=["b", "c"],
                         db_paths=paths[1:], gnd=None)
    conf = load_config(None, [f"output_dir={tmp_path / 'out'}", "rerank.methods=[loftr, sift]", "rerank.top_k=2",
                              "progress=false", "sift.long_side=160", "device=cpu",
                              f"loftr.weights={tmp_path / 'nowhere.ckpt'}"])
    ranks, scores = np.array([[1], [0]]), np.array([[0.9], [0.8]])  # the unrelated image c first
    with pytest.raises(VerifierUnavailable):  # rerank.main's way: a verifier that cannot run is an error
        rerank_methods(conf, ds, ranks, scores)
    runs = rerank_methods(conf, ds, ranks, scores, skip_unavailable=True, keep_open=True)
    assert [r.method for r in runs] == ["loftr", "sift"]
    assert runs[0].path is None and runs[0].reranker is None and "nowhere.ckpt" in str(runs[0].unavailable)
    sift = runs[1]
    assert sift.path == tmp_path / "out" / "ranks" / "rerank-sift.npz" and sift.reranker is not None
    assert sift.ranks[:, 0].tolist() == [0, 1]  # b (a shifted copy of the query) moves above c
    with np.load(sift.path) as z:  # the file holds what the loop returned
        np.testing.assert_array_equal(z["ranks"], sift.ranks)
        np.testing.assert_array_equal(z["inliers"], sift.inliers)
    assert sift.reranker.cache.db is not None  # kept open (report pictures) until the caller closes it
    sift.reranker.close()
