"""Which RANSAC model and threshold each verifier should use: Medium mAP after reranking, per (model, threshold).

Runs the project's own pipeline pieces on the real photos of ``../shared/data`` (a folder dataset: every image of a
landmark folder is a query, ``images_distractors`` joins the database): the global ranking of ``delg.search`` at the
demo settings, then for each verifier (registry: ``loftr_tools.registry.build_verifier``) the tentative matches of
every (query, database) pair of the global top K, computed ONCE (each image prepared once, each unordered pair
matched once, kept in ``<output_dir>/matches-<verifier tag>.npz`` for reruns). Every (model, threshold) of the grid
is then applied to those same matches with :func:`loftr_tools.ransac.ransac_inliers`, the top K is reordered like
the reranker does (:func:`loftr_tools.ranking.reorder_topk`) and evaluated with :func:`delg.evaluate.evaluate`.
Fundamental and homography run MAGSAC++ with 10000 trials, affine plain RANSAC with DELG's 1000 (``--trials``).

    nice -n 10 .venv/bin/python bench/ransac_choice.py --json outputs/bench/ransac_choice.json
    .venv/bin/python bench/ransac_choice.py --methods sift --thresholds 1 8 rerank.top_k=10

Trailing ``key=value`` arguments override the config (``configs/demo.yaml`` plus the folder dataset, DISK+LightGlue
at ``lightglue.long_side=384 lightglue.max_keypoints=512``, ``rerank.top_k=20``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from delg.config import load_config  # noqa: E402
from delg.data.dataset import load_dataset  # noqa: E402
from delg.data.images import ImageReadError  # noqa: E402
from delg.evaluate import evaluate  # noqa: E402
from loftr_tools.base import IDENTICAL_INLIERS  # noqa: E402
from loftr_tools.caches import FeatureCache  # noqa: E402
from loftr_tools.ranking import reorder_topk  # noqa: E402
from loftr_tools.ransac import ransac_inliers  # noqa: E402
from loftr_tools.registry import build_verifier  # noqa: E402
from loftr_tools.rerank import _resolved, dataset_refs  # noqa: E402

SHARED = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))
MODELS = ("fundamental", "homography", "affine")
TRIALS = {"fundamental": 10000, "homography": 10000, "affine": 1000}


def base_overrides() -> list[str]:
    return ["dataset.type=folders", f"dataset.root={SHARED / 'images'}",
            f"dataset.distractors={SHARED / 'images_distractors'}", "lightglue.long_side=384",
            "lightglue.max_keypoints=512", "rerank.top_k=20", "output_dir=outputs/bench/ransac_choice",
            "device=cpu", "progress=false"]


def tentative_matches(conf: Any, dataset: Any, method: str, ranks: np.ndarray, top_k: int) -> tuple[dict, dict, str]:
    """``(job_of, matches, tag)``: ``job_of[(q, d)]`` = the unordered pair key (``None`` for an image paired with
    itself), ``matches[key]`` = ``(pts0, pts1)`` :math:`(N, 2)` float32, or ``None`` for an unreadable image."""
    verifier = build_verifier(method, conf, conf.device)
    tag = verifier.cache_tag()
    qrefs, drefs = dataset_refs(dataset)
    job_of: dict[tuple[int, int], tuple[str, str] | None] = {}
    jobs: dict[tuple[str, str], tuple[Any, Any]] = {}
    for q in range(ranks.shape[1]):
        for d in ranks[:top_k, q]:
            a, b = _resolved(qrefs[q].path), _resolved(drefs[int(d)].path)
            key = None if a == b else (min(a, b), max(a, b))
            job_of[(q, int(d))] = key
            if key is not None:
                jobs.setdefault(key, (qrefs[q], drefs[int(d)]) if a < b else (drefs[int(d)], qrefs[q]))
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in tag)
    store = Path(conf.output_dir) / f"matches-{safe}.npz"
    matches: dict[tuple[str, str], tuple[np.ndarray, np.ndarray] | None] = {}
    if store.is_file():
        with np.load(store, allow_pickle=False) as z:
            keys = json.loads(str(z["keys"]))
            for i, k in enumerate(keys):
                matches[tuple(k)] = (z[f"p0_{i}"], z[f"p1_{i}"]) if f"p0_{i}" in z else None
    cache = FeatureCache(4 << 30, verifier.feature_nbytes)
    todo = [k for k in jobs if k not in matches]
    t0 = time.time()
    for n, key in enumerate(sorted(todo)):
        r0, r1 = jobs[key]
        feats = []
        for r in (r0, r1):
            f = cache.get(str(r.path))
            if f is None:
                try:
                    f = verifier.prepare(r)
                except ImageReadError as e:
                    print(f"unreadable: {e}", file=sys.stderr)
                    f = None
                cache.put(str(r.path), f)
            feats.append(f)
        matches[key] = None if feats[0] is None or feats[1] is None else verifier.match(feats[0], feats[1])
        if (n + 1) % 50 == 0:
            print(f"  {method}: {n + 1}/{len(todo)} pairs matched ({time.time() - t0:.0f} s)", flush=True)
    if todo:
        store.parent.mkdir(parents=True, exist_ok=True)
        keys = list(matches)
        arrays = {"keys": np.array(json.dumps(keys))}
        for i, k in enumerate(keys):
            if matches[k] is not None:
                arrays[f"p0_{i}"], arrays[f"p1_{i}"] = matches[k]
        np.savez_compressed(store, **arrays)
    return job_of, matches, tag


def _map(ev: dict[str, Any], protocol: str) -> float | None:
    """mAP of ``protocol``; ``None`` where it does not apply (folder datasets have no Hard positives)."""
    return (ev.get(protocol) or {}).get("mAP")


def score_grid(dataset: Any, ranks: np.ndarray, scores: np.ndarray, top_k: int, job_of: dict, matches: dict,
               thresholds: list[float], trials: dict[str, int]) -> list[dict[str, Any]]:
    """One row per (model, threshold): mAP E/M/H of the reranked ranking and the mean inliers of positive /
    negative pairs of the top K (their ratio is the separation)."""
    K = min(top_k, ranks.shape[0])
    pos = {q: set(map(int, g.easy)) | set(map(int, g.hard)) for q, g in enumerate(dataset.gnd.gnd)}
    rows = []
    for model in MODELS:
        for thr in thresholds:
            n_of = {}
            for key, m in matches.items():
                n_of[key] = 0 if m is None else ransac_inliers(m[0], m[1], model=model, threshold=thr,
                                                              max_iters=trials[model])[1]
            inl = np.zeros((K, ranks.shape[1]), np.int64)
            for q in range(ranks.shape[1]):
                for r in range(K):
                    key = job_of[(q, int(ranks[r, q]))]
                    inl[r, q] = IDENTICAL_INLIERS if key is None else n_of[key]
            new, _ = reorder_topk(ranks, inl, scores)
            ev = evaluate(dataset.gnd, new, n_db=dataset.n_db)
            p = [inl[r, q] for q in range(inl.shape[1]) for r in range(K)
                 if inl[r, q] != IDENTICAL_INLIERS and int(ranks[r, q]) in pos[q]]
            n = [inl[r, q] for q in range(inl.shape[1]) for r in range(K)
                 if inl[r, q] != IDENTICAL_INLIERS and int(ranks[r, q]) not in pos[q]
                 and int(ranks[r, q]) not in set(map(int, dataset.gnd.gnd[q].junk))]
            rows.append({"model": model, "threshold": thr, "max_iters": trials[model],
                         **{f"{p_}_mAP": _map(ev, p_) for p_ in "EMH"},
                         "mean_inliers_pos": float(np.mean(p)) if p else 0.0,
                         "mean_inliers_neg": float(np.mean(n)) if n else 0.0})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["lightglue", "sift"])
    ap.add_argument("--thresholds", nargs="+", type=float, default=[1.0, 3.0, 8.0, 20.0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--config", default="configs/demo.yaml")
    args, overrides = ap.parse_known_args(argv)
    conf = load_config(REPO / args.config, base_overrides() + overrides)
    from delg import search

    dataset = load_dataset(conf)
    t0 = time.time()
    ranks_path = search.main(conf, dataset)
    ranks = np.load(ranks_path)
    scores = np.load(ranks_path.with_name(ranks_path.stem + "_scores.npy"))
    top_k = int(conf.rerank.top_k)
    glob = evaluate(dataset.gnd, ranks, n_db=dataset.n_db)
    print(f"{dataset.name}: {dataset.n_queries} queries, {dataset.n_db} database images; global M mAP "
          f"{glob['M']['mAP']:.2f} ({time.time() - t0:.0f} s)")
    out: dict[str, Any] = {"dataset": dataset.name, "n_queries": dataset.n_queries, "n_db": dataset.n_db,
                           "top_k": top_k, "global": {p: _map(glob, p) for p in "EMH"}, "verifiers": {}}
    for method in args.methods:
        t0 = time.time()
        job_of, matches, tag = tentative_matches(conf, dataset, method, ranks, top_k)
        t_match = time.time() - t0
        rows = score_grid(dataset, ranks, scores, top_k, job_of, matches, args.thresholds, TRIALS)
        out["verifiers"][method] = {"cache_tag": tag, "pairs": len(matches), "match_s": round(t_match, 1),
                                    "mean_matches": float(np.mean([len(m[0]) for m in matches.values() if m is not None])),
                                    "rows": rows}
        print(f"\n{method} ({tag}): {len(matches)} pairs, {out['verifiers'][method]['mean_matches']:.0f} tentative "
              f"matches per pair; Medium mAP after reranking the top {top_k} (global {glob['M']['mAP']:.2f})")
        print(f"{'model':<12}" + "".join(f"{t:>8g}px" for t in args.thresholds))
        for model in MODELS:
            cells = [r for r in rows if r["model"] == model]
            print(f"{model:<12}" + "".join(f"{r['M_mAP']:>10.2f}" for r in cells))
        print("mean inliers positive / negative pairs:")
        for model in MODELS:
            cells = [r for r in rows if r["model"] == model]
            print(f"{model:<12}" + "".join(f"{r['mean_inliers_pos']:>5.0f}/{r['mean_inliers_neg']:<4.0f}" for r in cells))
        sys.stdout.flush()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\n-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
