"""Training-free reranking of a global ranking with global descriptors only: SuperGlobal's reranking.

Shao et al., "Global Features are All You Need for Image Retrieval and Reranking", ICCV 2023 (the reranking half of
SuperGlobal; its GeM variants are a matter of extraction and not here).  The formulas follow the authors' code
(github.com/ShihaoShao-GH/SuperGlobal, ``modules/reranking/MDescAug.py`` and ``RerankwMDA.py``, their defaults
M=400, K=9, beta=0.15), the official implementation; the paper's own equations could not be read where this was
written (only its abstract: "update the global features of the query and top-ranked images by
only considering feature refinement with a small set of images").  Written here in NumPy; for one query ``q`` (D,)
and its top-M candidates ``d_1..d_M`` (unit vectors, global order):

1. **Refine each candidate with its neighbours among the top M** (the code's "top-M descriptor augmentation"; the
   neighbours are searched among the query's own M candidates, not the whole database, which is what keeps it cheap:
   one M x M Gram matrix per query, no second pass over the index)::

       s_ij  = d_i . d_j
       N(i)  = the K candidates j != i with the largest s_ij
       d_i^r = (d_i + sum_{j in N(i)} beta * s_ij * d_j) / (1 + sum_{j in N(i)} beta * s_ij)

   a weighted average (not re-normalised) with weight 1 for the image itself and ``beta * s_ij`` for a neighbour.
2. **Score the refined candidates**: ``s1_i = q . d_i^r``.
3. **Expand the query by max-pooling**: ``q^e = max_elementwise(d^r_j for the K+1 best candidates by s1)``.
4. **Re-score**: ``score_i = (s1_i + q^e . d_i^r) / 2``; the M candidates are sorted by it, the rows below M keep their
   place (and their order).

Where this differs from the reference code, and why:

* the image itself is taken explicitly as the weight-1 term and excluded from ``N(i)``; the reference code takes the
  first K+1 of a sort of ``s_i.`` and gives weight 1 to the first, which is the image itself only while no other
  candidate is at least as similar (a duplicate, or vectors that are not exactly unit, e.g. IVF-PQ reconstructions);
* neighbour weights use ``max(s_ij, 0)``: with negative similarities the denominator could reach 0 (the reference
  code does not clip; the K nearest of 400 candidates are normally positively similar, and then nothing changes);
* ties are broken by the global order (stable sorts) where the reference code's ``argsort`` leaves them arbitrary;
* none in steps 2-4: ``q^e`` pools the K+1 best refined candidates and not the query itself, and the second term
  compares it with the *refined* candidates, both as the reference code does (pooling the query too, or comparing
  ``q^e`` with the raw candidates, moved Medium mAP by -0.5 to +1.1 on the README's two small benchmarks);
* when fewer than K+1 candidates exist (a tiny database, or ``M`` cut to ``n_db``), K is cut to ``M - 1``;
* in this project (:mod:`delg.search`) the candidates' vectors are read back from the FAISS index, as alpha-QE's are:
  exact with a flat index, the 8-bit copy with IVF-PQ + ``search.refine``, DBA's vectors with ``search.dba_k``; the
  query is the one the search used (alpha-QE's with ``search.qe_k``); images without features are never candidates;
* the written score of a re-scored row is floored at the first row below M (:func:`rerank_column`).

Pure NumPy, no I/O: :mod:`delg.search` calls :func:`rerank_column` for every query when ``search.superglobal`` is on.
"""

from __future__ import annotations

import numpy as np

__all__ = ["expand_query", "refine_candidates", "rerank_column", "superglobal_scores"]


def refine_candidates(cands: np.ndarray, k: int, beta: float) -> np.ndarray:
    """Each candidate averaged with its ``k`` nearest other candidates (step 1 of the module doc).

    Args:
        cands: (M, D) candidate descriptors (unit norm), best first.
        k: neighbours per candidate (cut to ``M - 1``); 0 returns the candidates unchanged.
        beta: weight factor of a neighbour (``beta * max(s_ij, 0)``; the image itself weighs 1).

    Returns:
        (M, D) float32 refined descriptors ``d^r`` (weighted averages, not re-normalised).
    """
    x = np.asarray(cands, np.float32)
    m = len(x)
    k = min(int(k), m - 1)
    if k <= 0:
        return x.copy()
    sims = x @ x.T  # (M, M)
    np.fill_diagonal(sims, -np.inf)  # the image itself is the weight-1 term, never its own neighbour
    nn = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (M, k): ties keep the better global rank
    w = float(beta) * np.maximum(np.take_along_axis(sims, nn, 1), 0)  # (M, k)
    num = x + np.einsum("mk,mkd->md", w, x[nn])
    return (num / (1.0 + w.sum(axis=1, keepdims=True))).astype(np.float32)


def expand_query(refined: np.ndarray, first_scores: np.ndarray, r: int) -> np.ndarray:
    """The expanded query: element-wise maximum of the ``r`` refined candidates scoring best (step 3).

    Args:
        refined: (M, D) refined candidates ``d^r``.
        first_scores: (M,) ``q . d^r`` (ties: the better global rank first).
        r: candidates pooled (cut to ``M``).

    Returns:
        (D,) float32 ``q^e`` (not normalised).
    """
    top = np.argsort(-np.asarray(first_scores), kind="stable")[: max(1, min(int(r), len(refined)))]
    return np.asarray(refined, np.float32)[top].max(axis=0)


def superglobal_scores(query: np.ndarray, cands: np.ndarray, k: int, beta: float) -> np.ndarray:
    """SuperGlobal score of every candidate (steps 1-4): ``(q . d^r + q^e . d^r) / 2``.

    Args:
        query: (D,) query descriptor; cands: (M, D) its top-M candidates, best first.
        k: neighbours of the refinement, and ``k + 1`` candidates pooled into ``q^e`` (both cut to the M given).
        beta: neighbour weight factor.

    Returns:
        (M,) float32 scores, aligned with ``cands``.
    """
    if len(cands) == 0:
        return np.zeros(0, np.float32)
    refined = refine_candidates(cands, k, beta)
    s1 = refined @ np.asarray(query, np.float32)
    q_exp = expand_query(refined, s1, int(k) + 1)
    return ((s1 + refined @ q_exp) / 2).astype(np.float32)


def rerank_column(
    query: np.ndarray, cands: np.ndarray, ids: np.ndarray, scores: np.ndarray, k: int, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """One query's ranking with its top ``len(cands)`` rows reordered by :func:`superglobal_scores`.

    Args:
        query: (D,) query descriptor.
        cands: (M, D) descriptors of ``ids[:M]`` (the candidates: images with features, best first).
        ids: (R,) database indices of the ranking, ``R >= M``; scores: (R,) their similarities (descending).
        k, beta: as :func:`superglobal_scores`.

    Returns:
        ``(ids, scores)`` (R,) each: the first M rows sorted by SuperGlobal score (ties keep the global order), the
        rows below M unchanged.  A reranked row's score is its SuperGlobal score, floored at the score of row M (the
        first row not reranked) so that the column stays non-increasing: whoever breaks ties by score (the local
        verification does) keeps this order.
    """
    m = len(cands)
    new_ids, new_sc = np.array(ids, np.int64, copy=True), np.array(scores, np.float32, copy=True)
    if m == 0:
        return new_ids, new_sc
    sg = superglobal_scores(query, cands, k, beta)
    order = np.argsort(-sg, kind="stable")
    new_ids[:m] = new_ids[:m][order]
    floor = new_sc[m] if m < len(new_sc) else -np.inf
    new_sc[:m] = np.maximum(sg[order], floor)
    return new_ids, new_sc
