"""Reranking logic on a synthetic verifier: ordering, top-K rule, caches, junk protocol, failures, OOM retry."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from delg.data.images import ImageReadError
from loftr_tools.base import IDENTICAL_INLIERS, ImageRef, Verifier
from loftr_tools.caches import FeatureCache
from loftr_tools.ranking import drop_junk, protocol_junk, reorder_topk
from loftr_tools.registry import VERIFIERS
from loftr_tools.rerank import Reranker, RerankStats, order_queries, rerank
from loftr_tools.resize import scaled_long_side

RANSAC_H = {"model": "homography", "threshold": 1.0}


class TableVerifier(Verifier):
    """Returns, for each pair, exactly ``table[(query name, db name)]`` correspondences consistent with one
    homography (identity + shift), so the RANSAC inlier count equals the table value (0 below 4 matches)."""

    name = "table"
    default_conf = {"long_side": 1024}

    def __init__(self, table: dict[tuple[str, str], int], unreadable: set[str] = frozenset(), oom_above: int = 0,
                 conf: dict[str, Any] | None = None):
        super().__init__(conf)
        self.table = table
        self.unreadable = set(unreadable)
        self.oom_above = oom_above
        self.prepare_calls: list[str] = []
        self.match_calls = 0

    def prepare(self, ref: ImageRef, size_factor: float = 1.0) -> dict[str, Any]:
        self.prepare_calls.append(ref.key)
        if ref.name in self.unreadable:
            raise ImageReadError(f"{ref.path}: cannot decode image (test)")
        return {"name": ref.name, "is_query": ref.key.startswith("query/"), "buf": np.zeros(250, np.float32),
                "long_side": scaled_long_side(self.conf["long_side"], size_factor)}

    def match(self, f0: dict[str, Any], f1: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        self.match_calls += 1
        if self.oom_above and max(f0["long_side"], f1["long_side"]) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        # Whole-image pairs may be matched in either order (unordered pairs): the table is symmetric.
        n = self.table.get((f0["name"], f1["name"]), self.table.get((f1["name"], f0["name"]), 0))
        rng = np.random.default_rng(n)
        p0 = rng.uniform(0, 500, size=(n, 2)).astype(np.float32)
        return p0, p0 + np.float32(7.0)


def _dataset(n_q: int, n_db: int, gnd: list[Any] | None = None, crop: bool = True) -> SimpleNamespace:
    # Cropped queries (as revisitop's) make (query, db) ordered pairs; whole-image pairs are tested separately.
    return SimpleNamespace(
        query_names=[f"q{i}" for i in range(n_q)], query_paths=[Path(f"/nonexistent/q{i}.jpg") for i in range(n_q)],
        query_bbx=[(0.0, 0.0, 1000.0, 1000.0) if crop else None] * n_q, db_names=[f"d{i}" for i in range(n_db)],
        db_paths=[Path(f"/nonexistent/d{i}.jpg") for i in range(n_db)], gnd=SimpleNamespace(gnd=gnd),
    )


# two queries, six database images; global ranks (rows = rank, columns = queries)
RANKS = np.array([[0, 5], [1, 4], [2, 3], [3, 2], [4, 1], [5, 0]])
SCORES = np.array([[0.9, 0.8], [0.8, 0.7], [0.7, 0.6], [0.6, 0.5], [0.5, 0.4], [0.4, 0.3]])
TABLE = {
    ("q0", "d0"): 5, ("q0", "d1"): 50, ("q0", "d2"): 0, ("q0", "d3"): 50, ("q0", "d4"): 999,
    ("q1", "d5"): 10, ("q1", "d4"): 3, ("q1", "d3"): 40, ("q1", "d2"): 12,
}


def test_rerank_orders_top_k_and_keeps_the_rest(tmp_path: Path) -> None:
    v = TableVerifier(TABLE)
    new, inl = rerank(_dataset(2, 6), RANKS, SCORES, v, top_k=4, ransac=RANSAC_H)
    # q0 top-4 = d0..d3 with inliers 5, 50, 0, 50: d1 and d3 tie at 50 -> higher global score (d1) first.
    # d4 (999 inliers) is below K and stays where it was.
    assert new[:, 0].tolist() == [1, 3, 0, 2, 4, 5]
    assert inl[:, 0].tolist() == [50, 50, 5, 0]
    # q1 top-4 = d5, d4, d3, d2 with 10, 3 (< 4 matches: 0), 40, 12.
    assert new[:, 1].tolist() == [3, 2, 5, 4, 1, 0]
    assert inl[:, 1].tolist() == [40, 12, 10, 0]
    assert v.match_calls == 8


def test_whole_image_pairs_are_matched_once_and_self_pairs_never(tmp_path: Path) -> None:
    """Folder datasets: every query is also a database image. (a, b) and (b, a) are one job, matched in path
    order whichever query asks first; an image paired with itself scores IDENTICAL_INLIERS without matching."""
    paths = [Path(f"/nonexistent/img{i}.jpg") for i in range(4)]
    ds = SimpleNamespace(query_names=["a", "b"], query_paths=paths[:2], query_bbx=[None, None],
                         db_names=["a", "b", "c", "d"], db_paths=paths, gnd=SimpleNamespace(gnd=None))
    table = {("a", "b"): 30, ("a", "c"): 8, ("b", "d"): 12}
    ranks = np.array([[0, 1], [1, 0], [2, 3], [3, 2]])  # a: a, b, c, d; b: b, a, d, c
    v = TableVerifier(table)
    stats = RerankStats()
    cache = tmp_path / "inl.sqlite"
    new, inl = rerank(ds, ranks, None, v, top_k=4, cache_path=cache, ransac=RANSAC_H, stats=stats)
    assert inl[:, 0].tolist() == [IDENTICAL_INLIERS, 30, 8, 0] and inl[:, 1].tolist() == [IDENTICAL_INLIERS, 30, 12, 0]
    assert new[:2, 0].tolist() == [0, 1] and new[:2, 1].tolist() == [1, 0]
    # 8 pairs asked: 2 identical, (a,b)/(b,a) one job, so 5 matched
    assert (stats.pairs, stats.identical, stats.symmetric, stats.matched) == (8, 2, 1, 5) and v.match_calls == 5
    # Report pictures reuse this run's inlier points, oriented (query, db) even where the pair ran as (db, query).
    rr = Reranker(v, RANSAC_H)
    rr.rerank(ds, ranks, None, top_k=4)
    calls = v.match_calls
    p0, p1 = rr.inlier_matches(ds, 0, 2)  # query a, db c: matched as (a, c)
    assert len(p0) == 8 and np.allclose(p1 - p0, 7)
    p0, p1 = rr.inlier_matches(ds, 1, 0)  # query b, db a: matched as (a, b)
    assert len(p0) == 30 and np.allclose(p1 - p0, -7) and v.match_calls == calls
    # The other query order (b first) asks for the same jobs: everything comes from the cache.
    v2 = TableVerifier(table)
    ds2 = SimpleNamespace(**{**ds.__dict__, "query_names": ["b", "a"], "query_paths": [paths[1], paths[0]]})
    new2, inl2 = rerank(ds2, ranks[:, ::-1], None, v2, top_k=4, cache_path=cache, ransac=RANSAC_H)
    assert v2.match_calls == 0 and np.array_equal(inl2[:, ::-1], inl)


def test_reorder_ties_use_global_similarity() -> None:
    ranks = np.array([[7], [8], [9]])
    inl = np.array([[3], [3], [3]])
    assert reorder_topk(ranks, inl, np.array([[0.1], [0.9], [0.5]]))[0][:, 0].tolist() == [8, 9, 7]
    assert reorder_topk(ranks, inl, None)[0][:, 0].tolist() == [7, 8, 9]  # no scores: global order kept


def test_inlier_cache_is_reused(tmp_path: Path) -> None:
    cache = tmp_path / "matches" / "inliers.sqlite"
    v1 = TableVerifier(TABLE)
    r1 = rerank(_dataset(2, 6), RANKS, SCORES, v1, top_k=4, cache_path=cache, ransac=RANSAC_H)
    assert cache.is_file() and v1.match_calls == 8
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 8
        assert db.execute("SELECT inliers FROM pairs WHERE query LIKE 'query/q0@%' AND db='db/d1'").fetchone()[0] == 50
    v2 = TableVerifier(TABLE)
    stats = RerankStats()
    r2 = rerank(_dataset(2, 6), RANKS, SCORES, v2, top_k=4, cache_path=cache, ransac=RANSAC_H, stats=stats)
    assert v2.match_calls == 0 and v2.prepare_calls == []
    assert stats.cached == 8 and stats.matched == 0
    assert np.array_equal(r1[0], r2[0]) and np.array_equal(r1[1], r2[1])
    # A larger K matches only the new pairs.
    v3 = TableVerifier(TABLE)
    rerank(_dataset(2, 6), RANKS, SCORES, v3, top_k=5, cache_path=cache, ransac=RANSAC_H)
    assert v3.match_calls == 2


def test_interrupted_run_resumes(tmp_path: Path) -> None:
    cache = tmp_path / "inl.sqlite"

    class Dies(TableVerifier):
        def match(self, f0, f1):
            if self.match_calls == 5:
                raise KeyboardInterrupt
            return super().match(f0, f1)

    with pytest.raises(KeyboardInterrupt):
        rerank(_dataset(2, 6), RANKS, SCORES, Dies(TABLE), top_k=4, cache_path=cache, ransac=RANSAC_H)
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 5  # every finished pair was kept
    v = TableVerifier(TABLE)
    new, _ = rerank(_dataset(2, 6), RANKS, SCORES, v, top_k=4, cache_path=cache, ransac=RANSAC_H)
    assert v.match_calls == 3
    assert new[:, 0].tolist() == [1, 3, 0, 2, 4, 5]


def test_junk_before_rerank_protocols() -> None:
    g0 = SimpleNamespace(easy=np.array([3]), hard=np.array([1]), junk=np.array([0]), bbx=None)
    g1 = SimpleNamespace(easy=np.array([], int), hard=np.array([5]), junk=np.array([], int), bbx=None)
    assert sorted(protocol_junk(g0, "easy").tolist()) == [0, 1]
    assert protocol_junk(g0, "medium").tolist() == [0]
    assert sorted(protocol_junk(g0, "hard").tolist()) == [0, 3]
    v = TableVerifier(TABLE)
    ranks, inl = rerank(_dataset(2, 6, [g0, g1]), RANKS, SCORES, v, top_k=3, junk_before_rerank=True, ransac=RANSAC_H)
    assert set(ranks) == {"easy", "medium", "hard"} and set(inl) == set(ranks)
    # q0 medium: junk d0 removed -> top-3 = d1, d2, d3 (50, 0, 50) -> d1, d3, d2; then d4, d5; junk d0 last.
    assert ranks["medium"][:, 0].tolist() == [1, 3, 2, 4, 5, 0]
    # q0 easy: d0 and d1 removed -> top-3 = d2, d3, d4 (0, 50, 999) -> d4, d3, d2; then d5; junk d0, d1 last.
    assert ranks["easy"][:, 0].tolist() == [4, 3, 2, 5, 0, 1]
    # q0 hard: d0 and d3 removed -> d1, d2, d4 (50, 0, 999) -> d4, d1, d2; then d5; d0, d3.
    assert ranks["hard"][:, 0].tolist() == [4, 1, 2, 5, 0, 3]
    # q1 hard/medium/easy: junk only in easy (d5 hard) -> easy top-3 = d4, d3, d2 (0, 40, 12) -> d3, d2, d4.
    assert ranks["easy"][:, 1].tolist() == [3, 2, 4, 1, 0, 5]
    assert ranks["medium"][:, 1].tolist() == [3, 5, 4, 2, 1, 0]
    # Every pair was matched once although three protocols used it.
    n_distinct = len({(0, d) for d in (1, 2, 3, 4)} | {(1, d) for d in (5, 4, 3, 2)})
    assert v.match_calls == n_distinct


def test_drop_junk_keeps_order() -> None:
    r, s = drop_junk(RANKS, SCORES, [np.array([1, 4]), np.array([], int)])
    assert r[:, 0].tolist() == [0, 2, 3, 5, 1, 4] and s[:, 0].tolist() == [0.9, 0.7, 0.6, 0.4, 0.8, 0.5]
    assert r[:, 1].tolist() == RANKS[:, 1].tolist()


def test_unreadable_image_scores_zero_and_is_counted() -> None:
    v = TableVerifier(TABLE, unreadable={"d1"})
    stats = RerankStats()
    new, inl = rerank(_dataset(2, 6), RANKS, SCORES, v, top_k=4, ransac=RANSAC_H, stats=stats)
    assert list(stats.failed_images) == ["db/d1"] and stats.failed_pairs == 1
    assert new[:, 0].tolist() == [3, 0, 1, 2, 4, 5]  # d1 now 0 inliers: tie with d2 -> global order
    assert v.prepare_calls.count("db/d1") == 1  # not retried for every pair


def test_real_decode_failure_with_sift(tmp_path: Path) -> None:
    from loftr_tools.sift import SiftVerifier

    rng = np.random.default_rng(0)
    img = (rng.uniform(0, 255, size=(120, 160, 3))).astype(np.uint8)
    good = tmp_path / "good.png"
    Image.fromarray(img).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    ds = SimpleNamespace(query_names=["q"], query_paths=[good], query_bbx=[None], db_names=["good", "bad"],
                         db_paths=[good, bad], gnd=None)
    stats = RerankStats()
    new, inl = rerank(ds, np.array([[1], [0]]), None, SiftVerifier({"long_side": 160}), top_k=2, stats=stats,
                      ransac=RANSAC_H)
    assert "db/bad" in stats.failed_images and "bad.jpg" in stats.failed_images["db/bad"]
    assert new[:, 0].tolist() == [0, 1] and inl[:, 0].tolist()[1] == 0 and inl[0, 0] > 20


def test_oom_pair_is_retried_smaller() -> None:
    v = TableVerifier(TABLE, oom_above=800)
    rr = Reranker(v, RANSAC_H, oom_retry_factors=(1.0, 0.75, 0.5))
    new, inl = rr.rerank(_dataset(2, 6), RANKS[:, :1], SCORES[:, :1], top_k=2)
    assert inl[:, 0].tolist() == [50, 5] and rr.stats.oom_retries == 2  # 1024 fails, 768 works, for 2 pairs
    # The smaller size reached prepare as an argument; the settings were never changed (they are read-only).
    assert v.conf["long_side"] == 1024
    with pytest.raises(TypeError):
        v.conf["long_side"] = 768  # type: ignore[index]


def test_feature_cache_budget_and_lru() -> None:
    c = FeatureCache(250, sizeof=lambda x: x)
    c.put("a", 100)
    c.put("b", 100)
    assert c.get("a") == 100  # a is now most recent
    c.put("c", 100)  # evicts b (least recent)
    assert "b" not in c and "a" in c and "c" in c and c.nbytes == 200
    c.put("huge", 1000)  # larger than the budget: not kept, nothing evicted
    assert "huge" not in c and c.nbytes == 200


def test_feature_cache_in_rerank_prepares_each_image_once() -> None:
    v = TableVerifier(TABLE)
    rerank(_dataset(2, 6), RANKS, SCORES, v, top_k=4, ransac=RANSAC_H)
    assert sorted(v.prepare_calls) == sorted(set(v.prepare_calls))  # 2 queries + 6 db images, once each
    v2 = TableVerifier(TABLE)
    rr = Reranker(v2, RANSAC_H, feature_cache_mb=0)  # no budget: prepared again for every pair
    rr.rerank(_dataset(2, 6), RANKS, SCORES, top_k=4)
    assert len(v2.prepare_calls) == 16


def test_order_queries_groups_shared_images() -> None:
    topk = [[0, 1, 2], [7, 8, 9], [0, 1, 3], [7, 8, 5]]
    assert order_queries(topk) == [0, 2, 1, 3]
    assert order_queries([[1], [2]]) == [0, 1]


def test_main_writes_reranked_ranks(tmp_path: Path) -> None:
    from delg.config import load_config
    from loftr_tools.rerank import main

    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, size=(120, 160, 3)).astype(np.uint8)
    paths = []
    for name, im in (("a", img), ("b", np.roll(img, 9, axis=1)), ("c", rng.uniform(0, 255, size=(120, 160, 3)).astype(np.uint8))):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(im).save(paths[-1])
    ds = SimpleNamespace(name="t", query_names=["a"], query_paths=[paths[0]], query_bbx=[None], db_names=["b", "c"],
                         db_paths=paths[1:], gnd=None)
    out = tmp_path / "out"
    np.save(tmp_path / "g.npy", np.array([[1], [0]]))  # a given global ranking: the unrelated image c first
    np.save(tmp_path / "g_scores.npy", np.array([[0.9], [0.8]]))
    conf = load_config(None, [f"output_dir={out}", "rerank.methods=[sift]", "rerank.top_k=2", "progress=false",
                              "sift.long_side=160", "sift.ransac.model=homography", "device=cpu",
                              f"rerank.global_ranks={tmp_path / 'g.npy'}"])
    written = main(conf, dataset=ds)
    z = np.load(written)
    assert z["ranks"][:, 0].tolist() == [0, 1]  # b (a shifted copy of a) moves above c
    assert z["inliers"][0, 0] > 20 and z["inliers"][1, 0] < 10
    assert len(list((out / "matches").glob("inliers-sift-*.sqlite"))) == 1
    assert (out / "ranks" / "rerank.config.yaml").is_file()


def test_batched_match_many_is_used() -> None:
    class Batched(TableVerifier):
        default_conf = {"long_side": 1024, "batch_size": 3}

        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.batches: list[int] = []

        @property
        def batch_size(self) -> int:
            return int(self.conf["batch_size"])

        def match_many(self, f0: dict[str, Any], f1s: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
            self.batches.append(len(f1s))
            return [self.match(f0, f1) for f1 in f1s]

    v = Batched(TABLE, unreadable={"d1"})
    stats = RerankStats()
    new, inl = rerank(_dataset(2, 6), RANKS, SCORES, v, top_k=4, ransac=RANSAC_H, stats=stats)
    assert new[:, 0].tolist() == [3, 0, 1, 2, 4, 5] and new[:, 1].tolist() == [3, 2, 5, 4, 1, 0]
    # 4 pairs per query in chunks of 3 + 1; q0's first chunk holds the unreadable d1, so it matches 2 there.
    assert sorted(v.batches) == [1, 1, 2, 3] and stats.failed_pairs == 1 and stats.matched == 7


def test_image_both_query_and_db_is_prepared_once() -> None:
    v = TableVerifier({("q0", "d1"): 9})
    ds = _dataset(1, 3, crop=False)
    ds.db_paths[0] = ds.query_paths[0]  # db image 0 is the query's own file (a folder dataset)
    _, inl = rerank(ds, np.array([[0], [1], [2]]), None, v, top_k=3, ransac=RANSAC_H)
    assert inl[:, 0].tolist() == [IDENTICAL_INLIERS, 9, 0]
    # the query's file is prepared once although it is matched against d1 and d2 (as first or second image)
    assert sorted(v.prepare_calls) == ["db/d1", "db/d2", "query/q0"] and v.match_calls == 2


# ---------------------------------------------------------------------------------------------------------------
# per-verifier RANSAC settings and the inlier cache's identity
# ---------------------------------------------------------------------------------------------------------------


def test_each_verifier_s_ransac_settings_reach_ransac_inliers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``<section>.ransac`` of the run config is what the reranker hands to ransac_inliers (and its min_inliers
    floors the counts), for each verifier separately."""
    import loftr_tools.rerank as rr_mod
    from delg.config import load_config
    from loftr_tools.ransac import RansacConf
    from loftr_tools.ransac import ransac_inliers as real

    seen: list[RansacConf] = []

    def spy(p0: np.ndarray, p1: np.ndarray, conf: Any = None, **kw: Any) -> tuple[np.ndarray, int]:
        seen.append(RansacConf.from_conf(conf))
        return real(p0, p1, conf=conf, **kw)

    monkeypatch.setattr(rr_mod, "ransac_inliers", spy)
    conf = load_config(None, ["sift.ransac.model=affine", "sift.ransac.threshold=12", "sift.ransac.max_iters=500",
                              "sift.ransac.min_inliers=11", "device=cpu", "rerank.cache=false"])
    rr = rr_mod.open_reranker(conf, _dataset(2, 6), "sift")
    assert rr.ransac == RansacConf(model="affine", threshold=12.0, max_iters=500, min_inliers=11,
                                   evidence_low=conf.sift.ransac.evidence_low, evidence_high=conf.sift.ransac.evidence_high)
    rr.close()
    # A verifier carrying its section's RANSAC mapping is scored with it (no ransac= given to the reranker); raw
    # counts are cached and the section's min_inliers floors them when reranking.
    v = TableVerifier(TABLE, conf={"ransac": conf.sift.ransac})
    _, inl = rerank(_dataset(2, 6), RANKS, SCORES, v, top_k=4)
    assert seen and all((c.model, c.threshold, c.max_iters) == ("affine", 12.0, 500) for c in seen)
    assert inl[:, 0].tolist() == [50, 50, 0, 0]  # q0: d0's 5 inliers fall under min_inliers=11, d2 has none
    # Another verifier's section is untouched: DELG-local keeps DELG's affine 20 px / 1000 trials.
    assert dict(conf.delg_local.ransac)["threshold"] == 20.0 and conf.lightglue.ransac != conf.sift.ransac


def _identity_path(cls: type, conf: dict[str, Any], tmp: Path) -> Path:
    """The inlier-cache file of a verifier of class ``cls`` with section ``conf`` (constructed without loading
    weights or stores: the identity derives from its resolved settings)."""
    v = cls.__new__(cls)
    v.conf = {**cls.default_conf, **conf}
    return Reranker.default_cache_path(tmp, v)


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1 if value != -1 else 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, 1]
    return 1  # None


@pytest.mark.parametrize("method", sorted(VERIFIERS))  # every registered verifier, a new one too
def test_every_setting_of_a_verifier_section_is_in_its_cache_identity(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changing any one key of the verifier's section (its RANSAC mapping included) changes the inlier cache, except
    the keys of NOT_IN_IDENTITY, which cannot change a cached count."""
    import importlib

    from delg.config import default_schema
    from loftr_tools.caches import NOT_IN_IDENTITY
    from loftr_tools.registry import VERIFIERS

    module, cls_name, section = VERIFIERS[method]
    cls = getattr(importlib.import_module(module), cls_name)
    monkeypatch.setattr(cls, "identity_extra", lambda self: {})  # weights / stores: tested on their own
    monkeypatch.setattr(cls, "cache_tag", lambda self: "same")  # the identity alone must tell settings apart
    base = default_schema()[section]
    assert isinstance(base.get("ransac"), dict)  # every verifier has its own RANSAC settings
    ref = _identity_path(cls, base, tmp_path)
    keys = [(k, None) for k in base if k != "ransac"] + [("ransac", k) for k in base["ransac"]]
    for key, sub in keys:
        conf = {**base, "ransac": dict(base["ransac"])}
        if sub is None:
            conf[key] = _changed(conf[key])
        else:
            # a value the RANSAC validation accepts
            conf["ransac"][sub] = {"model": "homography" if base["ransac"]["model"] != "homography" else "affine",
                                   "confidence": 0.9}.get(sub, _changed(base["ransac"][sub]))
        dotted = key if sub is None else f"ransac.{sub}"
        same = _identity_path(cls, conf, tmp_path) == ref
        assert same == (dotted in NOT_IN_IDENTITY), f"{section}.{dotted}"


def test_delg_local_cache_identity_follows_the_feature_stores(tmp_path: Path) -> None:
    """Another checkpoint's features (another store preset) never reuse the DELG-local inlier counts."""
    from delg.store import FeatureStore
    from loftr_tools.delg_local import DelgLocalVerifier

    paths = []
    for preset in ("feats-resnet50-ckptaaaaaa-s7-1024-11111111", "feats-resnet50-ckptbbbbbb-s7-1024-22222222"):
        p = tmp_path / preset / "store.h5"
        p.parent.mkdir()
        with FeatureStore(p, "a", preset=preset, split="db") as st:
            st.set_model_meta({"trained_local": True})
        paths.append(p)
    caches = []
    for p in paths:
        v = DelgLocalVerifier(stores={"query": p, "db": p})
        caches.append(Reranker.default_cache_path(tmp_path / "out", v))
        v.close()
    assert caches[0] != caches[1]
