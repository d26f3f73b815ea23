"""FAISS global search vs NumPy dot product + argsort, and IVF-PQ's recall / speed, on synthetic descriptors.

For each database size (default 5,000 and 1,000,000; 2048-d, like DELG R50 / the 1M distractors): clustered
synthetic unit vectors (recall on i.i.d. noise means nothing), generated in float32 chunks straight into the FAISS
flat index, which holds the only copy (1M x 2048 float32 = 8 GB); the NumPy baseline reads the same memory.
Measured on the same queries (peak RSS ~ the data + one chunk: the index is allocated once, not grown by add):
    numpy    S = X @ Q.T, np.argsort(-S, axis=0)      (what revisitop's example code does)
    flat     delg.search exact inner product (IndexFlatIP), top-k
    ivfpq    IndexIVFPQ (nlist, m, nbits, nprobe) at the largest size: recall@k vs exact, speed-up vs flat/numpy
    +refine  the same IVF-PQ inside delg.search's IndexRefine (search.refine): refine*k candidates re-scored with an
             8-bit copy of every vector; one build serves both rows
Top-k of flat and numpy must agree (ties within 1e-5 may swap), else the script fails.  Peak memory is the
process's maximum RSS.

    .venv/bin/python bench/faiss_search.py --n 5000,1000000 --json outputs/bench/faiss_search.json
    .venv/bin/python bench/faiss_search.py --n 5000,100000          # smaller machines
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from delg.search import flat_index_view, new_index, search_chunked


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clustered_chunks(n: int, d: int, n_clusters: int, spread: float, seed: int, chunk: int = 50_000):
    """Yield (n_chunk, d) float32 unit vectors around ``n_clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centres[rng.integers(0, n_clusters, m)]
        x += rng.standard_normal((m, d), dtype=np.float32) * np.float32(spread / np.sqrt(d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    d, k, nq = args.d, args.k, args.queries
    t0 = time.perf_counter()
    flat, X = flat_index_view(d, n)  # X: a view of the index's storage, the only copy of the data
    n_clusters = args.clusters or max(10, n // 500)
    s = 0
    for x in clustered_chunks(n, d, n_clusters, args.spread, args.seed):
        X[s : s + len(x)] = x
        s += len(x)
    gen_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed + 1)
    # queries: perturbed database images (a landmark seen again), so true neighbours exist
    noise = rng.standard_normal((nq, d), dtype=np.float32) * np.float32(args.spread / np.sqrt(d))
    Q = X[rng.choice(n, nq, replace=False)] + noise  # float32 throughout: a float64 Q would make X @ Q.T copy X
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)

    def numpy_search():
        S = X @ Q.T
        order = np.argsort(-S, axis=0)
        return np.take_along_axis(S, order[:k], axis=0), order[:k]

    t_np, (s_np, r_np) = timed(numpy_search, args.repeat)
    t_flat, (s_fl, r_fl) = timed(lambda: search_chunked(flat, Q, k, args.query_chunk), args.repeat)
    r_fl, s_fl = r_fl.T, s_fl.T  # (k, nq) like revisitop
    same = r_fl == r_np
    # Positions that differ must be ties (float summation order differs between BLAS calls).
    tie_ok = bool(np.all(np.abs(s_fl - s_np)[~same] < 1e-5)) if (~same).any() else True
    if not tie_ok:
        raise AssertionError(f"n={n}: FAISS flat and NumPy top-{k} differ beyond ties")
    row: dict[str, Any] = {
        "n": n, "d": d, "queries": nq, "k": k, "clusters": n_clusters,
        "generate_and_index_s": gen_s,
        "numpy_s": t_np, "faiss_flat_s": t_flat, "flat_speedup_vs_numpy": t_np / t_flat,
        "topk_identical_fraction": float(same.mean()), "topk_equal_up_to_ties": tie_ok,
    }
    if n == max(args.n) and args.ivfpq:
        nlist = args.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
        refined = new_index(d, "ivfpq", n, nlist, args.m, args.nbits, refine=args.refine)
        ivf = faiss.downcast_index(refined.base_index)  # the plain IVF-PQ inside
        ntrain = min(n, args.train)
        t0 = time.perf_counter()
        sample = np.sort(rng.choice(n, ntrain, replace=False))
        refined.train(np.ascontiguousarray(X[sample]))
        for s in range(0, n, 100_000):
            refined.add(X[s : s + 100_000])  # adds to the IVF-PQ and to the 8-bit copy
        build_s = time.perf_counter() - t0
        faiss.extract_index_ivf(ivf).nprobe = args.nprobe

        def recall_of(r):
            return float(np.mean([len(set(r[:, j]) & set(r_np[:, j])) / k for j in range(nq)]))

        t_ivf, (_, r_ivf) = timed(lambda: search_chunked(ivf, Q, k, args.query_chunk), args.repeat)
        t_ref, (_, r_ref) = timed(lambda: search_chunked(refined, Q, k, args.query_chunk), args.repeat)
        pq_mb = ivf.ntotal * (args.m * args.nbits / 8 + 8) / 2**20
        row.update({
            "ivfpq": {"nlist": nlist, "m": args.m, "nbits": args.nbits, "nprobe": args.nprobe, "train": ntrain,
                      "refine": args.refine},
            "ivfpq_build_s": build_s, "ivfpq_s": t_ivf, f"ivfpq_recall@{k}": recall_of(r_ivf.T),
            "ivfpq_speedup_vs_flat": t_flat / t_ivf, "ivfpq_speedup_vs_numpy": t_np / t_ivf,
            "ivfpq_index_mb": pq_mb,
            "refine_s": t_ref, f"refine_recall@{k}": recall_of(r_ref.T),
            "refine_speedup_vs_flat": t_flat / t_ref, "refine_speedup_vs_numpy": t_np / t_ref,
            "refine_index_mb": pq_mb + ivf.ntotal * d / 2**20,
        })
    row["peak_rss_mb"] = rss_mb()
    return row  # the index (and the view X of it) is freed here


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=lambda s: [int(v) for v in s.split(",")], default=[5000, 1_000_000],
                    help="database sizes, comma-separated")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=70)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--clusters", type=int, default=0,
                    help="synthetic landmarks; 0 = n/500, so each holds more images than k (else top-k is noise)")
    ap.add_argument("--spread", type=float, default=0.8, help="noise norm around a centre (unit vectors)")
    ap.add_argument("--repeat", type=int, default=1, help="best of N timings")
    ap.add_argument("--query-chunk", type=int, default=1024)
    ap.add_argument("--no-ivfpq", dest="ivfpq", action="store_false")
    ap.add_argument("--nlist", type=int, default=1024, help="0 = delg.search's default (4 sqrt(n))")
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--nbits", type=int, default=8)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--refine", type=float, default=4, help="search.refine: candidates re-scored per result (> 1)")
    ap.add_argument("--train", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = [bench_size(n, args) for n in args.n]
    print(f"{'n':>9} {'numpy s':>9} {'flat s':>8} {'speed-up':>9} {'top-k same':>10} {'peak MB':>8}")
    for r in rows:
        print(f"{r['n']:>9} {r['numpy_s']:>9.3f} {r['faiss_flat_s']:>8.3f} {r['flat_speedup_vs_numpy']:>9.1f} "
              f"{r['topk_identical_fraction']:>10.4f} {r['peak_rss_mb']:>8.0f}")
    for r in rows:
        if "ivfpq_s" in r:
            print(f"at n={r['n']}, {r['ivfpq']} (built in {r['ivfpq_build_s']:.0f} s):")
            print(f"{'index':>14} {'search s':>9} {f'recall@{args.k}':>10} {'x flat':>7} {'x numpy':>8} {'index MB':>9}")
            for name, key in (("IVF-PQ", "ivfpq"), (f"+refine x{args.refine:g}", "refine")):
                print(f"{name:>14} {r[f'{key}_s']:>9.3f} {r[f'{key}_recall@{args.k}']:>10.3f} "
                      f"{r[f'{key}_speedup_vs_flat']:>7.1f} {r[f'{key}_speedup_vs_numpy']:>8.1f} "
                      f"{r[f'{key}_index_mb']:>9.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"}, "sizes": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
