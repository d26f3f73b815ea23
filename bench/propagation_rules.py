"""Which propagation rule: five ways of spreading verified evidence over the graph, on the real photos.

    python bench/propagation_rules.py [--out DIR] [--json OUT] [key=value ...]   (e.g. rerank.methods=[lightglue_aliked])

Every pair of the real photos (45 photos + 16 distractors: 1,710 unordered pairs) is verified once through the
reranker (its inlier cache, so a rerun in the same ``--out`` matches nothing), then the demo's steps beyond pairwise
(``configs/demo.yaml``: top 12, fusion, verified QE, propagation) run through ``loftr_tools.expansion.expand_rankings``
with the verifier answered from that matrix, once per rule:

* ``bottleneck``: ``p(b) = max_a min(e(q, a), e(a, b))`` (``rerank.propagation_hops: 1``);
* ``two-hop bottleneck``: the same over paths of up to two links (``rerank.propagation_hops: 2``);
* ``product``: ``max_a e(q, a) e(a, b)``;
* ``mean``: ``sum_a e(q, a) e(a, b) / sum_a e(a, b)`` (the evidence of b's neighbours, weighted);
* ``diffusion``: three steps of a personalised random walk from the query's direct evidence (restart 0.5) over the
  row-normalised graph, as diffusion on a kNN graph does (Iscen et al. 2017), restricted to verified edges.

Then the demo's rule with two other weightings of the verified hits in the expanded query: alpha-QE's
(similarity^3) and equal weights (the default weights are the pairs' evidence).

Medium mAP over all queries, half A (the landmarks settings were chosen on) and half B; distinct pairs verified.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from beyond_pairwise import dataset_overrides, halves, medium  # noqa: E402


def _product(direct: Mapping[int, float], graph: Any, hops: int = 1) -> dict[int, float]:
    out: dict[int, float] = {}
    for a, ea in direct.items():
        for b, eab in graph.neighbours(a).items():
            out[b] = max(out.get(b, 0.0), ea * eab)
    return out


def _mean(direct: Mapping[int, float], graph: Any, hops: int = 1) -> dict[int, float]:
    acc: dict[int, float] = {}
    for a, ea in direct.items():
        for b, eab in graph.neighbours(a).items():
            acc[b] = acc.get(b, 0.0) + ea * eab
    return {b: v / max(sum(graph.neighbours(b).values()), 1e-12) for b, v in acc.items()}


def _diffusion(direct: Mapping[int, float], graph: Any, hops: int = 1, alpha: float = 0.5, steps: int = 3) -> dict[int, float]:
    f = dict(direct)
    for _ in range(steps):
        nf: dict[int, float] = {}
        for a, fa in f.items():
            nb = graph.neighbours(a)
            tot = sum(nb.values())
            for b, w in nb.items():
                nf[b] = nf.get(b, 0.0) + alpha * fa * w / tot
        for a, ya in direct.items():
            nf[a] = nf.get(a, 0.0) + (1 - alpha) * ya
        f = nf
    return f


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    over = dataset_overrides("real")
    if over is None:
        return 0
    import loftr_tools.expansion as ex
    from delg import search
    from delg.config import load_config
    from delg.data.dataset import load_dataset
    from loftr_tools.ranking import reorder_topk
    from loftr_tools.rerank import dataset_refs, open_reranker

    out = args.out or Path(tempfile.mkdtemp(prefix="propagation_rules_"))
    conf = load_config("configs/demo.yaml", [*over, f"output_dir={out}", "progress=true", *args.overrides])
    method = conf.rerank.methods[0]
    dataset = load_dataset(conf)
    ranks = np.load(search.main(conf, dataset))
    scores = np.load(Path(conf.output_dir) / "ranks" / "global_scores.npy")
    space = search.global_space(conf, dataset)
    qrefs, drefs = dataset_refs(dataset)
    rr = open_reranker(conf, dataset, method)
    counts = rr.score_pairs({q: drefs for q in qrefs})  # every pair, once (unordered), cached
    rr.close()
    S = np.array([[counts[(q.key, d.key)] for d in drefs] for q in qrefs])
    db_of_name = {n: i for i, n in enumerate(dataset.db_names)}
    db_of_query = [db_of_name[n] for n in dataset.query_names]
    D = np.zeros((len(drefs), len(drefs)), np.int64)  # database pairs: every photo is also a query
    for j, a in enumerate(db_of_query):
        D[a] = np.maximum(D[a], S[j])
    D = np.maximum(D, D.T)
    K = int(conf.rerank.top_k)
    rc = ex.ExpansionConf.from_conf(conf.rerank, rr.ransac)
    cols_a, cols_b = halves(list(dataset.query_names))

    evid = ex.expand_query

    def alpha_weights(q: np.ndarray, hits: np.ndarray, w: np.ndarray) -> np.ndarray:  # alpha-QE: similarity^3
        return evid(q, hits, np.maximum(hits @ q, 0) ** 3)

    def equal_weights(q: np.ndarray, hits: np.ndarray, w: np.ndarray) -> np.ndarray:
        return evid(q, hits, np.ones_like(w))

    # (name, propagation rule, hops, query-expansion weights): the five rules with the evidence weights, then the
    # demo's rule (two-link bottleneck) with two other weightings of the verified hits in the expanded query
    rules = [("bottleneck", ex.propagate, 1, evid), ("two-hop bottleneck", ex.propagate, 2, evid),
             ("product", _product, 1, evid), ("mean", _mean, 1, evid), ("diffusion", _diffusion, 1, evid),
             ("two-hop, QE alpha^3", ex.propagate, 2, alpha_weights), ("two-hop, QE equal", ex.propagate, 2, equal_weights)]
    original = ex.propagate
    table = []
    for name, fn, hops, qe_fn in rules:
        asked: set[tuple[int, int]] = set()

        def verify(todo: Mapping[int, Any], asked: set[tuple[int, int]] = asked) -> dict[tuple[int, int], int]:
            res = {}
            for c, ds in todo.items():
                for d in ds:
                    a = db_of_query[c]
                    if a != d:
                        asked.add((min(a, int(d)), max(a, int(d))))
                    res[(c, int(d))] = int(S[c, d])
            return res

        first = verify({c: list(ranks[:K, c]) for c in range(ranks.shape[1])})
        inl = np.array([[first[(c, int(ranks[r, c]))] for c in range(ranks.shape[1])] for r in range(K)])
        pairwise, _ = reorder_topk(ranks, inl, scores)
        ex.propagate, ex.expand_query = fn, qe_fn
        try:
            xc = ex.ExpansionConf(**{**rc.to_dict(), "propagation_hops": hops})
            new, _, _ = ex.expand_rankings(ranks, first, space.queries, space.db_vectors, verify, space.search,
                                           xc, K, db_of_query, pairwise_ranks=pairwise)
        finally:
            ex.propagate, ex.expand_query = original, evid
        cols = list(range(ranks.shape[1]))
        row = {"rule": name, "M_mAP": medium(dataset.gnd, new, cols, dataset.n_db)["mAP"],
               "M_mAP_A": medium(dataset.gnd, new, cols_a, dataset.n_db)["mAP"],
               "M_mAP_B": medium(dataset.gnd, new, cols_b, dataset.n_db)["mAP"], "pairs": len(asked)}
        table.append(row)
        print(f"{name:<22} all {row['M_mAP']:6.2f}  half A {row['M_mAP_A']:6.2f}  half B {row['M_mAP_B']:6.2f}  "
              f"pairs {row['pairs']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"method": method, "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
