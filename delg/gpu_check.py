"""GPU timing check (``scripts/gpu_check.sh``): no dataset, synthetic images at ROxford sizes, random weights.

Measures, on whatever device is there (CUDA if present), one stage at a time:

* ``extraction_amp_off`` / ``extraction_amp_on``: images/s of ResNet-50 DELG, 7 scales, 1024 px long side,
  mixed precision off and on (on needs CUDA);
* ``search``: global search over 1,000,000 2048-d descriptors: FAISS GPU where installed, else torch matmul + topk;
* ``loftr``: LoFTR pairs/s, our cached-backbone verifier against a plain loop over kornia's LoFTR forward;
* ``lightglue``: DISK + LightGlue pairs/s (random weights: only the time means something);
* ``loftr_vs_kornia``: our cached LoFTR path (fp32, and fp16 with mixed precision on CUDA) against kornia's own
  forward on the same weights and images: match counts and the fraction of our matches that kornia also finds;
* ``paper_standin``: the quick subset of ``scripts/paper_standin.sh`` (paper configs end to end on stand-in data)
  on this device: autocast extraction, LoFTR's cached fp16 path, FAISS on the GPU where installed; one line per
  config with its Medium mAPs (needs ``../shared/data``; skipped with ``--tiny``).

Every stage runs on its own: one that fails records ``{"error": "<one line>"}``, one that cannot run (no kornia,
no CUDA) records ``{"skipped": "<reason>"}``, and the next stage runs anyway.  The JSON is rewritten (atomically)
after every stage, so a run cut short keeps every finished figure; ``"finished": false`` and ``"running"`` then say
where it stopped.  It also records the environment (python, torch, CUDA device, kornia and faiss versions or null).

Needs torch, timm, numpy, pyyaml, tqdm, h5py, pillow and opencv; kornia (+ kornia-rs) for the LoFTR and LightGlue
stages; faiss optional; no model weights, no network.  Sized to take well under 4 minutes on one H200.

Usage (flags or the project's ``key=value`` style)::

    python -m delg.gpu_check [--out FILE | output_dir=DIR] [--tiny | tiny=true] [--device auto|cpu|cuda]

``output_dir=DIR`` writes ``DIR/gpu_check.json``; the default is ``gpu_check.json`` in the current folder.
``--tiny`` shrinks every size for a CPU smoke test.  The JSON is also printed at the end.
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

from delg.io import atomic_write_json

KORNIA_STAGES = ("loftr", "lightglue", "loftr_vs_kornia")
KORNIA_FIX = "run `make gpu-wheels` where PyPI is reachable and carry .gpu_wheels (scripts/gpu_check.sh installs it)"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


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


def one_line(e: BaseException, limit: int = 300) -> str:
    """``'<Type>: <first line of the message>'``, at most ``limit`` characters."""
    msg = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def module_version(name: str) -> tuple[str | None, str | None]:
    """``(version, None)`` when ``name`` imports, else ``(None, why)``: any failure counts, not only ImportError."""
    try:
        mod = __import__(name)
    except Exception as e:  # a broken install (kornia without kornia_rs, a faiss built for another numpy) too
        return None, one_line(e)
    return str(getattr(mod, "__version__", "unknown")), None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    atomic_write_json(path, data, mkdir=True, newline=True, indent=1)


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
    """Images/s of DELG multi-scale extraction (global + local, one pass per scale); warm-up on one image."""
    from delg.config import load_config
    from delg.extract import ExtractSettings, extract_multiscale
    from delg.model import build_model

    conf = load_config(None, [f"model.backbone={backbone}", "model.pretrained=false", f"extract.long_side={max(size)}"])
    model = build_model(conf.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    xs = ExtractSettings.from_conf(conf)
    ims = [torch.from_numpy(i).permute(2, 0, 1).contiguous() for i in synthetic_images(n, size)]
    extract_multiscale(model, ims[0], xs, mixed_precision=amp)  # warm-up: kernels, allocator

    def run() -> None:
        for im in ims:
            extract_multiscale(model, im, xs, mixed_precision=amp)

    return n / _timed(run, device, warmup=0)


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
    gray = torch.from_numpy(np.asarray(synthetic_images(1, size, seed=1)[0].mean(2), np.float32) / 255)
    gray = gray[None, None].to(device)

    def run_plain() -> None:
        with torch.inference_mode(), torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            for _ in pairs:
                plain({"image0": gray, "image1": gray})

    t_ours = _timed(run_ours, device)
    t_plain = _timed(run_plain, device)
    return {"ours_pairs_per_s": n_pairs / t_ours, "plain_pairs_per_s": n_pairs / t_plain, "speedup": t_plain / t_ours}


def _agreement(ours: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray], tol: float) -> float:
    """Fraction of our matches (pts0, pts1) with a kornia match within ``tol`` px in both images."""
    a = torch.from_numpy(np.concatenate(ours, 1)).double()
    b = torch.from_numpy(np.concatenate(ref, 1)).double()
    if len(a) == 0 or len(b) == 0:
        return float(len(a) == len(b))
    d = torch.cdist(a[:, :2], b[:, :2]).clamp_min(torch.cdist(a[:, 2:], b[:, 2:]))  # worse of the two images
    return float((d.min(1).values <= tol).double().mean())


def compare_loftr_kornia(device: torch.device, folder: Path, size: tuple[int, int], n_pairs: int) -> dict[str, Any]:
    """Our cached LoFTR (backbone once per image) against kornia's own per-pair forward, same weights and images.

    fp32: the same matches (counts equal, keypoints within 1e-3 px).  fp16 (CUDA autocast, as the reranker runs):
    half precision reorders sums, so a few matches near the threshold differ; the counts and the fraction of our
    matches that kornia's fp16 forward also finds (within 1 px) say how far.
    """
    from kornia.feature import LoFTR

    from delg.paper_standin import write_loftr_checkpoint
    from loftr_tools.base import ImageRef
    from loftr_tools.loftr import LoFTRVerifier, kornia_config
    from loftr_tools.resize import load_resized

    ckpt = write_loftr_checkpoint(folder / "loftr_official_random.ckpt")
    paths = _write_images(folder, n_pairs + 1, size)
    refs = [ImageRef(key=str(p), name=p.name, path=p) for p in paths]
    res: dict[str, Any] = {}
    for tag, amp in (("fp32", False), ("fp16", True)):
        if amp and device.type != "cuda":
            res[tag] = {"skipped": "mixed precision needs CUDA"}
            continue
        conf = {"weights": str(ckpt), "long_side": max(size), "match_threshold": 0.0, "mixed_precision": amp,
                "temp_bug_fix": True}
        ours = LoFTRVerifier(conf, device=device)
        ref = LoFTR(pretrained=None, config=kornia_config(conf))
        ref.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
        ref = ref.to(device).eval()
        n_ours, n_ref, agree, max_diff = [], [], [], 0.0
        for i in range(n_pairs):
            r0, r1 = refs[i], refs[i + 1]
            got = ours.match(ours.prepare(r0), ours.prepare(r1))
            im0, im1 = (load_resized(r, conf["long_side"], 8, gray=True) for r in (r0, r1))
            with torch.inference_mode(), torch.autocast(device.type, enabled=amp):
                out = ref({"image0": im0.tensor(gray=True).to(device), "image1": im1.tensor(gray=True).to(device)})
            # kornia puts pixel centres at +0.5 (see tests/test_loftr.py)
            want = (im0.to_original(out["keypoints0"].float().cpu() - 0.5),
                    im1.to_original(out["keypoints1"].float().cpu() - 0.5))
            n_ours.append(len(got[0]))
            n_ref.append(len(want[0]))
            agree.append(_agreement(got, want, 1.0))
            if len(got[0]) == len(want[0]) and len(got[0]):
                o, s_ = np.lexsort((got[0][:, 0], got[0][:, 1])), np.lexsort((want[0][:, 0], want[0][:, 1]))
                max_diff = max(max_diff, float(np.abs(got[0][o] - want[0][s_]).max()),
                               float(np.abs(got[1][o] - want[1][s_]).max()))
        res[tag] = {"matches_ours": n_ours, "matches_kornia": n_ref, "agree_1px": round(min(agree), 4),
                    "same_count": n_ours == n_ref, "max_diff_px": max_diff if n_ours == n_ref else None}
    res["setting"] = f"{size[0]}x{size[1]}, {n_pairs} pairs, random weights, threshold 0"
    return res


def run_paper_standin(device: torch.device, out_dir: Path) -> dict[str, Any]:
    """The quick subset of ``scripts/paper_standin.sh`` on ``device``; one entry per config."""
    from dataclasses import replace

    from delg import paper_standin

    lines: list[str] = []
    rc = paper_standin.main(out_dir, quick=True, sizes=replace(paper_standin.QUICK, device=str(device)),
                            log=lines.append)
    data = json.loads((out_dir / "standin.json").read_text())
    keep = ("status", "seconds", "maps", "skipped_methods", "loss", "error")
    return {"exit_status": rc, "output_dir": str(out_dir), "failed": data["failed"],
            "configs": {r["name"]: {k: r[k] for k in keep if k in r} for r in data["configs"]},
            "lines": [x for x in lines if x and not x.startswith("paper_standin:")]}


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
    """Exact inner-product search of ``n_q`` queries over ``n_db`` descriptors: FAISS GPU, else torch matmul+topk.

    The descriptors are drawn on ``device`` in chunks (1M x 2048 on the CPU would take longer than the search).
    """
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    chunk = 262144  # bounds the memory of the random draw and of the similarity block
    db = torch.empty(n_db, dim, dtype=dtype, device=device)
    for s in range(0, n_db, chunk):
        e = min(s + chunk, n_db)
        db[s:e] = torch.nn.functional.normalize(torch.randn(e - s, dim, generator=g, device=device), dim=1).to(dtype)
    q = torch.nn.functional.normalize(torch.randn(n_q, dim, generator=g, device=device), dim=1).to(dtype)
    info: dict[str, Any] = {"n_db": n_db, "dim": dim, "n_queries": n_q, "k": k}
    if device.type == "cuda":
        try:
            import faiss

            if hasattr(faiss, "StandardGpuResources"):
                res = faiss.StandardGpuResources()
                index = faiss.GpuIndexFlatIP(res, dim)
                index.add(db.float().cpu().numpy())
                qn = q.float().cpu().numpy()
                sec = _timed(lambda: index.search(qn, k), device, reps=5)
                return {"engine": "faiss-gpu", "seconds": sec, "queries_per_s": n_q / sec, **info}
            info["faiss"] = "installed without GPU support"
        except ImportError:
            pass
        except Exception as e:  # faiss there but broken: the torch figure is still worth having
            info["faiss_error"] = one_line(e)

    def run() -> None:
        for s in range(0, n_db, chunk):
            torch.topk(q @ db[s : s + chunk].T, min(k, n_db - s, chunk), dim=1)

    sec = _timed(run, device, reps=5)
    return {"engine": f"torch-matmul-topk-{str(dtype).split('.')[-1]}", "seconds": sec, "queries_per_s": n_q / sec,
            **info}


def environment(device: torch.device) -> dict[str, Any]:
    """Python, torch, CUDA device, kornia and faiss versions (null when not importable, with the reason)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "cuda_device": None,
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            env["cuda_device"] = torch.cuda.get_device_name(device)
            env["cuda_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
            env["cudnn"] = torch.backends.cudnn.version()
        except Exception as e:
            env["cuda_error"] = one_line(e)
    for name in ("kornia", "faiss"):
        env[name], why = module_version(name)
        if why:
            env[f"{name}_error"] = why
    if env["kornia"] is not None:  # the stages need kornia.feature, which pulls in more than `import kornia`
        try:
            __import__("kornia.feature")
        except Exception as e:
            env["kornia_error"] = one_line(e)
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags (``--out``, ``--tiny``, ``--device``) and the project's ``key=value`` style (``output_dir=DIR``,
    ``out=FILE``, ``tiny=true``, ``device=cuda``), mixed freely; ``output_dir=DIR`` means ``--out DIR/gpu_check.json``."""
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file to write (default gpu_check.json)")
    ap.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                    help="write DIR/gpu_check.json (same as output_dir=DIR)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    kv: dict[str, str] = {}
    for a in rest:
        if a.startswith("-") or "=" not in a:
            ap.error(f"unrecognized argument: {a}")
        key, value = a.split("=", 1)
        kv[key.strip()] = value.strip()
    for key, value in kv.items():
        if key in ("output_dir", "out", "device"):
            setattr(args, key, value)
        elif key in ("tiny", "overwrite", "progress"):
            if value.lower() not in _TRUE | _FALSE:
                ap.error(f"{key}={value}: expected true or false")
            if key == "tiny":
                args.tiny = value.lower() in _TRUE
            # overwrite, progress: accepted as every script accepts them; the JSON is always rewritten
        else:
            import difflib

            known = ("output_dir", "out", "tiny", "device", "overwrite", "progress")
            near = difflib.get_close_matches(key, known, n=1, cutoff=0) or ["output_dir"]
            ap.error(f"unknown setting '{key}' (nearest valid key: '{near[0]}'; known: {', '.join(known)})")
    if args.out is None:
        args.out = str(Path(args.output_dir) / "gpu_check.json") if args.output_dir else "gpu_check.json"
    elif args.output_dir:
        ap.error("give either --out or output_dir, not both")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        ap.error(f"device={args.device}: expected auto, cpu or cuda")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every stage, rewriting the JSON after each; returns what it wrote last."""
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    path = Path(args.out)
    # Full sizes, by design well under 4 minutes on one H200 (most of it model set-up, not the timed loops).
    ext_size, ext_n, backbone = ((128, 96), 1, "efficientnet_lite0") if args.tiny else ((1024, 768), 8, "resnet50")
    l_size, l_pairs, kp = ((128, 96), 2, 64) if args.tiny else ((640, 480), 40, 2048)
    n_db, dim = (5000, 256) if args.tiny else (1_000_000, 2048)
    env = environment(device)
    out: dict[str, Any] = {"finished": False, "running": None, "tiny": args.tiny, "env": env}
    kornia_missing = env.get("kornia_error")
    t_all = time.perf_counter()
    ext_setting = f"{backbone}, 7 scales, {max(ext_size)} px, {ext_n} images, random weights"
    l_setting = f"{l_size[0]}x{l_size[1]}, {l_pairs} pairs, random weights"

    def extraction(amp: bool) -> Callable[[], dict[str, Any]]:
        return lambda: {"images_per_s": bench_extraction(device, ext_size, ext_n, amp, backbone), "setting": ext_setting}

    def loftr() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            res: dict[str, Any] = bench_loftr(device, Path(tmp), l_size, l_pairs, device.type == "cuda")
        return {**res, "setting": f"{l_setting}, threshold 0"}

    def lightglue() -> dict[str, Any]:
        return {"pairs_per_s": bench_lightglue(device, l_size, l_pairs, kp), "setting": f"DISK {kp} keypoints, {l_setting}"}

    def loftr_vs_kornia() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            return compare_loftr_kornia(device, Path(tmp), (128, 96) if args.tiny else (640, 480), 2 if args.tiny else 4)

    def standin() -> dict[str, Any]:
        return run_paper_standin(device, path.parent / "paper_standin")

    standin_skip = "tiny: the stand-in takes minutes on a CPU (run scripts/paper_standin.sh --quick)" if args.tiny else None
    if standin_skip is None:
        from delg.errors import ProjectError
        from delg.paper_standin import shared_data

        try:
            shared_data()
        except ProjectError as e:
            standin_skip = str(e)
    stages: list[tuple[str, Callable[[], dict[str, Any]], str | None]] = [
        ("extraction_amp_off", extraction(False), None),
        ("extraction_amp_on", extraction(True), None if device.type == "cuda" else "mixed precision needs CUDA"),
        ("search", lambda: bench_search(device, n_db, dim, 70), None),
        ("loftr", loftr, f"kornia not importable ({kornia_missing}); {KORNIA_FIX}" if kornia_missing else None),
        ("lightglue", lightglue, f"kornia not importable ({kornia_missing}); {KORNIA_FIX}" if kornia_missing else None),
        ("loftr_vs_kornia", loftr_vs_kornia,
         f"kornia not importable ({kornia_missing}); {KORNIA_FIX}" if kornia_missing else None),
        ("paper_standin", standin, standin_skip),
    ]
    for name, fn, skip in stages:
        if skip:
            out[name] = {"skipped": skip}
            continue
        out["running"] = name
        write_json_atomic(path, out)
        t = time.perf_counter()
        try:
            res = fn()
        except Exception as e:
            res = {"error": one_line(e)}
        res["stage_s"] = round(time.perf_counter() - t, 2)
        out[name] = res
        out["total_s"] = round(time.perf_counter() - t_all, 2)
        print(f"gpu_check: {name}: {json.dumps(res)}", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["running"] = None
    out["finished"] = True
    out["total_s"] = round(time.perf_counter() - t_all, 2)
    write_json_atomic(path, out)
    print(json.dumps(out, indent=1))
    print(f"gpu_check: wrote {path}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
