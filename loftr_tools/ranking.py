"""The pure ranking rules of reranking (arrays in, arrays out; no images, no verifier).

* the top-K rule (:func:`topk_rows`): the first ``min(top_k, R)`` rows of each query's global ranking are
  verified, the rows below keep their global order;
* the inlier floor (:func:`floor_inliers`): counts below the verifier's ``ransac.min_inliers`` score 0, so the
  global similarity decides among them;
* the reorder (:func:`reorder_topk`): the top K ordered by (inliers desc, global similarity desc, global rank);
* the DELG paper's junk protocol (:func:`protocol_junk`, :func:`drop_junk`, :func:`protocol_variants`): with
  ``junk_before_rerank`` each protocol's junk leaves the global ranking *before* the top K is taken, giving one
  ranking per protocol (the removed images go to the bottom, so every ranking keeps its shape).

Used by the reranker (:mod:`loftr_tools.rerank`) and by the one-photo search (``delg.retrieve`` ``query=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PROTOCOLS = ("easy", "medium", "hard")


def topk_rows(top_k: int, n_rows: int) -> int:
    """How many rows of a ranking with ``n_rows`` rows are verified: ``top_k`` cut to the ranking, never below 0."""
    return max(0, min(int(top_k), int(n_rows)))


def floor_inliers(inliers: np.ndarray, min_inliers: int) -> np.ndarray:
    """A copy of ``inliers`` (any shape) with counts below ``min_inliers`` set to 0 (``min_inliers <= 0``: unchanged).

    The caches hold raw counts; the floor applies here, when ranking, so changing it rematches nothing.
    """
    out = np.array(inliers, dtype=np.int64, copy=True)
    if min_inliers > 0:
        out[out < min_inliers] = 0
    return out


def reorder_topk(ranks: np.ndarray, inliers: np.ndarray, scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Order the top rows of ``ranks`` by (inliers desc, global similarity desc); rows below stay as they are.

    Args:
        ranks: :math:`(R, Q)` database indices, each column a query's global ranking (best first).
        inliers: :math:`(K, Q)` inlier counts of ``ranks[:K]``.
        scores: :math:`(R, Q)` global similarities aligned with ``ranks``; ``None`` = the global order itself
            (identical when ``ranks`` is sorted by similarity).

    Returns:
        ``(new_ranks, new_inliers)``: :math:`(R, Q)` and :math:`(K, Q)` (the inliers follow their images).
    """
    K = inliers.shape[0]
    new = ranks.copy()
    new_inl = inliers.copy()
    for q in range(ranks.shape[1]):
        sim = scores[:K, q] if scores is not None else -np.arange(K, dtype=np.float64)
        # lexsort: last key is primary. Ties in both keep the global order (stable).
        order = np.lexsort((np.arange(K), -sim, -inliers[:, q]))
        new[:K, q] = ranks[:K, q][order]
        new_inl[:, q] = inliers[order, q]
    return new, new_inl


def protocol_junk(gnd_q: Any, protocol: str) -> np.ndarray:
    """Images ignored by ``protocol`` for one query (revisitop): easy -> junk+hard, medium -> junk, hard -> junk+easy."""
    junk = [np.asarray(gnd_q.junk, dtype=np.int64).ravel()]
    if protocol == "easy":
        junk.append(np.asarray(gnd_q.hard, dtype=np.int64).ravel())
    elif protocol == "hard":
        junk.append(np.asarray(gnd_q.easy, dtype=np.int64).ravel())
    elif protocol != "medium":
        raise ValueError(f"unknown protocol '{protocol}' (easy | medium | hard)")
    return np.concatenate(junk)


def drop_junk(ranks: np.ndarray, scores: np.ndarray | None, junk: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """Move each query's junk to the bottom of its column (relative order kept), scores alongside."""
    new = np.empty_like(ranks)
    new_s = np.empty_like(scores) if scores is not None else None
    for q in range(ranks.shape[1]):
        is_junk = np.isin(ranks[:, q], junk[q])
        order = np.concatenate([np.flatnonzero(~is_junk), np.flatnonzero(is_junk)])
        new[:, q] = ranks[order, q]
        if scores is not None:
            new_s[:, q] = scores[order, q]
    return new, new_s



def protocol_variants(
    ranks: np.ndarray, scores: np.ndarray | None, gnd_of_columns: Sequence[Any] | None
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The global rankings to rerank: ``{'all': (ranks, scores)}``, or with the DELG junk protocol
    (``gnd_of_columns``: the ground truth of each column's query) one per protocol, its junk moved to the bottom.

    Args:
        ranks: :math:`(R, Q)` global ranking; scores: :math:`(R, Q)` similarities or ``None``.
        gnd_of_columns: ``None`` (no junk protocol), or ``Q`` revisitop query entries (``junk``/``easy``/``hard``).

    Returns:
        ``{name: (ranks (R, Q), scores (R, Q) | None)}``, names ``all`` or ``easy``/``medium``/``hard``.
    """
    if gnd_of_columns is None:
        return {"all": (ranks, scores)}
    return {p: drop_junk(ranks, scores, [protocol_junk(g, p) for g in gnd_of_columns]) for p in PROTOCOLS}
