"""Beyond pairwise reranking: score fusion, verified query expansion and propagation over verified pairs.

Pairwise reranking (:mod:`loftr_tools.rerank`) only reorders the global top K by the inliers each candidate shares
with the query: a positive that the global stage ranks below K, or that matches the query poorly (night, a far view)
but matches another verified image well, is never recovered. This module works on what verification found, with one
scoring function and no ground truth:

* **Evidence** of a pair: ``e(n) = clip((n - low) / (high - low), 0, 1)`` of its inlier count ``n``
  (:func:`evidence`). Counts at or below ``low`` are no evidence (the counts RANSAC finds between unrelated images
  sit there: false pairs of DISK + LightGlue with a fundamental matrix at 3 px share a median of 18 inliers on the
  real photos); ``high`` and above is certain.
* **Score fusion** (:func:`fused_scores`): every ranked image gets
  ``z = e(q, x) + propagation_weight * p(q, x) + global_weight * s(q', x)`` where ``e(q, x)`` is the direct evidence
  (0 when the pair was not verified), ``p`` the propagated evidence (below) and ``s(q', x)`` the global similarity
  to the expanded query (the plain query without expansion). The images scored are the global top K, the
  expanded query's top ``qe_top_k`` and the images propagation reaches; they are ordered by ``z`` (ties: global
  rank) and the rest of the global ranking follows unchanged.
* **Verified query expansion** (:func:`expand_query`): ``q' = normalise(q + sum_x e(q, x) x)`` over the verified
  hits (alpha-QE with the verified evidence as the weights instead of a power of the similarity, so an unverified
  neighbour never enters the expansion). The database is searched again with ``q'`` and the new candidates in its
  top ``qe_top_k`` are verified against the query (pairs already matched come from the inlier cache); with
  ``qe_rounds`` > 1 the expansion is redone with what the last round verified.
* **Propagation** (:func:`propagate`): the pairs verified in the run (every query's, for folder datasets where the
  queries are database images too, plus optional database-side pairs: each database image against its own global
  top ``db_pairs_k``) form a graph of evidence between database images. An image ``b`` that the query reaches
  through a verified image ``a`` gets ``p(q, b) = max_a min(e(q, a), e(a, b))``: the strength of its best verified
  path (a bottleneck, so one weak link is never outweighed by a strong one); with ``propagation_hops: 2`` paths may
  run through two verified links (query -> a -> b -> c). The ``propagate_verify`` best images
  that propagation reaches and the query has not been verified against are then verified directly.

A query without a verified hit (no count above ``low``) keeps its pairwise ranking. ``order: inliers`` with
``qe_rounds: 0`` and ``propagate: false`` is plain pairwise reranking (the DELG paper's protocol); the steps can be
combined freely, and :mod:`bench.beyond_pairwise` measures each.

Everything here is arrays in, arrays out; the reranker supplies verification (``verify``) and the global search
(``search``) as callables, so the same code runs on a real run and on a precomputed inlier matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Bytes one edge of the verified graph costs (two int32 ends, a float32 evidence and dict overhead, rounded up): the
# graph keeps the strongest edges that fit rerank.graph_memory_mb.
EDGE_BYTES = 64


@dataclass(frozen=True)
class ExpansionConf:
    """The settings of this module (keys of the ``rerank`` section; see ``delg/conf/rerank.yaml``)."""

    order: str = "inliers"  # inliers (pure inlier order, global similarity breaks ties) | fused
    low: float = 30.0  # inlier counts <= low: no evidence
    high: float = 80.0  # counts >= high: full evidence
    global_weight: float = 0.1  # weight of the (expanded) global similarity in the fused score
    qe_rounds: int = 0  # verified query expansion rounds (0 = off)
    qe_top_k: int = 15  # candidates of the expanded query's ranking verified in each round
    propagate: bool = False  # propagation over verified pairs
    propagation_weight: float = 1.0  # weight of the propagated evidence in the fused score
    propagation_hops: int = 1  # edges of a propagation path beyond the first verified hit
    propagate_verify: int = 10  # best images reached by propagation verified directly against the query
    db_pairs_k: int = 0  # database-side pairs: each database image verified against its global top k (0 = off)
    graph_memory_mb: float = 256.0  # memory budget of the verified graph

    @classmethod
    def from_conf(cls, rc: Mapping[str, Any], ransac: Any = None) -> ExpansionConf:
        """From the ``rerank`` section (a :class:`~delg.config.Config` or a plain mapping) and the verifier's RANSAC
        settings (:class:`~loftr_tools.ransac.RansacConf`: ``evidence_low`` / ``evidence_high``)."""
        names = [k for k in cls.__dataclass_fields__ if k not in ("low", "high")]
        kwargs: dict[str, Any] = {k: rc.get(k) for k in names if rc.get(k) is not None}
        if ransac is not None:
            kwargs.update(low=float(ransac.evidence_low), high=float(ransac.evidence_high))
        return cls(**kwargs)

    @property
    def active(self) -> bool:
        """False for plain pairwise reranking (pure inlier order, no expansion, no propagation)."""
        return self.order != "inliers" or self.qe_rounds > 0 or self.propagate

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def evidence(inliers: np.ndarray | float, low: float, high: float) -> np.ndarray:
    """``clip((n - low) / (high - low), 0, 1)`` of inlier counts ``n`` (any shape); an image paired with itself
    (``IDENTICAL_INLIERS``) is no evidence about anything else and scores 0 here (callers leave it out)."""
    from loftr_tools.base import IDENTICAL_INLIERS

    n = np.asarray(inliers, dtype=np.float64)
    e = np.clip((n - low) / max(high - low, 1e-9), 0.0, 1.0)
    return np.where(n >= IDENTICAL_INLIERS, 0.0, e)


def expand_query(q: np.ndarray, hits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Verified query expansion of one query.

    Args:
        q: (D,) the query's global descriptor (L2-normalised).
        hits: (H, D) global descriptors of its verified hits.
        weights: (H,) their evidence (> 0).

    Returns:
        (D,) ``normalise(q + sum_h weights[h] * hits[h])`` (``q`` itself when there is no hit).
    """
    q = np.asarray(q, np.float64)
    v = q + np.asarray(weights, np.float64) @ np.asarray(hits, np.float64).reshape(len(weights), q.shape[-1])
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


@dataclass
class VerifiedGraph:
    """Evidence between database images from verified pairs, within a memory budget.

    ``add`` keeps every edge with evidence > 0 and prunes to the strongest ``max_edges`` whenever twice that many
    are held; :meth:`prune` does the same at the end. ``with_budget`` sets ``max_edges`` to half of what the budget
    holds, so the graph never holds more than its budget. Dropped edges are counted and logged.
    """

    max_edges: int
    adj: dict[int, dict[int, float]] = field(default_factory=dict)
    n_edges: int = 0
    dropped: int = 0

    @classmethod
    def with_budget(cls, memory_mb: float) -> VerifiedGraph:
        return cls(max_edges=max(1, int(memory_mb * 2**20 // EDGE_BYTES // 2)))

    def add(self, a: int, b: int, e: float) -> None:
        if a == b or e <= 0:
            return
        old = self.adj.get(a, {}).get(b)
        if old is None:
            self.n_edges += 1
        if old is None or e > old:
            self.adj.setdefault(a, {})[b] = float(e)
            self.adj.setdefault(b, {})[a] = float(e)
        if self.n_edges >= 2 * self.max_edges:
            self.prune()

    def prune(self) -> None:
        """Keep at most ``max_edges`` edges: the strongest."""
        if self.n_edges <= self.max_edges:
            return
        edges = sorted({(min(a, b), max(a, b), e) for a, nb in self.adj.items() for b, e in nb.items()},
                       key=lambda t: -t[2])
        kept = edges[: self.max_edges]
        self.dropped += len(edges) - len(kept)
        self.adj, self.n_edges = {}, len(kept)
        for a, b, e in kept:
            self.adj.setdefault(a, {})[b] = e
            self.adj.setdefault(b, {})[a] = e
        log.warning("verified graph: %d weakest edges dropped to stay within rerank.graph_memory_mb", self.dropped)

    def neighbours(self, a: int) -> dict[int, float]:
        return self.adj.get(a, {})


def propagate(direct: Mapping[int, float], graph: VerifiedGraph, hops: int = 1) -> dict[int, float]:
    """Propagated evidence of one query: the strength of its widest path to each image, ``hops`` edges at most.

    With one hop ``p(b) = max_a min(e(q, a), e(a, b))`` over the query's verified hits ``a``; each further hop
    continues from what the last one reached: ``p(b) = max(p(b), max_a min(p(a), e(a, b)))``. A path is as strong as
    its weakest link (a bottleneck), so one weak link is never outweighed by strong ones.

    Args:
        direct: database index -> direct evidence ``e(q, a) > 0`` of the query's verified hits.
        graph: evidence between database images.
        hops: path length beyond the first verified hit (1 = hits' neighbours).

    Returns:
        database index -> ``p(b)`` for every image reached (the hits themselves included when linked to each other).
    """
    out: dict[int, float] = {}
    frontier: Mapping[int, float] = direct
    for _ in range(max(1, int(hops))):
        nxt: dict[int, float] = {}
        for a, ea in frontier.items():
            for b, eab in graph.neighbours(a).items():
                v = min(ea, eab)
                if v > out.get(b, 0.0) and v > nxt.get(b, 0.0):
                    nxt[b] = v
        if not nxt:
            break
        out.update(nxt)
        frontier = nxt
    return out


def fused_scores(ev: np.ndarray, prop: np.ndarray, sim: np.ndarray, conf: ExpansionConf) -> np.ndarray:
    """The one scoring function of the fused order: ``e + propagation_weight * p + global_weight * s``.

    Args:
        ev: (N,) direct evidence (0 where not verified); prop: (N,) propagated evidence; sim: (N,) similarity to
            the (expanded) query.
    """
    w = conf.propagation_weight if conf.propagate else 0.0
    return np.asarray(ev, np.float64) + w * np.asarray(prop, np.float64) + conf.global_weight * np.asarray(sim, np.float64)


# A verifier callable: {query column: [database indices]} -> {(query column, database index): raw inlier count}.
VerifyFn = Callable[[Mapping[int, Sequence[int]]], Mapping[tuple[int, int], int]]
# Global search: (n, D) vectors, k -> (sims (n, k), database indices (n, k)).
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class ExpansionStats:
    """What :func:`expand_rankings` did (logged; part of results.json)."""

    queries_with_hits: int = 0
    qe_pairs: int = 0  # pairs verified for query expansion (before the cache)
    propagation_pairs: int = 0  # pairs verified because propagation reached them
    db_pairs: int = 0  # database-side pairs
    graph_edges: int = 0
    graph_edges_dropped: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def expand_rankings(
    ranks: np.ndarray,
    counts: Mapping[tuple[int, int], int],
    qvecs: np.ndarray,
    db_vector: Callable[[np.ndarray], np.ndarray],
    verify: VerifyFn,
    search: SearchFn,
    conf: ExpansionConf,
    top_k: int,
    db_of_query: Sequence[int | None],
    verify_db: Callable[[Mapping[int, Sequence[int]]], Mapping[tuple[int, int], int]] | None = None,
    pairwise_ranks: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[tuple[int, int], int], ExpansionStats]:
    """Fusion, verified query expansion and propagation over the rankings of every query (see the module doc).

    Args:
        ranks: (R, Q) global ranking (database indices, best first); ties of the fused score keep its order.
        counts: raw inlier counts of the pairs verified so far, ``(column, db index) -> n`` (the top K).
        qvecs: (Q, D) the queries' global descriptors (L2-normalised).
        db_vector: database indices (n,) -> their (n, D) global descriptors.
        verify: scores more pairs (see :data:`VerifyFn`); counts come back raw (the cache holds them).
        search: the global search (see :data:`SearchFn`).
        top_k: the pairwise stage's K (the rows whose counts ``counts`` holds).
        db_of_query: the database index of each column's query when it is a database image too (folder datasets:
            its verified pairs are edges of the graph), else ``None``.
        verify_db: database-side pairs ``{a: [b, ...]} -> {(a, b): n}`` (``conf.db_pairs_k > 0``).
        pairwise_ranks: (R, Q) the pairwise reranking, kept by queries without a verified hit (default ``ranks``).

    Returns:
        ``(new_ranks (R, Q), counts, stats)``: ``counts`` holds every pair verified (raw counts).
    """
    from loftr_tools.base import IDENTICAL_INLIERS

    R, Q = ranks.shape
    K = max(0, min(int(top_k), R))
    counts = dict(counts)
    stats = ExpansionStats()
    kept = pairwise_ranks if pairwise_ranks is not None else ranks

    by_col: list[dict[tuple[int, int], int]] = [{} for _ in range(Q)]  # each column's verified pairs

    def ev_of(c: int) -> dict[int, float]:
        """The column's verified hits with evidence (> low), the query's own image left out."""
        return {d: float(evidence(n, conf.low, conf.high)) for (_, d), n in by_col[c].items()
                if conf.low < n < IDENTICAL_INLIERS}

    def absorb(new: Mapping[tuple[int, int], int]) -> None:
        for (c, d), n in new.items():
            counts[(c, d)] = int(n)
            by_col[c][(c, d)] = int(n)

    absorb(counts)
    expanded = np.asarray(qvecs, np.float32).copy()
    qe_candidates: list[set[int]] = [set() for _ in range(Q)]

    # -- verified query expansion ----------------------------------------------------------------------------
    for _ in range(int(conf.qe_rounds)):
        todo: dict[int, list[int]] = {}
        cols = []
        for c in range(Q):
            ev = ev_of(c)
            if not ev:
                continue
            ids = np.fromiter(ev, np.int64, len(ev))
            expanded[c] = expand_query(qvecs[c], db_vector(ids), np.array([ev[i] for i in ids]))
            cols.append(c)
        if not cols:
            break
        k = min(int(conf.qe_top_k), R)
        _, ids = search(expanded[cols], k)
        for c, row in zip(cols, ids):
            new = [int(d) for d in row if d >= 0 and (c, int(d)) not in counts]
            qe_candidates[c].update(int(d) for d in row if d >= 0)
            if new:
                todo[c] = new
        if not todo:
            break
        stats.qe_pairs += sum(len(v) for v in todo.values())
        absorb(verify(todo))

    # -- propagation ---------------------------------------------------------------------------------------
    prop: list[dict[int, float]] = [{} for _ in range(Q)]
    if conf.propagate:
        graph = VerifiedGraph.with_budget(conf.graph_memory_mb)
        if conf.db_pairs_k > 0 and verify_db is not None:
            db_ids = sorted({d for c in range(Q) for d in ev_of(c)})  # the images propagation starts from
            if db_ids:
                k = min(int(conf.db_pairs_k) + 1, R)
                _, nn = search(db_vector(np.asarray(db_ids, np.int64)), k)
                pairs = {a: [int(b) for b in row if b >= 0 and b != a][: conf.db_pairs_k] for a, row in zip(db_ids, nn)}
                stats.db_pairs += sum(len(v) for v in pairs.values())
                for (a, b), n in verify_db(pairs).items():
                    graph.add(a, b, float(evidence(n, conf.low, conf.high)))
        for (c, d), n in counts.items():
            a = db_of_query[c]
            if a is not None and n < IDENTICAL_INLIERS:
                graph.add(int(a), int(d), float(evidence(n, conf.low, conf.high)))
        graph.prune()
        stats.graph_edges, stats.graph_edges_dropped = graph.n_edges, graph.dropped
        todo = {}
        for c in range(Q):
            direct = ev_of(c)
            p = propagate(direct, graph, conf.propagation_hops)
            own = db_of_query[c]
            if own is not None:
                p.pop(own, None)  # the query's own image is not a result
            prop[c] = p
            reach = sorted((b for b in p if (c, b) not in counts), key=lambda b: -p[b])[: conf.propagate_verify]
            if reach:
                todo[c] = reach
        if todo:
            stats.propagation_pairs += sum(len(v) for v in todo.values())
            absorb(verify(todo))

    # -- fused order -----------------------------------------------------------------------------------------
    new = kept.copy()
    for c in range(Q):
        direct = ev_of(c)
        if not direct:
            continue  # no verified hit: the pairwise ranking stays
        stats.queries_with_hits += 1
        col = ranks[:, c]
        touched = list(dict.fromkeys([*map(int, col[:K]), *sorted(qe_candidates[c]), *sorted(prop[c]),
                                      *(d for (_, d) in by_col[c])]))
        ids = np.asarray(touched, np.int64)
        sim = db_vector(ids) @ expanded[c]
        ev = np.array([direct.get(int(d), 0.0) for d in ids])
        pp = np.array([prop[c].get(int(d), 0.0) for d in ids])
        if conf.order == "fused":
            z = fused_scores(ev, pp, sim, conf)
        else:  # pure inlier order (unverified images count 0), the (expanded) similarity breaks ties
            raw = np.array([by_col[c].get((c, int(d)), 0) for d in ids], np.float64)
            z = raw + np.clip(sim, -1, 1) * 1e-3
        # images paired with themselves (folder datasets) stay first, as in pairwise reranking
        ident = np.array([by_col[c].get((c, int(d)), 0) >= IDENTICAL_INLIERS for d in ids])
        pos = {int(d): i for i, d in enumerate(col)}
        grank = np.array([pos.get(int(d), R) for d in ids])
        order = np.lexsort((grank, -z, ~ident))
        head = ids[order]
        rest = col[~np.isin(col, head)]
        new[:, c] = np.concatenate([head, rest])[:R]
    return new, counts, stats
