"""Beyond pairwise reranking (loftr_tools.expansion): evidence, verified query expansion, propagation and the fused
order, on small hand-made cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from loftr_tools.base import IDENTICAL_INLIERS
from loftr_tools.expansion import (
    ExpansionConf,
    VerifiedGraph,
    evidence,
    expand_query,
    expand_rankings,
    fused_scores,
    propagate,
)
from loftr_tools.ranking import reorder_topk


def test_evidence_is_linear_between_low_and_high() -> None:
    n = np.array([0, 30, 40, 55, 80, 200, IDENTICAL_INLIERS])
    np.testing.assert_allclose(evidence(n, 30, 80), [0, 0, 0.2, 0.5, 1, 1, 0])  # an image with itself: no evidence


def test_expand_query_weights_hits_by_evidence() -> None:
    q = np.array([1.0, 0.0, 0.0])
    hits = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    v = expand_query(q, hits, np.array([1.0, 0.5]))
    np.testing.assert_allclose(v, np.array([1.0, 1.0, 0.5]) / 1.5, rtol=1e-6)
    np.testing.assert_allclose(expand_query(q, np.zeros((0, 3)), np.zeros(0)), q)


def test_propagation_is_the_best_bottleneck_path() -> None:
    g = VerifiedGraph(max_edges=100)
    g.add(1, 2, 0.9)
    g.add(1, 3, 0.2)
    g.add(4, 3, 0.6)
    g.add(4, 2, 0.1)
    g.add(5, 5, 1.0)  # a self edge is never kept
    g.add(6, 7, 0.0)  # nor an edge without evidence
    assert g.n_edges == 4 and g.neighbours(5) == {} and g.neighbours(6) == {}
    p = propagate({1: 0.5, 4: 1.0}, g)
    # 2: via 1 min(0.5, 0.9) = 0.5, via 4 min(1.0, 0.1) = 0.1 -> 0.5; 3: via 1 0.2, via 4 0.6 -> 0.6
    assert p == {2: 0.5, 3: 0.6}


def test_graph_keeps_the_strongest_edges_within_its_budget() -> None:
    g = VerifiedGraph(max_edges=2)
    for a, b, e in [(0, 1, 0.3), (1, 2, 0.9), (2, 3, 0.5), (3, 4, 0.1)]:
        g.add(a, b, e)
    g.prune()
    assert g.n_edges == 2 and g.dropped == 2
    assert g.neighbours(1) == {2: 0.9} and g.neighbours(3) == {2: 0.5} and g.neighbours(0) == {}
    assert VerifiedGraph.with_budget(1).max_edges == 2**20 // 64 // 2  # pruned at twice that: never above 1 MB
    small = VerifiedGraph(max_edges=3)
    for i in range(40):  # pruned on the way, never holding 2 x max_edges edges
        small.add(i, i + 1, (i % 7) / 7 + 0.01)
        assert small.n_edges < 6
    small.prune()
    assert small.n_edges == 3 and sorted(e for nb in small.adj.values() for e in nb.values())[-1] == pytest.approx(6 / 7 + 0.01)


def test_fused_score_formula() -> None:
    conf = ExpansionConf(order="fused", global_weight=0.1, propagate=True, propagation_weight=0.5)
    z = fused_scores(np.array([1.0, 0.0]), np.array([0.0, 0.8]), np.array([0.2, 0.9]), conf)
    np.testing.assert_allclose(z, [1.02, 0.49])
    # without propagation its term is not counted
    z = fused_scores(np.array([0.0]), np.array([0.8]), np.array([0.9]), ExpansionConf(order="fused", global_weight=0.1))
    np.testing.assert_allclose(z, [0.09])


# ------------------------------------------------------------------------------------------- expand_rankings
class Oracle:
    """A verifier from a known inlier matrix that records every pair it is asked for."""

    def __init__(self, inl: np.ndarray, db_inl: np.ndarray | None = None) -> None:
        self.inl, self.db_inl = inl, db_inl
        self.asked: list[tuple[int, int]] = []
        self.asked_db: list[tuple[int, int]] = []

    def __call__(self, todo):
        out = {}
        for c, ds in todo.items():
            for d in ds:
                self.asked.append((c, int(d)))
                out[(c, int(d))] = int(self.inl[c, d])
        return out

    def db(self, todo):
        out = {}
        for a, bs in todo.items():
            for b in bs:
                self.asked_db.append((int(a), int(b)))
                out[(int(a), int(b))] = int(self.db_inl[a, b])
        return out


def _setup(X: np.ndarray, Q: np.ndarray, inl: np.ndarray, K: int):
    G = Q @ X.T
    ranks = np.argsort(-G, axis=1, kind="stable").T.copy()
    scores = np.take_along_axis(G, ranks.T, 1).T.copy()
    oracle = Oracle(inl)
    counts = oracle({c: list(ranks[:K, c]) for c in range(len(Q))})
    topk = np.array([[counts[(c, ranks[r, c])] for c in range(len(Q))] for r in range(K)])
    pairwise, _ = reorder_topk(ranks, topk, scores)

    def search(v, k):
        s = v @ X.T
        ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, ids, 1), ids

    return ranks, scores, counts, pairwise, oracle, search


def _unit(*rows: list[float]) -> np.ndarray:
    a = np.array(rows, np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def test_query_without_a_verified_hit_keeps_its_pairwise_ranking() -> None:
    X = _unit([1, 0.1, 0], [1, 0.3, 0], [0, 1, 0], [0, 0, 1])
    Q = _unit([1, 0.2, 0.1])
    inl = np.array([[12, 25, 0, 3]])  # nothing above low = 30
    ranks, scores, counts, pairwise, oracle, search = _setup(X, Q, inl, K=2)
    conf = ExpansionConf(order="fused", qe_rounds=1, propagate=True)
    new, _, stats = expand_rankings(ranks, counts, Q, lambda i: X[i], oracle, search, conf, 2, [None],
                                    pairwise_ranks=pairwise)
    np.testing.assert_array_equal(new, pairwise)
    assert pairwise[0, 0] == 1  # (25 inliers beat 12: the pairwise order, not the global one)
    assert stats.queries_with_hits == 0 and stats.qe_pairs == 0


def test_verified_query_expansion_verifies_and_lifts_a_candidate_below_k() -> None:
    # db 0 is the query's landmark seen alike, db 3 the same landmark seen differently (globally far from the query
    # but close to db 0), db 1 / 2 distractors that the global stage ranks above db 3.
    X = _unit([1, 0, 0.2], [0.7, 0.7, 0], [0.6, 0.5, 0.6], [1, -0.3, 0.4])
    Q = _unit([1, 0.3, 0])
    inl = np.array([[120, 10, 12, 60]])
    ranks, scores, counts, pairwise, oracle, search = _setup(X, Q, inl, K=2)
    assert list(ranks[:, 0]) == [0, 1, 3, 2]  # db 3 is third globally, outside the top K = 2
    conf = ExpansionConf(order="fused", qe_rounds=1, qe_top_k=2, global_weight=0.1, low=30, high=80)
    new, out_counts, stats = expand_rankings(ranks, counts, Q, lambda i: X[i], oracle, search, conf, 2,
                                             [None], pairwise_ranks=pairwise)
    # expanded query = normalise(q + 1.0 * x0) ranks db 0 then db 3 (similarities 0.98, 0.88, then db 1 0.80, db 2
    # 0.73, by hand): db 3 is verified (60 inliers, evidence 0.6) and, in the fused order, ranks second
    assert oracle.asked[2:] == [(0, 3)] and stats.qe_pairs == 1
    assert list(new[:, 0]) == [0, 3, 1, 2]
    assert out_counts[(0, 3)] == 60
    # pure inlier order with the same expansion: counts decide (120 > 60 > unverified), the expanded query next
    new_i, _, _ = expand_rankings(ranks, counts, Q, lambda i: X[i], Oracle(inl), search,
                                  ExpansionConf(order="inliers", qe_rounds=1, qe_top_k=2), 2, [None], pairwise_ranks=pairwise)
    assert list(new_i[:, 0]) == [0, 3, 1, 2]


def test_propagation_lifts_an_image_reached_through_a_verified_hit() -> None:
    # Two queries that are database images 0 and 1 (a folder dataset). Query 0 matches db 1 strongly and db 2 only
    # weakly (a night photo, 20 inliers: no evidence); query 1 (= db 1) matches db 2 strongly. db 3 is a distractor
    # that the global stage puts above db 2 for query 0.
    X = _unit([1, 0, 0], [0.9, 0.44, 0], [0.3, 0.6, 0.7], [0.75, -0.45, 0.49])
    Q = X[:2].copy()
    inl = np.array([[IDENTICAL_INLIERS, 150, 20, 5],
                    [150, IDENTICAL_INLIERS, 100, 8]])
    ranks, scores, counts, pairwise, oracle, search = _setup(X, Q, inl, K=4)
    assert list(ranks[:, 0]) == [0, 1, 3, 2]
    conf = ExpansionConf(order="fused", propagate=True, propagation_weight=1.0, propagate_verify=5, low=30, high=80)
    new, _, stats = expand_rankings(ranks, counts, Q, lambda i: X[i], oracle, search, conf, 4, [0, 1],
                                    pairwise_ranks=pairwise)
    # query 0: db 2 reached via db 1: min(e(0,1) = 1, e(1,2) = 0.4) = 0.4 > the distractor's 0 + 0.1 * similarity
    assert list(new[:, 0]) == [0, 1, 2, 3]
    assert stats.graph_edges == 2  # (0, 1) and (1, 2): the pairs with evidence
    # every pair was verified already (top K = the whole database): propagation asked for nothing new
    assert stats.propagation_pairs == 0
    # K = 3: db 2 is outside query 0's top K (pairwise reranking keeps the distractor above it), inside query 1's
    ranks2, scores2, counts2, pairwise2, oracle2, search2 = _setup(X, Q, inl, K=3)
    assert list(ranks2[:, 1]) == [1, 0, 2, 3] and (0, 2) not in counts2
    new2, _, stats2 = expand_rankings(ranks2, counts2, Q, lambda i: X[i], oracle2, search2, conf, 3, [0, 1],
                                      pairwise_ranks=pairwise2)
    assert list(pairwise2[:, 0]) == [0, 1, 3, 2]
    assert list(new2[:, 0]) == [0, 1, 2, 3]  # propagation reached db 2 and verified it directly
    assert (0, 2) in oracle2.asked and stats2.propagation_pairs >= 1


def test_database_side_pairs_give_edges_when_queries_are_not_database_images() -> None:
    # revisitop-like: the query is not a database image, so only database-side pairs link db 1 to db 2.
    X = _unit([1, 0, 0], [0.3, 0.3, 0.9], [0.8, 0, 0.6], [0, 0.2, 1])
    Q = _unit([1, 0.05, 0])
    inl = np.array([[200, 15, 4, 3]])
    db_inl = np.zeros((4, 4), int)
    db_inl[0, 3] = db_inl[3, 0] = 90
    ranks, scores, counts, pairwise, oracle, search = _setup(X, Q, inl, K=2)
    oracle.db_inl = db_inl
    conf = ExpansionConf(order="fused", propagate=True, propagate_verify=0, db_pairs_k=3, low=30, high=80)
    new, _, stats = expand_rankings(ranks, counts, Q, lambda i: X[i], oracle, search, conf, 2, [None],
                                    verify_db=oracle.db, pairwise_ranks=pairwise)
    assert {a for a, _ in oracle.asked_db} == {0} and stats.db_pairs == 3  # only the query's verified hit
    assert new[1, 0] == 3  # db 3 reached through db 0 (min(1, 1) = 1): second


def test_plain_settings_are_pairwise_reranking() -> None:
    assert not ExpansionConf().active
    assert ExpansionConf(order="fused").active and ExpansionConf(qe_rounds=1).active
    assert ExpansionConf(propagate=True).active


def test_expansion_conf_reads_the_rerank_section_and_the_verifier_ransac() -> None:
    from delg.config import load_config
    from loftr_tools.ransac import RansacConf

    conf = load_config(None, ["rerank.order=fused", "rerank.qe_rounds=2"])
    rc = RansacConf.from_conf(conf.sift.ransac)
    x = ExpansionConf.from_conf(conf.rerank, rc)
    assert x.order == "fused" and x.qe_rounds == 2
    assert (x.low, x.high) == (rc.evidence_low, rc.evidence_high)


@pytest.mark.parametrize("override, key", [
    ("rerank.qe_rounds=-1", "rerank.qe_rounds"),
    ("rerank.order=best", "rerank.order"),
    ("rerank.global_weight=2", "rerank.global_weight"),
    ("rerank.graph_memory_mb=0", "rerank.graph_memory_mb"),
    ("lightglue.ransac.evidence_low=-3", "lightglue.ransac.evidence_low"),
])
def test_bad_settings_are_refused(override: str, key: str) -> None:
    from delg.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_evidence_high_must_be_above_low() -> None:
    from delg.config import ConfigError
    from loftr_tools.ransac import RansacConf

    with pytest.raises(ConfigError, match="evidence_high"):
        RansacConf(evidence_low=50, evidence_high=40)


def test_junk_protocol_is_not_combined_with_expansion() -> None:
    from delg.config import ConfigError, load_config
    from loftr_tools.rerank import check_expansion

    check_expansion(load_config(None, ["rerank.junk_before_rerank=true"]))  # pairwise: fine
    with pytest.raises(ConfigError, match="junk_before_rerank"):
        check_expansion(load_config(None, ["rerank.junk_before_rerank=true", "rerank.propagate=true"]))


# ------------------------------------------------------------------------------------------- in the pipeline
FAST = ["progress=false", "num_workers=0", "device=cpu", "extract.long_side=160", "extract.scales=[0.7071, 1.0, 1.4142]",
        "rerank.methods=[sift]", "rerank.top_k=4", "sift.long_side=320", "report.enabled=false"]
BEYOND = ["rerank.order=fused", "rerank.qe_rounds=1", "rerank.qe_top_k=6", "rerank.propagate=true",
          "rerank.db_pairs_k=3", "rerank.propagate_verify=3", "sift.ransac.evidence_low=8", "sift.ransac.evidence_high=40"]


class _NoGroundTruth:
    def __getattr__(self, name: str):
        raise AssertionError(f"ground truth read during reranking: .{name}")


def test_pipeline_records_resumes_and_never_reads_ground_truth(tiny_bench, tmp_path, capsys) -> None:
    """The tiny benchmark (cropped queries, so the graph comes from database-side pairs) through delg.retrieve: the
    steps run, results.json records their settings and counts, a second run verifies nothing new (the inlier cache
    answers every pair), and the reranking itself never touches the ground truth."""
    import json
    from dataclasses import replace

    from delg.config import load_config
    from delg.data.dataset import load_dataset
    from delg.evaluate import evaluate
    from delg.retrieve import main
    from loftr_tools.rerank import rerank_methods

    conf = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", f"dataset.root={tiny_bench}", *FAST, *BEYOND])
    res = json.loads(main(conf).read_text())
    rec = res["protocol"]["verifiers"]["sift"]["beyond_pairwise"]
    assert rec["order"] == "fused" and rec["qe_rounds"] == 1 and rec["propagate"] is True and rec["db_pairs_k"] == 3
    assert (rec["low"], rec["high"]) == (8.0, 40.0)  # the verifier's own evidence range
    assert rec["queries_with_hits"] > 0 and rec["db_pairs"] > 0 and rec["qe_pairs"] > 0
    saved = np.load(tmp_path / "ranks" / "rerank-sift.npz")
    ranks, inl = saved["ranks"], saved["inliers"]
    gnd = load_dataset(conf).gnd
    assert res["methods"]["sift"] == evaluate(gnd, ranks, n_db=res["n_db"])
    assert all(sorted(ranks[:, c]) == list(range(res["n_db"])) for c in range(ranks.shape[1]))  # permutations
    assert inl.shape == (4, ranks.shape[1]) and (inl >= -1).all()
    capsys.readouterr()

    main(conf)  # again: every pair comes from the inlier cache
    out = capsys.readouterr().out
    assert " 0 matched" in out and "[sift]" in out, out

    # the reranking with a dataset whose ground truth raises on any access gives the same rankings
    dataset = load_dataset(conf)
    g = np.load(tmp_path / "ranks" / "global.npy")
    s = np.load(tmp_path / "ranks" / "global_scores.npy")
    run = rerank_methods(conf, replace(dataset, gnd=_NoGroundTruth()), g, s)[0]
    np.testing.assert_array_equal(run.ranks, ranks)


def test_two_hop_propagation_follows_the_widest_path() -> None:
    g = VerifiedGraph(max_edges=100)
    g.add(1, 2, 0.9)
    g.add(2, 3, 0.7)
    g.add(3, 4, 1.0)
    g.add(1, 5, 0.3)
    g.add(5, 3, 1.0)
    one = propagate({1: 0.8}, g, hops=1)
    assert one == {2: 0.8, 5: 0.3}
    two = propagate({1: 0.8}, g, hops=2)
    # 3: via 2 min(0.8, 0.7) = 0.7 beats via 5 min(0.3, 1.0) = 0.3; 4 needs three links; the hit itself is
    # reached back through 2 (hits linked to each other get propagated evidence too, as with one hop)
    assert two == {2: 0.8, 5: 0.3, 3: 0.7, 1: 0.8}
    three = propagate({1: 0.8}, g, hops=3)
    assert three[4] == 0.7 and three[3] == 0.7


def test_expansion_conf_defaults_are_the_yaml_defaults() -> None:
    """The dataclass defaults (bare calls, tests) are those of delg/conf/rerank.yaml: one meaning for each key."""
    from delg.config import load_config

    rc = load_config(None).rerank
    bare = ExpansionConf()
    for key in ExpansionConf.__dataclass_fields__:
        if key not in ("low", "high"):  # the verifier's own, from <section>.ransac
            assert getattr(bare, key) == rc[key], key
