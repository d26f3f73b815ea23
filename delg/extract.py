"""One-pass multi-scale DELG extraction into resumable HDF5 feature stores.

For every image (queries cropped to their bbx), resized so its long side is at most ``extract.long_side``, the
model runs once per scale of ``extract.scales``; scales of ``extract.global_scales`` ask for both heads (the
stride-16 map is shared), the others stop the backbone at stride 16.  The global descriptor is the L2-normalised
sum of the per-scale ones (``extract.global_aggregation``: each L2-normalised first, as DELG, or raw, as the seed);
local features are the top ``max_keypoints`` by attention over all scales (optionally the seed's halving threshold
and box NMS), their receptive-field centres mapped back to pixels of the (cropped) original image.  The image is
fed in the colour order and normalisation of the model's weights (``model.input_colour``: 'bgr' for pycls/seed
checkpoints and their fine-tunes), resized as ``extract.resize`` says.

Outputs, under ``<output_dir>/features/<dataset>/``:
    ``<preset>-db.h5``, ``<preset>-query.h5``  the stores (``delg.store``); ``query_full`` when queries are not cropped;
                                                none when every query is a whole database image (folder datasets,
                                                revisitop with ``query_crop=false``): the queries read the db store
                                                (:func:`queries_in_db`), so no image is extracted twice
    ``<store>.skipped.json``                    images that could not be read (skipped, the rest proceeds); a
                                                damaged one is moved aside and its images are tried again
    ``<store>.progress.json``                   images done / total, rewritten after every image

Distractors (``dataset.distractors``, e.g. the 1M of ROxford+1M / RParis+1M) are not part of the benchmark's db
store: their global descriptors go to one store that does not depend on the benchmark,
``<extract.distractor_dir>/<distractor id>/<preset>-distractors.h5`` (globals only), shared by every run with the
same folder, model and settings; local features of a distractor are extracted only when a verifier that reads the
stores (DELG-local) asks for them, into ``<preset>-distractors-local.h5`` beside it (:class:`OnDemandLocals`).
Search reads the two database stores as one (:func:`delg.feature_stores.open_db_store`).

The names of these files and the identity hashed into ``<preset>`` (:func:`~delg.feature_stores.preset_name`,
:func:`~delg.feature_stores.extraction_settings`) are :mod:`delg.feature_stores`: every later stage uses them.

Before the first image of a store, the disk space it needs is estimated and printed; a folder with less free
space refuses the run (:class:`DiskSpaceError`).

Sharding (``shard=i/n`` or torchrun's RANK/WORLD_SIZE): part ``i`` takes images ``i, i+n, ...`` of each split into
``<preset>-<split>.part-i-of-n.h5``; the last part to finish merges all parts into the store (``extract.merge=true``
merges by hand, e.g. after a crash of the last one).  Run on its own::

    python -m delg.extract --config configs/demo.yaml [shard=0/4] [overwrite=true]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from delg.config import Config, ConfigError, dump_config, run_stage
from delg.data.images import ImageReadError, load_pil, resize_max_side
from delg.devices import resolve_device
from delg.errors import ProjectError
from delg.feature_stores import (
    SCALE_TOL,
    ExtractSettings,
    check_weights,
    distractor_local_path,
    distractor_settings,
    distractor_store_path,
    extraction_settings,
    features_dir,
    part_path,
    preset_name,
    queries_in_db,
    sidecar,
    split_tag,
    store_path,
)
from delg.feature_stores import (
    ExtractError as ExtractError,  # re-exported: the error of extraction's settings
)
from delg.io import atomic_write_json
from delg.store import FeatureStore, StoreError


class DiskSpaceError(ProjectError, OSError):
    """The folder of a store has less free space than the extraction needs; the message names both."""


# ---------------------------------------------------------------------------------------------- settings
GLOBAL_AGGREGATIONS = ("l2_per_scale", "sum")
RESIZES = ("antialias", "cv2_bilinear")


def parse_shard(conf: Config) -> tuple[int, int] | None:
    """``shard="i/n"`` (0-based), else torchrun's ``RANK``/``WORLD_SIZE``, else ``None`` (everything)."""
    raw = conf.get("shard")
    if raw not in (None, ""):
        try:
            i, n = (int(v) for v in str(raw).split("/"))
        except ValueError:
            raise ConfigError(f"shard: expected 'i/n' (e.g. 0/4), got {raw!r}") from None
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"shard: need 0 <= i < n, got {raw!r}")
        return (i, n) if n > 1 else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return int(os.environ.get("RANK", "0")), world
    return None


# ---------------------------------------------------------------------------------------------- the model
def load_model(conf: Config) -> torch.nn.Module:
    """``build_model(conf.model)`` on the configured device; seeded, so untrained heads are reproducible."""
    from delg.model import build_model

    check_weights(conf)
    torch.manual_seed(int(conf.seed))
    return build_model(conf.model).to(resolve_device(conf.get("device", "auto"))).eval()


def _norm_consts(model: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(model.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.as_tensor(model.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def _autocast(device: torch.device, mixed_precision: bool) -> Any:
    if mixed_precision and device.type == "cuda":
        # float16, not bfloat16: inference activations fit its range and it keeps 3 more mantissa bits
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """(1, 3, H, W) -> (1, 3, round(H*s), round(W*s)); bilinear, antialiased when shrinking."""
    if abs(scale - 1.0) < SCALE_TOL:
        return x
    h, w = x.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)


def rescale_cv2(image: np.ndarray, scale: float) -> np.ndarray:
    """(H, W, 3) float32 -> (round(H*s), round(W*s), 3) with ``cv2.resize`` INTER_LINEAR (no antialiasing), as the
    seed resizes each scale of its pyramid (the 0..255 image as float32)."""
    import cv2

    if abs(scale - 1.0) < SCALE_TOL:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


def resize_max_side_cv2(im: Image.Image, max_side: int | None) -> np.ndarray:
    """RGB PIL image -> (H, W, 3) uint8, long side at most ``max_side`` (never upscales; sizes as
    :func:`delg.data.images.resize_max_side`), resized with ``cv2.resize`` INTER_LINEAR on the 8-bit image."""
    import cv2

    arr = np.asarray(im, dtype=np.uint8)
    if not max_side or max(im.size) <= max_side:
        return arr
    s = max_side / max(im.size)
    size = (max(1, round(im.width * s)), max(1, round(im.height * s)))
    return cv2.resize(arr, size, interpolation=cv2.INTER_LINEAR)


def _to_input(image: torch.Tensor, model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """(3, H, W) RGB uint8 or float in [0, 1] -> (1, 3, H, W) normalised float32 on ``device``, in the channel
    order of the model's weights: a 'bgr' model (pycls / seed checkpoints) gets B, G, R, as cv2.imread gives."""
    x = image.to(device)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if getattr(model, "input_colour", "rgb") == "bgr":
        x = x.flip(0)
    mean, std = _norm_consts(model, device)
    return (x[None] - mean) / std


def nms_boxes(boxes: np.ndarray, scores: np.ndarray, iou: float, top_k: int) -> np.ndarray:
    """Greedy box non-maximum suppression, as the seed's local selection.

    Only the ``top_k`` highest scores are candidates; going down by score, a box is kept unless its IoU with an
    already kept box exceeds ``iou``.  IoU uses areas ``(x1 - x0) * (y1 - y0)`` (no +1, as the seed).

    Args:
        boxes: (N, 4) float ``x0, y0, x1, y1``.
        scores: (N,) float.
        iou: suppression threshold in [0, 1].
        top_k: number of candidates.

    Returns:
        (K,) int64 indices of the kept boxes, by decreasing score (ties: lower index first), K <= top_k.
    """
    order = np.argsort(-scores, kind="stable")[:top_k]
    b = boxes[order].astype(np.float64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    alive = np.ones(len(order), bool)
    keep = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(i)
        rest = np.flatnonzero(alive[i + 1:]) + i + 1
        if not len(rest):
            break
        w = np.clip(np.minimum(b[rest, 2], b[i, 2]) - np.maximum(b[rest, 0], b[i, 0]), 0, None)
        h = np.clip(np.minimum(b[rest, 3], b[i, 3]) - np.maximum(b[rest, 1], b[i, 1]), 0, None)
        inter = w * h
        union = area[rest] + area[i] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            ov = np.where(union > 0, inter / union, 0.0)
        alive[rest[ov > iou]] = False
    return order[np.asarray(keep, np.int64)].astype(np.int64)


def _threshold_indices(sc: np.ndarray, threshold: float, halve_until: int) -> np.ndarray:
    """Cells of one scale that pass the attention threshold.

    ``halve_until == 0``: ``score >= threshold`` (DELG).  Otherwise the seed's rule: ``score > threshold``, the
    threshold halved while fewer than ``halve_until`` cells pass, stopping once it would drop below 0.1.
    """
    if not halve_until:
        return np.flatnonzero(sc >= threshold)
    thr = threshold
    while True:
        idx = np.flatnonzero(sc > thr)
        thr *= 0.5
        if len(idx) >= halve_until or thr < 0.1:
            return idx


def select_local(
    per_scale: Sequence[tuple[np.ndarray, ...]], max_keypoints: int, threshold: float,
    halve_until: int = 0, nms_iou: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``max_keypoints`` by attention over all scales, ties broken by (scale, cell) order.

    Args:
        per_scale: per scale ``(scores (M,), keypoints (M, 2) original pixels, descriptors (M, d))``, plus
            ``boxes (M, 4)`` (receptive fields in original pixels, x0 y0 x1 y1) when ``nms_iou > 0``.
        threshold, halve_until: per-scale attention threshold (see :func:`_threshold_indices`).
        nms_iou: > 0: box NMS (:func:`nms_boxes`) over the top ``max_keypoints`` candidates, as the seed.

    Returns:
        ``keypoints (N, 2)``, ``descriptors (N, d)``, ``scores (N,)``, sorted by decreasing score.
    """
    kept = []
    for entry in per_scale:
        sc = entry[0]
        idx = _threshold_indices(sc, threshold, halve_until)
        # The global top-k is inside the union of the per-scale top-k: cut each scale first to bound memory.
        idx = idx[np.argsort(-sc[idx], kind="stable")[:max_keypoints]]
        idx.sort()  # back to cell order so that the global stable sort breaks ties by (scale, cell)
        kept.append([a[idx] for a in entry])
    sc = np.concatenate([k[0] for k in kept])
    kp = np.concatenate([k[1] for k in kept])
    de = np.concatenate([k[2] for k in kept])
    if nms_iou > 0:
        order = nms_boxes(np.concatenate([k[3] for k in kept]), sc, nms_iou, max_keypoints)
    else:
        order = np.argsort(-sc, kind="stable")[:max_keypoints]
    return kp[order].astype(np.float32), de[order].astype(np.float32), sc[order].astype(np.float32)


def extract_multiscale(
    model: torch.nn.Module,
    image: torch.Tensor,
    settings: ExtractSettings,
    orig_size: tuple[int, int] | None = None,
    mixed_precision: bool = False,
) -> dict[str, np.ndarray]:
    """DELG features of one image in one pass per scale.

    Args:
        model: a :class:`delg.model.DELG` (or anything with ``extract``, ``keypoint_centers``, ``mean``, ``std``).
        image: (3, H, W) uint8 (or float in [0, 1]) RGB, already limited to ``long_side`` (channels are put in the
            model's ``input_colour`` order here).
        settings: scales, global scales, aggregation, resize, keypoint budget and selection.
        orig_size: (w, h) of the image the keypoints refer to (before the ``long_side`` resize); default (W, H).
        mixed_precision: autocast on CUDA (ignored on CPU).

    Returns:
        ``global`` (D,) float32 L2-normalised; with ``settings.local`` also ``keypoints`` (N, 2) float32 xy in
        ``orig_size`` pixels, ``descriptors`` (N, d) float32, ``scores`` (N,) float32; and ``image_size`` (2,).
    """
    device = next(model.parameters()).device
    x = _to_input(image, model, device)
    h0, w0 = x.shape[-2:]
    ow, oh = orig_size if orig_size is not None else (w0, h0)
    gsum: torch.Tensor | None = None
    per_scale = []
    if settings.resize == "cv2_bilinear":  # the seed: cv2.resize of the 0..255 image (float32) at every scale
        src = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
        src = src if image.dtype == torch.uint8 else src * 255.0
    kw = {"normalize_global": False} if settings.global_aggregation == "sum" else {}
    with torch.inference_mode(), _autocast(device, mixed_precision):
        for s in settings.scales:
            want_g = settings.is_global(s)
            if not (want_g or settings.local):
                continue
            if settings.resize == "cv2_bilinear":
                im_s = torch.from_numpy(np.ascontiguousarray(rescale_cv2(src, s))).permute(2, 0, 1) / 255.0
                xs = _to_input(im_s, model, device)
            else:
                xs = rescale(x, s)
            out = model.extract(xs, want_global=want_g, want_local=settings.local, **kw)
            if want_g:
                g = out["global"][0].float()
                gsum = g if gsum is None else gsum + g
            if settings.local:
                att = out["attention"][0].float()
                h, w = att.shape
                loc = out["local"][0].float().reshape(h * w, -1)
                xy = torch.as_tensor(model.keypoint_centers(h, w), dtype=torch.float32).cpu().numpy()
                # receptive-field centres (pixels of this scale) -> pixels of the original (cropped) image
                fx, fy = xs.shape[-1] / ow, xs.shape[-2] / oh
                xy = xy / np.array([fx, fy], np.float32)
                entry = (att.reshape(-1).cpu().numpy(), xy, loc.cpu().numpy())
                if settings.nms_iou > 0:  # receptive boxes of the cells, in original pixels (the seed's NMS boxes)
                    half = (float(model.backbone.rf_size) - 1) / 2 / np.array([fx, fy], np.float32)
                    entry = (*entry, np.concatenate([xy - half, xy + half], axis=1))
                per_scale.append(entry)
    assert gsum is not None
    out_np = {"global": F.normalize(gsum, dim=0).cpu().numpy().astype(np.float32)}
    if settings.local:
        kp, de, sc = select_local(per_scale, settings.max_keypoints, settings.attention_threshold,
                                  settings.threshold_halve_until, settings.nms_iou)
        out_np.update(keypoints=kp, descriptors=de, scores=sc)
    out_np["image_size"] = np.array([ow, oh], np.int64)
    return out_np


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8."""
    return torch.from_numpy(np.array(im, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def extract_one(model: torch.nn.Module, image_pil: Image.Image, conf: Config) -> dict[str, np.ndarray]:
    """Features of one new photo (already cropped if needed), as stored for dataset images (see ``extract_multiscale``)."""
    xs = ExtractSettings.from_conf(conf)
    im = image_pil.convert("RGB") if image_pil.mode != "RGB" else image_pil
    size = im.size
    dev = next(model.parameters()).device
    mp = bool(conf.get("mixed_precision", False)) and dev.type == "cuda"
    return extract_multiscale(model, _load_resized(im, xs), xs, orig_size=size, mixed_precision=mp)


def _load_resized(im: Image.Image, xs: ExtractSettings) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 limited to ``long_side``, resized as ``extract.resize`` says."""
    if xs.resize == "cv2_bilinear":
        return torch.from_numpy(np.array(resize_max_side_cv2(im, xs.long_side), dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return pil_to_tensor(resize_max_side(im, xs.long_side))


# ---------------------------------------------------------------------------------------------- input pipeline
@dataclass(frozen=True)
class Item:
    name: str
    path: Path
    crop: tuple[float, float, float, float] | None = None


class ImageLoader(torch.utils.data.Dataset):
    """Decodes (EXIF, colour modes, crop via ``load_pil``) and resizes in DataLoader workers.

    Returns ``{'index', 'name', 'image' (3, H, W) uint8, 'size' (w, h) before resizing}`` or, for an unreadable
    image, ``{'index', 'name', 'error'}`` so the main process can report it and go on.
    """

    def __init__(self, items: Sequence[Item], settings: ExtractSettings) -> None:
        self.items = list(items)
        self.settings = settings

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        it = self.items[i]
        try:
            im = load_pil(it.path, crop=it.crop)
        except ImageReadError as e:
            return {"index": i, "name": it.name, "error": str(e)}
        size = im.size
        return {"index": i, "name": it.name, "image": _load_resized(im, self.settings), "size": size}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores


def split_items(dataset: Any, split: str, conf: Config) -> list[Item]:
    if split == "db":
        return [Item(n, Path(p)) for n, p in zip(dataset.db_names, dataset.db_paths)]
    if split == "query":
        crop = bool(conf.dataset.get("query_crop", True))
        bbx = list(getattr(dataset, "query_bbx", None) or [None] * len(dataset.query_names))
        return [
            Item(n, Path(p), tuple(b) if (crop and b is not None) else None)
            for n, p, b in zip(dataset.query_names, dataset.query_paths, bbx)
        ]
    raise ConfigError(f"extract.splits: unknown split '{split}' (valid: db, query)")


# ---------------------------------------------------------------------------------------------- reports
def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, indent=1, sort_keys=True)


def read_skipped(path: Path) -> dict[str, dict[str, str]]:
    """``{name: {"name", "path", "error"}}`` of a ``.skipped.json``; ``{}`` when there is none.  A damaged one
    (not JSON, or not a list of such entries) is moved aside with one line and read as empty: its images count as
    not done, so the extraction tries them again and writes a new list."""
    from delg.store import move_aside

    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, list) or not all(isinstance(d, dict) and isinstance(d.get("name"), str) for d in data):
            raise ValueError("not a list of {name, path, error} entries")
    except (ValueError, UnicodeDecodeError) as e:
        move_aside(path, f"unreadable list of skipped images ({e})", "its images are tried again")
        return {}
    return {d["name"]: d for d in data}


def _update_skipped(store: Path, failures: Mapping[str, dict[str, str]], done: set[str] | FeatureStore) -> int:
    """Keep ``<store>.skipped.json`` = images that failed and are still not in the store, sorted by name."""
    path = sidecar(store, "skipped")
    old = read_skipped(path)
    old.update(failures)
    keep = [old[n] for n in sorted(old) if n not in done]
    if keep:
        _write_json(path, keep)
    elif path.exists():
        path.unlink()
    return len(keep)


# ---------------------------------------------------------------------------------------------- one split
@dataclass(frozen=True)
class StoreJob:
    """One store to fill: its path, what it records, the images and what to extract of them."""

    path: Path
    tag: str  # the split recorded in the store: db, query, query_full, distractors
    settings: dict[str, Any]
    items: list[Item]
    local: bool  # extract local features (false: globals only, the distractor store)
    desc: str
    # Images whose local features may be added later beside the store (on demand): counted in the disk check.
    on_demand: int = 0


def store_jobs(conf: Config, dataset: Any, split: str) -> list[StoreJob]:
    """The stores of one split: one, or for ``db`` with distractors the benchmark's db store (global + local)
    and the shared distractor store (globals only; their local features come on demand)."""
    items = split_items(dataset, split, conf)
    if split == "query" and queries_in_db(conf, dataset):  # the queries' features are the db store's
        return [StoreJob(store_path(conf, dataset.name, "db"), "db", extraction_settings(conf, "db"), items,
                         bool(conf.extract.local), f"{dataset.name} queries (in the db store)")]
    tag = split_tag(conf, split)
    own = StoreJob(store_path(conf, dataset.name, split), tag, extraction_settings(conf, tag), items,
                   bool(conf.extract.local), f"{dataset.name} {split}")
    dpath = distractor_store_path(conf, dataset) if split == "db" else None
    if dpath is None:
        return [own]
    n_own = dataset.n_db - dataset.n_distractors
    # At most top_k x n_queries distractors are ever verified by DELG-local (the only verifier reading stores).
    methods = list(conf.get("rerank", {}).get("methods") or [])
    later = min(dataset.n_distractors, int(conf.rerank.top_k) * dataset.n_queries) if "delg" in methods else 0
    return [replace(own, items=items[:n_own]),
            StoreJob(dpath, "distractors", distractor_settings(conf), items[n_own:], False,
                     f"{dataset.distractor_id} (globals)", on_demand=later)]


def extract_split(
    conf: Config,
    dataset_name: str,
    split: str,
    items: Sequence[Item],
    get_model: Callable[[], torch.nn.Module],
) -> Path:
    """Extract one split (or this process's shard of it) into its store; returns the main store's path."""
    tag = split_tag(conf, split)
    job = StoreJob(store_path(conf, dataset_name, split), tag, extraction_settings(conf, tag), list(items),
                   bool(conf.extract.local), f"{dataset_name} {split}")
    return extract_store(conf, job, get_model)


def extract_store(conf: Config, job: StoreJob, get_model: Callable[[], torch.nn.Module]) -> Path:
    """Fill one store (or this process's shard of it) with ``job.items``; returns the main store's path."""
    main_path = job.path
    preset = preset_name(conf)
    settings = job.settings
    items = job.items
    shard = parse_shard(conf)
    overwrite = bool(conf.get("overwrite", False))
    float16 = bool(conf.extract.float16)
    xs = replace(ExtractSettings.from_conf(conf), local=job.local)
    already: set[str] = set()
    if shard is None:
        target = main_path
        mine = list(items)
        for n in _part_sets(main_path):  # parts of an earlier sharded run: keep their work
            merge_parts(main_path, n, preset, settings, force=False)
    else:
        i, n = shard
        target = part_path(main_path, i, n)
        mine = list(items)[i::n]
        if main_path.is_file() and not overwrite:
            try:
                with FeatureStore(main_path, "r", preset=preset, settings=settings) as st:
                    already = set(st.names())
            except StoreError as e:
                print(f"[extract] {e}; this shard redoes its images", file=sys.stderr)
    extra = {"shard": f"{shard[0]}/{shard[1]}", "part_total": len(mine)} if shard else None
    st = FeatureStore(target, "a", preset=preset, settings=settings, split=job.tag, float16=float16,
                      extra_attrs=extra)
    try:
        todo = [it for it in mine if overwrite or not (st.has(it.name) or it.name in already)]
        if overwrite and shard is not None and st.attrs().get("complete"):
            del st.f.attrs["complete"]
        failures = _run(conf, st, todo, get_model, target, total=len(mine), desc=job.desc, xs=xs,
                        sharded=shard is not None, on_demand=job.on_demand if shard is None else 0)
        done = set(st.names()) | already
        n_skipped = _update_skipped(target, failures, done)
        missing = len([it for it in mine if it.name not in done])
        if shard is not None and missing == n_skipped:
            st.f.attrs["complete"] = True  # every image of this part is done or reported unreadable
            st.flush()
    finally:
        st.close()
    if shard is not None:
        merge_parts(main_path, shard[1], preset, settings, force=False)
    return main_path


# ---------------------------------------------------------------------------------------------- disk space
# HDF5 bytes per image beyond the arrays (group + one object header per dataset), measured with h5py: ~1.7 kB for
# a global-only image, ~2.6 kB with local features; rounded up.
GROUP_OVERHEAD = 1024
DATASET_OVERHEAD = 512


def bytes_per_image(global_dim: int, local_dim: int, xs: ExtractSettings, float16: bool) -> int:
    """Upper estimate of one image's bytes in a store: its arrays at their stored types + HDF5 overhead."""
    fbytes = 2 if float16 else 4
    n = global_dim * fbytes + 16 + GROUP_OVERHEAD + 2 * DATASET_OVERHEAD  # global, image_size (int64 x 2)
    if xs.local:
        # keypoints (2 x float32) + scores (float32) stay float32; descriptors follow extract.float16
        n += xs.max_keypoints * (local_dim * fbytes + 12) + 3 * DATASET_OVERHEAD
    return n


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def check_disk_space(folder: Path, n_images: int, per_image: int, sharded: bool, later: int = 0) -> int:
    """Print the disk an extraction needs in ``folder`` and refuse (:class:`DiskSpaceError`) when it is more than
    the free space.  A sharded run needs twice its part: the merge copies the parts into the store before it
    deletes them.  ``later``: bytes that on-demand features may add beside the store.  Returns the bytes needed."""
    need = n_images * per_image * (2 if sharded else 1) + later
    free = shutil.disk_usage(folder).free
    why = " (x2: the merge copies the part)" if sharded else ""
    if later:
        why += f" (incl. ~{_gib(later)} for local features extracted on demand)"
    print(f"[extract] {folder}: {n_images} image(s) need ~{_gib(need)}{why}; {_gib(free)} free", file=sys.stderr)
    if free < need:
        raise DiskSpaceError(f"{folder}: not enough disk space for the extraction: {n_images} image(s) need "
                             f"~{_gib(need)}{why}, {_gib(free)} free; free some space or point output_dir "
                             f"(extract.distractor_dir for distractors) to a larger disk")
    return need


def _run(
    conf: Config,
    st: FeatureStore,
    todo: Sequence[Item],
    get_model: Callable[[], torch.nn.Module],
    target: Path,
    total: int,
    desc: str,
    xs: ExtractSettings | None = None,
    sharded: bool = False,
    on_demand: int = 0,
) -> dict[str, dict[str, str]]:
    progress = sidecar(target, "progress")
    n_done = total - len(todo)
    _write_json(progress, {"done": n_done, "skipped": 0, "total": total})
    failures: dict[str, dict[str, str]] = {}
    if not todo:
        return failures
    xs = xs if xs is not None else ExtractSettings.from_conf(conf)
    model = get_model()
    meta = _json_safe(getattr(model, "meta", {}))
    # Before the first image: the sizes come from the model (checkpoints decide them, not the config).
    dims = int(meta.get("global_dim") or 2048), int(meta.get("local_dim") or 1024)
    f16 = bool(conf.extract.float16)
    later = on_demand * bytes_per_image(*dims, ExtractSettings.from_conf(conf), f16) if on_demand else 0
    check_disk_space(target.parent, len(todo), bytes_per_image(*dims, xs, f16), sharded, later)
    st.set_model_meta(meta)
    dev = next(model.parameters()).device
    mp = bool(conf.get("mixed_precision", False)) and dev.type == "cuda"
    nw = int(conf.get("num_workers", 0) or 0)
    loader = torch.utils.data.DataLoader(
        ImageLoader(todo, xs),
        batch_size=None,  # one image per step: sizes differ
        shuffle=False,
        num_workers=nw,
        worker_init_fn=_worker_init if nw > 0 else None,
        prefetch_factor=2 if nw > 0 else None,
    )
    overwrite = bool(conf.get("overwrite", False))
    bar = tqdm(loader, total=len(todo), desc=f"extract {desc}", unit="img", disable=not conf.get("progress", True),
               dynamic_ncols=True)
    n_written = 0
    for sample in bar:
        it = todo[sample["index"]]
        if "error" in sample:
            failures[it.name] = {"name": it.name, "path": str(it.path), "error": sample["error"]}
            bar.write(f"[extract] skipped unreadable image: {sample['error']}")
        else:
            feats = extract_multiscale(model, sample["image"], xs, orig_size=tuple(sample["size"]), mixed_precision=mp)
            st.write(it.name, feats, overwrite=overwrite)
            n_written += 1
        # "done" counts committed images only: what a crash right now would keep
        _write_json(progress, {"done": n_done + n_written - st.n_staged, "skipped": len(failures), "total": total})
    bar.close()
    st.commit()
    _write_json(progress, {"done": n_done + n_written, "skipped": len(failures), "total": total})
    if failures:
        print(f"[extract] {len(failures)} unreadable image(s) skipped; see {sidecar(target, 'skipped')}", file=sys.stderr)
    return failures


def _json_safe(meta: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(meta), default=str))


# ---------------------------------------------------------------------------------------------- shards
def _part_sets(main: Path) -> list[int]:
    """The ``n`` of every ``<main>.part-i-of-n.h5`` set present."""
    ns = set()
    for p in main.parent.glob(f"{main.stem}.part-*-of-*.h5"):
        try:
            ns.add(int(p.stem.rsplit("-of-", 1)[1]))
        except (IndexError, ValueError):
            continue
    return sorted(ns)


def merge_parts(main: Path, n: int, preset: str, settings: Mapping[str, Any], force: bool = False) -> bool:
    """Merge ``<main>.part-{0..n-1}-of-n.h5`` into ``main`` once every part is complete (``force``: whatever
    valid images the parts hold), then delete the parts.  Returns whether a merge happened.

    Safe to call from every finishing process: the main store's lock lets one merge; the others see no parts.
    """
    parts = [part_path(main, i, n) for i in range(n)]
    if not any(p.is_file() for p in parts) or not (force or _all_complete(parts)):
        return False
    # Each part marks itself complete before it checks the others, so when two finish together at least one sees
    # all complete; both then wait for the lock and the second finds no parts left.
    st = FeatureStore(main, "a", preset=preset, settings=settings, split=settings.get("split"), wait=True)
    try:
        present = [p for p in parts if p.is_file()]
        if not present:
            return False  # another process merged them meanwhile
        failures: dict[str, dict[str, str]] = {}
        for p in present:  # part order, then name order: deterministic
            with FeatureStore(p, "r", preset=preset, settings=settings) as ps:
                meta = ps.model_meta
                if meta is not None:
                    st.set_model_meta(meta)
                st.copy_from(ps, overwrite=True)
            failures.update(read_skipped(sidecar(p, "skipped")))
        done = set(st.names())
        n_skipped = _update_skipped(main, failures, done)
        _write_json(sidecar(main, "progress"), {"done": len(done), "skipped": n_skipped, "total": len(done) + n_skipped})
        for p in present:
            for q in (p, sidecar(p, "skipped"), sidecar(p, "progress"), p.with_name(p.name + ".lock")):
                q.unlink(missing_ok=True)
        print(f"[extract] merged {len(present)} part file(s) into {main}", file=sys.stderr)
        return True
    finally:
        st.close()


def _all_complete(parts: Sequence[Path]) -> bool:
    for p in parts:
        if not p.is_file():
            return False
        try:
            with FeatureStore(p, "r") as ps:
                if not ps.attrs().get("complete"):
                    return False
        except StoreError:
            return False  # a part still being written (or damaged: its shard's rerun recovers it)
    return True


# ---------------------------------------------------------------------------------------------- main
def main(conf: Config, dataset: Any = None) -> Path:
    """Extract the splits ``extract.splits`` of the configured dataset; returns the folder of the stores.

    Images already in a store are skipped (``overwrite=true`` redoes every image of every store of the splits,
    the shared distractor store included); the model is built only when there is
    something to extract.  ``dataset`` (a ``RetrievalDataset``) overrides ``load_dataset(conf)``.  With
    distractors, split ``db`` fills two stores (:func:`store_jobs`).
    """
    check_weights(conf)  # before the dataset is even looked at
    ExtractSettings.from_conf(conf)  # fail early on bad settings
    if dataset is None:
        from delg.data.dataset import load_dataset

        dataset = load_dataset(conf)
    out = features_dir(conf, dataset.name)
    out.mkdir(parents=True, exist_ok=True)
    # The resolved config beside the stores it made (one file per preset, so two models never share one).
    dump_config(conf, out / f"{preset_name(conf)}.config.yaml")
    model_box: list[torch.nn.Module] = []

    def get_model() -> torch.nn.Module:
        if not model_box:
            model_box.append(load_model(conf))
        return model_box[0]

    for split in conf.extract.splits:
        for job in store_jobs(conf, dataset, split):
            if bool(conf.extract.merge):
                for n in _part_sets(job.path):
                    merge_parts(job.path, n, preset_name(conf), job.settings, force=True)
                continue
            extract_store(conf, job, get_model)
    return out


def stores_complete(conf: Config, dataset: Any, split: str) -> bool:
    """Every image of ``split`` is in its store(s) or listed as unreadable."""
    for job in store_jobs(conf, dataset, split):
        path = job.path
        if not path.is_file():
            return False
        skipped = set(read_skipped(sidecar(path, "skipped")))
        try:
            with FeatureStore(path, "r") as st:
                if not all(st.has(it.name) or it.name in skipped for it in job.items):
                    return False
        except StoreError:
            return False
    return True


# ---------------------------------------------------------------------------------------------- on-demand locals
class OnDemandLocals:
    """Local features of distractors, extracted the first time a verifier asks for them.

    Only images that reach some query's top K are ever verified, so the 1M distractors keep globals only and the
    few thousand that matter get their local features here, appended to ``<preset>-distractors-local.h5`` beside
    the distractor store: same preset -> shared by ROxford+1M and RParis+1M, kept across runs (resumable), and
    written under the store's lock (two runs at once wait for each other, never write it together).  Features
    are computed exactly as an up-front extraction computes them (same loader, same settings, same seeded model).

    Args:
        conf: the run config (model, extract settings, device).
        dataset: the dataset whose distractors this serves.
    """

    def __init__(self, conf: Config, dataset: Any) -> None:
        path = distractor_local_path(conf, dataset)
        if path is None:
            raise ValueError("OnDemandLocals: the dataset has no separately stored distractors")
        self.conf = conf
        self.path = path
        self.preset = preset_name(conf)
        self.settings = extraction_settings(conf, "distractors-local")
        self.xs = ExtractSettings.from_conf(conf)
        n_own = dataset.n_db - dataset.n_distractors
        self.items = {n: Item(n, Path(p)) for n, p in zip(dataset.db_names[n_own:], dataset.db_paths[n_own:])}
        self._model: torch.nn.Module | None = None
        self.n_extracted = 0  # images extracted by this object (the rest were in the store already)
        # overwrite=true redoes the distractor store's globals, so the local features asked for are redone too
        # (each once in this process), never mixed with kept ones of an earlier extraction
        self.overwrite = bool(conf.get("overwrite", False))
        self._redone: set[str] = set()

    def covers(self, name: str) -> bool:
        """``name`` is one of the distractors."""
        return name in self.items

    def _get_model(self) -> torch.nn.Module:
        if self._model is None:  # built once, and only if some distractor needs extracting
            self._model = load_model(self.conf)
        return self._model

    def read_local(self, name: str) -> dict[str, np.ndarray]:
        """``{'keypoints' (N, 2), 'descriptors' (N, d), 'scores' (N,)`` float32, ``'image_size' (2,)`` int64}``,
        extracted and stored first if missing.

        Raises:
            ImageReadError: the image cannot be read (the reranker counts it like any unreadable image).
        """
        from delg.data.images import ImageReadError

        # Opened for writing even to read: the lock keeps a concurrent run (the other benchmark) from writing
        # while this one reads; HDF5 gives no such guarantee on its own.
        with FeatureStore(self.path, "a", preset=self.preset, settings=self.settings, split="distractors-local",
                          float16=bool(self.conf.extract.float16), wait=True) as st:
            if not st.has(name) or (self.overwrite and name not in self._redone):
                sample = ImageLoader([self.items[name]], self.xs)[0]
                if "error" in sample:
                    raise ImageReadError(sample["error"])
                model = self._get_model()
                st.set_model_meta(_json_safe(getattr(model, "meta", {})))
                mp = bool(self.conf.get("mixed_precision", False)) and next(model.parameters()).device.type == "cuda"
                feats = extract_multiscale(model, sample["image"], self.xs, orig_size=tuple(sample["size"]),
                                           mixed_precision=mp)
                st.write(name, feats, overwrite=self.overwrite)
                st.commit()
                self.n_extracted += 1
                self._redone.add(name)
            return st.read_local(name)


def distractor_locals(conf: Config, dataset: Any) -> OnDemandLocals | None:
    """The on-demand local features of the dataset's distractors; ``None`` without a distractor store."""
    return OnDemandLocals(conf, dataset) if distractor_store_path(conf, dataset) is not None else None


if __name__ == "__main__":
    sys.exit(run_stage(main, sys.argv[1:], __doc__))
