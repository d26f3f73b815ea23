"""Rerank the global top-K with a local verifier: pairs to score, their order, and the one reranking loop.

The caches are :mod:`loftr_tools.caches` (feature LRU, SQLite inlier cache and its identity); the ranking rules
(top K, ``min_inliers`` floor, reorder, junk protocol) are :mod:`loftr_tools.ranking`. :func:`rerank_methods` runs
every configured verifier over the global rankings and :func:`write_reranked` writes ``ranks/rerank-<method>.npz``:
``python -m loftr_tools.rerank`` and ``delg.retrieve`` both go through them.

The score of a (query, database) pair is the number of RANSAC inliers (:func:`loftr_tools.ransac.ransac_inliers`)
among the verifier's tentative matches. The reranked ranking of a query is its global top-K ordered by
(inliers desc, global similarity desc), followed by the untouched global ranking below K.

Ground truth is never read, with one documented exception: ``junk_before_rerank=True`` reproduces the DELG paper's
protocol, which removes each protocol's junk images (revisitop: easy -> junk+hard, medium -> junk,
hard -> junk+easy) from the global ranking *before* taking the top K. That gives one reranked ranking per protocol
(a dict ``{'easy': ranks, 'medium': ranks, 'hard': ranks}``); the removed images are appended at the bottom
(evaluation ignores junk wherever it sits), so every ranking keeps the input's shape.

Caching:

* Features: each image is prepared once while it stays in an in-memory LRU cache of ``rerank.feature_cache_mb``
  (sized with ``Verifier.feature_nbytes``). Pairs run grouped by their first image (the query; for an unordered
  pair, below, the image whose path sorts first) and groups are ordered greedily so that consecutive groups share
  images, which are then still cached. A verifier with ``match_many(f0, f1s)`` (LoFTR) gets up to
  ``<section>.batch_size`` pairs of one group at a time.
* Pairs of two whole images (no crop: folder datasets, where every query is also a database image) are unordered:
  (a, b) is matched once, in the order of the images' paths, and its count also answers (b, a); an image paired
  with itself (same file, no crop) is not matched and scores :data:`IDENTICAL_INLIERS`.
* Inliers: one SQLite file per verifier identity, ``<output_dir>/matches/inliers-<tag>-<hash>.sqlite``, where the hash
  covers the method, every setting of its section, its RANSAC settings and the inputs that are not settings (LoFTR's
  weight digest, the feature stores DELG-local reads; :func:`loftr_tools.caches.cache_identity`). It is keyed by
  (query key incl. crop, database key), or for an unordered pair by ``('pair:' + first path, second path)``. Each
  pair is committed as soon as it is scored, so a killed run loses at most the pair in progress, a rerun skips what
  is done, and another protocol (or ``top_k`` <= the cached one) reuses the counts without matching anything.
  A file SQLite cannot read (garbage, truncated: checked with ``PRAGMA quick_check`` on opening) is moved aside
  (``*.damaged-<time>.sqlite``) with one line and its pairs are verified again; ``overwrite=true`` starts it empty. (With ``match_many`` a kill loses at most the batch in progress.)

Failures: an image that cannot be read scores 0 with every partner (counted, listed in the log, not cached so a
fixed file is retried). A CUDA OOM pair is retried at smaller sizes (``rerank.oom_retry_factors``), logged.

CLI: ``python -m loftr_tools.rerank --config configs/demo.yaml rerank.methods=[lightglue]``.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from delg.config import ConfigError, dump_config
from delg.data.images import ImageReadError
from delg.errors import ProjectError
from delg.io import atomic_path
from loftr_tools.base import IDENTICAL_INLIERS, ImageRef, Verifier
from loftr_tools.caches import FeatureCache, InlierCache, _json_safe, cache_identity, identity_hash
from loftr_tools.expansion import ExpansionConf, expand_rankings
from loftr_tools.ranking import floor_inliers, protocol_variants, reorder_topk, topk_rows
from loftr_tools.ransac import RansacConf, ransac_inliers
from loftr_tools.resize import is_oom, run_with_oom_retry

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# pair order
# ---------------------------------------------------------------------------------------------------------------


def order_queries(topk: Sequence[Sequence[int]], max_greedy: int = 3000) -> list[int]:
    """Query order in which consecutive queries share many database images (greedy, starting at query 0).

    Beyond ``max_greedy`` queries the natural order is used (the greedy search is quadratic).
    """
    n = len(topk)
    if n <= 2 or n > max_greedy:
        return list(range(n))
    sets = [set(map(int, t)) for t in topk]
    left = set(range(1, n))
    order = [0]
    while left:
        prev = sets[order[-1]]
        nxt = max(sorted(left), key=lambda j: len(prev & sets[j]))
        order.append(nxt)
        left.remove(nxt)
    return order


# ---------------------------------------------------------------------------------------------------------------
# the reranker
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RerankStats:
    """What a run did; logged at the end and kept on :attr:`Reranker.stats`."""

    pairs: int = 0  # distinct pairs asked for
    cached: int = 0  # found in the inlier cache
    matched: int = 0  # scored by the verifier in this run
    failed_pairs: int = 0  # scored 0 because an image could not be read
    failed_images: dict[str, str] = field(default_factory=dict)  # image key -> error
    oom_retries: int = 0
    symmetric: int = 0  # answered by the reverse pair (two whole images, matched once)
    identical: int = 0  # an image paired with itself: not matched
    prepared: int = 0  # images prepared (feature cache misses)
    seconds: float = 0.0
    images: int = 0  # distinct images in the pairs asked for (matched or cached): what a run without cache prepares
    jobs: int = 0  # distinct pairs asked for over all calls (matched or cached): what a run without cache matches
    prepare_seconds: float = 0.0  # of which preparing images (features)
    match_seconds: float = 0.0  # of which matching + RANSAC of the pairs matched

    def summary(self) -> str:
        s = f"{self.pairs} pairs: {self.cached} cached, {self.matched} matched, {self.failed_pairs} failed"
        if self.symmetric or self.identical:
            s += f", {self.symmetric} answered by the reverse pair, {self.identical} identical"
        s += f"; {self.prepared} images prepared; {self.oom_retries} OOM retries; {self.seconds:.1f} s"
        if self.failed_images:
            s += f"; {len(self.failed_images)} unreadable images: " + "; ".join(self.failed_images.values())
        return s


def _query_key(ref: ImageRef) -> str:
    # The crop is part of the key: the same query uncropped is a different pair.
    if ref.crop is None:
        return ref.key
    return ref.key + "@" + ",".join(f"{float(c):g}" for c in ref.crop)


@functools.lru_cache(maxsize=1 << 16)
def _resolved(path: Path) -> str:
    return str(Path(path).resolve())


def dataset_refs(dataset: Any) -> tuple[list[ImageRef], list[ImageRef]]:
    """``(query_refs, db_refs)`` of a :class:`~delg.data.dataset.RetrievalDataset` (queries carry their bbx)."""
    q = [ImageRef(key=f"query/{n}", name=n, path=Path(p), crop=tuple(b) if b is not None else None)
         for n, p, b in zip(dataset.query_names, dataset.query_paths, dataset.query_bbx)]
    d = [ImageRef(key=f"db/{n}", name=n, path=Path(p)) for n, p in zip(dataset.db_names, dataset.db_paths)]
    return q, d


class Reranker:
    """Scores (query, db) pairs with a verifier + the shared RANSAC, with feature and inlier caches.

    Args:
        verifier: a built :class:`~loftr_tools.base.Verifier`.
        ransac: RANSAC settings (mapping or :class:`~loftr_tools.ransac.RansacConf`); ``None`` = the verifier's own
            (``verifier.conf['ransac']``, i.e. ``<section>.ransac``), bare :class:`RansacConf` defaults without one.
        cache_path: SQLite inlier cache file, or ``None`` for in-memory only.
        feature_cache_mb: budget of the in-memory feature cache.
        progress: show a tqdm bar (pairs/s).
        oom_retry_factors: size factors tried in turn when a pair runs out of GPU memory.
        min_inliers: counts below this score 0 (the global similarity then decides); ``None`` = the RANSAC
            settings' ``min_inliers``. The cache holds raw counts; the floor is applied when reranking.
    """

    def __init__(
        self,
        verifier: Verifier,
        ransac: Mapping[str, Any] | RansacConf | None = None,
        cache_path: str | Path | None = None,
        feature_cache_mb: float = 2048,
        progress: bool = False,
        oom_retry_factors: Sequence[float] = (1.0, 0.75, 0.5),
        min_inliers: int | None = None,
    ) -> None:
        self.verifier = verifier
        self.ransac = RansacConf.from_conf(ransac if ransac is not None else verifier.conf.get("ransac"))
        self.min_inliers = int(self.ransac.min_inliers if min_inliers is None else min_inliers)
        # Raw counts are cached (min_inliers applies at reranking), so the floor can change without rematching.
        self._ransac_raw = replace(self.ransac, min_inliers=0)
        self.identity = cache_identity(verifier, self.ransac)
        self.cache = InlierCache(cache_path, tag=json.dumps(self.identity, sort_keys=True, default=str))
        self.features = FeatureCache(int(feature_cache_mb * 2**20), verifier.feature_nbytes)
        self.progress = progress
        self.oom_factors = tuple(oom_retry_factors) or (1.0,)
        self.stats = RerankStats()
        # Inlier correspondences of pairs matched in this run, so report pictures need no second match.
        self.kept_inliers: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self.keep_inlier_pairs = 50_000
        self.last_counts: dict[tuple[str, str], int] = {}
        self._touched: set[str] = set()  # feature keys of every image in a pair asked for (RerankStats.images)
        self._jobs: set[tuple[str, str]] = set()  # cache keys of every pair asked for (RerankStats.jobs)

    @staticmethod
    def default_cache_path(
        output_dir: str | Path, verifier: Verifier, ransac: Mapping[str, Any] | RansacConf | None = None
    ) -> Path:
        """``<output_dir>/matches/inliers-<verifier tag>-<ransac tag>-<identity hash>.sqlite``; ``ransac=None`` =
        the verifier's own (as :class:`Reranker` resolves it)."""
        rc = RansacConf.from_conf(ransac if ransac is not None else verifier.conf.get("ransac"))
        tag = f"{verifier.cache_tag()}-{rc.tag()}-{identity_hash(cache_identity(verifier, rc))}"
        safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in tag)
        return Path(output_dir) / "matches" / f"inliers-{safe}.sqlite"

    def settings(self) -> dict[str, Any]:
        """This reranker's verifier settings for results.json: method, resolved section (``long_side`` etc.), the
        RANSAC settings used and the inlier cache's identity digest."""
        ident = _json_safe(self.verifier.identity())
        return {"method": self.verifier.name, "settings": ident.pop("settings", {}),
                "ransac": self.ransac.to_dict(), **ident, "cache_identity": identity_hash(self.identity)}

    # -- features -------------------------------------------------------------------------------------------

    def _feature_key(self, ref: ImageRef) -> str:
        """Image verifiers' features depend only on (path, crop), so an image that is both a query and a database
        image (folder datasets) is prepared once; verifiers reading stores (``reads_store``) key by split too."""
        if self.verifier.reads_store:
            return ref.key
        return f"{ref.path}@{ref.crop}"

    def _prepare(self, ref: ImageRef) -> Any | None:
        """Cached features of ``ref``; ``None`` (and counted) if the image cannot be read."""
        if ref.key in self.stats.failed_images:
            return None
        feats = self.features.get(self._feature_key(ref))
        if feats is not None:
            return feats
        t = time.perf_counter()
        try:
            feats = self.verifier.prepare(ref)
        except ImageReadError as e:
            self.stats.failed_images[ref.key] = str(e)
            log.warning("skipping unreadable image: %s", e)
            return None
        self.stats.prepared += 1
        self.stats.prepare_seconds += time.perf_counter() - t
        self.features.put(self._feature_key(ref), feats)
        return feats

    def _score(self, q: ImageRef, d: ImageRef) -> tuple[int, int] | None:
        """``(inliers, matches)`` of a pair, or ``None`` if one image is unreadable."""

        def attempt(factor: float) -> tuple[np.ndarray, np.ndarray] | None:
            if factor == 1.0:  # the usual size: cached features
                f0, f1 = self._prepare(q), self._prepare(d)
                if f0 is None or f1 is None:
                    return None
                return self.verifier.match(f0, f1)
            # Smaller size, passed explicitly (settings stay read-only): prepare this pair afresh (not cached).
            self.stats.oom_retries += 1
            return self.verifier.match(self.verifier.prepare(q, factor), self.verifier.prepare(d, factor))

        try:
            res = run_with_oom_retry(attempt, self.oom_factors, f"pair {q.key} / {d.key}")
        except ImageReadError as e:
            self.stats.failed_images.setdefault(q.key if str(q.path) in str(e) else d.key, str(e))
            return None
        if res is None:
            return None
        p0, p1 = res
        return self._verify(q, d, p0, p1)

    def _verify(self, q: ImageRef, d: ImageRef, p0: np.ndarray, p1: np.ndarray) -> tuple[int, int]:
        """RANSAC on a pair's matches: ``(inliers, matches)``; the inlier points are kept for report pictures."""
        mask, n = ransac_inliers(p0, p1, conf=self._ransac_raw)
        if len(self.kept_inliers) < self.keep_inlier_pairs:
            m = np.asarray(mask, bool).reshape(-1)
            self.kept_inliers[(self._feature_key(q), self._feature_key(d))] = (np.asarray(p0)[m], np.asarray(p1)[m])
        return n, len(p0)

    def _score_many(self, q: ImageRef, ds: Sequence[ImageRef]) -> list[tuple[int, int] | None]:
        """Like ``[self._score(q, d) for d in ds]`` through the verifier's batched ``match_many(f0, f1s)``.

        A chunk that runs out of memory falls back to pair by pair (with the smaller-size retries).
        """
        fq = self._prepare(q)
        if fq is None:
            return [None] * len(ds)
        feats = [self._prepare(d) for d in ds]
        ok = [i for i, f in enumerate(feats) if f is not None]
        out: list[tuple[int, int] | None] = [None] * len(ds)
        try:
            matches = self.verifier.match_many(fq, [feats[i] for i in ok])
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            log.warning("out of memory on a batch of %d pairs of %s; matching them one by one", len(ok), q.key)
            return [self._score(q, d) for d in ds]
        for i, (p0, p1) in zip(ok, matches):
            out[i] = self._verify(q, ds[i], p0, p1)
        return out

    # -- pairs ----------------------------------------------------------------------------------------------

    def _pair_job(self, q: ImageRef, d: ImageRef) -> tuple[tuple[str, str] | None, ImageRef, ImageRef]:
        """Cache key of a pair and the order its images are matched in.

        Two whole images (no crop) form an unordered pair: key and order follow their resolved paths, so (a, b) and
        (b, a) are one job whichever is asked first (a resumed run scores them exactly as an uninterrupted one).
        The key is ``None`` for an image paired with itself. Verifiers that read feature stores keep (query, db).
        """
        if q.crop is None and d.crop is None and not self.verifier.reads_store:
            a, b = _resolved(q.path), _resolved(d.path)
            if a == b:
                return None, q, d
            return (("pair:" + a, b), q, d) if a < b else (("pair:" + b, a), d, q)
        return (_query_key(q), d.key), q, d

    def score_pairs(self, pairs: Mapping[ImageRef, Sequence[ImageRef]]) -> dict[tuple[str, str], int]:
        """Inlier counts of ``{query_ref: [db_refs]}``, keyed by ``(query_ref.key, db_ref.key)``.

        Cached pairs are read, the rest matched (grouped by first image, groups ordered to reuse cached features)
        and written to the cache one by one. Pairs with an unreadable image score 0 (not cached).
        """
        t0 = time.time()
        job_of: dict[tuple[str, str], tuple[str, str] | None] = {}
        jobs: dict[tuple[str, str], tuple[ImageRef, ImageRef]] = {}
        for q in pairs:
            for d in pairs[q]:
                key, first, second = self._pair_job(q, d)
                job_of[(q.key, d.key)] = key
                if key is not None:
                    jobs.setdefault(key, (first, second))
        n_identical = sum(k is None for k in job_of.values())
        self._touched.update(self._feature_key(r) for pair in jobs.values() for r in pair)
        self._jobs.update(jobs)
        self.stats.images, self.stats.jobs = len(self._touched), len(self._jobs)
        self.stats.pairs += len(job_of)
        self.stats.identical += n_identical
        self.stats.symmetric += len(job_of) - n_identical - len(jobs)
        done = self.cache.get_many(jobs)
        self.stats.cached += len(done)

        # Jobs grouped by their first image (one prepare, and one match_many batch for LoFTR).
        groups: dict[str, tuple[ImageRef, list[ImageRef], list[tuple[str, str]]]] = {}
        for key, (first, second) in jobs.items():
            if key not in done:
                g = groups.setdefault(self._feature_key(first), (first, [], []))
                g[1].append(second)
                g[2].append(key)
        group_list = list(groups.values())
        second_index = {k: i for i, k in enumerate(dict.fromkeys(self._feature_key(s) for g in group_list for s in g[1]))}
        order = order_queries([[second_index[self._feature_key(s)] for s in g[1]] for g in group_list])
        n_todo = sum(len(g[1]) for g in group_list)
        bar = None
        if self.progress and n_todo:
            from tqdm import tqdm

            bar = tqdm(total=n_todo, desc=f"rerank {self.verifier.name}", unit="pair", dynamic_ncols=True)
        # Verifiers with a batched match_many (LoFTR) get chunks of one first image's pairs.
        batch = max(1, int(self.verifier.batch_size))
        try:
            for gi in order:
                first, seconds, keys = group_list[gi]
                # Images already in the feature cache first, before later ones can evict them.
                todo = sorted(zip(seconds, keys), key=lambda sk: self._feature_key(sk[0]) not in self.features)
                for s in range(0, len(todo), max(1, batch)):
                    chunk = todo[s : s + max(1, batch)]
                    refs = [sk[0] for sk in chunk]
                    t, prep = time.perf_counter(), self.stats.prepare_seconds
                    results = self._score_many(first, refs) if batch > 1 else [self._score(first, refs[0])]
                    self.stats.match_seconds += time.perf_counter() - t - (self.stats.prepare_seconds - prep)
                    for (_, key), r in zip(chunk, results):
                        if r is None:
                            self.stats.failed_pairs += 1
                            done[key] = 0
                        else:
                            self.stats.matched += 1
                            self.cache.put(key[0], key[1], r[0], r[1])
                            done[key] = r[0]
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        self.stats.seconds += time.time() - t0
        return {qd: IDENTICAL_INLIERS if key is None else done[key] for qd, key in job_of.items()}

    def rerank(
        self,
        dataset: Any,
        ranks: np.ndarray,
        scores: np.ndarray | None = None,
        top_k: int = 100,
        junk_before_rerank: bool = False,
        query_ids: Sequence[int] | None = None,
    ) -> tuple[np.ndarray | dict[str, np.ndarray], np.ndarray | dict[str, np.ndarray]]:
        """Rerank the global top-``top_k`` of each query; see the module docstring.

        Args:
            dataset: a :class:`~delg.data.dataset.RetrievalDataset` (paths, names, query bbx; ``gnd`` only read
                with ``junk_before_rerank``).
            ranks: :math:`(R, Q)` int global ranking (database row indices, best first), ``R <= n_db``.
            scores: :math:`(R, Q)` global similarities aligned with ``ranks``, or ``None``.
            top_k: how many of the global ranking to verify (cut to ``R``).
            junk_before_rerank: DELG protocol (reads the ground truth's junk): one ranking per protocol.
            query_ids: dataset query index of each column of ``ranks`` (default ``range(Q)``).

        Returns:
            ``(new_ranks, inliers)``: :math:`(R, Q)` and :math:`(K, Q)` arrays, or dicts protocol -> array with
            ``junk_before_rerank``.
        """
        ranks = np.asarray(ranks)
        if ranks.ndim != 2:
            raise ValueError(f"ranks must be (n_rows, n_queries), got shape {ranks.shape}")
        if scores is not None:
            scores = np.asarray(scores)
            if scores.shape != ranks.shape:
                raise ValueError(f"scores {scores.shape} and ranks {ranks.shape} must have the same shape")
        qrefs, drefs = dataset_refs(dataset)
        qids = list(query_ids) if query_ids is not None else list(range(ranks.shape[1]))
        if len(qids) != ranks.shape[1]:
            raise ValueError(f"{len(qids)} query_ids for {ranks.shape[1]} columns of ranks")
        K = topk_rows(top_k, ranks.shape[0])
        variants = protocol_variants(ranks, scores, [dataset.gnd.gnd[q] for q in qids] if junk_before_rerank else None)

        pairs: dict[ImageRef, dict[str, ImageRef]] = {}
        for r, _ in variants.values():
            for c, qid in enumerate(qids):
                # dict keeps order and drops the db images that several protocols share
                lst = pairs.setdefault(qrefs[qid], {})
                for i in r[:K, c]:
                    lst.setdefault(drefs[i].key, drefs[i])
        counts = self.score_pairs({q: list(ds.values()) for q, ds in pairs.items()})
        self.last_counts = counts  # raw counts of the top K, for loftr_tools.expansion (no second cache read)

        out_r: dict[str, np.ndarray] = {}
        out_i: dict[str, np.ndarray] = {}
        for name, (r, s) in variants.items():
            inl = np.zeros((K, r.shape[1]), dtype=np.int64)
            for c, qid in enumerate(qids):
                qk = qrefs[qid].key
                inl[:, c] = [counts[(qk, drefs[i].key)] for i in r[:K, c]]
            out_r[name], out_i[name] = reorder_topk(r, floor_inliers(inl, self.min_inliers), s)
        log.info("rerank %s: %s", self.verifier.name, self.stats.summary())
        if junk_before_rerank:
            return out_r, out_i
        return out_r["all"], out_i["all"]

    def inlier_matches(self, dataset: Any, query: int, db: int) -> tuple[np.ndarray, np.ndarray] | None:
        """RANSAC-inlier correspondences ``(pts0, pts1)`` (each ``(N, 2)``, original cropped pixels) of dataset
        query ``query`` and database image ``db``, for pictures (report.html); ``None`` if an image is unreadable.

        Pairs matched in this run come from memory; others (inlier counts read from the cache) are matched again,
        using the feature cache.
        """
        qrefs, drefs = dataset_refs(dataset)
        k0, k1 = self._feature_key(qrefs[query]), self._feature_key(drefs[db])
        if (k0, k1) in self.kept_inliers:
            return self.kept_inliers[(k0, k1)]
        if (k1, k0) in self.kept_inliers:  # matched as the unordered pair (db, query)
            p1, p0 = self.kept_inliers[(k1, k0)]
            return p0, p1
        f0, f1 = self._prepare(qrefs[query]), self._prepare(drefs[db])
        if f0 is None or f1 is None:
            return None
        p0, p1 = self.verifier.match(f0, f1)
        mask, _ = ransac_inliers(p0, p1, conf=self._ransac_raw)
        mask = np.asarray(mask, bool).reshape(-1)
        if mask.size != len(p0):
            return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
        return np.asarray(p0)[mask], np.asarray(p1)[mask]

    def close(self) -> None:
        self.cache.close()
        self.verifier.close()


def rerank(
    dataset: Any,
    ranks: np.ndarray,
    scores: np.ndarray | None,
    verifier: Verifier,
    top_k: int,
    cache_path: str | Path | None = None,
    junk_before_rerank: bool = False,
    ransac: Mapping[str, Any] | RansacConf | None = None,
    feature_cache_mb: float = 2048,
    progress: bool = False,
    min_inliers: int | None = None,
    stats: RerankStats | None = None,
) -> tuple[np.ndarray | dict[str, np.ndarray], np.ndarray | dict[str, np.ndarray]]:
    """One-call version of :meth:`Reranker.rerank` (see there); ``stats``, if given, receives the run's counts."""
    rr = Reranker(verifier, ransac, cache_path, feature_cache_mb, progress, min_inliers=min_inliers)
    try:
        out = rr.rerank(dataset, ranks, scores, top_k, junk_before_rerank)
    finally:
        rr.cache.close()
    if stats is not None:
        stats.__dict__.update(rr.stats.__dict__)
    return out


# ---------------------------------------------------------------------------------------------------------------
# stage entry point
# ---------------------------------------------------------------------------------------------------------------


def open_reranker(conf: Any, dataset: Any, method: str) -> Reranker:
    """The :class:`Reranker` of ``method`` for a run config: verifier from the registry (built once), the run's
    inlier cache, and for 'delg' the run's feature stores.

    Raises:
        VerifierUnavailable: the verifier cannot run here (missing weights, untrained local head).
    """
    from loftr_tools.registry import build_verifier

    rc = conf.rerank
    ctx: dict[str, Any] = {}
    if method == "delg":
        from delg.extract import distractor_locals
        from delg.feature_stores import query_store_path, store_path

        ctx["stores"] = {"query": Path(rc.query_store) if rc.get("query_store") else query_store_path(conf, dataset),
                         "db": Path(rc.db_store) if rc.get("db_store") else store_path(conf, dataset.name, "db")}
        # Distractors have globals only; their local features are extracted when first verified.
        ctx["on_demand"] = distractor_locals(conf, dataset)
    verifier = build_verifier(method, conf, conf.device, **ctx)
    # RANSAC settings: the verifier's own section (<section>.ransac), carried in verifier.conf.
    cache = Reranker.default_cache_path(conf.output_dir, verifier) if rc.cache else None
    if cache is not None and conf.get("overwrite", False):  # overwrite=true verifies every pair again
        for extra in ("", "-wal", "-shm"):
            cache.with_name(cache.name + extra).unlink(missing_ok=True)
    return Reranker(verifier, None, cache, rc.feature_cache_mb, bool(conf.progress), rc.oom_retry_factors)


class GlobalRanksError(ProjectError, ValueError):
    """``rerank.global_ranks`` (a user's file) is missing or not a ranking of this dataset; names the file."""


def load_global_ranks(src: Path, n_queries: int, n_db: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``rerank.global_ranks``: ``ranks`` (R, n_queries) integer, values in [0, n_db), and the optional
    ``<stem>_scores.npy`` beside it (R, n_queries) float, or ``None``.  Anything else: :class:`GlobalRanksError`."""
    from delg.evaluate import RankingError, check_ranks, load_ranking

    key = "rerank.global_ranks"
    if not src.is_file():
        raise GlobalRanksError(f"{key}: file not found: {src}")
    try:
        ranks = check_ranks(load_ranking(src), n_queries, n_db, check_unique=False)
    except RankingError as e:
        msg = str(e) if str(e).startswith(str(src)) else f"{src}: {e}"
        raise GlobalRanksError(f"{key}: {msg} (expected an integer array (rows <= {n_db}, {n_queries}))") from None
    score_path = src.with_name(src.stem + "_scores.npy")
    if not score_path.is_file():
        return ranks, None
    try:
        scores = np.load(score_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise GlobalRanksError(f"{key}: {score_path}: unreadable scores ({str(e).strip()[:200]})") from None
    if scores.dtype.kind != "f" or scores.shape != ranks.shape:
        raise GlobalRanksError(f"{key}: {score_path} holds a {scores.dtype} array of shape {scores.shape}; expected "
                               f"float similarities of the ranking's shape {ranks.shape}")
    return ranks, scores


def write_reranked(
    out_dir: str | Path,
    method: str,
    ranks: np.ndarray | dict[str, np.ndarray],
    inliers: np.ndarray | dict[str, np.ndarray],
) -> Path:
    """The one writer of reranked rankings: ``<out_dir>/ranks/rerank-<method>.npz`` (compressed; written beside,
    then renamed, so a killed run never leaves half a file) with ``ranks`` (R, Q) int and ``inliers`` (K, Q) int, or
    with one ranking per protocol (``junk_before_rerank``) ``ranks_<protocol>`` / ``inliers_<protocol>``."""
    arrays: dict[str, np.ndarray] = {}
    for key, val in (("ranks", ranks), ("inliers", inliers)):
        if isinstance(val, dict):
            arrays.update({f"{key}_{p}": v for p, v in val.items()})
        else:
            arrays[key] = val
    path = Path(out_dir) / "ranks" / f"rerank-{method}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)
    return path


def check_expansion(conf: Any) -> None:
    """Cross-key rule of the steps beyond pairwise order: the DELG junk protocol (one ranking per protocol, junk
    removed by ground truth before the top K) is the paper's pairwise protocol and is not combined with them."""
    xconf = ExpansionConf.from_conf(conf.rerank)
    if bool(conf.rerank.junk_before_rerank) and xconf.active:
        raise ConfigError("rerank.junk_before_rerank: the DELG paper's protocol reranks pairwise; it cannot be combined "
                          "with rerank.order=fused, rerank.qe_rounds > 0 or rerank.propagate=true (set those to "
                          "inliers / 0 / false, or junk_before_rerank=false)")


def expand_reranked(
    conf: Any,
    dataset: Any,
    rr: Reranker,
    ranks: np.ndarray,
    pairwise: np.ndarray,
    query_ids: Sequence[int] | None,
    xconf: ExpansionConf,
    space: Any,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """:func:`loftr_tools.expansion.expand_rankings` on a run: the reranker verifies (inlier cache shared with the
    pairwise step), the run's global descriptors (``space``: :func:`delg.search.global_space`, read once for every
    verifier) expand and search.

    Args:
        ranks: :math:`(R, Q)` global ranking; pairwise: :math:`(R, Q)` its pairwise reranking (kept by queries
            without a verified hit); query_ids: dataset query of each column.

    Returns:
        ``(ranks (R, Q), inliers (K, Q), record)``: ``inliers`` holds the raw count of each of the top K rows, -1
        where the pair was not verified; ``record`` the settings and counts for results.json.
    """
    t0 = time.time()
    qrefs, drefs = dataset_refs(dataset)
    qids = list(query_ids) if query_ids is not None else list(range(ranks.shape[1]))
    col_of_key = {qrefs[q].key: c for c, q in enumerate(qids)}
    db_of_key = {d.key: i for i, d in enumerate(drefs)}
    counts = {(col_of_key[qk], db_of_key[dk]): n for (qk, dk), n in rr.last_counts.items() if qk in col_of_key}
    db_of_path = {_resolved(d.path): i for i, d in enumerate(drefs)}
    db_of_query = [db_of_path.get(_resolved(qrefs[q].path)) if qrefs[q].crop is None else None for q in qids]

    verify_seconds = 0.0

    def verify(todo: Mapping[int, Sequence[int]]) -> dict[tuple[int, int], int]:
        nonlocal verify_seconds
        t = time.time()
        got = rr.score_pairs({qrefs[qids[c]]: [drefs[d] for d in ds] for c, ds in todo.items()})
        verify_seconds += time.time() - t
        return {(c, d): got[(qrefs[qids[c]].key, drefs[d].key)] for c, ds in todo.items() for d in ds}

    def verify_db(todo: Mapping[int, Sequence[int]]) -> dict[tuple[int, int], int]:
        nonlocal verify_seconds
        t = time.time()
        got = rr.score_pairs({drefs[a]: [drefs[b] for b in bs] for a, bs in todo.items()})
        verify_seconds += time.time() - t
        return {(a, b): got[(drefs[a].key, drefs[b].key)] for a, bs in todo.items() for b in bs}

    new, counts, stats = expand_rankings(
        ranks, counts, space.queries[qids], space.db_vectors, verify, space.search, xconf, int(conf.rerank.top_k),
        db_of_query, verify_db, pairwise)
    K = topk_rows(int(conf.rerank.top_k), new.shape[0])
    inliers = np.array([[counts.get((c, int(new[r, c])), -1) for c in range(new.shape[1])] for r in range(K)],
                       dtype=np.int64).reshape(K, new.shape[1])
    # seconds: the whole step; verify_seconds: of which verifying the pairs it brought up (matching or cache reads)
    record = {**xconf.to_dict(), **stats.to_dict(), "seconds": round(time.time() - t0, 2),
              "verify_seconds": round(verify_seconds, 2)}
    log.info("beyond pairwise (%s): %s", rr.verifier.name, record)
    return new, inliers, record


@dataclass
class VerifierRun:
    """One configured verifier's pass over the global rankings (:func:`rerank_methods`)."""

    method: str
    path: Path | None = None  # <output_dir>/ranks/rerank-<method>.npz; None when the verifier was unavailable
    ranks: np.ndarray | dict[str, np.ndarray] | None = None  # (R, Q), or protocol -> (R, Q)
    inliers: np.ndarray | dict[str, np.ndarray] | None = None  # (K, Q), or protocol -> (K, Q)
    reranker: Reranker | None = None  # still open with keep_open=True (report pictures); the caller closes it
    unavailable: str | None = None  # why the verifier cannot run here (skip_unavailable=True)
    seconds: float = 0.0
    expansion: dict[str, Any] | None = None  # settings and counts of the steps beyond pairwise (results.json)


def rerank_methods(
    conf: Any,
    dataset: Any,
    ranks: np.ndarray,
    scores: np.ndarray | None,
    query_ids: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    skip_unavailable: bool = False,
    keep_open: bool = False,
) -> list[VerifierRun]:
    """The one loop of reranking (``python -m loftr_tools.rerank`` and ``delg.retrieve``): each method of
    ``methods`` (default ``conf.rerank.methods``) reranks the global top ``rerank.top_k`` of ``ranks`` and its
    result is written by :func:`write_reranked`.

    Args:
        ranks: :math:`(R, Q)` global ranking; scores: :math:`(R, Q)` similarities or ``None``.
        query_ids: dataset query index of each column (default ``range(Q)``).
        skip_unavailable: a verifier that cannot run here (``VerifierUnavailable``) is listed with its reason
            instead of raising.
        keep_open: leave each :class:`Reranker` open on its :class:`VerifierRun` (the caller closes it).
    """
    from loftr_tools.base import VerifierUnavailable

    rc = conf.rerank
    check_expansion(conf)
    space = None  # the run's global descriptors, read when the first verifier goes beyond pairwise order
    out: list[VerifierRun] = []
    still_open: list[Reranker] = []  # closed here on an error (a verifier's close must not run twice)
    try:
        for m in list(methods) if methods is not None else list(rc.methods):
            t = time.time()
            try:
                rr = open_reranker(conf, dataset, m)
            except VerifierUnavailable as e:
                if not skip_unavailable:
                    raise
                print(f"[{m}] skipped: {e}")
                out.append(VerifierRun(m, unavailable=str(e)))
                continue
            still_open.append(rr)
            run = VerifierRun(m, reranker=rr)
            out.append(run)
            run.ranks, run.inliers = rr.rerank(dataset, ranks, scores, int(rc.top_k), bool(rc.junk_before_rerank),
                                               query_ids=query_ids)
            xconf = ExpansionConf.from_conf(rc, rr.ransac)
            if xconf.active:  # fusion, verified query expansion, propagation (loftr_tools.expansion)
                if space is None:
                    from delg.search import global_space

                    space = global_space(conf, dataset)
                run.ranks, run.inliers, run.expansion = expand_reranked(conf, dataset, rr, ranks, run.ranks, query_ids,
                                                                        xconf, space)
            run.path = write_reranked(conf.output_dir, m, run.ranks, run.inliers)
            if not keep_open:
                still_open.remove(rr)
                rr.close()
            run.seconds = time.time() - t
            print(f"[{m}] {rr.stats.summary()} -> {run.path}")
    except BaseException:
        for rr in still_open:
            rr.close()
        raise
    return out


def main(conf: Any, method: str | None = None, dataset: Any = None) -> Path:
    """Rerank the global ranking of ``conf`` with ``method`` (default: each of ``conf.rerank.methods``).

    Reads ``<output_dir>/ranks/global.npy`` (R, Q) and ``global_scores.npy`` (written by ``delg.search``; or
    ``rerank.global_ranks``), writes ``<output_dir>/ranks/rerank-<method>.npz`` (:func:`write_reranked`) and
    returns the last file.
    """

    if dataset is None:
        from delg.data.dataset import load_dataset

        dataset = load_dataset(conf)
    rc = conf.rerank
    out_dir = Path(conf.output_dir)
    if rc.get("global_ranks"):
        src = Path(rc.global_ranks)
        ranks, scores = load_global_ranks(src, len(dataset.query_names), len(dataset.db_names))
    else:  # the global stage of this config; delg.search skips itself when its ranking is up to date
        from delg.search import main as search_main

        src = search_main(conf, dataset)  # checks its cached ranking, recomputes a damaged one
        ranks = np.load(src)
        score_path = src.with_name(src.stem + "_scores.npy")
        scores = np.load(score_path) if score_path.is_file() else None
    dump_config(conf, out_dir / "ranks" / "rerank.config.yaml")
    runs = rerank_methods(conf, dataset, ranks, scores, methods=[method] if method else None)
    return runs[-1].path if runs and runs[-1].path is not None else out_dir


if __name__ == "__main__":
    from delg.config import run_stage

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every SIMD build it tries at INFO
    sys.exit(run_stage(main, sys.argv[1:], __doc__))
