"""Keypoints and verifiers: DISK, ALIKED (+ LightGlue) and XFeat (+ LighterGlue) at several sizes and keypoint
counts on the real photos, pairwise and with the demo's steps beyond pairwise; quality per second.

    python bench/keypoints.py [--out DIR] [--json OUT] [--configs lightglue:512:1024 xfeat:512:1024 ...]

For each ``method:long_side:max_keypoints``:

* seconds per image (prepare: read, resize, extract) and per pair (match; RANSAC included) timed on a fixed sample of
  the real photos (10 images, 30 pairs among them), after one warm-up pair;
* Medium mAP of the pairwise row and of the demo's default (configs/demo.yaml: top 12, fusion, verified QE,
  propagation) through the pipeline's own code (``bench/beyond_pairwise.py``), over all queries and each half;
* the pairs and images each row verifies, and its seconds = extraction + images x s/image + pairs x s/pair.

The evidence ranges (``<section>.ransac.evidence_low/high``) are each section's defaults, chosen at 1024 keypoints:
fewer keypoints give fewer inliers, so the 512-keypoint rows are a little pessimistic. With ``--out`` reused, rows
answer from the inlier caches there and only the timing sample runs again.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from beyond_pairwise import ROWS, bench_dataset, shared_data  # noqa: E402

CONFIGS = ["lightglue:384:512", "lightglue:512:512", "lightglue:512:1024", "lightglue_aliked:512:512",
           "lightglue_aliked:512:1024", "xfeat:512:1024", "xfeat:640:2048"]
SECTION = {"lightglue": "lightglue", "lightglue_aliked": "lightglue", "xfeat": "xfeat"}


def unit_costs(method: str, overrides: list[str]) -> tuple[float, float]:
    """(seconds per image prepared, seconds per pair matched incl. RANSAC) on a fixed sample of the real photos."""
    from delg.config import load_config
    from loftr_tools.base import ImageRef
    from loftr_tools.ransac import RansacConf, ransac_inliers
    from loftr_tools.registry import build_verifier

    conf = load_config("configs/demo.yaml", ["device=cpu", *overrides])
    paths = sorted(glob.glob(str(shared_data() / "images" / "*" / "*.jpg")))[:10]
    refs = [ImageRef(key=f"db/{i}", name=str(i), path=Path(p)) for i, p in enumerate(paths)]
    v = build_verifier(method, conf, "cpu")
    rc = RansacConf.from_conf(v.conf["ransac"])
    v.match(v.prepare(refs[-1]), v.prepare(refs[-2]))  # warm-up
    t = time.perf_counter()
    feats = [v.prepare(r) for r in refs]
    s_img = (time.perf_counter() - t) / len(refs)
    pairs = [(i, j) for i in range(len(refs)) for j in range(i + 1, len(refs))][:30]
    t = time.perf_counter()
    for i, j in pairs:
        ransac_inliers(*v.match(feats[i], feats[j]), conf=rc)
    s_pair = (time.perf_counter() - t) / len(pairs)
    v.close()
    return s_img, s_pair


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=CONFIGS, help="method:long_side:max_keypoints")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a new temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (shared_data() / "images").is_dir():
        print(f"skipped: {shared_data() / 'images'} not found (set SHARED_DATA)")
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="keypoints_"))
    rows = [r for r in ROWS if r[0] in ("pairwise", "default")]
    table: list[dict[str, Any]] = []
    first_global: float | None = None  # extraction + search, measured by the first config (later ones reuse it)
    for spec in args.configs:
        method, side, kp = spec.split(":")
        over = [f"{SECTION[method]}.long_side={side}", f"{SECTION[method]}.max_keypoints={kp}"]
        s_img, s_pair = unit_costs(method, over)
        got = bench_dataset("real", [method], out, over, rows=rows, unit_costs={method: (s_img, s_pair)}) or []
        by = {r["row"]: r for r in got if r["method"] == method}
        pw, de = by["pairwise"], by["default"]
        t_global = next(r["seconds"] for r in got if r["row"] == "global")
        first_global = t_global if first_global is None else first_global
        for r in (pw, de):  # as if each config ran alone: the extraction that the first one measured
            r["seconds"] += first_global - t_global
        table.append({"config": spec, "s_per_image": s_img, "s_per_pair": s_pair,
                      "pairwise": pw["M_mAP"], "pairwise_A": pw["M_mAP_A"], "pairwise_B": pw["M_mAP_B"],
                      "default": de["M_mAP"], "default_A": de["M_mAP_A"], "default_B": de["M_mAP_B"],
                      "pairs": de["pairs"], "seconds": de["seconds"]})
        print(f"{spec}: {s_img:.3f} s/image {s_pair:.3f} s/pair; pairwise {pw['M_mAP']:.2f}; default "
              f"{de['M_mAP']:.2f} (A {de['M_mAP_A']:.2f}, B {de['M_mAP_B']:.2f}), {de['pairs']} pairs, "
              f"{de['seconds']:.0f} s", flush=True)
    head = (f"{'verifier:px:kp':<26} {'s/img':>6} {'s/pair':>6} {'pairwise':>8} {'default':>8} {'half A':>6} "
            f"{'half B':>6} {'pairs':>6} {'s':>5}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in table:
        print(f"{r['config']:<26} {r['s_per_image']:6.3f} {r['s_per_pair']:6.3f} {r['pairwise']:8.2f} "
              f"{r['default']:8.2f} {r['default_A']:6.2f} {r['default_B']:6.2f} {r['pairs']:6d} {r['seconds']:5.0f}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
