"""Speed of LoFTR reranking: our cached-feature verifier against a plain and a seed-style kornia loop.

Workload shaped like ROxford reranking: 2 landmarks x 5 queries, each query's top 10 drawn (seeded) from a pool of
15 images of its landmark: 100 pairs over at most 40 distinct images, all 320x240 (long side ``--size``).  Images
are crops of the real photos of ``../shared/data/images`` when present, synthetic textures otherwise; they are
written as PNG files so every method reads them from disk.

Methods (same weights, same settings):

* ours: :class:`loftr_tools.loftr.LoFTRVerifier` built once; each image prepared once (load, resize, backbone,
  leading self layers), each query's pairs through ``match_many``. Timed: everything after construction, image
  loading included, on all 100 pairs.
* plain: kornia ``LoFTR.forward`` per pair on the two images (matcher built once; image tensors loaded before the
  clock starts, which favours plain), on a fixed 20-pair subset (the first two queries).
* seed-style: per pair, build kornia LoFTR, reload the weights from disk, load the two images, forward (subset).
* lightglue: :class:`loftr_tools.lightglue.DiskLightGlue` on all 100 pairs like ours (null if unavailable).
* xfeat: :class:`loftr_tools.xfeat.XFeatLighterGlue` (XFeat + LighterGlue) the same way (null if unavailable).

For the two sparse verifiers the bench also reports the time per image (``prepare``: load, resize, extraction, on
the distinct images) and per pair (``match``: the matcher on prepared features), each with its own settings
section (``lightglue.*``, ``xfeat.*``; the images are never upscaled, so ``--size`` bounds the long side).
``--sparse-only`` times DISK + LightGlue and XFeat alone (no LoFTR).

Weights: ``loftr.weights`` when that file exists (with its configured threshold); otherwise random weights with the
test recipe of ``tests/test_loftr.py`` (``temp_bug_fix=true``, backbone coarse output x0.1). Random weights give
no confident matches, so the coarse-match threshold is then lowered just enough that every pair of the workload
has at least ``MIN_MATCHES`` matches (calibrated on the coarse stage, untimed), as real pairs of a landmark do.  Each method is warmed up on a pair outside the workload; CUDA is
synchronised before every clock read.

    .venv/bin/python bench/rerank_speed.py --json outputs/bench/rerank_speed.json
    .venv/bin/python bench/rerank_speed.py device=cuda loftr.weights=/path/outdoor_ds.ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from delg.config import load_config  # noqa: E402
from delg.devices import resolve_device  # noqa: E402
from loftr_tools.base import ImageRef, VerifierUnavailable  # noqa: E402
from loftr_tools.loftr import LoFTRVerifier, build_matcher, kornia_config, loftr_to_original, resolve_weights  # noqa: E402
from loftr_tools.resize import load_resized  # noqa: E402

SHARED_IMAGES = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data")) / "images"
N_LANDMARKS, N_QUERIES, POOL, TOPK, SUBSET = 2, 5, 15, 10, 20
MIN_MATCHES = 100


# ---------------------------------------------------------------------------------------------- workload
def make_images(out: Path, size: tuple[int, int], seed: int = 0) -> tuple[list[list[Path]], str]:
    """``N_LANDMARKS`` lists of ``N_QUERIES + POOL`` images of ``size`` (w, h); returns them and their source."""
    rng = np.random.default_rng(seed)
    w, h = size
    folders = sorted(d for d in SHARED_IMAGES.glob("*") if d.is_dir() and len(list(d.glob("*.jpg"))) >= 5)
    landmarks = []
    source = "real photos (crops) from " + str(SHARED_IMAGES) if len(folders) >= N_LANDMARKS else "synthetic textures"
    for li in range(N_LANDMARKS):
        paths = []
        for n in range(N_QUERIES + POOL):
            if len(folders) >= N_LANDMARKS:
                photos = sorted(folders[-1 - li].glob("*.jpg"))  # british_museum, paris_sacre_coeur when present
                im = Image.open(photos[n % len(photos)]).convert("RGB")
                s = 1.6 * max(w / im.width, h / im.height)  # a crop of a downscaled photo: different views
                im = im.resize((max(w, round(im.width * s)), max(h, round(im.height * s))), Image.BILINEAR)
                x, y = rng.integers(0, im.width - w + 1), rng.integers(0, im.height - h + 1)
                im = im.crop((int(x), int(y), int(x) + w, int(y) + h))
            else:
                noise = rng.random((h // 8, w // 8))
                im = Image.fromarray((noise * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC).convert("RGB")
            p = out / f"lm{li}_{n:02d}.png"
            im.save(p)
            paths.append(p)
        landmarks.append(paths)
    return landmarks, source


def make_pairs(landmarks: list[list[Path]], seed: int = 0) -> list[tuple[ImageRef, list[ImageRef]]]:
    """Each query with its top ``TOPK`` drawn from its landmark's pool of ``POOL`` images."""
    rng = np.random.default_rng(seed)

    def ref(p: Path, kind: str) -> ImageRef:
        return ImageRef(key=f"{kind}/{p.stem}", name=p.stem, path=p)

    out = []
    for paths in landmarks:
        queries, pool = paths[:N_QUERIES], paths[N_QUERIES:]
        for q in queries:
            top = rng.choice(len(pool), TOPK, replace=False)
            out.append((ref(q, "query"), [ref(pool[i], "db") for i in top]))
    return out


# ---------------------------------------------------------------------------------------------- helpers
def random_checkpoint(path: Path) -> None:
    """Random LoFTR weights, zju3dv layout (the recipe of tests/test_loftr.py)."""
    from kornia.feature import LoFTR

    torch.manual_seed(0)
    model = LoFTR(pretrained=None, config=kornia_config({"temp_bug_fix": True, "match_threshold": 0.0}))
    with torch.no_grad():
        model.backbone.layer3_outconv.weight.mul_(0.1)
    torch.save({"state_dict": {f"matcher.{k}": v for k, v in model.state_dict().items()}}, path)


def calibrate_threshold(lconf: dict[str, Any], pairs: list[tuple[ImageRef, list[ImageRef]]], device: torch.device,
                        min_matches: int = MIN_MATCHES) -> float:
    """The largest coarse-match threshold at which every pair still has ``min_matches`` coarse matches."""
    v = LoFTRVerifier({**lconf, "match_threshold": 0.0}, device=device)
    feats = {r.key: v.prepare(r) for q, ds in pairs for r in (q, *ds)}
    kth = []
    for q, ds in pairs:
        for d in ds:
            conf = np.sort(v.coarse_confidences(feats[q.key], feats[d.key]))[::-1]
            if len(conf) < min_matches:
                return 0.0  # some pair has fewer mutual nearest neighbours: keep them all
            kth.append(float(conf[min_matches - 1]))
    # kornia keeps confidences strictly above the threshold
    return float(np.nextafter(np.float32(min(kth)), np.float32(0)))


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    t0 = clock(device)
    out = fn()
    return clock(device) - t0, out


def sort_matches(p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.lexsort((p0[:, 0], p0[:, 1]))
    return p0[o], p1[o]


# ---------------------------------------------------------------------------------------------- methods
def run_ours(v: LoFTRVerifier, pairs: list[tuple[ImageRef, list[ImageRef]]]) -> dict[tuple[str, str], Any]:
    cache: dict[str, Any] = {}

    def feats(r: ImageRef) -> Any:
        if r.key not in cache:
            cache[r.key] = v.prepare(r)
        return cache[r.key]

    out = {}
    for q, dbs in pairs:
        fq = feats(q)
        for d, m in zip(dbs, v.match_many(fq, [feats(d) for d in dbs])):
            out[(q.key, d.key)] = m
    return out


def kornia_pair(model: torch.nn.Module, t0: torch.Tensor, t1: torch.Tensor, s0: Any, s1: Any
                ) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        o = model({"image0": t0, "image1": t1})
    k0, k1 = o["keypoints0"].double().cpu().numpy(), o["keypoints1"].double().cpu().numpy()
    return loftr_to_original(k0, s0), loftr_to_original(k1, s1)


def time_sparse(v: Any, pairs: list[tuple[ImageRef, list[ImageRef]]], warm: list[ImageRef], device: torch.device
                ) -> dict[str, float]:
    """A sparse verifier on the workload: each distinct image prepared once (timed per image), then every pair
    matched (timed per pair). Returns seconds (both), pairs/s, ms per image, ms per pair, image and pair counts."""
    v.match(v.prepare(warm[0]), v.prepare(warm[1]))
    refs = list({r.key: r for q, ds in pairs for r in (q, *ds)}.values())
    feats: dict[str, Any] = {}

    def prep() -> None:
        for r in refs:
            feats[r.key] = v.prepare(r)

    def match() -> None:
        for q, ds in pairs:
            for d in ds:
                v.match(feats[q.key], feats[d.key])

    t_prep, _ = timed(prep, device)
    t_match, _ = timed(match, device)
    n = sum(len(ds) for _, ds in pairs)
    return {"seconds": t_prep + t_match, "pairs_per_s": n / (t_prep + t_match), "ms_per_image": 1000 * t_prep / len(refs),
            "ms_per_pair": 1000 * t_match / n, "images": len(refs), "pairs": n}


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--size", default="320x240", help="image size WxH (default 320x240)")
    ap.add_argument("--sparse-only", action="store_true", help="time DISK + LightGlue and XFeat only (no LoFTR)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["lightglue", "xfeat"], help="sparse verifiers to skip")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (loftr.*, device, mixed_precision)")
    args = ap.parse_args()
    conf = load_config(None, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(x) for x in args.size.lower().split("x"))
    device = resolve_device(conf.device)
    tmp = Path(tempfile.mkdtemp(prefix="rerank_speed_"))
    details: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads(), "size": [w, h]}

    landmarks, details["images"] = make_images(tmp, (w, h))
    pairs = make_pairs(landmarks)
    n_pairs = sum(len(d) for _, d in pairs)
    distinct = {q.key for q, _ in pairs} | {d.key for _, ds in pairs for d in ds}
    details.update(pairs=n_pairs, distinct_images=len(distinct))
    warm_refs = [ImageRef("warm/a", "a", landmarks[0][-1]), ImageRef("warm/b", "b", landmarks[1][-1])]

    def run_loftr() -> dict[str, Any]:
        weights = resolve_weights(conf.loftr.weights)
        lconf = {**conf.loftr.to_dict(), "long_side": max(w, h), "mixed_precision": bool(conf.mixed_precision)}
        if weights.is_file():
            details["weights"] = str(weights)
        else:
            weights = tmp / "random_loftr.ckpt"
            random_checkpoint(weights)
            lconf.update(weights=str(weights), temp_bug_fix=True)
            print("[rerank_speed] calibrating the coarse-match threshold ...", file=sys.stderr, flush=True)
            lconf["match_threshold"] = calibrate_threshold(lconf, pairs, device)
            details["weights"] = (f"random (no checkpoint at loftr.weights), temp_bug_fix=true, threshold "
                                  f"{lconf['match_threshold']:.4g} (every pair >= {MIN_MATCHES} matches)")

        # ours ------------------------------------------------------------------------------------------------
        print("[rerank_speed] timing ours ...", file=sys.stderr, flush=True)
        v = LoFTRVerifier(lconf, device=device)
        v.match(v.prepare(warm_refs[0]), v.prepare(warm_refs[1]))
        t_ours, ours = timed(lambda: run_ours(v, pairs), device)
        details["ours_seconds"] = t_ours
        details["ours_mean_matches"] = float(np.mean([len(m[0]) for m in ours.values()]))
        details["ours_min_matches"] = int(min(len(m[0]) for m in ours.values()))

        # plain and seed-style on the subset ---------------------------------------------------------------------
        print("[rerank_speed] timing plain + seed-style (20-pair subset) ...", file=sys.stderr, flush=True)
        subset = [(q, d) for q, ds in pairs for d in ds][:SUBSET]
        model = build_matcher(weights, lconf).to(device)
        loaded = {}
        for r in [*{r.key: r for qd in subset for r in qd}.values(), *warm_refs]:
            rz = load_resized(r, lconf["long_side"], 8, gray=True)
            loaded[r.key] = (rz.tensor(device, gray=True), rz.scale)
        amp = v.amp

        def plain_pair(q: ImageRef, d: ImageRef) -> tuple[np.ndarray, np.ndarray]:
            (t0, s0), (t1, s1) = loaded[q.key], loaded[d.key]
            with torch.autocast(device_type=device.type, enabled=amp):
                return kornia_pair(model, t0, t1, s0, s1)

        plain_pair(*warm_refs)
        t_plain, plain = timed(lambda: [plain_pair(q, d) for q, d in subset], device)

        def seed_pair(q: ImageRef, d: ImageRef) -> None:
            from kornia.feature import LoFTR

            m = LoFTR(pretrained=None, config=kornia_config(lconf))
            m.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True)["state_dict"])
            m = m.eval().to(device)
            r0, r1 = (load_resized(r, lconf["long_side"], 8, gray=True) for r in (q, d))
            with torch.autocast(device_type=device.type, enabled=amp):
                kornia_pair(m, r0.tensor(device, gray=True), r1.tensor(device, gray=True), r0.scale, r1.scale)

        seed_pair(*warm_refs)
        t_seed, _ = timed(lambda: [seed_pair(q, d) for q, d in subset], device)

        # agreement of ours and plain on the subset
        max_diff, count_mismatch = 0.0, 0
        for (q, d), pm in zip(subset, plain):
            a, b = sort_matches(*ours[(q.key, d.key)]), sort_matches(*pm)
            if len(a[0]) != len(b[0]):
                count_mismatch += 1
                continue
            if len(a[0]):
                max_diff = max(max_diff, float(np.abs(a[0] - b[0]).max()), float(np.abs(a[1] - b[1]).max()))
        details["subset_pairs_with_different_match_counts"] = count_mismatch
        return {"ours": t_ours, "plain": t_plain, "seed": t_seed, "subset": len(subset), "max_diff": max_diff,
                "count_mismatch": count_mismatch}

    lo = None if args.sparse_only else run_loftr()
    if lo is None:
        details["weights"] = "LoFTR not timed (--sparse-only)"

    # sparse verifiers: DISK + LightGlue, XFeat + LighterGlue ---------------------------------------------
    from loftr_tools.registry import build_verifier

    sparse: dict[str, dict[str, float] | None] = {}
    for method, label in (("lightglue", "DISK + LightGlue"), ("xfeat", "XFeat + LighterGlue")):
        if method in args.skip:
            details[method] = f"skipped (--skip {method})"
            sparse[label] = None
            continue
        print(f"[rerank_speed] timing {label} ...", file=sys.stderr, flush=True)
        try:
            vs = build_verifier(method, conf, device)
        except (ImportError, VerifierUnavailable) as e:
            details[method] = f"unavailable: {e}"
            sparse[label] = None
            continue
        sparse[label] = time_sparse(vs, pairs, warm_refs, device)
        details[method] = {"settings": {k: v for k, v in vs.conf.items() if k != "ransac"}, **sparse[label]}

    def rate(n: int, t: float | None) -> float | None:
        return None if t is None else n / t

    sp = {label: (t["pairs_per_s"] if t else None) for label, t in sparse.items()}
    res = {
        "ours_pairs_per_s": rate(n_pairs, lo and lo["ours"]),
        "plain_pairs_per_s": rate(lo["subset"], lo["plain"]) if lo else None,
        "seed_style_pairs_per_s": rate(lo["subset"], lo["seed"]) if lo else None,
        "lightglue_pairs_per_s": sp["DISK + LightGlue"],
        "xfeat_pairs_per_s": sp["XFeat + LighterGlue"],
        "lightglue_ms_per_image": (sparse["DISK + LightGlue"] or {}).get("ms_per_image"),
        "xfeat_ms_per_image": (sparse["XFeat + LighterGlue"] or {}).get("ms_per_image"),
        "lightglue_ms_per_pair": (sparse["DISK + LightGlue"] or {}).get("ms_per_pair"),
        "xfeat_ms_per_pair": (sparse["XFeat + LighterGlue"] or {}).get("ms_per_pair"),
        "max_keypoint_diff_px": lo["max_diff"] if lo else None,
        "details": details,
    }
    plain_rate = res["plain_pairs_per_s"]
    print(f"\nworkload: {n_pairs} pairs, {len(distinct)} distinct {w}x{h} images ({details['images']}); "
          f"weights: {details['weights']}; device {device}, {torch.get_num_threads()} torch threads")
    print(f"{'method':44s} {'pairs':>6s} {'s':>8s} {'pairs/s':>9s} {'vs plain':>9s}")
    rows = []
    if lo:
        rows += [("ours (cached backbone, match_many)", n_pairs, lo["ours"], res["ours_pairs_per_s"]),
                 ("plain kornia forward per pair", lo["subset"], lo["plain"], plain_rate),
                 ("seed-style (rebuild + reload per pair)", lo["subset"], lo["seed"], res["seed_style_pairs_per_s"])]
    for label, t in sparse.items():
        if t is not None:
            rows.append((label, n_pairs, t["seconds"], t["pairs_per_s"]))
    for name, n, t, r in rows:
        vs = f"{r / plain_rate:8.2f}x" if plain_rate else f"{'-':>9s}"
        print(f"{name:44s} {n:6d} {t:8.2f} {r:9.3f} {vs}")
    for label, t in sparse.items():
        if t is None:
            print(f"{label:44s} {'null':>6s}  ({details.get('lightglue' if 'Light' in label else 'xfeat')})")
        else:
            print(f"{label}: {t['ms_per_image']:.1f} ms per image (prepare, {t['images']} images), "
                  f"{t['ms_per_pair']:.1f} ms per pair (match)")
    if lo:
        print(f"max keypoint difference ours vs plain on the subset: {lo['max_diff']:.2e} px "
              f"({lo['count_mismatch']} pairs with a different match count); mean matches/pair "
              f"{details['ours_mean_matches']:.0f} (min {details['ours_min_matches']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
