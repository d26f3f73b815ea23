"""The main job: global search, reranking with each configured verifier, evaluation, results.json and report.html.

    python -m delg.retrieve --config configs/demo.yaml [key=value ...]     (perform_retrieval.sh)
    python -m delg.retrieve query=photo.jpg                                search with a new photo

Every earlier stage it needs (the embedded benchmark, the features, the index) is built when missing and reused
when present.  Images that cannot be read are skipped and reported: a skipped database image ranks last for every
query (the database and the ground truth stay as they are, so nothing flatters the score), a skipped query is left
out of the evaluation and counted, and ``results.json`` says the run was incomplete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from delg.config import Config, ConfigError, dump_config, run_stage
from delg.data.dataset import RetrievalDataset, load_dataset
from delg.data.revisitop import GroundTruth
from delg.evaluate import evaluate, format_table
from delg.feature_stores import extraction_settings
from delg.io import atomic_write_json

log = logging.getLogger("delg.retrieve")

DEFAULT_CONFIG = "configs/demo.yaml"
# rerank's protocol names -> evaluator's
_PROTOCOL_KEY = {"easy": "E", "medium": "M", "hard": "H"}


def _stored_names(conf: Config, dataset: RetrievalDataset, split: str) -> set[str]:
    from delg.feature_stores import open_db_store, preset_name, query_store_path
    from delg.store import FeatureStore

    if split == "db":  # the db store, plus the shared distractor store when there is one
        with open_db_store(conf, dataset) as st:
            return set(st.names())
    with FeatureStore(query_store_path(conf, dataset), "r", preset=preset_name(conf)) as st:
        return set(st.names())


def _subset_gnd(gnd: GroundTruth, keep: Sequence[int]) -> GroundTruth:
    return replace(gnd, qimlist=[gnd.qimlist[j] for j in keep], gnd=[gnd.gnd[j] for j in keep])


def _skipped_report(dataset: RetrievalDataset, missing_db: list[int], missing_q: list[int], conf: Config) -> list[dict]:
    """One entry per image that has no features, with the reason the extraction recorded."""
    from delg.feature_stores import db_store_paths, query_store_path, sidecar

    reasons: dict[str, str] = {}
    sidecars = [("db", sidecar(p, "skipped")) for p in db_store_paths(conf, dataset)]
    for split, p in [*sidecars, ("query", sidecar(query_store_path(conf, dataset), "skipped"))]:
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except ValueError:
                continue
            for item in data if isinstance(data, list) else []:  # [{"name", "path", "error"}, ...]
                if isinstance(item, dict) and "name" in item:
                    reasons[f"{split}/{item['name']}"] = str(item.get("error", item.get("reason", "unreadable")))
    out = []
    for i in missing_db:
        n = dataset.db_names[i]
        out.append({"split": "db", "name": n, "path": str(dataset.db_paths[i]), "reason": reasons.get(f"db/{n}", "no features"),
                    "effect": "ranked last for every query"})
    for j in missing_q:
        n = dataset.query_names[j]
        out.append({"split": "query", "name": n, "path": str(dataset.query_paths[j]),
                    "reason": reasons.get(f"query/{n}", "no features"), "effect": "left out of the evaluation"})
    return out


def _evaluate(gnd: GroundTruth, ranks: np.ndarray | dict[str, np.ndarray], n_db: int) -> dict[str, Any]:
    """Evaluator JSON; with one ranking per protocol (DELG protocol), each protocol is read off its own ranking."""
    if isinstance(ranks, dict):
        out = {}
        for p, r in ranks.items():
            out[_PROTOCOL_KEY[p]] = evaluate(gnd, r, n_db=n_db)[_PROTOCOL_KEY[p]]
        return out
    return evaluate(gnd, ranks, n_db=n_db)


def main(conf: Config) -> Path:
    """Run search, reranking, evaluation and the report; returns ``<output_dir>/results.json``."""
    from delg.feature_stores import check_weights

    check_weights(conf)  # a forgotten model.checkpoint fails before any work
    if conf.get("query"):
        return search_photo(conf, Path(conf.query))
    from delg import search
    from loftr_tools.registry import verifier_settings
    from loftr_tools.rerank import check_expansion, rerank_methods

    # Each verifier's resolved settings (long_side, RANSAC model/threshold/trials/min_inliers): checked before any
    # work, recorded in results.json (protocol.verifiers), completed with weight digests / stores when it runs.
    verifier_protocol = {m: verifier_settings(m, conf) for m in conf.rerank.methods}
    check_expansion(conf)
    search.check_settings(conf)  # rules between search keys (search.sg_k < search.sg_m), before any work
    out_dir = Path(conf.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A run that fails must not leave an older results.json that reads as its result: it becomes
    # results.previous.json now, and the new one is written (atomically) only at the end.
    if (out_dir / "results.json").is_file():
        (out_dir / "results.json").replace(out_dir / "results.previous.json")
    dump_config(conf, out_dir / "config.yaml")
    timing: dict[str, float] = {}

    t = time.time()
    dataset = load_dataset(conf)
    timing["dataset"] = time.time() - t
    print(f"dataset {dataset.name}: {dataset.n_queries} queries, {dataset.n_db} database images")

    t = time.time()
    ranks_path = search.main(conf, dataset)  # extracts features first when they are missing
    ranks = np.load(ranks_path)
    scores = np.load(ranks_path.with_name(ranks_path.stem + "_scores.npy"))
    timing["features+search"] = time.time() - t

    have_db, have_q = _stored_names(conf, dataset, "db"), _stored_names(conf, dataset, "query")
    missing_db = [i for i, n in enumerate(dataset.db_names) if n not in have_db]
    missing_q = [j for j, n in enumerate(dataset.query_names) if n not in have_q]
    keep = [j for j in range(dataset.n_queries) if j not in set(missing_q)]
    gnd = _subset_gnd(dataset.gnd, keep)
    skipped = _skipped_report(dataset, missing_db, missing_q, conf)

    rankings: dict[str, np.ndarray] = {"global": ranks[:, keep]}
    results: dict[str, Any] = {"global": _evaluate(gnd, ranks[:, keep], dataset.n_db)}
    inliers_for_report: dict[str, dict[tuple[int, int], int]] = {}
    match_fns: dict[str, Any] = {}
    verifier_skips: list[dict[str, str]] = []
    rc = conf.rerank
    # the one reranking loop (shared with python -m loftr_tools.rerank): writes ranks/rerank-<method>.npz; the
    # rerankers stay open for the report's match pictures
    runs = rerank_methods(conf, dataset, ranks[:, keep], scores[:, keep], query_ids=keep, skip_unavailable=True,
                          keep_open=True)
    rerankers = [run.reranker for run in runs if run.reranker is not None]
    for run in runs:
        method = run.method
        if run.reranker is None:
            verifier_skips.append({"method": method, "reason": str(run.unavailable)})
            continue
        rr = run.reranker
        new_ranks, inliers = run.ranks, run.inliers
        verifier_protocol[method] = {**verifier_protocol[method], **rr.settings(), "method": method}
        # the steps beyond pairwise order (fusion, verified QE, propagation): settings and what they did; absent =
        # plain pairwise reranking
        if run.expansion is not None:
            verifier_protocol[method]["beyond_pairwise"] = run.expansion
        for key, img_err in rr.stats.failed_images.items():
            if not any(s["split"] + "/" + s["name"] == key for s in skipped):
                verifier_skips.append({"method": method, "image": key, "reason": img_err})
        t = time.time()
        results[method] = _evaluate(gnd, new_ranks, dataset.n_db)
        shown = new_ranks["medium"] if isinstance(new_ranks, dict) else new_ranks
        shown_inl = inliers["medium"] if isinstance(inliers, dict) else inliers
        rankings[method] = shown
        inliers_for_report[method] = {
            (c, int(shown[r, c])): int(shown_inl[r, c]) for c in range(shown.shape[1]) for r in range(shown_inl.shape[0])
            if shown_inl[r, c] >= 0  # -1: brought up by query expansion / propagation without a direct match
        }
        match_fns[method] = (lambda rr_: lambda c, db: rr_.inlier_matches(dataset, keep[c], db))(rr)
        timing[method] = run.seconds + time.time() - t

    title = f"{dataset.name}: {len(keep)} queries" + (f" ({len(missing_q)} skipped)" if missing_q else "")
    print()
    print(format_table(results, title=title))
    complete = not (missing_db or missing_q or any("image" in s for s in verifier_skips))
    payload = {
        "dataset": dataset.name,
        "n_queries": len(keep),
        "n_db": dataset.n_db,
        "protocol": {
            "query_crop": bool(conf.dataset.query_crop) and any(b is not None for b in dataset.query_bbx),
            "junk_before_rerank": bool(rc.junk_before_rerank),
            "top_k": int(rc.top_k),
            "checkpoint": conf.model.checkpoint,
            "backbone": conf.model.backbone,
            "notes": dataset.notes,
            "search": search.search_record(ranks_path),  # index, exact, gpu, depth, ranking_cut, ...
            # what made the features: model conventions (input_colour, mean, std, attention_input), scales,
            # aggregation, resize, local selection; the same dict whose hash names the feature stores
            "extraction": extraction_settings(conf),
            "verifiers": verifier_protocol,
        },
        "methods": results,
        "complete": complete,
        "n_db_skipped": len(missing_db),  # ranked last for every query
        "n_queries_skipped": len(missing_q),  # left out of the evaluation (n_queries counts the ones kept)
        "skipped": skipped,
        "skipped_methods": [s for s in verifier_skips if "image" not in s],
        "verifier_failures": [s for s in verifier_skips if "image" in s],
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
    }
    if not complete:
        print(f"\nrun INCOMPLETE: {len(missing_db)} database and {len(missing_q)} query image(s) skipped "
              f"(listed in results.json)")
    res_path = out_dir / "results.json"
    atomic_write_json(res_path, payload, indent=1)

    if conf.report.enabled:
        from delg.report import write_report

        sub = replace(dataset, query_paths=[dataset.query_paths[j] for j in keep],
                      query_names=[dataset.query_names[j] for j in keep],
                      query_bbx=[dataset.query_bbx[j] for j in keep], gnd=gnd)
        t = time.time()
        rep = write_report(out_dir / "report.html", sub, rankings, results, inliers_for_report, match_fns,
                           conf.report, title=f"Retrieval report: {dataset.name}")
        timing["report"] = time.time() - t
        print(f"report: {rep}")
    for rr in rerankers:
        rr.close()
    print(f"results: {res_path}")
    return res_path


def query_result_path(conf: Config, photo: Path) -> Path:
    """``<output_dir>/query/<stem>-<hash>.json``: the hash of the photo's absolute path keeps two photos of one
    name (``a/IMG_0001.jpg``, ``b/IMG_0001.jpg``) from overwriting each other's results."""
    digest = hashlib.sha1(str(photo.resolve()).encode()).hexdigest()[:8]
    return Path(conf.output_dir) / "query" / f"{photo.stem}-{digest}.json"


def search_photo(conf: Config, photo: Path) -> Path:
    """Search the indexed database with one new photo, rerank its top K and print the best matches."""
    from delg import search
    from delg.data.images import load_pil
    from delg.extract import extract_one, load_model
    from loftr_tools.base import ImageRef, VerifierUnavailable
    from loftr_tools.ranking import floor_inliers, reorder_topk, topk_rows
    from loftr_tools.rerank import dataset_refs, open_reranker

    if not photo.is_file():
        raise ConfigError(f"query={photo}: file not found")
    dataset = load_dataset(conf)
    search.ensure_features(conf, dataset, ("db",))
    feats = extract_one(load_model(conf), load_pil(photo), conf)
    ids, scores = search.search_one(feats["global"], conf, dataset)
    top_k = topk_rows(int(conf.rerank.top_k), len(ids))
    order = list(range(len(ids)))
    inl: list[int | None] = [None] * len(ids)
    used = "global"
    for method in conf.rerank.methods:
        try:
            rr = open_reranker(conf, dataset, method)
        except VerifierUnavailable as e:
            print(f"[{method}] skipped: {e}")
            continue
        qref = ImageRef(key=f"photo/{photo.resolve()}", name=photo.name, path=photo)
        _, drefs = dataset_refs(dataset)
        counts = rr.score_pairs({qref: [drefs[int(i)] for i in ids[:top_k]]})
        rr.close()
        # the reranker's own rules: the verifier's ransac.min_inliers floor, then reorder_topk on the one column of
        # positions (so `order` indexes ids/scores); ties keep the global order
        raw = np.array([counts[(qref.key, drefs[int(ids[r])].key)] for r in range(top_k)], dtype=np.int64)
        floored = floor_inliers(raw, rr.min_inliers)
        positions, _ = reorder_topk(np.arange(len(ids))[:, None], floored[:, None], np.asarray(scores)[:, None])
        order = [int(r) for r in positions[:, 0]]
        inl[:top_k] = [int(v) for v in floored]
        used = method
        break
    print(f"\ntop matches for {photo} (global search, reranked with {used}):")
    print(f"{'rank':>4}  {'inliers':>7}  {'similarity':>10}  image")
    lines = []
    for pos, r in enumerate(order[:max(10, min(top_k, 20))]):
        i = int(ids[r])
        n = "" if inl[r] is None else str(inl[r])
        print(f"{pos + 1:>4}  {n:>7}  {scores[r]:>10.4f}  {dataset.db_paths[i]}")
        lines.append({"rank": pos + 1, "inliers": inl[r], "similarity": float(scores[r]), "path": str(dataset.db_paths[i])})
    out = query_result_path(conf, photo)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"query": str(photo), "verifier": used, "matches": lines}, indent=1))
    return out


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_stage(main, sys.argv[1:] if argv is None else argv, __doc__, default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
    sys.exit(cli())
