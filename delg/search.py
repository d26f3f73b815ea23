"""Global search: FAISS over the database's global descriptors, rankings in revisitop's layout.

The database is read through ``delg.feature_stores.open_db_store``: the benchmark's db store, plus the shared distractor
store with ``dataset.distractors`` (float16 stores are read as float32).

Outputs (``main``), under ``<output_dir>/ranks/``:
    ``global.npy``          (depth, n_queries) int64: row r of column j = the database index ranked r-th for query j
    ``global_scores.npy``   (depth, n_queries) float32: its cosine similarity (PQ-approximate with ``ivfpq``);
                            ``-inf`` where a row had to be filled with images that have no features (unreadable)
                            or that IVF-PQ did not return (outside the probed lists); with ``search.superglobal``
                            the top ``search.sg_m`` rows hold their SuperGlobal score (:mod:`delg.global_rerank`),
                            floored so that every column stays non-increasing
    ``global.meta.json``    what produced them (index kind, exact or not, GPU, depth, whether the ranking is cut,
                            key); lets a rerun skip the search.  :func:`search_record` is its part for results.json.

``depth = n_db`` (the whole database, revisitop's full ranking) when ``ranks.depth`` is ``null``/``all``, else
``min(ranks.depth, n_db)`` (a cut: a positive below the cut counts as never found).  The index is saved beside the
features as ``<preset>-db.<kind>-<key>.faiss``, ``key`` hashing the database store (image names in dataset order,
the store's content checksum, :meth:`delg.store.FeatureStore.identity`), the index settings and DBA; it is rebuilt
whenever one of them changes, and a saved index FAISS cannot read (or of the wrong size) is moved aside
(``*.damaged-<time>.faiss``) with one line and rebuilt.  A cached ranking is reused only when its meta matches
(including ``query_globals``, a hash of the query descriptors read this run, so a same-size change of the query
store is seen) and both arrays load with the expected shape; a damaged one is moved aside and the search runs again.  Database vectors are read and
added in chunks of ``search.chunk`` and queries searched in chunks of ``search.query_chunk``, so no
(n_db, n_queries) similarity matrix is held beyond the ranking asked for: +R1M runs in the memory of the index
itself (8 GB flat at 1M x 2048 float32, 2 GB at 512-d; IVF-PQ with m=64, nbits=8 needs 64 bytes per image, plus d
bytes for the 8-bit copy of ``search.refine``) plus the output (12 bytes per row and query: 840 MB for a full
1M ranking of 70 queries).  DBA holds two indexes while it runs.

Top-k beyond FAISS's GPU limit (``GPU_MAX_K`` = 2048: GPU indexes refuse larger k, and an ``IndexRefine`` asks its
base for ``refine * k``): a flat index ranks exactly with a chunked matrix product and a partial sort on the CPU
(:func:`exact_topk`), any other index is searched on its CPU copy; each reason is logged once and recorded.

    python -m delg.search --config configs/demo.yaml [search.index=ivfpq] [search.qe_k=2] [ranks.depth=1000]
        [search.superglobal=true]
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from delg.config import Config, dump_config, run_stage
from delg.errors import ProjectError
from delg.feature_stores import db_store_paths, open_db_store, preset_name, query_store_path, store_path
from delg.io import atomic_path
from delg.store import FeatureStore, StoreUnion

INDEX_KINDS = ("flat", "ivfpq")
MISSING_SCORE = np.float32(-np.inf)
# FAISS GPU indexes refuse k above this (faiss/gpu/utils/DeviceDefs.cuh GPU_MAX_SELECTION_K: 2048 with CUDA, 16384
# with cuVS, 1024 in old builds); a request that needs more is answered without the GPU (see DatabaseIndex.knn),
# and any other refusal of the GPU copy is caught and retried on the CPU copy.
GPU_MAX_K = 2048


class SearchError(ProjectError, ValueError):
    """A search setting or input is invalid; the message names the key or file."""


# ---------------------------------------------------------------------------------------------- FAISS helpers
def _use_gpu(setting: Any) -> bool:
    have = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if setting in (True, "true"):
        if not have:
            raise SearchError("search.gpu=true but FAISS has no GPU support here (install faiss-gpu) or no GPU")
        return True
    if setting in ("auto", None):
        return have
    return False


_GPU_RES: list[Any] = []


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of ``index`` on device 0.

    IVF-PQ gets float16 lookup tables (``useFloat16``): the GPU kernels need them for codes of 56 bytes and more
    (m=64 at 8 bits is 64) and they cost no measurable recall.  A flat index stays float32 (for it the same flag
    would store the vectors in float16 and make "exact" search approximate)."""
    if isinstance(index, faiss.IndexRefine):
        # FAISS cannot clone an IndexRefine to the GPU: move the IVF-PQ that finds the candidates, keep the 8-bit
        # copy that re-scores them (refine * k per query, cheap) on the CPU.
        return refine_on(_clone_to_gpu(faiss.downcast_index(index.base_index)), index)
    return _clone_to_gpu(index)


def refine_on(base: faiss.Index, cpu_refine: faiss.Index) -> faiss.Index:
    """An ``IndexRefine`` that searches ``base`` (e.g. a GPU copy) and re-scores with ``cpu_refine``'s copy."""
    refine = faiss.downcast_index(cpu_refine.refine_index)
    out = faiss.IndexRefine(base, refine)  # faiss's wrapper keeps both alive
    out.k_factor = cpu_refine.k_factor
    return out


def _clone_to_gpu(index: faiss.Index) -> faiss.Index:
    if not _GPU_RES:
        _GPU_RES.append(faiss.StandardGpuResources())
    co = faiss.GpuClonerOptions()
    co.useFloat16 = _ivf(index) is not None
    return faiss.index_cpu_to_gpu(_GPU_RES[0], 0, index, co)


def default_nlist(n: int) -> int:
    """About ``4 sqrt(n)`` lists, at most ``n / 39`` (FAISS wants >= 39 training points per centroid)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def new_index(
    d: int, kind: str, n: int, nlist: int | None = None, m: int = 64, nbits: int = 8, refine: float = 0
) -> faiss.Index:
    """An empty inner-product index: ``IndexFlatIP`` or ``IndexIVFPQ`` (untrained).

    ``refine > 1`` wraps the IVF-PQ in an ``IndexRefine``: it asks the IVF-PQ for ``refine * k`` candidates and
    re-scores them with an 8-bit scalar-quantised copy of every vector (``d`` bytes each), which is near exact.
    PQ codes of 2048-d descriptors in 64 bytes rank the true neighbours poorly (clustered data: recall@100 about
    0.25); the re-scoring brings recall up to what the probed lists hold."""
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "ivfpq":
        if d % m:
            raise SearchError(f"search.m: {m} must divide the descriptor size {d}")
        nl = int(nlist) if nlist else default_nlist(n)
        quantizer = faiss.IndexFlatIP(d)
        ivfpq = faiss.IndexIVFPQ(quantizer, d, nl, int(m), int(nbits), faiss.METRIC_INNER_PRODUCT)
        if not refine or refine <= 1:
            return ivfpq
        sq8 = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexRefine(ivfpq, sq8)  # faiss's wrapper keeps both parts alive
        index.k_factor = float(refine)
        return index
    raise SearchError(f"search.index: unknown index '{kind}' (valid: {', '.join(INDEX_KINDS)})")


def flat_index_view(d: int, n: int) -> tuple[faiss.Index, np.ndarray]:
    """An ``IndexFlatIP`` of ``n`` vectors allocated once, and a writable (n, d) float32 view of its storage.

    Filling the view chunk by chunk avoids ``add``'s vector growth, which can briefly hold two copies (16 GB for
    1M x 2048 float32)."""
    index = faiss.IndexFlatIP(d)
    index.codes.resize(n * d * 4)
    index.ntotal = n
    view = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d), np.float32)
    return index, view


def search_chunked(index: faiss.Index, queries: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of each query, ``chunk`` queries at a time.

    Args:
        queries: (Q, D) float32.

    Returns:
        ``scores`` (Q, k) float32 (descending) and ``ids`` (Q, k) int64 (-1 where the index had fewer results).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    scores = np.empty((len(q), k), np.float32)
    ids = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), max(1, chunk)):
        sc, ix = index.search(q[s : s + chunk], k)
        scores[s : s + chunk], ids[s : s + chunk] = sc, ix
    return scores, ids


def exact_topk(
    xb: np.ndarray, queries: np.ndarray, k: int, db_chunk: int = 65536, query_chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` without FAISS's top-k (any ``k``, up to the full ranking ``k = len(xb)``).

    Each step multiplies ``query_chunk`` queries by ``db_chunk`` database vectors and keeps the best ``k`` so far
    (``argpartition``), so it holds about ``query_chunk x (k + db_chunk)`` scores and ids beyond the output (the full
    ranking: ``query_chunk x N`` scores and their sort order); the best ``k`` are sorted by descending similarity,
    the lower database index first on ties (as a stable NumPy argsort).

    Args:
        xb: (N, D) float32 database vectors (e.g. a flat index's storage, see :func:`flat_vectors`).
        queries: (Q, D) float32.

    Returns:
        ``scores`` (Q, k') float32 and ``ids`` (Q, k') int64, ``k' = min(k, N)``.
    """
    q_all = np.ascontiguousarray(queries, dtype=np.float32)
    n, k = len(xb), min(int(k), len(xb))
    dc, qc = max(1, int(db_chunk)), max(1, int(query_chunk))
    scores = np.empty((len(q_all), k), np.float32)
    ids = np.empty((len(q_all), k), np.int64)
    if k == 0:
        return scores, ids
    for qs in range(0, len(q_all), qc):
        q = q_all[qs : qs + qc]
        qe = qs + len(q)
        if k == n:  # the full ranking: every similarity is kept, the sort order is the ranking
            neg = np.empty((len(q), n), np.float32)
            for s in range(0, n, dc):
                neg[:, s : s + dc] = q @ np.asarray(xb[s : s + dc], np.float32).T
            np.negative(neg, out=neg)
            ids[qs:qe] = np.argsort(neg, axis=1, kind="stable")  # ascending -s: ties keep the lower index first
            scores[qs:qe] = np.take_along_axis(neg, ids[qs:qe], 1)
            np.negative(scores[qs:qe], out=scores[qs:qe])
            continue
        s_buf = np.empty((len(q), min(n, k + dc)), np.float32)
        i_buf = np.empty((len(q), min(n, k + dc)), np.int64)
        filled = 0
        for s in range(0, n, dc):
            e = min(s + dc, n)
            s_buf[:, filled : filled + e - s] = q @ np.asarray(xb[s:e], np.float32).T
            i_buf[:, filled : filled + e - s] = np.arange(s, e)
            filled += e - s
            if filled > k:  # keep the best k so far
                keep = np.argpartition(-s_buf[:, :filled], k - 1, axis=1)[:, :k]
                s_buf[:, :k] = np.take_along_axis(s_buf[:, :filled], keep, 1)
                i_buf[:, :k] = np.take_along_axis(i_buf[:, :filled], keep, 1)
                filled = k
        # partitions scramble the order: ascending index first, so that the stable sort breaks ties by index
        by_id = np.argsort(i_buf[:, :k], axis=1)
        sc, ix = np.take_along_axis(s_buf[:, :k], by_id, 1), np.take_along_axis(i_buf[:, :k], by_id, 1)
        order = np.argsort(-sc, axis=1, kind="stable")
        scores[qs:qe] = np.take_along_axis(sc, order, 1)
        ids[qs:qe] = np.take_along_axis(ix, order, 1)
    return scores, ids


def flat_vectors(index: faiss.Index) -> np.ndarray | None:
    """A read-only (n, d) float32 view of an inner-product flat index's storage (no copy), else ``None``."""
    index = faiss.downcast_index(index) if type(index) is faiss.Index else index
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    n, d = int(index.ntotal), int(index.d)
    if n == 0:
        return np.zeros((0, d), np.float32)
    view = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)
    view.flags.writeable = False
    return view


def index_kind(index: faiss.Index) -> str:
    """What a (CPU) index is: ``flat``, ``ivfpq`` or ``ivfpq+refine``."""
    if isinstance(index, faiss.IndexRefine):
        return "ivfpq+refine"
    return "flat" if flat_vectors(index) is not None else "ivfpq"


def _base_k(index: faiss.Index, k: int) -> int:
    """The k an index asks of its base: ``IndexRefine`` searches ``int(k * k_factor)`` candidates."""
    return max(k, int(k * float(index.k_factor))) if isinstance(index, faiss.IndexRefine) else k


# ---------------------------------------------------------------------------------------------- settings
def ranking_depth(setting: Any, n_db: int | None = None) -> int | None:
    """Rows kept of every ranking: ``ranks.depth`` checked; ``null``/``'all'`` = the whole database.

    Returns ``min(setting, n_db)``, ``n_db`` for the whole database, or with ``n_db=None`` the checked setting
    (``None`` for the whole database).
    """
    if setting is None or (isinstance(setting, str) and setting.strip().lower() == "all"):
        return n_db
    if isinstance(setting, bool) or not isinstance(setting, (int, np.integer)) or setting < 1:
        raise SearchError(f"ranks.depth: need a positive number of rows, or null/all for the whole database "
                          f"(got {setting!r})")
    return int(setting) if n_db is None else min(int(setting), n_db)


def check_settings(conf: Config) -> None:
    """Type and range of every search setting (and ``ranks.depth``), before any work: the schema of
    :mod:`delg.settings` (load_config already applied it; a config changed since is checked again here)."""
    from delg.settings import validate_section

    validate_section("search", conf.search, error=SearchError)
    validate_section("ranks", conf.ranks, error=SearchError)
    sc = conf.search
    if sc.superglobal and int(sc.sg_k) >= int(sc.sg_m):
        raise SearchError(f"search.sg_k: {sc.sg_k} neighbours per candidate among search.sg_m={sc.sg_m} candidates; "
                          f"need sg_k < sg_m")


def _l2n(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def alpha_qe(queries: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float) -> np.ndarray:
    """alpha-QE (Radenovic et al.): ``q' = normalise(q + sum_i max(s_i, 0)^alpha x_i)``.

    Args:
        queries: (Q, D); neighbours: (Q, k, D) the top-k database vectors; sims: (Q, k) their similarities.
    """
    w = np.maximum(sims, 0) ** alpha
    return _l2n(queries + np.einsum("qk,qkd->qd", w, neighbours))


def dba_vectors(neighbours: np.ndarray, sims: np.ndarray, alpha: float) -> np.ndarray:
    """DBA: each database vector becomes ``normalise(sum_i max(s_i, 0)^alpha x_i)`` over its top-k neighbours,
    itself included (its own nearest neighbour, similarity 1).

    Args:
        neighbours: (B, k, D) neighbour vectors; sims: (B, k) their similarities.
    """
    w = np.maximum(sims, 0) ** alpha
    return _l2n(np.einsum("qk,qkd->qd", w, neighbours))


def _reconstruct(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """Stored vectors of ``ids`` (any shape) -> ids.shape + (D,); exact for flat, decoded for IVF-PQ."""
    flat = ids.reshape(-1).astype(np.int64)
    out = index.reconstruct_batch(flat) if flat.size else np.zeros((0, index.d), np.float32)
    return np.asarray(out, np.float32).reshape(*ids.shape, index.d)


# ---------------------------------------------------------------------------------------------- the database index
@dataclass
class DatabaseIndex:
    """A FAISS index over the database images that have features.

    ``present[i]`` is the dataset database index of index row ``i``; ``n_db`` counts all database images.
    ``gpu``: ``index`` is a GPU copy; ``notes`` lists why requests of the last :func:`rank` were answered without it
    (each reason logged once).
    """

    index: faiss.Index  # what searches (GPU copy when used)
    cpu_index: faiss.Index  # what reconstructs vectors and is saved
    present: np.ndarray  # (n_present,) int64
    n_db: int
    key: str
    path: Path | None
    gpu: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """``flat``, ``ivfpq`` or ``ivfpq+refine``: what was built (ivfpq falls back to flat on tiny databases)."""
        return index_kind(self.cpu_index)

    def allow_reconstruct(self) -> None:
        """Let :meth:`vectors` read stored vectors back (an IVF index does so by id only with a direct map)."""
        ivf = _ivf(self.cpu_index)
        if ivf is not None:
            ivf.make_direct_map()

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Dataset db indices (any shape, images with features) -> ``ids.shape + (D,)`` vectors as the index holds
        them (exact for flat, the 8-bit copy with ``search.refine``, PQ-decoded for plain IVF-PQ; DBA vectors with
        DBA); call :meth:`allow_reconstruct` first."""
        ids = np.asarray(ids, np.int64)
        rows = ids if len(self.present) == self.n_db else np.searchsorted(self.present, ids)
        return _reconstruct(self.cpu_index, rows)

    def set_search_params(self, nprobe: int, refine: float) -> None:
        """The search-time settings of IVF-PQ (lists probed) and of its re-scoring (``refine * k`` candidates), on
        the searching copy and the saved one alike; they are not part of the index, so a cached index gets them too.
        A GPU IVF index is not an ``IndexIVF`` on the Python side: it took ``nprobe`` from the CPU copy when cloned."""
        for index in (self.index, self.cpu_index):
            ivf = _ivf(index)
            if ivf is not None:
                ivf.nprobe = int(nprobe)
            if isinstance(index, faiss.IndexRefine):
                index.k_factor = float(refine)

    def _note(self, reason: str) -> None:
        if reason not in self.notes:
            self.notes.append(reason)
            print(f"[search] {reason}", file=sys.stderr)

    def knn(self, queries: np.ndarray, k: int, chunk: int = 1024, db_chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` in index-row space, whatever ``k``: every search of the database goes through here.

        A flat index asked for more than ``GPU_MAX_K`` ranks with :func:`exact_topk` on its CPU storage (FAISS's
        top-k on the GPU refuses such k; on the CPU its heap gives no tie order), ``db_chunk`` vectors per step.
        Any other index whose base would be asked for more than ``GPU_MAX_K`` (``refine * k`` for IVF-PQ + refine)
        is searched on its CPU copy, as is a request the GPU copy refuses for another reason.

        Args:
            queries: (Q, D) float32; ``k <= len(present)``.

        Returns:
            ``scores`` (Q, k) float32 (descending) and ``ids`` (Q, k) int64 index rows (-1 where IVF found fewer).
        """
        xb = flat_vectors(self.cpu_index) if k > GPU_MAX_K else None
        if xb is not None:
            if self.gpu:
                self._note(f"k={k} is above the GPU top-k limit ({GPU_MAX_K}): exact ranking by chunked matrix "
                           f"product on the CPU")
            return exact_topk(xb, queries, k, db_chunk, chunk)
        index = self.index
        if self.gpu and _base_k(self.cpu_index, k) > GPU_MAX_K:
            self._note(f"k={_base_k(self.cpu_index, k)} (ranks.depth x search.refine where refine applies) is above "
                       f"the GPU top-k limit ({GPU_MAX_K}): searched on the CPU copy of the index")
            index = self.cpu_index
        try:
            return search_chunked(index, queries, k, chunk)
        except RuntimeError as e:
            if index is self.cpu_index:
                raise
            # FAISS checks k before any work, so the refusal came at once; the CPU copy answers the whole request
            self._note(f"the GPU index refused k={k} ({_one_line(e)}): searched on the CPU copy of the index")
            return search_chunked(self.cpu_index, queries, k, chunk)

    def search(
        self, queries: np.ndarray, depth: int | None, chunk: int = 1024, db_chunk: int = 65536
    ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) -> ``ids`` (Q, k) dataset db indices and ``scores`` (Q, k), ``k = min(depth, n_db)`` (``n_db`` when
        ``depth`` is ``None``); rows past the images with features (or past IVF results) hold the remaining db
        indices in order, score ``-inf``."""
        k = self.n_db if depth is None else min(depth, self.n_db)
        kk = min(k, len(self.present))
        if kk > 0:
            sc, ix = self.knn(queries, kk, chunk, db_chunk)
        else:
            sc = np.zeros((len(queries), 0), np.float32)
            ix = np.zeros((len(queries), 0), np.int64)
        complete = kk == k and bool((ix >= 0).all())
        if complete and len(self.present) == self.n_db:  # rows are db indices: no copies of a (maybe 1M-row) result
            return ix, sc
        ids = np.where(ix >= 0, self.present[np.maximum(ix, 0)], -1)
        if complete:
            return ids, sc
        out_ids = np.empty((len(queries), k), np.int64)
        out_sc = np.full((len(queries), k), MISSING_SCORE, np.float32)
        for j in range(len(queries)):
            valid = ids[j][ids[j] >= 0]
            rest = np.setdiff1d(np.arange(self.n_db), valid, assume_unique=False)[: k - len(valid)]
            out_ids[j] = np.concatenate([valid, rest])
            out_sc[j, : len(valid)] = sc[j][ids[j] >= 0]
        return out_ids, out_sc


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _ivf(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _chunks(names: Sequence[str], size: int) -> Iterator[tuple[int, Sequence[str]]]:
    for s in range(0, len(names), size):
        yield s, names[s : s + size]


def _build(st: FeatureStore | StoreUnion, names: Sequence[str], conf: Config, progress: bool) -> faiss.Index:
    sc = conf.search
    d = st.global_dim()
    n = len(names)
    chunk = int(sc.chunk)
    kind = str(sc.index)
    if kind == "ivfpq" and n < max(2 ** int(sc.nbits), 39):
        print(f"[search] {n} database images are too few for ivfpq; using an exact flat index", file=sys.stderr)
        kind = "flat"
    if kind == "flat":
        index, view = flat_index_view(d, n)
        for s, part in tqdm(list(_chunks(names, chunk)), desc="index db", unit="chunk", disable=not progress):
            view[s : s + len(part)] = st.read_globals(part)
        return index
    index = new_index(d, kind, n, sc.nlist, int(sc.m), int(sc.nbits), float(sc.refine or 0))
    if not index.is_trained:
        rng = np.random.default_rng(int(conf.seed))
        m = min(n, int(sc.train_size))
        pick = np.sort(rng.choice(n, size=m, replace=False))
        xt = st.read_globals([names[i] for i in pick])
        index.train(xt)
        del xt
    for _, part in tqdm(list(_chunks(names, chunk)), desc="index db", unit="chunk", disable=not progress):
        index.add(st.read_globals(part))
    return index


def _dba(index: faiss.Index, conf: Config, progress: bool) -> faiss.Index:
    """Replace every database vector by its DBA version (neighbours from ``index``), in chunks; returns a new index."""
    sc = conf.search
    k = min(int(sc.dba_k), index.ntotal)
    ivf = _ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
        ivf.nprobe = int(sc.nprobe)
    chunk = int(sc.chunk)
    new = faiss.clone_index(index)
    new.reset()
    for s in tqdm(range(0, index.ntotal, chunk), desc="DBA", unit="chunk", disable=not progress):
        ids = np.arange(s, min(s + chunk, index.ntotal))
        x = _reconstruct(index, ids)
        sims, nn = index.search(x, k)
        ok = nn >= 0  # IVF may return fewer than k: those slots get weight 0
        nn, sims = np.where(ok, nn, ids[:, None]), np.where(ok, sims, 0)
        new.add(dba_vectors(_reconstruct(index, nn), sims, float(sc.alpha)))
    return new


def store_identities(st: FeatureStore | StoreUnion) -> list[str]:
    """Content identity of each file of the database view (:meth:`FeatureStore.identity`: the checksum the store
    keeps up to date at every commit), so an in-place edit or a redone image is never mistaken for the same store."""
    return [s.identity() for s in (st.stores if isinstance(st, StoreUnion) else [st])]


def index_key(conf: Config, identities: Sequence[str], names: Sequence[str]) -> str:
    sc = conf.search
    h = hashlib.sha1()
    h.update(preset_name(conf).encode())
    for ident in identities:  # the db store (+ the distractor store)
        h.update(ident.encode())
    h.update("\n".join(names).encode())
    fields = {"index": sc.index, "dba_k": sc.dba_k, "alpha": sc.alpha if sc.dba_k else None, "seed": conf.seed}
    if sc.index == "ivfpq":
        fields.update(nlist=sc.nlist, m=sc.m, nbits=sc.nbits, train_size=sc.train_size, refine=bool(sc.refine and sc.refine > 1))
    h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()[:12]


_CACHE: dict[str, DatabaseIndex] = {}


def _read_saved_index(path: Path, d: int, n: int) -> faiss.Index | None:
    """The saved index, or ``None`` (moved aside with one line, to be rebuilt) when FAISS cannot read it (truncated,
    overwritten) or it does not hold ``n`` vectors of size ``d``."""
    from delg.store import move_aside

    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        move_aside(path, f"unreadable FAISS index ({_one_line(e)})", "the index is rebuilt")
        return None
    if index.d != d or index.ntotal != n:
        move_aside(path, f"FAISS index holds {index.ntotal} vectors of size {index.d}, expected {n} of size {d}", "the index is rebuilt")
        return None
    return index


def get_index(conf: Config, dataset: Any) -> DatabaseIndex:
    """Load the saved index if its key matches the database store, else build (and save) it."""
    check_settings(conf)
    progress = bool(conf.get("progress", True))
    db_paths = db_store_paths(conf, dataset)
    db_path = db_paths[0]
    with open_db_store(conf, dataset) as st:  # one view of the db store (+ the shared distractor store)
        have = st.names()
        have_set = set(have)
        present = np.array([i for i, n in enumerate(dataset.db_names) if n in have_set], np.int64)
        names = [dataset.db_names[i] for i in present]
        if len(present) < len(dataset.db_names):
            print(f"[search] {len(dataset.db_names) - len(present)} database image(s) have no features "
                  f"(see the .skipped.json beside {db_path.name}); they rank last", file=sys.stderr)
        if not names:
            raise SearchError(f"{db_path}: no database image has features")
        key = index_key(conf, store_identities(st), names)
        path = db_path.with_name(f"{db_path.stem}.{conf.search.index}-{key}.faiss")
        reuse = bool(conf.search.save_index) and not conf.get("overwrite", False)
        if reuse and str(path) in _CACHE:
            return _CACHE[str(path)]
        cpu = _read_saved_index(path, st.global_dim(), len(names)) if reuse and path.is_file() else None
        loaded = cpu is not None
        if cpu is None:
            cpu = _build(st, names, conf, progress)
    if not loaded:
        if int(conf.search.dba_k or 0) > 0:
            cpu = _dba(cpu, conf, progress)
        if bool(conf.search.save_index):
            for old in path.parent.glob(f"{db_path.stem}.{conf.search.index}-*.faiss"):
                if ".damaged-" not in old.name:  # a moved-aside file stays for inspection
                    old.unlink()  # indexes of an older database store or other settings
            with atomic_path(path) as tmp:
                faiss.write_index(cpu, str(tmp))
    ivf = _ivf(cpu)
    if ivf is not None:
        ivf.nprobe = int(conf.search.nprobe)  # before a GPU clone, which copies it
    idx, gpu = cpu, False
    if _use_gpu(conf.search.gpu):
        try:
            idx, gpu = to_gpu(cpu), True
        except RuntimeError as e:  # e.g. a PQ size the GPU kernels do not support
            print(f"[search] GPU index unavailable ({e}); searching on CPU", file=sys.stderr)
    db = DatabaseIndex(idx, cpu, present, len(dataset.db_names), key, path if conf.search.save_index else None, gpu)
    _CACHE[str(path)] = db
    return db


# ---------------------------------------------------------------------------------------------- queries
def query_vectors(conf: Config, dataset: Any) -> np.ndarray:
    """(n_queries, D) float32 from the query store; zeros (with a warning) for unreadable queries."""
    path = query_store_path(conf, dataset)  # the db store when the queries are whole database images
    with FeatureStore(path, "r", preset=preset_name(conf)) as st:
        d = st.global_dim()
        out = np.zeros((len(dataset.query_names), d), np.float32)
        missing = []
        for j, n in enumerate(dataset.query_names):
            if st.has(n):
                out[j] = st.read_global(n)
            else:
                missing.append(n)
    if missing:
        print(f"[search] {len(missing)} query image(s) have no features ({', '.join(missing[:5])}); "
              f"their rankings are arbitrary", file=sys.stderr)
    return out


def superglobal_m(conf: Config, n_present: int) -> int:
    """Candidates SuperGlobal re-scores per query: ``search.sg_m`` cut to the database images with features; 0 when
    ``search.superglobal`` is off."""
    return min(int(conf.search.sg_m), n_present) if bool(conf.search.superglobal) else 0


def rank(db: DatabaseIndex, queries: np.ndarray, conf: Config) -> tuple[np.ndarray, np.ndarray]:
    """Search (with optional alpha-QE, then optional SuperGlobal reranking of the top ``search.sg_m``); returns
    ``ranks`` (depth, Q) int64 and ``scores`` (depth, Q) float32, ``depth`` = :func:`ranking_depth` (``n_db`` for the
    whole database)."""
    sc = conf.search
    depth, chunk, db_chunk = ranking_depth(conf.ranks.depth, db.n_db), int(sc.query_chunk), int(sc.chunk)
    db.notes.clear()  # the notes of this ranking (the index may be cached across runs)
    db.set_search_params(int(sc.nprobe), float(sc.refine or 0))
    qe_k = int(sc.qe_k or 0)
    sg_m = superglobal_m(conf, len(db.present))
    if qe_k > 0 or sg_m > 0:
        db.allow_reconstruct()
    if qe_k > 0:
        k = min(qe_k, len(db.present))
        sims, ix = db.knn(queries, k, chunk, db_chunk)
        ok = ix >= 0
        ix, sims = np.where(ok, ix, 0), np.where(ok, sims, 0)
        queries = alpha_qe(queries, _reconstruct(db.cpu_index, ix), sims, float(sc.alpha))
    # SuperGlobal re-scores the top sg_m: search at least that deep, keep `depth` rows after
    ids, scores = db.search(queries, max(depth, sg_m), chunk, db_chunk)
    if sg_m > 0:
        ids, scores = _superglobal(db, queries, ids, scores, sg_m, int(sc.sg_k), float(sc.sg_beta))
    return np.ascontiguousarray(ids[:, :depth].T), np.ascontiguousarray(scores[:, :depth].T)


def _superglobal(
    db: DatabaseIndex, queries: np.ndarray, ids: np.ndarray, scores: np.ndarray, m: int, k: int, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`delg.global_rerank.rerank_column` on each query's top ``m`` rows that have features (``ids`` (Q, R)
    dataset db indices, ``scores`` (Q, R)); the candidates' vectors are read back from the index (as alpha-QE does:
    exact for flat, the 8-bit copy with ``search.refine``, PQ-decoded for plain IVF-PQ; DBA vectors with DBA)."""
    from delg.global_rerank import rerank_column

    new_ids, new_sc = np.empty_like(ids), np.empty_like(scores)
    for j in range(len(ids)):
        top = ids[j, :m]
        top = top[np.isfinite(scores[j, :m])]  # rows without features / not found by IVF rank last: never candidates
        new_ids[j], new_sc[j] = rerank_column(queries[j], db.vectors(top), ids[j], scores[j], k, beta)
    return new_ids, new_sc


@dataclass
class GlobalSpace:
    """The global descriptors of a run, for the steps after pairwise verification (``loftr_tools.expansion``):
    the queries' vectors, database vectors by dataset index, and search by any vectors; all in dataset database
    indices (images without features are never returned)."""

    db: DatabaseIndex
    queries: np.ndarray  # (n_queries, D) from the query store

    def db_vectors(self, ids: np.ndarray) -> np.ndarray:
        """(n,) dataset db indices (with features) -> (n, D) vectors as the index holds them (DBA vectors with DBA)."""
        return self.db.vectors(ids)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) -> ``sims`` (n, k) and dataset db indices (n, k) (-1 where fewer were found)."""
        k = max(1, min(int(k), len(self.db.present)))
        sims, ix = self.db.knn(np.ascontiguousarray(vectors, np.float32), k)
        return sims, np.where(ix >= 0, self.db.present[np.maximum(ix, 0)], -1)


def global_space(conf: Config, dataset: Any) -> GlobalSpace:
    """:class:`GlobalSpace` of a run whose features exist (the index is loaded, or built, as the search does)."""
    db = get_index(conf, dataset)
    db.allow_reconstruct()
    db.set_search_params(int(conf.search.nprobe), float(conf.search.refine or 0))
    return GlobalSpace(db, query_vectors(conf, dataset))


_REDONE: set[tuple[str, ...]] = set()


def _redo_key(conf: Config, dataset: Any, split: str) -> tuple[str, ...]:
    return (str(Path(conf.output_dir).resolve()), dataset.name, preset_name(conf), split)


def ensure_features(conf: Config, dataset: Any, splits: Sequence[str] = ("db", "query")) -> None:
    """Run the extraction for the splits whose stores are missing or incomplete (a fresh clone works); with
    ``overwrite=true`` for every split (the whole extraction is redone, the shared distractor store included)."""
    from delg.extract import main as extract_main
    from delg.extract import stores_complete

    overwrite = bool(conf.get("overwrite", False))
    # overwrite=true redoes the extraction of every split (once per process: search_one after ensure_features,
    # or a second stage in the same process, must not redo it again)
    todo = [s for s in splits if (overwrite and _redo_key(conf, dataset, s) not in _REDONE)
            or not stores_complete(conf, dataset, s)]
    if not todo:
        return
    sub = Config(conf.to_dict())
    sub.extract.splits = list(todo)
    sub.extract.merge = False
    extract_main(sub, dataset)
    if overwrite:
        _REDONE.update(_redo_key(conf, dataset, s) for s in todo)
    for s in todo:
        if not stores_complete(conf, dataset, s):
            raise SearchError(
                f"{store_path(conf, dataset.name, s)}: features of split '{s}' are incomplete after extraction "
                f"(a sharded run? finish every shard=i/n, or merge with extract.merge=true)"
            )


def main(conf: Config, dataset: Any = None) -> Path:
    """Rank the database for every query; writes ``<output_dir>/ranks/global.npy`` (+ scores, meta) and returns it."""
    from delg.feature_stores import check_weights

    check_weights(conf)  # a forgotten model.checkpoint fails before any work
    check_settings(conf)
    if dataset is None:
        from delg.data.dataset import load_dataset

        dataset = load_dataset(conf)
    ensure_features(conf, dataset)
    out = Path(conf.output_dir) / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    dump_config(conf, out / "global.config.yaml")
    ranks_path, scores_path, meta_path = out / "global.npy", out / "global_scores.npy", out / "global.meta.json"
    db = get_index(conf, dataset)
    qpath = query_store_path(conf, dataset)
    sc = conf.search
    depth = ranking_depth(conf.ranks.depth, db.n_db)
    kind = db.kind
    queries = query_vectors(conf, dataset)  # read (and checked) every run: their hash is the ranking's identity
    meta = {
        "dataset": dataset.name,
        "db_store": store_path(conf, dataset.name, "db").name,
        "query_store": qpath.name,
        # the query descriptors themselves (not the file size: an in-place edit keeps the size)
        "query_globals": hashlib.sha1(np.ascontiguousarray(queries).tobytes()).hexdigest()[:16],
        "query_names": hashlib.sha1("\n".join(dataset.query_names).encode()).hexdigest()[:12],
        "index": kind,  # what searched: search.index=ivfpq falls back to flat on a tiny database
        "exact": kind == "flat",
        "gpu": db.gpu,  # GPU IVF-PQ uses float16 lookup tables: part of what produced the numbers
        "index_key": db.key,
        "n_db": db.n_db,
        "n_db_with_features": len(db.present),
        "n_queries": len(dataset.query_names),
        "depth": depth,  # rows of every ranking
        "depth_setting": ranking_depth(conf.ranks.depth),  # ranks.depth as given; null = the whole database
        "ranking_cut": depth < db.n_db,  # a positive below the cut counts as never found
        "nprobe": int(sc.nprobe) if kind != "flat" else None,
        "refine": float(sc.refine or 0) if kind == "ivfpq+refine" else None,  # search-time: not in the index key
        "qe_k": int(sc.qe_k or 0),
        "dba_k": int(sc.dba_k or 0),
        "alpha": float(sc.alpha),
        # SuperGlobal reranking of the top sg_m (delg.global_rerank); its settings null while it is off, so that
        # changing them then does not redo an identical ranking
        "superglobal": bool(sc.superglobal),
        "sg_m": int(sc.sg_m) if sc.superglobal else None,
        "sg_k": int(sc.sg_k) if sc.superglobal else None,
        "sg_beta": float(sc.sg_beta) if sc.superglobal else None,
        "layout": "(depth, n_queries): column j ranks the database for query j",
    }
    if ranks_path.is_file() and scores_path.is_file() and meta_path.is_file() and not conf.get("overwrite", False):
        try:
            old = json.loads(meta_path.read_text())
            if {k: v for k, v in old.items() if k not in _META_OUTCOMES} == meta and _cached_ranks_ok(
                    ranks_path, scores_path, (depth, len(dataset.query_names)), db.n_db):
                return ranks_path
        except ValueError:
            pass
    ranks, scores = rank(db, queries, conf)
    for path, arr in ((ranks_path, ranks), (scores_path, scores)):
        with atomic_path(path) as tmp:
            np.save(tmp, arr)
    meta["gpu_fallbacks"] = list(db.notes)  # requests answered without the GPU copy, and why
    meta_path.write_text(json.dumps(meta, indent=1))
    return ranks_path


def _cached_ranks_ok(ranks_path: Path, scores_path: Path, shape: tuple[int, int], n_db: int) -> bool:
    """The saved ranking and scores load and have the expected shape, dtype and range; a damaged one is moved
    aside (one line) and ``False`` is returned so that it is recomputed."""
    from delg.store import move_aside

    for path, kind in ((ranks_path, "i"), (scores_path, "f")):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            problem = None
            if arr.dtype.kind != kind or arr.shape != shape:
                problem = f"holds a {arr.dtype} array of shape {arr.shape}, expected {shape}"
            elif kind == "i" and arr.size and (int(arr.min()) < 0 or int(arr.max()) >= n_db):
                problem = f"holds database indices outside [0, {n_db})"
        except (OSError, ValueError, EOFError) as e:
            problem = f"unreadable ({_one_line(e)})"
        if problem is not None:
            move_aside(path, f"cached ranking {problem}", "the search runs again")
            return False
    return True


# Meta entries that report how the search went rather than what it is: not compared when reusing a ranking.
_META_OUTCOMES = ("gpu_fallbacks",)
SEARCH_RECORD_KEYS = ("index", "exact", "gpu", "gpu_fallbacks", "nprobe", "refine", "depth", "depth_setting",
                      "ranking_cut", "qe_k", "dba_k", "alpha", "superglobal", "sg_m", "sg_k", "sg_beta")


def search_record(ranks_path: str | Path) -> dict[str, Any]:
    """What the global search used, for results.json (``protocol.search``): index kind, exact or not, GPU (and the
    requests answered without it), nprobe/refine where they apply, ranking depth and whether the ranking is cut.

    ``ranks_path`` is what :func:`main` returned; the record is read from the ``global.meta.json`` beside it."""
    meta_path = Path(ranks_path).with_name("global.meta.json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise SearchError(f"{meta_path}: cannot read the search record ({e}); rerun the search") from None
    return {k: meta.get(k) for k in SEARCH_RECORD_KEYS}


def search_one(descriptor: np.ndarray, conf: Config, dataset: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank the database for one new photo's global descriptor.

    Args:
        descriptor: (D,) L2-normalised global descriptor (``delg.extract.extract_one(...)['global']``).

    Returns:
        ``indices`` (k,) int64 database indices and ``scores`` (k,) float32, ``k = min(ranks.depth, n_db)`` (``n_db``
        when ``ranks.depth`` is null).
    """
    check_settings(conf)
    if dataset is None:
        from delg.data.dataset import load_dataset

        dataset = load_dataset(conf)
    ensure_features(conf, dataset, ("db",))
    db = get_index(conf, dataset)
    q = np.asarray(descriptor, np.float32).reshape(1, -1)
    if q.shape[1] != db.cpu_index.d:
        raise SearchError(f"search_one: descriptor has size {q.shape[1]}, the database index {db.cpu_index.d}")
    ranks, scores = rank(db, q, conf)
    return ranks[:, 0], scores[:, 0]


__all__ = [
    "GPU_MAX_K",
    "DatabaseIndex",
    "SearchError",
    "alpha_qe",
    "check_settings",
    "dba_vectors",
    "default_nlist",
    "exact_topk",
    "flat_vectors",
    "flat_index_view",
    "get_index",
    "index_kind",
    "main",
    "new_index",
    "rank",
    "ranking_depth",
    "search_chunked",
    "search_one",
    "search_record",
]

if __name__ == "__main__":
    sys.exit(run_stage(main, sys.argv[1:], __doc__))
