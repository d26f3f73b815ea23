"""Speed of delg.evaluate against the naive revisitop loop on a 1M-image synthetic benchmark.

Synthetic ground truth: 70 queries over a 1,000,000-image database, with RParis-like list sizes (easy ~100,
hard ~150, junk ~100 per query, drawn per query).  Rankings: random scores with positives pushed up.  Both
implementations run on the same ranking (warm-up, then best of N); the results are also checked to agree.

    .venv/bin/python bench/evaluate_speed.py                 # 70 x 1,000,000
    .venv/bin/python bench/evaluate_speed.py --n-db 100000 --repeat 3 --json outputs/bench/evaluate_speed.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from delg.data.revisitop import GroundTruth, QueryGroundTruth
from delg.evaluate import evaluate

# ----------------------------------------------------------------------------------- naive (published) loop


def _naive_ap(pos: np.ndarray, nres: int) -> float:
    ap = 0.0
    for j in range(len(pos)):
        r = pos[j]
        p0 = 1.0 if r == 0 else float(j) / r
        p1 = float(j + 1) / (r + 1)
        ap += (p0 + p1) * (1.0 / nres) / 2.0
    return ap


def _naive_map(ranks: np.ndarray, gnd: list[dict[str, np.ndarray]], kappas=(1, 5, 10)) -> tuple[float, np.ndarray]:
    aps, prs = [], []
    for i, g in enumerate(gnd):
        if len(g["ok"]) == 0:
            continue
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], g["ok"])]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], g["junk"])]
        k = ij = 0
        for ip in range(len(pos)):
            while ij < len(junk) and pos[ip] > junk[ij]:
                k += 1
                ij += 1
            pos[ip] -= k
        aps.append(_naive_ap(pos, len(g["ok"])))
        pos = pos + 1
        prs.append([(pos <= min(pos.max(), kk)).sum() / min(pos.max(), kk) for kk in kappas])
    return float(np.mean(aps)), np.mean(prs, axis=0)


def naive_evaluate(gnd: GroundTruth, ranks: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for p in ("E", "M", "H"):
        if p == "E":
            g = [{"ok": q.easy, "junk": np.concatenate([q.junk, q.hard])} for q in gnd.gnd]
        elif p == "M":
            g = [{"ok": np.concatenate([q.easy, q.hard]), "junk": q.junk} for q in gnd.gnd]
        else:
            g = [{"ok": q.hard, "junk": np.concatenate([q.junk, q.easy])} for q in gnd.gnd]
        m, pr = _naive_map(ranks, g)
        out[p] = {"mAP": 100 * m, "mP@1": 100 * pr[0], "mP@5": 100 * pr[1], "mP@10": 100 * pr[2]}
    return out


# ------------------------------------------------------------------------------------------------ synthetic


def synthetic(n_db: int, n_queries: int, seed: int) -> tuple[GroundTruth, np.ndarray]:
    """A ground truth with RParis-like list sizes and an int32 ``(n_db, n_queries)`` ranking."""
    rng = np.random.default_rng(seed)
    gnd = []
    ranks = np.empty((n_db, n_queries), np.int32)
    for _ in range(n_queries):
        n_e, n_h, n_j = (int(rng.integers(lo, hi)) for lo, hi in ((20, 200), (30, 300), (10, 200)))
        ids = rng.choice(n_db, n_e + n_h + n_j, replace=False)
        gnd.append(QueryGroundTruth(np.sort(ids[:n_e]), np.sort(ids[n_e:n_e + n_h]), np.sort(ids[n_e + n_h:]), None))
    for j, q in enumerate(gnd):
        s = rng.random(n_db, dtype=np.float32)
        s[q.easy] += rng.random(q.easy.size, dtype=np.float32) * 2
        s[q.hard] += rng.random(q.hard.size, dtype=np.float32) * 1.5
        s[q.junk] += rng.random(q.junk.size, dtype=np.float32) * 1.5
        ranks[:, j] = np.argsort(-s)
    g = GroundTruth("synthetic", [f"db{i}" for i in range(n_db)], [f"q{j}" for j in range(n_queries)], gnd)
    return g, ranks


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    fn()  # warm-up (page faults, numpy caches)
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-db", type=int, default=1_000_000)
    ap.add_argument("--n-queries", type=int, default=70)
    ap.add_argument("--repeat", type=int, default=3, help="best of N (after one warm-up)")
    ap.add_argument("--naive-repeat", type=int, default=1, help="best of N for the slow naive loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the timings here")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    gnd, ranks = synthetic(args.n_db, args.n_queries, args.seed)
    print(f"synthetic: {args.n_queries} queries x {args.n_db:,} db images ({time.perf_counter() - t:.1f} s to build)")
    t_ours, ours = best_of(lambda: evaluate(gnd, ranks, n_db=args.n_db), args.repeat)
    t_naive, naive = best_of(lambda: naive_evaluate(gnd, ranks), args.naive_repeat)
    diff = max(abs(ours[p][k] - naive[p][k]) for p in naive for k in naive[p])

    rows = [("delg.evaluate (vectorised, validated)", t_ours), ("naive revisitop loop", t_naive)]
    w = max(len(r[0]) for r in rows)
    print(f"{'implementation'.ljust(w)}  {'best (s)':>9}  {'vs ours':>8}")
    for name, sec in rows:
        print(f"{name.ljust(w)}  {sec:9.3f}  {sec / t_ours:7.1f}x")
    print(f"max |difference| of the 12 numbers: {diff:.2e} (percent points)")
    result = {
        "n_db": args.n_db, "n_queries": args.n_queries, "repeat": args.repeat,
        "seconds": {"ours": t_ours, "naive": t_naive}, "speedup": t_naive / t_ours, "max_abs_diff": diff,
        "results": ours,
    }
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
