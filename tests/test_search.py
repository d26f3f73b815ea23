"""Global search: exact FAISS vs NumPy, depth cut, chunking, missing images, index reuse, alpha-QE, DBA, IVF-PQ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from delg.config import ConfigError, load_config, parse_override
from delg.data.dataset import RetrievalDataset
from delg.data.revisitop import GroundTruth
from delg.feature_stores import extraction_settings, preset_name, split_tag, store_path
from delg.search import _CACHE, SearchError, alpha_qe, dba_vectors, main, search_one
from delg.store import FeatureStore


def clustered(rng: np.random.Generator, n: int, d: int, k: int = 20, spread: float = 0.3) -> np.ndarray:
    centres = rng.standard_normal((k, d))
    x = centres[rng.integers(0, k, n)] + spread * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_case(root: Path, n_db: int = 300, n_q: int = 7, d: int = 32, seed: int = 0, skip: tuple[int, ...] = (),
              *overrides: str):
    """A dataset whose stores already hold synthetic global descriptors (no model needed)."""
    conf = load_config(None, [f"output_dir={root}", "progress=false", *overrides])
    rng = np.random.default_rng(seed)
    X = clustered(rng, n_db, d)
    Q = clustered(rng, n_q, d)
    ds = RetrievalDataset(
        name="synth",
        db_paths=[root / f"db{i}.jpg" for i in range(n_db)],
        db_names=[f"db/{i:05d}" for i in range(n_db)],
        query_paths=[root / f"q{j}.jpg" for j in range(n_q)],
        query_names=[f"q{j}" for j in range(n_q)],
        query_bbx=[None] * n_q,
        gnd=GroundTruth("synth", [], [], []),
    )
    for split, names, vecs in (("db", ds.db_names, X), ("query", ds.query_names, Q)):
        with FeatureStore(store_path(conf, "synth", split), "a", preset=preset_name(conf),
                          settings=extraction_settings(conf, split_tag(conf, split))) as st:
            for i, (n, v) in enumerate(zip(names, vecs)):
                if split == "db" and i in skip:
                    continue
                st.write(n, {"global": v, "image_size": [10, 10]})
    if skip:
        path = store_path(conf, "synth", "db")
        (path.parent / f"{path.stem}.skipped.json").write_text(
            "[" + ",".join(f'{{"name": "{ds.db_names[i]}", "path": "x", "error": "x"}}' for i in skip) + "]"
        )
    return conf, ds, X, Q


def numpy_ranks(X: np.ndarray, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    S = X @ Q.T  # (n_db, n_q)
    order = np.argsort(-S, axis=0, kind="stable")
    return order, np.take_along_axis(S, order, axis=0)


def test_exact_matches_numpy_and_depth(tmp_path):
    conf, ds, X, Q = make_case(tmp_path, 300, 7, 32, 0, (), "ranks.depth=50")
    path = main(conf, ds)
    assert path == tmp_path / "ranks" / "global.npy"
    ranks, scores = np.load(path), np.load(tmp_path / "ranks" / "global_scores.npy")
    assert ranks.shape == (50, 7) and ranks.dtype == np.int64 and scores.dtype == np.float32
    ref, ref_s = numpy_ranks(X, Q)
    np.testing.assert_array_equal(ranks, ref[:50])
    np.testing.assert_allclose(scores, ref_s[:50], atol=1e-5)
    # depth beyond n_db: every database image once per column
    conf2, ds2, X2, Q2 = make_case(tmp_path / "b", 40, 3, 16, 1, (), "ranks.depth=1000")
    r2 = np.load(main(conf2, ds2))
    assert r2.shape == (40, 3)
    np.testing.assert_array_equal(np.sort(r2, axis=0), np.arange(40)[:, None].repeat(3, 1))
    np.testing.assert_array_equal(r2, numpy_ranks(X2, Q2)[0])


def test_chunking_does_not_change_results(tmp_path):
    conf, ds, X, Q = make_case(tmp_path / "a", 257, 9, 32, 2, (), "search.chunk=16", "search.query_chunk=2",
                               "ranks.depth=30")
    r_small = np.load(main(conf, ds))
    conf2, ds2, _, _ = make_case(tmp_path / "b", 257, 9, 32, 2, (), "ranks.depth=30")
    r_big = np.load(main(conf2, ds2))
    np.testing.assert_array_equal(r_small, r_big)
    np.testing.assert_array_equal(r_small, numpy_ranks(X, Q)[0][:30])


def test_missing_db_images_rank_last(tmp_path):
    conf, ds, X, Q = make_case(tmp_path, 30, 2, 16, 3, (4, 17), "ranks.depth=100")
    ranks = np.load(main(conf, ds))
    scores = np.load(tmp_path / "ranks" / "global_scores.npy")
    assert ranks.shape == (30, 2)
    np.testing.assert_array_equal(ranks[-2:], [[4, 4], [17, 17]])
    assert np.isneginf(scores[-2:]).all() and np.isfinite(scores[:-2]).all()
    keep = np.array([i for i in range(30) if i not in (4, 17)])
    ref = keep[numpy_ranks(X[keep], Q)[0]]
    np.testing.assert_array_equal(ranks[:-2], ref)


def test_index_saved_reused_and_invalidated(tmp_path):
    conf, ds, X, Q = make_case(tmp_path, 100, 3, 16, 4, (), "ranks.depth=10")
    main(conf, ds)
    feats = store_path(conf, "synth", "db").parent
    idx = sorted(feats.glob("*.faiss"))
    assert len(idx) == 1
    stamp = idx[0].stat().st_mtime_ns
    import delg.search as S

    S._CACHE.clear()
    main(conf, ds)  # same store: the saved index is loaded, not rewritten
    assert sorted(feats.glob("*.faiss")) == idx and idx[0].stat().st_mtime_ns == stamp
    # the database changes (one more image): a new index replaces the old one, results include the new image
    new = np.asarray(Q[0], np.float32)
    with FeatureStore(store_path(conf, "synth", "db"), "a") as st:
        st.write("db/new", {"global": new, "image_size": [10, 10]})
    ds.db_names.append("db/new")
    ds.db_paths.append(tmp_path / "new.jpg")
    S._CACHE.clear()
    ranks = np.load(main(conf, ds))
    after = sorted(feats.glob("*.faiss"))
    assert len(after) == 1 and after != idx
    assert ranks[0, 0] == 100  # the exact copy of query 0 ranks first


def test_alpha_qe_and_dba_against_numpy(tmp_path):
    conf, ds, X, Q = make_case(tmp_path / "qe", 200, 5, 32, 5, (), "search.qe_k=3", "search.alpha=3.0",
                               "ranks.depth=20")
    ranks = np.load(main(conf, ds))
    order, s = numpy_ranks(X, Q)
    w = np.maximum(s[:3], 0) ** 3  # (3, nq)
    q2 = Q + np.einsum("kq,kqd->qd", w, X[order[:3]])
    q2 /= np.linalg.norm(q2, axis=1, keepdims=True)
    np.testing.assert_array_equal(ranks, numpy_ranks(X, q2)[0][:20])
    # the helper itself on a case worked by hand: weights 1 and 0.5^1
    q = np.array([[1.0, 0.0]], np.float32)
    nb = np.array([[[0.0, 1.0], [1.0, 0.0]]], np.float32)
    np.testing.assert_allclose(alpha_qe(q, nb, np.array([[1.0, 0.5]]), 1.0), [[1.5 / np.hypot(1.5, 1), 1 / np.hypot(1.5, 1)]],
                               atol=1e-6)

    conf, ds, X, Q = make_case(tmp_path / "dba", 200, 5, 32, 6, (), "search.dba_k=4", "search.alpha=2.0",
                               "ranks.depth=20")
    ranks = np.load(main(conf, ds))
    S = X @ X.T
    nn = np.argsort(-S, axis=1, kind="stable")[:, :4]
    w = np.maximum(np.take_along_axis(S, nn, 1), 0) ** 2
    Xd = np.einsum("nk,nkd->nd", w, X[nn])
    Xd /= np.linalg.norm(Xd, axis=1, keepdims=True)
    ref = numpy_ranks(Xd, Q)[0][:20]
    np.testing.assert_array_equal(ranks, ref)
    np.testing.assert_allclose(dba_vectors(X[nn[:3]], np.take_along_axis(S, nn, 1)[:3], 2.0), Xd[:3], atol=1e-5)


def test_ivfpq_recall_and_search_one(tmp_path):
    conf, ds, X, Q = make_case(tmp_path, 2000, 20, 32, 7, (), "search.index=ivfpq", "search.m=8", "search.nbits=6",
                               "search.nlist=16",
                               "search.nprobe=16", "ranks.depth=10")
    ranks = np.load(main(conf, ds))
    exact = numpy_ranks(X, Q)[0][:10]
    recall = np.mean([len(set(ranks[:, j]) & set(exact[:, j])) / 10 for j in range(Q.shape[0])])
    assert recall >= 0.5, recall
    idx, sc = search_one(Q[3], conf, ds)
    np.testing.assert_array_equal(idx, ranks[:, 3])
    assert sc.shape == (10,) and np.all(np.diff(sc) <= 1e-6)
    with pytest.raises(SearchError, match="descriptor has size"):
        search_one(np.zeros(7, np.float32), conf, ds)


def test_ivfpq_refine_restores_recall(tmp_path):
    """Coarse PQ codes (8 sub-quantisers of 4 bits for 32-d) rank poorly; re-scoring 16k candidates with the
    8-bit copy brings recall close to exact (8-bit rounding may swap near-ties at the cut), and survives a reload."""
    common = ("search.index=ivfpq", "search.m=8", "search.nbits=4", "search.nlist=8", "search.nprobe=8",
              "ranks.depth=10")
    conf, ds, X, Q = make_case(tmp_path / "plain", 1500, 30, 32, 11, (), *common, "search.refine=0")
    exact = numpy_ranks(X, Q)[0][:10]

    def recall(r):
        return np.mean([len(set(r[:, j]) & set(exact[:, j])) / 10 for j in range(Q.shape[0])])

    plain = recall(np.load(main(conf, ds)))
    conf, ds, X2, Q2 = make_case(tmp_path / "refine", 1500, 30, 32, 11, (), *common, "search.refine=16")
    np.testing.assert_array_equal(X2, X)
    refined = np.load(main(conf, ds))
    assert recall(refined) >= 0.9 and recall(refined) > plain + 0.5, (plain, recall(refined))
    _CACHE.clear()  # search again from the index saved on disk (its k_factor set from the config again)
    saved = list((tmp_path / "refine").glob("**/*.faiss"))
    assert len(saved) == 1
    for f in (tmp_path / "refine" / "ranks").glob("global*"):
        f.unlink()
    np.testing.assert_array_equal(np.load(main(conf, ds)), refined)
    conf.search.refine = 2.0  # a search-time change: the same (cached) index, searched again with fewer candidates
    fewer = recall(np.load(main(conf, ds)))
    assert len(list((tmp_path / "refine").glob("**/*.faiss"))) == 1 and plain < fewer < recall(refined)


def test_refine_rebuilt_around_another_base_searches_the_same() -> None:
    """What to_gpu does with an IndexRefine (FAISS cannot clone one to the GPU): the IVF-PQ goes to the device,
    the 8-bit copy stays.  Here the 'device copy' is a CPU clone, so results must be identical."""
    import faiss

    from delg.search import new_index, refine_on

    X = clustered(np.random.default_rng(5), 3000, 32)
    index = new_index(32, "ivfpq", 3000, nlist=16, m=8, nbits=6, refine=3)
    index.train(X)
    index.add(X)
    faiss.extract_index_ivf(index).nprobe = 8
    moved = refine_on(faiss.clone_index(faiss.downcast_index(index.base_index)), index)
    assert moved.k_factor == 3 and moved.ntotal == 3000
    d0, i0 = index.search(X[:20], 10)
    d1, i1 = moved.search(X[:20], 10)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(d0, d1)


def test_bad_settings(tmp_path):
    conf, ds, _, _ = make_case(tmp_path, 300, 2, 32, 8, (), "search.index=ivfpq", "search.m=5")
    with pytest.raises(SearchError, match="search.m"):
        main(conf, ds)
    with pytest.raises(ConfigError, match="search.index: 'hnsw' is not allowed: one of flat, ivfpq"):
        load_config(None, ["search.index=hnsw"])
    conf, ds, _, _ = make_case(tmp_path / "b", 30, 2, 32, 8, ())
    conf.search.index = "hnsw"  # changed after load_config: the stage checks again before any work
    with pytest.raises(SearchError, match="search.index"):
        main(conf, ds)


def test_missing_stores_trigger_extraction(tmp_path, monkeypatch):
    import delg.extract as E

    conf, ds, X, Q = make_case(tmp_path, 50, 2, 16, 9, (), "ranks.depth=5")
    qpath = store_path(conf, "synth", "query")
    qpath.unlink()
    calls = []

    def fake_extract(sub, dataset):
        calls.append(list(sub.extract.splits))
        with FeatureStore(qpath, "a", preset=preset_name(conf)) as st:
            for n, v in zip(dataset.query_names, Q):
                st.write(n, {"global": v, "image_size": [10, 10]})
        return qpath.parent

    monkeypatch.setattr(E, "main", fake_extract)
    ranks = np.load(main(conf, ds))
    assert calls == [["query"]]  # only what was missing
    np.testing.assert_array_equal(ranks, numpy_ranks(X, Q)[0][:5])


# ---------------------------------------------------------------------------------------------- depth and GPU k limit
def test_full_depth_ranks_the_whole_database_exactly(tmp_path):
    """ranks.depth null/all (the default) = every database image, as a stable NumPy argsort of the similarities;
    2500 > GPU_MAX_K rows go through the chunked exact path.  A cut is recorded as one."""
    import json

    from delg.search import GPU_MAX_K, search_record

    conf, ds, X, Q = make_case(tmp_path / "full", 2500, 4, 16, 12, (), "search.chunk=700", "search.query_chunk=3")
    assert conf.ranks.depth is None and 2500 > GPU_MAX_K
    path = main(conf, ds)
    ranks, scores = np.load(path), np.load(tmp_path / "full" / "ranks" / "global_scores.npy")
    ref, ref_s = numpy_ranks(X, Q)
    assert ranks.shape == (2500, 4)
    np.testing.assert_array_equal(ranks, ref)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    rec = search_record(path)
    assert rec["depth"] == 2500 and rec["depth_setting"] is None and rec["ranking_cut"] is False
    assert rec["index"] == "flat" and rec["exact"] is True and rec["gpu"] is False and rec["gpu_fallbacks"] == []
    conf.ranks.depth = "all"  # the same ranking: reused, not searched again
    assert np.load(main(conf, ds)).shape == (2500, 4) and search_record(path)["depth_setting"] is None

    conf, ds, X, Q = make_case(tmp_path / "cut", 2500, 4, 16, 12, (), "ranks.depth=2100", "search.chunk=500")
    path = main(conf, ds)
    np.testing.assert_array_equal(np.load(path), ref[:2100])
    meta = json.loads(path.with_name("global.meta.json").read_text())
    assert meta["depth"] == 2100 and meta["depth_setting"] == 2100 and meta["ranking_cut"] is True
    for bad in ("0", "-3", "ten", "1.5", "true"):
        with pytest.raises(ConfigError, match="ranks.depth"):
            load_config(None, [f"ranks.depth={bad}"])
        conf.ranks.depth = parse_override(f"ranks.depth={bad}")[1]
        with pytest.raises(SearchError, match="ranks.depth"):
            main(conf, ds)


def test_exact_topk_matches_a_stable_argsort() -> None:
    """Any k (partial sort across database chunks) and any chunking: NumPy's stable order, ties by lower index."""
    from delg.search import exact_topk

    rng = np.random.default_rng(3)
    X = clustered(rng, 57, 8)
    X[40] = X[5]  # exact ties
    X[41] = X[5]
    Q = np.concatenate([X[5:6], clustered(rng, 4, 8)])
    S = Q @ X.T
    order = np.argsort(-S, axis=1, kind="stable")
    for k in (1, 3, 20, 56, 57, 100):
        for dc, qc in ((4, 2), (16, 5), (1000, 1000)):
            sc, ix = exact_topk(X, Q, k, dc, qc)
            kk = min(k, 57)
            np.testing.assert_array_equal(ix, order[:, :kk], err_msg=f"k={k} chunks={dc},{qc}")
            np.testing.assert_allclose(sc, np.take_along_axis(S, order[:, :kk], 1), atol=1e-6)
    assert list(exact_topk(X, Q, 3)[1][0]) == [5, 40, 41]


def gpu_standin(index, limit: int = 2048):
    """What ``to_gpu`` returns, on the CPU: a copy whose search refuses, as FAISS GPU indexes do, a request that
    needs more than ``limit`` results of the (base) index (an IndexRefine asks its base for k * k_factor)."""
    import faiss

    from delg.search import refine_on

    if isinstance(index, faiss.IndexRefine):
        clone = refine_on(faiss.clone_index(faiss.downcast_index(index.base_index)), index)
    else:
        clone = faiss.clone_index(index)

    class StandIn(type(clone)):
        asked: list[int] = []

        def search(self, x, k, **kw):
            need = int(k * self.k_factor) if isinstance(self, faiss.IndexRefine) else k
            StandIn.asked.append(need)
            if need > limit:
                raise RuntimeError(f"Error in void faiss::gpu::validateKSelect(int, bool) at IndexUtils.cu:28: GPU "
                                   f"index only supports min/max-K selection up to {limit} (requested {need})")
            return super().search(x, k, **kw)

    clone.__class__ = StandIn
    return clone


@pytest.mark.parametrize("case", ["flat", "ivfpq+refine"])
def test_search_beyond_the_gpu_k_limit(tmp_path, monkeypatch, case):
    """A GPU index stand-in that refuses k > 2048: full-depth flat and IVF-PQ + refine (depth 1000 x refine 4 = 4000
    asked of the base) still give the ranking of a search without the limit, and the results say what happened."""
    import delg.search as S

    opts = ("search.index=ivfpq", "search.m=8", "search.nbits=6", "search.nlist=16", "search.nprobe=8",
            "search.refine=4", "ranks.depth=1000") if case != "flat" else ()
    conf, ds, X, Q = make_case(tmp_path / "cpu", 2600, 3, 32, 13, (), "search.gpu=false", *opts)
    want = np.load(main(conf, ds))
    made = []
    monkeypatch.setattr(S, "_use_gpu", lambda setting: True)
    monkeypatch.setattr(S, "to_gpu", lambda cpu: made.append(gpu_standin(cpu)) or made[-1])
    conf, ds, _, _ = make_case(tmp_path / "gpu", 2600, 3, 32, 13, (), "search.gpu=true", *opts)
    path = main(conf, ds)
    assert made and type(made[0]).__mro__[1].__name__ == ("IndexFlatIP" if case == "flat" else "IndexRefine")
    np.testing.assert_array_equal(np.load(path), want)
    assert all(k <= 2048 for k in type(made[0]).asked)  # nothing beyond the limit was asked of the GPU copy
    rec = S.search_record(path)
    assert rec["gpu"] is True and rec["index"] == case and len(rec["gpu_fallbacks"]) == 1
    assert "GPU top-k limit (2048)" in rec["gpu_fallbacks"][0]
    if case == "flat":
        assert rec["exact"] is True and rec["depth"] == 2600 and rec["ranking_cut"] is False
        np.testing.assert_array_equal(want, numpy_ranks(X, Q)[0])
        # within the limit the GPU copy searches
        conf.ranks.depth = 50
        path = main(conf, ds)
        np.testing.assert_array_equal(np.load(path), want[:50])
        assert type(made[0]).asked[-1] == 50 and S.search_record(path)["gpu_fallbacks"] == []
    else:
        assert rec["refine"] == 4 and rec["nprobe"] == 8 and rec["ranking_cut"] is True


def test_gpu_refusal_at_run_time_falls_back_to_the_cpu(tmp_path, monkeypatch):
    """A GPU limit lower than GPU_MAX_K (older FAISS builds: 1024) is caught when the GPU copy refuses."""
    import delg.search as S

    conf, ds, X, Q = make_case(tmp_path, 1500, 2, 16, 14, (), "search.gpu=true", "ranks.depth=1200")
    monkeypatch.setattr(S, "_use_gpu", lambda setting: True)
    monkeypatch.setattr(S, "to_gpu", lambda cpu: gpu_standin(cpu, limit=1024))
    path = main(conf, ds)
    np.testing.assert_array_equal(np.load(path), numpy_ranks(X, Q)[0][:1200])
    notes = S.search_record(path)["gpu_fallbacks"]
    assert len(notes) == 1 and "refused k=1200" in notes[0] and "up to 1024 (requested 1200)" in notes[0]
