"""The reranker's caches: prepared features in memory (LRU) and inlier counts on disk (SQLite), with the identity
that names an inlier cache file.

* :class:`FeatureCache`: prepared features of images within a byte budget (``rerank.feature_cache_mb``, items sized
  with ``Verifier.feature_nbytes``), least recently used first out.
* :class:`InlierCache`: one SQLite file per verifier identity, keyed by (query key, database key), one commit per
  pair; a file SQLite cannot read is moved aside (``delg.store.move_aside``) and its pairs are verified again.
* :func:`cache_identity` / :func:`identity_hash`: what a cached count depends on besides the two images (the
  verifier's method, every setting of its section, its RANSAC settings, the inputs that are not settings), minus
  :data:`NOT_IN_IDENTITY`.

How the reranker uses them (pair order, unordered pairs, what is committed when) is :mod:`loftr_tools.rerank`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from loftr_tools.base import Verifier
from loftr_tools.ransac import RansacConf

# The one list of settings that cannot change a cached inlier count, left out of the inlier cache's identity
# (every other key of a verifier's section is in it, see cache_identity); dotted keys are inside the section.
NOT_IN_IDENTITY: dict[str, str] = {
    "batch_size": "LoFTR pairs per forward: a batch of equal-size pairs gives each pair the matches it gets alone",
    "ransac.min_inliers": "applied to the cached raw counts when reranking, so changing it rematches nothing",
    "ransac.evidence_low": "applied to the cached raw counts by loftr_tools.expansion, so changing it rematches nothing",
    "ransac.evidence_high": "applied to the cached raw counts by loftr_tools.expansion, so changing it rematches nothing",
}


def _json_safe(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def cache_identity(verifier: Verifier, ransac: RansacConf) -> dict[str, Any]:
    """Everything a cached inlier count depends on besides the two images: :meth:`Verifier.identity` (method,
    resolved settings, weight digest / feature stores) and the RANSAC settings, minus :data:`NOT_IN_IDENTITY`."""
    ident = _json_safe(verifier.identity())
    ident["ransac"] = ransac.to_dict()
    for key in NOT_IN_IDENTITY:
        *parents, leaf = key.split(".")
        node = ident["ransac"] if parents == ["ransac"] else ident.get("settings", {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    return ident


def identity_hash(identity: Mapping[str, Any]) -> str:
    """Short digest of :func:`cache_identity` (part of the inlier cache's file name)."""
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]


class FeatureCache:
    """LRU cache of prepared features within a byte budget (an item larger than the budget is not kept)."""

    def __init__(self, budget_bytes: int, sizeof: Callable[[Any], int]) -> None:
        self.budget = max(0, int(budget_bytes))
        self.sizeof = sizeof
        self.items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def get(self, key: str) -> Any | None:
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key][0]
        self.misses += 1
        return None

    def put(self, key: str, feats: Any) -> None:
        n = int(self.sizeof(feats))
        if key in self.items:
            self.nbytes -= self.items.pop(key)[1]
        if n > self.budget:
            return
        while self.items and self.nbytes + n > self.budget:
            self.nbytes -= self.items.popitem(last=False)[1][1]
        self.items[key] = (feats, n)
        self.nbytes += n


class InlierCache:
    """Inlier counts on disk (SQLite), keyed by (query key, database key); ``path=None`` keeps them in memory."""

    def __init__(self, path: str | Path | None, tag: str = "") -> None:
        self.path = Path(path) if path else None
        self.mem: dict[tuple[str, str], int] = {}
        self.db: sqlite3.Connection | None = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._connect(tag)
        except sqlite3.DatabaseError as e:
            # Only a cache: a damaged file (truncated, overwritten) is moved aside and the counts are recomputed.
            from delg.store import move_aside

            move_aside(self.path, f"unreadable inlier cache ({e})", "its pairs are verified again")
            for extra in ("-wal", "-shm"):  # the damaged file's journal must not be applied to the new one
                self.path.with_name(self.path.name + extra).unlink(missing_ok=True)
            self.db = self._connect(tag)

    def _connect(self, tag: str) -> sqlite3.Connection:
        assert self.path is not None
        db = sqlite3.connect(str(self.path), timeout=60)
        try:
            # quick_check reads every page (the cache holds top-K x queries pairs: milliseconds) and catches a
            # truncated file, which would otherwise fail only at the first lookup of a lost page.
            check = db.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else 'no answer'}")
            # WAL + one commit per pair: a kill loses at most the pair in progress; readers never block writers.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS pairs (query TEXT NOT NULL, db TEXT NOT NULL, "
                       "inliers INTEGER NOT NULL, matches INTEGER NOT NULL, PRIMARY KEY (query, db))")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('tag', ?)", (tag,))
            db.commit()
        except BaseException:
            db.close()
            raise
        return db

    def get_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
        keys = list(dict.fromkeys(keys))
        out = {k: self.mem[k] for k in keys if k in self.mem}
        if self.db is not None:
            todo = {k for k in keys if k not in out}
            by_query: dict[str, set[str]] = {}
            for q, d in todo:
                by_query.setdefault(q, set()).add(d)
            for q, ds in by_query.items():
                for d, n in self.db.execute("SELECT db, inliers FROM pairs WHERE query = ?", (q,)):
                    if d in ds:
                        out[(q, d)] = int(n)
        return out

    def put(self, query: str, db: str, inliers: int, matches: int) -> None:
        self.mem[(query, db)] = int(inliers)
        if self.db is not None:
            self.db.execute("INSERT OR REPLACE INTO pairs VALUES (?, ?, ?, ?)", (query, db, int(inliers), int(matches)))
            self.db.commit()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
