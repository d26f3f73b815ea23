"""Revisited Oxford / Paris metrics, exactly as published (revisitop ``compute_ap`` / ``compute_map``).

* AP is revisitop's trapezoidal AP over the (0-based) ranks of the positives, after junk images are removed from
  the ranking; it divides by *all* positives of the query, so positives missing from a cut ranking add nothing.
* mP@k caps k at the position of the last positive found: ``kq = min(max(pos), k)`` with 1-based ``pos``.
* A query without positives (in a protocol) is left out of the mean (ROxford Easy averages over 68 queries).
* Protocols: E: ok = easy, junk = junk + hard;  M: ok = easy + hard, junk = junk;  H: ok = hard, junk = junk + easy.

Differences from the published loop, all where it would crash or be ambiguous: a query with positives but none
inside a cut ranking scores AP 0 and mP@k 0 and stays in the mean; a protocol with no query having positives gives
``None`` (published: a division by zero).  Rankings are validated (shape, dtype, range, duplicates).

The implementation is vectorised: one gather of a per-query label table over the ranking, then work on the few
positive/junk positions only, so 70 queries over a 1,000,000-row ranking take well under a few seconds.

    python -m delg.evaluate --gnd gnd_roxford5k.pkl --ranks ranks.npy --json results.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from delg.data.revisitop import GroundTruth, read_gnd
from delg.errors import ProjectError, report_error

KAPPAS: tuple[int, ...] = (1, 5, 10)
PROTOCOLS: tuple[str, ...] = ("E", "M", "H")


class RankingError(ProjectError, ValueError):
    """A ranking array does not fit the ground truth; the message says which property is wrong."""


def protocol_gnd(gnd: GroundTruth, protocol: str) -> list[dict[str, np.ndarray]]:
    """Per-query ``{'ok', 'junk'}`` index arrays of one revisitop protocol (``'E'``, ``'M'`` or ``'H'``)."""
    out = []
    for q in gnd.gnd:
        if protocol == "E":
            ok, junk = q.easy, np.concatenate([q.junk, q.hard])
        elif protocol == "M":
            ok, junk = np.concatenate([q.easy, q.hard]), q.junk
        elif protocol == "H":
            ok, junk = q.hard, np.concatenate([q.junk, q.easy])
        else:
            raise ValueError(f"unknown protocol '{protocol}' (expected one of {PROTOCOLS})")
        out.append({"ok": np.asarray(ok, np.int64), "junk": np.asarray(junk, np.int64)})
    return out


def check_ranks(ranks: Any, n_queries: int, n_db: int | None = None, check_unique: bool = True) -> np.ndarray:
    """Validate a ``(K, n_queries)`` integer ranking (``K <= n_db``, values in ``[0, n_db)``) and return it.

    ``n_db`` is the database size including distractors; ``None`` checks only that values are non-negative.
    With ``check_unique``, a database image listed twice in one column is an error too.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise RankingError(f"ranks must be 2-D (n_db, n_queries), got shape {ranks.shape}")
    if ranks.dtype.kind not in "iu":
        raise RankingError(f"ranks must be an integer array, got dtype {ranks.dtype}")
    if ranks.shape[1] != n_queries:
        hint = " (transposed? the layout is (n_db, n_queries))" if ranks.shape[0] == n_queries else ""
        raise RankingError(f"ranks has {ranks.shape[1]} columns but the ground truth has {n_queries} queries{hint}")
    if ranks.size == 0:
        return ranks
    lo, hi = int(ranks.min()), int(ranks.max())
    if lo < 0:
        raise RankingError(f"ranks contains negative index {lo} (a FAISS -1 for missing results?)")
    if n_db is not None:
        if ranks.shape[0] > n_db:
            raise RankingError(f"ranks has {ranks.shape[0]} rows but the database has only {n_db} images")
        if hi >= n_db:
            raise RankingError(f"ranks contains index {hi}, out of range for a database of {n_db} images")
    if check_unique:
        for _ in _columns(ranks, check_unique=True):
            pass
    return ranks


def _columns(ranks: np.ndarray, check_unique: bool = False, block: int = 16) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(j, ranks[:, j])`` as contiguous arrays, optionally checking that no column repeats an image.

    A column of a C-ordered ``(n_db, n_queries)`` array is strided: reading it touches every cache line of the
    whole array.  Copying 16 columns at a time, in row tiles that stay in cache, makes the per-query work run on
    contiguous memory for about the cost of one pass over the ranking.
    """
    n, nq = ranks.shape
    seen = np.zeros(int(ranks.max(initial=-1)) + 1, bool) if check_unique else None
    buf = np.empty((min(block, nq), n), ranks.dtype)
    for j0 in range(0, nq, block):
        b = min(block, nq - j0)
        if ranks.flags.f_contiguous:
            cols = ranks[:, j0:j0 + b].T
        else:
            cols = buf[:b]
            for r0 in range(0, n, 8192):
                cols[:, r0:r0 + 8192] = ranks[r0:r0 + 8192, j0:j0 + b].T
        for k in range(b):
            col = cols[k]
            if seen is not None:
                seen[col] = True
                if np.count_nonzero(seen) != col.size:
                    counts = np.bincount(col.astype(np.intp, copy=False))
                    dup = int(np.argmax(counts))
                    raise RankingError(f"ranks column {j0 + k} (query {j0 + k}) lists database image {dup} "
                                       f"{counts[dup]} times")
                seen[col] = False
            yield j0 + k, col


def _labelled_positions(
    ranks: np.ndarray, lists: Sequence[Sequence[np.ndarray]], check_unique: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each query ``i``: the rank positions of the images in ``lists[i]`` and their label (1-based list index).

    Images in none of the lists (negatives, distractors) are skipped; a later list wins where lists overlap.
    ``check_unique`` checks each column for repeated images on the way (see :func:`check_ranks`).
    """
    n_tab = 1 + max([int(ranks.max(initial=-1))] + [int(a.max()) for ls in lists for a in ls if a.size])
    table = np.zeros(n_tab, np.int8)
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64), np.zeros(0, np.int8))] * len(lists)
    for i, col in _columns(ranks, check_unique):
        if not any(a.size for a in lists[i]):
            continue
        for lab, a in enumerate(lists[i], 1):
            table[a] = lab
        labels = table[col]  # one gather into a small (cache-resident) table per query
        where = np.flatnonzero(labels)
        out[i] = (where, labels[where])
        for a in lists[i]:
            table[a] = 0
    return out


def _ap_and_precisions(pos: np.ndarray, n_ok: int, kappas: Sequence[int]) -> tuple[float, np.ndarray]:
    """revisitop's compute_ap on 0-based junk-free ``pos`` (sorted) and mP@k; ``pos`` may be empty."""
    if pos.size == 0:
        return 0.0, np.zeros(len(kappas))
    j = np.arange(pos.size, dtype=np.float64)
    r = pos.astype(np.float64)
    prec0 = np.ones_like(r)
    nz = r > 0
    prec0[nz] = j[nz] / r[nz]
    prec1 = (j + 1) / (r + 1)
    # Summed in the published loop's order so that results agree to the last bits.
    ap = 0.0
    for v in ((prec0 + prec1) * (1.0 / n_ok) / 2.0).tolist():
        ap += v
    pos1 = pos + 1
    last = int(pos1[-1])
    prs = np.empty(len(kappas))
    for i, k in enumerate(kappas):
        kq = min(last, int(k))
        prs[i] = np.count_nonzero(pos1 <= kq) / kq
    return ap, prs


def _scores(
    where: np.ndarray, is_ok: np.ndarray, is_junk: np.ndarray, n_ok: int, kappas: Sequence[int]
) -> tuple[float, np.ndarray]:
    pos, jpos = where[is_ok], where[is_junk]
    # Position after junk removal = position - number of junk images ranked before it.
    pos = pos - np.searchsorted(jpos, pos)
    return _ap_and_precisions(pos, n_ok, kappas)


def _means(aps: np.ndarray, prs: np.ndarray) -> tuple[float, np.ndarray]:
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), np.full(prs.shape[1], np.nan)
    return float(aps[valid].mean()), prs[valid].mean(axis=0)


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = KAPPAS,
    n_db: int | None = None,
    check: bool = True,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop's ``compute_map``: mean AP and mean precision@k of a ranking (fractions, not percent).

    Args:
        ranks: ``(K, n_queries)`` integer database indices, best first, possibly cut to the top ``K`` rows.
        gnd: per query a mapping with ``'ok'`` (positives) and ``'junk'`` index lists (see :func:`protocol_gnd`);
            the two must be disjoint (an image in both counts as a positive).
        kappas: the k of mP@k.
        n_db: database size (with distractors) for the range check; ``None`` checks non-negativity only.
        check: validate ``ranks`` (see :func:`check_ranks`).

    Returns:
        ``(map, aps, pr, prs)``: mean AP, per-query AP ``(n_queries,)``, mean precisions ``(len(kappas),)`` and
        per-query precisions ``(n_queries, len(kappas))``.  Queries without positives are NaN in ``aps``/``prs``
        and left out of the means; with no such query at all, ``map`` and ``pr`` are NaN.
    """
    nq = len(gnd)
    if check:
        ranks = check_ranks(ranks, nq, n_db, check_unique=False)  # repeats are checked in the one pass below
    ok_all = [np.asarray(g["ok"], np.int64).ravel() for g in gnd]
    junk_all = [np.asarray(g.get("junk", []), np.int64).ravel() for g in gnd]
    # Label 1 = junk, 2 = positive (listed last so that it wins an overlap); no positives -> nothing to look up.
    lists = [(junk, ok) if ok.size else () for ok, junk in zip(ok_all, junk_all)]
    found = _labelled_positions(ranks, lists, check_unique=check)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for i, (where, labels) in enumerate(found):
        if ok_all[i].size:  # no positives: left out of the mean, as published
            aps[i], prs[i] = _scores(where, labels == 2, labels == 1, ok_all[i].size, kappas)
    m, pr = _means(aps, prs)
    return m, aps, pr, prs


# Label of each revisitop list in _labelled_positions (easy=1, hard=2, junk=3) and the labels each protocol
# counts as positive / junk.
_PROTOCOL_LABELS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "E": ((1,), (3, 2)),
    "M": ((1, 2), (3,)),
    "H": ((2,), (3, 1)),
}


def evaluate_per_query(
    gnd: GroundTruth, ranks: np.ndarray, kappas: Sequence[int] = KAPPAS, n_db: int | None = None
) -> dict[str, dict[str, Any]]:
    """Per-protocol means and per-query scores, in percent.

    Returns:
        ``{'E': {'mAP', 'mP@1', ..., 'n_queries', 'ap': (n_queries,) array, 'p@1': array, ...}, 'M': ..., 'H': ...}``
        where per-query arrays are NaN for queries left out (no positives) and ``n_queries`` counts the others;
        the means are ``None`` when no query of the protocol has positives.
    """
    ranks = check_ranks(ranks, gnd.n_queries, n_db, check_unique=False)
    # One pass over the ranking for the three protocols: locate every easy/hard/junk image once (and check that
    # no column repeats an image on the way).
    found = _labelled_positions(ranks, [(q.easy, q.hard, q.junk) for q in gnd.gnd], check_unique=True)
    out: dict[str, dict[str, Any]] = {}
    for p in PROTOCOLS:
        ok_labels, junk_labels = _PROTOCOL_LABELS[p]
        aps = np.full(gnd.n_queries, np.nan)
        prs = np.full((gnd.n_queries, len(kappas)), np.nan)
        for i, ((where, labels), q) in enumerate(zip(found, gnd.gnd)):
            n_ok = sum((q.easy.size, q.hard.size, q.junk.size)[lab - 1] for lab in ok_labels)
            if n_ok:
                aps[i], prs[i] = _scores(
                    where, np.isin(labels, ok_labels), np.isin(labels, junk_labels), n_ok, kappas
                )
        m, pr = _means(aps, prs)
        n = int((~np.isnan(aps)).sum())
        res: dict[str, Any] = {"mAP": None if n == 0 else 100.0 * m}
        for i, k in enumerate(kappas):
            res[f"mP@{k}"] = None if n == 0 else 100.0 * float(pr[i])
        res["n_queries"] = n
        res["ap"] = 100.0 * aps
        for i, k in enumerate(kappas):
            res[f"p@{k}"] = 100.0 * prs[:, i]
        out[p] = res
    return out


def evaluate(
    gnd: GroundTruth, ranks: np.ndarray, kappas: Sequence[int] = KAPPAS, n_db: int | None = None
) -> dict[str, dict[str, float | None] | None]:
    """revisitop E/M/H results in percent: ``{'E': {'mAP', 'mP@1', 'mP@5', 'mP@10'}, 'M': ..., 'H': ...}``.

    Args:
        gnd: the ground truth.
        ranks: ``(K, n_queries)`` integer database indices, best first (revisitop's layout), ``K <= n_db``.
            Indices ``>= gnd.n_db`` are distractors (negatives for every query).
        kappas: the k of mP@k.
        n_db: database size including distractors, for the range check (``None``: non-negativity only).

    A protocol where no query has positives (e.g. Hard on a folder dataset) is ``None``.
    """
    full = evaluate_per_query(gnd, ranks, kappas, n_db)
    out: dict[str, dict[str, float | None] | None] = {}
    for p, res in full.items():
        out[p] = None if res["n_queries"] == 0 else {k: res[k] for k in ("mAP", *(f"mP@{k}" for k in kappas))}
    return out


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def format_table(results: Mapping[str, Mapping[str, Any]], title: str = "Revisited Oxford/Paris (mAP, %)") -> str:
    """One row per method: E/M/H mAP and mP@1/5/10 on Medium; ``n/a`` where a protocol has no result.

    ``results`` maps a method name to :func:`evaluate`'s output.
    """
    cols = [("E", "mAP"), ("M", "mAP"), ("H", "mAP"), ("M", "mP@1"), ("M", "mP@5"), ("M", "mP@10")]
    header = ["method", "E mAP", "M mAP", "H mAP", "M mP@1", "M mP@5", "M mP@10"]
    rows = []
    for method, res in results.items():
        row = [str(method)]
        for p, k in cols:
            pr = res.get(p) if res else None
            row.append(_fmt(pr.get(k) if pr else None))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "-" * len(line(header))
    return "\n".join([title, sep, line(header), sep, *(line(r) for r in rows), sep])


def to_json(results: Mapping[str, Any]) -> Any:
    """JSON-ready copy: numpy arrays to lists, NaN to null."""
    if isinstance(results, Mapping):
        return {k: to_json(v) for k, v in results.items()}
    if isinstance(results, np.ndarray):
        return [None if math.isnan(x) else float(x) for x in results.astype(float).ravel()]
    if isinstance(results, (list, tuple)):
        return [to_json(v) for v in results]
    if isinstance(results, (float, np.floating)):
        return None if math.isnan(float(results)) else float(results)
    if isinstance(results, np.integer):
        return int(results)
    return results


def load_ranking(path: str | Path, key: str = "ranks") -> np.ndarray:
    """A saved ranking: a ``.npy`` integer array, or the ``key`` array of a ``.npz`` (the pipeline's ranks/*.npz).

    Raises:
        RankingError: unreadable file, no such array, or not a 2-D integer array; the message names the file.
    """
    where = str(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if key not in loaded.files:
                    raise RankingError(f"{where}: no '{key}' array (has {', '.join(loaded.files) or 'nothing'})")
                loaded = loaded[key]
    except RankingError:
        raise
    except (OSError, ValueError, EOFError) as e:  # truncated, not NumPy, or object dtype (would need pickle)
        lines = str(e).strip().splitlines()
        raise RankingError(f"{where}: cannot read a ranking ({lines[0] if lines else type(e).__name__}); expected "
                           f"an integer array (n_db, n_queries) saved with numpy.save") from None
    ranks = np.asarray(loaded)
    if ranks.ndim != 2 or ranks.dtype.kind not in "iu":
        raise RankingError(f"{where}: holds a {ranks.dtype} array of shape {ranks.shape}; expected an integer array "
                           f"(n_db, n_queries)")
    return ranks


def main(argv: list[str] | None = None) -> Path | None:
    """CLI: print E/M/H mAP and mP@1/5/10 of a saved ranking; ``--json`` writes them (percent, null = n/a)."""
    ap = argparse.ArgumentParser(prog="python -m delg.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--gnd", required=True, help="gnd_<name>.pkl or .mat")
    ap.add_argument("--ranks", required=True, help=".npy integer array (n_db, n_queries), best first, or a .npz "
                    "holding it as 'ranks'")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--n-db", type=int, default=None, help="database size incl. distractors (range check)")
    ap.add_argument("--per-query", action="store_true", help="also write per-query AP / precision to --json")
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    for a in rest:  # the project's key=value style: output_dir=DIR receives the JSON (DIR/evaluation.json)
        key, _, value = a.partition("=")
        if key.lstrip("-") != "output_dir" or not value:
            ap.error(f"unrecognized argument '{a}' (this command takes --gnd, --ranks, --json, --n-db, --per-query "
                     "and output_dir=DIR)")
        if args.json is None:
            args.json = str(Path(value) / "evaluation.json")
    try:
        gnd = read_gnd(args.gnd)
    except (ProjectError, OSError) as e:  # a missing or malformed ground truth: one line, no traceback
        raise RankingError(f"--gnd {e}") from None
    try:
        ranks = load_ranking(args.ranks)
    except RankingError as e:
        raise RankingError(f"--ranks {e}") from None
    try:
        full = evaluate_per_query(gnd, ranks, n_db=args.n_db)
    except RankingError as e:
        raise RankingError(f"--ranks {args.ranks}: {e}") from None
    res = {p: (None if r["n_queries"] == 0 else {k: r[k] for k in ("mAP", "mP@1", "mP@5", "mP@10")})
           for p, r in full.items()}
    print(f"{gnd.name}: {gnd.n_queries} queries, ranking {ranks.shape[0]} x {ranks.shape[1]}")
    for p in PROTOCOLS:
        r = res[p]
        n = full[p]["n_queries"]
        if r is None:
            print(f"  {p}: n/a (no query has positives)")
        else:
            print(f"  {p}: mAP {r['mAP']:.2f}  mP@1 {r['mP@1']:.2f}  mP@5 {r['mP@5']:.2f}  mP@10 {r['mP@10']:.2f}"
                  f"  ({n} queries)")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = dict(res)  # {"E": {...}, "M": {...}, "H": {...}}, null for a protocol with no positives
        if args.per_query:
            payload["per_query"] = {"query": gnd.qimlist, **{p: dict(r) for p, r in full.items()}}
        out.write_text(json.dumps(to_json(payload), indent=1))
        return out
    return None


def cli(argv: list[str] | None = None) -> int:
    """``python -m delg.evaluate``: :func:`main`, with an expected failure as one line ``error: ...``, exit 2."""
    try:
        main(argv)
    except ProjectError as e:
        return report_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
