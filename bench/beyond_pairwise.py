"""Beyond pairwise reranking, measured step by step: one table per dataset and verifier.

    python bench/beyond_pairwise.py [--datasets real minibench] [--methods lightglue sift] [--out DIR] [--json OUT]
                                    [key=value ...]      (extra overrides for every row, e.g. lightglue.max_keypoints=512)

Rows (each adds one step to the row above; the last is what ``configs/demo.yaml``, perform_retrieval.sh's default,
runs):

* ``global``: the global ranking;
* ``pairwise``: the top K ordered by inlier count (``rerank.order=inliers``, the DELG paper's protocol);
* ``+ fusion``: ``rerank.order=fused`` (evidence of the counts + global similarity, loftr_tools.expansion);
* ``+ verified QE``: ``rerank.qe_rounds=1``;
* ``+ propagation``: ``rerank.propagate=true``;
* ``default``: configs/demo.yaml as it is.

Columns: Medium mAP over all queries, over the landmarks settings were chosen on (half A: every other landmark in
sorted order, starting with the first) and over the others (half B, never used to choose anything); mP@1/5/10 (all
queries); distinct pairs verified; seconds on this machine.

Every row runs the pipeline's own code (``delg.search`` then ``loftr_tools.rerank.rerank_methods`` with that row's
``rerank.*`` settings) in one output folder: the rows share the features and the inlier cache, so a pair is matched
once however many rows ask for it. A row's seconds are what it would take alone, from costs measured in this run:
``extraction + search`` (measured) ``+ images it prepares x seconds per image + pairs it verifies x seconds per
pair`` (the reranker times preparing and matching separately; the per-unit costs are the means over every image and
pair matched here). Run it on an otherwise idle machine: the seconds are only as quiet as the machine.

Datasets: ``real`` = the 45 photos + 16 distractors of ``../shared/data`` (``$SHARED_DATA`` overrides; skipped with a
message when absent), ``minibench`` = the embedded benchmark of ``make demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ROWS: list[tuple[str, list[str] | None]] = [
    ("pairwise", ["rerank.order=inliers", "rerank.qe_rounds=0", "rerank.propagate=false"]),
    ("+ fusion", ["rerank.order=fused", "rerank.qe_rounds=0", "rerank.propagate=false"]),
    ("+ verified QE", ["rerank.order=fused", "rerank.qe_rounds=1", "rerank.propagate=false"]),
    ("+ propagation", ["rerank.order=fused", "rerank.qe_rounds=1", "rerank.propagate=true"]),
    ("default", []),
]


def shared_data() -> Path:
    return Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))


def dataset_overrides(name: str) -> list[str] | None:
    if name == "minibench":
        return []
    root = shared_data()
    if not (root / "images").is_dir():
        print(f"[real] skipped: {root / 'images'} not found (set SHARED_DATA)")
        return None
    return ["dataset.type=folders", f"dataset.root={root / 'images'}", f"dataset.distractors={root / 'images_distractors'}"]


def landmark_of(name: str) -> str:
    """Folder datasets: ``<landmark>/<image>``; the embedded benchmark: ``lmNN_<photo>_qK``."""
    return name.split("/")[0] if "/" in name else name.split("_")[0]


def halves(query_names: list[str]) -> tuple[list[int], list[int]]:
    """Query columns of half A (landmarks 0, 2, 4, ... in sorted order: settings were chosen there) and half B."""
    lms = sorted({landmark_of(n) for n in query_names})
    a = [j for j, n in enumerate(query_names) if lms.index(landmark_of(n)) % 2 == 0]
    b = [j for j, n in enumerate(query_names) if lms.index(landmark_of(n)) % 2 == 1]
    return a, b


def medium(gnd: Any, ranks: np.ndarray, cols: list[int], n_db: int) -> dict[str, float]:
    from dataclasses import replace

    from delg.evaluate import evaluate

    sub = replace(gnd, qimlist=[gnd.qimlist[j] for j in cols], gnd=[gnd.gnd[j] for j in cols])
    return evaluate(sub, ranks[:, cols], n_db=n_db)["M"]


def bench_dataset(
    name: str,
    methods: list[str],
    out: Path,
    extra: list[str],
    rows: list[tuple[str, list[str] | None]] | None = None,
    unit_costs: dict[str, tuple[float, float]] | None = None,
) -> list[dict[str, Any]] | None:
    """The table rows of one dataset: ``global`` then ``rows`` (default :data:`ROWS`) for each method.

    ``unit_costs``: method -> (seconds per image, seconds per pair) measured elsewhere (``bench/keypoints.py`` times
    them on a sample, so rows answered from an existing inlier cache still get their cost); default: the means of
    what this run prepared and matched."""
    from delg import search
    from delg.config import load_config
    from delg.data.dataset import load_dataset
    from loftr_tools.rerank import rerank_methods

    ds_over = dataset_overrides(name)
    if ds_over is None:
        return None
    common = [*ds_over, f"output_dir={out / name}", "progress=false", "report.enabled=false", *extra]
    base = load_config("configs/demo.yaml", common)
    dataset = load_dataset(base)
    t = time.perf_counter()
    ranks_path = search.main(base, dataset)
    t_global = time.perf_counter() - t
    ranks = np.load(ranks_path)
    scores = np.load(ranks_path.with_name("global_scores.npy"))
    gnd, n_db = dataset.gnd, dataset.n_db
    cols_a, cols_b = halves(list(dataset.query_names))
    all_cols = list(range(dataset.n_queries))
    print(f"[{name}] {dataset.n_queries} queries ({len(cols_a)} in half A, {len(cols_b)} in half B), {n_db} database "
          f"images; extraction + search {t_global:.1f} s")

    def row(label: str, method: str, r: np.ndarray, pairs: int, images: int, seconds: float) -> dict[str, Any]:
        m_all = medium(gnd, r, all_cols, n_db)
        return {"dataset": name, "method": method, "row": label, "M_mAP": m_all["mAP"],
                "M_mAP_A": medium(gnd, r, cols_a, n_db)["mAP"], "M_mAP_B": medium(gnd, r, cols_b, n_db)["mAP"],
                "mP@1": m_all["mP@1"], "mP@5": m_all["mP@5"], "mP@10": m_all["mP@10"], "pairs": pairs,
                "images": images, "seconds": seconds}

    out_rows = [row("global", "-", ranks, 0, 0, t_global)]
    for method in methods:
        measured: list[tuple[Any, str]] = []
        for label, over in rows or ROWS:
            conf = load_config("configs/demo.yaml", [*common, f"rerank.methods=[{method}]", *(over or [])])
            run = rerank_methods(conf, dataset, ranks, scores, methods=[method], skip_unavailable=True)[0]
            if run.reranker is None:
                print(f"[{name}] {method}: unavailable ({run.unavailable})")
                break
            measured.append((run, label))
        prepared = sum(r.reranker.stats.prepared for r, _ in measured)
        matched = sum(r.reranker.stats.matched for r, _ in measured)
        s_img = sum(r.reranker.stats.prepare_seconds for r, _ in measured) / max(prepared, 1)
        s_pair = sum(r.reranker.stats.match_seconds for r, _ in measured) / max(matched, 1)
        if unit_costs and method in unit_costs:
            s_img, s_pair = unit_costs[method]
        print(f"[{name}] {method}: {s_img:.3f} s per image prepared ({prepared}), {s_pair:.3f} s per pair matched "
              f"({matched})")
        for run, label in measured:
            st = run.reranker.stats
            pairs = st.jobs  # distinct pairs this row asks for, whether matched here or read from the cache
            rec = run.expansion or {}
            extra_s = float(rec.get("seconds", 0.0)) - float(rec.get("verify_seconds", 0.0))  # search, scoring
            out_rows.append(row(label, method, run.ranks, pairs, st.images,
                                t_global + st.images * s_img + pairs * s_pair + extra_s))
    return out_rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = (f"{'dataset':<10} {'method':<10} {'row':<15} {'M mAP':>6} {'half A':>6} {'half B':>6} {'mP@1':>6} "
            f"{'mP@5':>6} {'mP@10':>6} {'pairs':>6} {'s':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['dataset']:<10} {r['method']:<10} {r['row']:<15} {r['M_mAP']:6.2f} {r['M_mAP_A']:6.2f} "
                     f"{r['M_mAP_B']:6.2f} {r['mP@1']:6.2f} {r['mP@5']:6.2f} {r['mP@10']:6.2f} {r['pairs']:6d} "
                     f"{r['seconds']:6.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["real", "minibench"], choices=["real", "minibench"])
    ap.add_argument("--methods", nargs="+", default=["lightglue", "sift"])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a new temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="key=value for every row")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="beyond_pairwise_"))
    rows: list[dict[str, Any]] = []
    for name in args.datasets:
        got = bench_dataset(name, args.methods, out, args.overrides)
        if got:
            rows.extend(got)
            print(format_rows(got), flush=True)
    print()
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
