"""What each step of the paper reproduction costs: disk, memory and time for ROxford5k/RParis6k and +1M.

Measured here (CPU, random weights: speed does not depend on them): the seconds and FLOPs of one image's DELG
extraction at the paper settings (long side 1024, 7 scales, 3 of them global; ResNet-50 and -101) and of the
global-only extraction of a distractor (3 global scales), and of one LoFTR pair at the paper configs' resolution.
Everything else is arithmetic on the dataset sizes: store sizes from the descriptor shapes, search memory from
the database matrix, times as (images or pairs) x (measured seconds or FLOPs / an assumed GPU throughput).

The GPU column is an ESTIMATE, not a measurement: FLOPs divided by ``--gpu-tflops`` (an effective fp16 rate for
batch-1 convolutions on a current data-centre GPU, well below its peak), with JPEG decoding assumed to keep up.

    .venv/bin/python bench/paper_cost.py                      # about 3 minutes on 2 CPU cores
    .venv/bin/python bench/paper_cost.py --json outputs/bench/paper_cost.json --gpu-tflops 40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from delg.config import load_config
from delg.extract import ExtractSettings, extract_multiscale
from delg.model.delg import DELG

# Image counts of the benchmarks (revisitop): database, queries; R1M = 1,001,001 distractors.
DATASETS = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}
N_1M = 1_001_001
TOP_K = 100  # pairs verified per query (paper configs)
ASPECT = 0.75  # typical Oxford/Paris photo: 1024 x 768 after the resize


def synthetic_image(w: int, h: int, seed: int = 0) -> torch.Tensor:
    """(3, h, w) uint8 smooth random image (content does not change the cost of a CNN)."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy((rng.random((3, h // 16 + 1, w // 16 + 1)) * 255).astype(np.float32))
    big = torch.nn.functional.interpolate(small[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return big.clamp(0, 255).to(torch.uint8)


def timed_flops(fn: Any) -> tuple[float, float]:
    """(seconds of one call after a warm-up call, FLOPs of one call).

    The seconds are the process's CPU time divided by torch's thread count: what the call takes on idle cores,
    robust to other processes sharing the machine (wall-clock time is not, on a busy 2-core machine).
    """
    from torch.utils.flop_counter import FlopCounterMode

    fn()
    c0 = time.process_time()
    fn()
    sec = (time.process_time() - c0) / torch.get_num_threads()
    with FlopCounterMode(display=False) as fc:
        fn()
    return sec, float(fc.get_total_flops())


def extraction_cost(backbone: str, size: int) -> dict[str, float]:
    """Seconds and FLOPs of one image: full (7 scales, global + local) and distractor (3 global scales only)."""
    model = DELG(backbone=backbone, pretrained=False, whiten_dim=2048, local_dim=128, trained_global=True,
                 trained_local=True).eval()
    img = synthetic_image(size, round(size * ASPECT))
    conf = load_config(None, ["device=cpu", f"extract.long_side={size}"])
    full = ExtractSettings.from_conf(conf)
    glob = ExtractSettings.from_conf(load_config(None, ["device=cpu", f"extract.long_side={size}", "extract.local=false",
                                                        "extract.scales=[0.7071, 1.0, 1.4142]"]))
    s_full, f_full = timed_flops(lambda: extract_multiscale(model, img, full))
    s_glob, f_glob = timed_flops(lambda: extract_multiscale(model, img, glob))
    return {"full_s": s_full, "full_gflop": f_full / 1e9, "global_s": s_glob, "global_gflop": f_glob / 1e9}


def loftr_cost(long_side: int) -> dict[str, float]:
    """Seconds and FLOPs of one LoFTR pair (kornia's model, random weights) at ``long_side`` x 3/4, both images."""
    from kornia.feature import LoFTR

    from loftr_tools.loftr import kornia_config

    conf = load_config(None, []).loftr
    model = LoFTR(pretrained=None, config=kornia_config(conf)).eval()
    w, h = long_side - long_side % 8, round(long_side * ASPECT) // 8 * 8
    a = synthetic_image(w, h, 1).float().mean(0, keepdim=True)[None] / 255
    b = synthetic_image(w, h, 2).float().mean(0, keepdim=True)[None] / 255

    def run() -> None:
        with torch.inference_mode():
            model({"image0": a, "image1": b})

    sec, flops = timed_flops(run)
    return {"pair_s": sec, "pair_gflop": flops / 1e9, "size": [w, h]}


def store_gb(n: int, gdim: int, ldim: int, kp: int, bytes_desc: int) -> float:
    """HDF5 store size: global + kp x (local descriptor + xy + score); chunk overhead ignored (a few %)."""
    per = gdim * bytes_desc + kp * (ldim * bytes_desc + 3 * 4)
    return n * per / 1e9


def table(m: dict[str, Any], gpu_tflops: float) -> list[dict[str, Any]]:
    rows = []
    gpu = gpu_tflops * 1e12
    for bb, e in m["extract"].items():
        for name, (n_db, n_q) in DATASETS.items():
            n = n_db + n_q
            rows.append({
                "step": f"extract {name} ({bb}, 7 scales, 1024 px, global + 1000 local)", "items": n,
                "disk_gb": round(store_gb(n, 2048, 128, 1000, 4), 1),
                "disk_gb_seed_512d_local": round(store_gb(n, 512, 512, 1000, 4), 1),
                "cpu_h": round(n * e["full_s"] / 3600, 1),
                "gpu_h_estimate": round(n * e["full_gflop"] * 1e9 / gpu / 3600, 2),
            })
        rows.append({
            "step": f"extract 1M distractors ({bb}, 3 global scales, global only, float16), shared by both +1M",
            "items": N_1M, "disk_gb": round(store_gb(N_1M, 2048, 0, 0, 2), 1),
            "disk_gb_seed_512d_local": round(store_gb(N_1M, 512, 0, 0, 2), 1),
            "cpu_h": round(N_1M * e["global_s"] / 3600, 0),
            "gpu_h_estimate": round(N_1M * e["global_gflop"] * 1e9 / gpu / 3600, 1),
        })
        rows.append({
            "step": f"on-demand local features of distractors in a top {TOP_K} ({bb}, <= 70 x {TOP_K} per dataset)",
            "items": 70 * TOP_K, "disk_gb": round(store_gb(70 * TOP_K, 0, 128, 1000, 2), 1),
            "disk_gb_seed_512d_local": round(store_gb(70 * TOP_K, 0, 512, 1000, 2), 1),
            "cpu_h": round(70 * TOP_K * e["full_s"] / 3600, 1),
            "gpu_h_estimate": round(70 * TOP_K * e["full_gflop"] * 1e9 / gpu / 3600, 2),
        })
    lo = m["loftr"]
    rows.append({
        "step": f"LoFTR top {TOP_K} of 70 queries, {lo['size'][0]}x{lo['size'][1]} (per dataset, per protocol set)",
        "items": 70 * TOP_K, "disk_gb": 0.0, "disk_gb_seed_512d_local": 0.0,
        "cpu_h": round(70 * TOP_K * lo["pair_s"] / 3600, 1),
        "gpu_h_estimate": round(70 * TOP_K * lo["pair_gflop"] * 1e9 / gpu / 3600, 2),
    })
    return rows


def memory(gdim: int) -> dict[str, float]:
    """GB held by an exact (flat) search: the float32 database matrix; 5k/6k are negligible."""
    return {"flat_1M_float32_gb": round(N_1M * gdim * 4 / 1e9, 1), "ranks_full_1M_int32_70q_gb": round(N_1M * 70 * 4 / 1e9, 2)}


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="long side of the extraction image (paper: 1024)")
    ap.add_argument("--loftr-side", type=int, default=840, help="LoFTR long side of the paper configs")
    ap.add_argument("--backbones", nargs="+", default=["resnet50", "resnet101"])
    ap.add_argument("--gpu-tflops", type=float, default=40.0,
                    help="assumed effective GPU throughput (TFLOP/s) for the estimate column")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    m: dict[str, Any] = {"threads": torch.get_num_threads(), "gpu_tflops_assumed": args.gpu_tflops, "extract": {}}
    for bb in args.backbones:
        m["extract"][bb] = extraction_cost(bb, args.size)
        print(f"{bb}: full {m['extract'][bb]['full_s']:.1f} s / {m['extract'][bb]['full_gflop']:.0f} GFLOP per image, "
              f"global-only {m['extract'][bb]['global_s']:.1f} s / {m['extract'][bb]['global_gflop']:.0f} GFLOP", flush=True)
    m["loftr"] = loftr_cost(args.loftr_side)
    print(f"LoFTR pair: {m['loftr']['pair_s']:.1f} s / {m['loftr']['pair_gflop']:.0f} GFLOP", flush=True)
    m["rows"] = table(m, args.gpu_tflops)
    m["memory"] = {"2048d": memory(2048), "512d": memory(512)}
    print(f"\n{'step':<100} {'items':>9} {'disk GB':>8} {'(seed)':>7} {'CPU h':>8} {'GPU h (est.)':>12}")
    for r in m["rows"]:
        print(f"{r['step']:<100} {r['items']:>9} {r['disk_gb']:>8} {r['disk_gb_seed_512d_local']:>7} "
              f"{r['cpu_h']:>8} {r['gpu_h_estimate']:>12}")
    print(f"\nexact +1M search memory: {m['memory']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(m, indent=1))
    return m


if __name__ == "__main__":
    main()
