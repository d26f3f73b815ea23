"""Every paper config end to end on the CPU, at stand-in scale (``scripts/paper_standin.sh``).

Runs each ``configs/paper/*.yaml`` through the real stages (``delg.retrieve.main`` / ``delg.train.main``, configs
read by ``delg.config.load_config`` exactly as the scripts read them) with only overrides that shrink the work
(:data:`RETRIEVAL_OVERRIDES`, :data:`TRAIN_OVERRIDES`) and that point at stand-in data and weights built under
``<out>/data`` and ``<out>/weights``:

* Revisited Oxford/Paris in revisitop's layout (``<name>/jpg/<image>.jpg`` + ``<name>/gnd_<name>.pkl``) under the
  real names of the real ground truth (``../shared/data/revisitop/gnd_*.pkl``; ``$SHARED_DATA`` overrides): the 70
  real queries with their real ``bbx`` scaled to the stand-in size, and either every real database name
  (``db_per_query=None``) or a consistent subset -- up to ``db_per_query`` easy, hard and junk images of every query
  plus ``db_others`` other images -- with the ground truth remapped into the subset's ``imlist``.  Images are small
  views rendered with the embedded benchmark's facade generator: queries that share positives form one landmark
  (one facade), its easy positives are mild views, hard ones strong views, junk a far corner; other images show
  other facades.  So the rankings mean something although every weight is random.
* a +1M stand-in: ``distractors`` tiny views of other facades under ``revisitop1m/jpg/<k>/``;
* random-weight checkpoints: the seed's R50/R101 in the pycls layout, 2048-d R50/R101 in ours, LoFTR in the
  official zju3dv layout, ImageNet-style timm ResNet state dicts for the training configs (``$DELG_WEIGHTS``);
* a GLDv2 stand-in: ``train_clean.csv`` (``landmark_id,images``) + ``train/a/b/c/<id>.jpg``.

Each config writes ``<out>/<config name>/results.json`` (training configs: a summary of the run written here);
one line per config is printed, and the exit status is non-zero when any config failed.  Random weights: the
numbers check that every path runs and that the protocol holds together, they are not the paper's.

    python -m delg.paper_standin --out DIR [--quick] [configs=a,b] [db_per_query=2|all] [distractors=1000]
                                 [device=cpu|cuda] [any.config.key=value ...]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import pickle
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from delg.errors import ProjectError

REPO = Path(__file__).resolve().parent.parent
PAPER_CONFIGS = REPO / "configs" / "paper"
DATASETS = ("roxford5k", "rparis6k")
QUICK_CONFIGS = ("roxford5k_seed_r50", "roxford5k_r1m_seed_r50", "seed_r50_delg_s512")
REAL_LONG_SIDE = 1024  # revisitop images are 1024 px on the long side; the real bbx are in that frame


class StandinError(ProjectError, RuntimeError):
    """The stand-in cannot be built (no real ground truth, unknown config); the message names the path or key."""


@dataclass(frozen=True)
class Sizes:
    """What the stand-in is made of.  ``db_per_query=None`` keeps every real database name."""

    db_per_query: int | None = 2  # easy, hard and junk images kept per query (each kind); None = all names
    db_others: int = 120  # database images kept that are nobody's positive or junk
    distractors: int = 1000  # +1M stand-in size
    long_side: int = 96  # database images (px)
    query_long_side: int = 128  # query images (px); the real bbx are scaled to this
    distractor_long_side: int = 64
    min_crop: int = 32  # query boxes smaller than this (px) are grown around their centre
    gld_classes: int = 6
    gld_per_class: int = 4
    device: str = "cpu"

    def check(self) -> Sizes:
        for k, v in asdict(self).items():
            if k == "device":
                if not (v in ("cpu", "cuda", "auto") or str(v).startswith("cuda:")):
                    raise StandinError(f"device={v}: expected cpu, cuda, cuda:N or auto")
            elif v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise StandinError(f"{k}={v}: expected a non-negative integer")
        if self.db_per_query == 0:
            raise StandinError("db_per_query=0 keeps no positives: give >= 1, or 'all'")
        if min(self.long_side, self.query_long_side, self.distractor_long_side) < 32:
            raise StandinError("image sides below 32 px are too small for the verifiers")
        if self.gld_classes < 2 or self.gld_per_class < 2:
            raise StandinError("gld_classes and gld_per_class must be >= 2 (SupCon needs two images per class)")
        return self


QUICK = Sizes(db_per_query=1, db_others=40, distractors=300)


# ------------------------------------------------------------------------------------------- shrinking overrides
# The only changes made to a paper config, besides paths to the stand-in (dataset.root, dataset.distractors,
# extract.distractor_dir, model.checkpoint, loftr.weights, train.csv/images, output_dir).  One table, so that a renamed key is one edit.
def retrieval_overrides(sizes: Sizes) -> list[str]:
    """Overrides that shrink a retrieval config to stand-in scale (image sizes, scales, top-K, report)."""
    s = sizes.long_side
    return [
        f"extract.long_side={max(s, sizes.query_long_side)}",
        "extract.scales=[0.7071,1.0]",  # 2 of the 7 scales: the pyramid and the local/global split still run
        "extract.global_scales=[1.0]",
        "extract.max_keypoints=100",
        "rerank.top_k=3",
        "rerank.feature_cache_mb=256",
        f"loftr.long_side={s}",
        f"lightglue.long_side={s}",
        "lightglue.max_keypoints=128",
        "delg_local.max_keypoints=100",
        "report.enabled=false",
        "num_workers=0",
        "progress=false",
        f"device={sizes.device}",
    ]


def train_overrides(sizes: Sizes) -> list[str]:
    """Overrides that shrink a training config to one short epoch."""
    return [
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "train.batch_size=4",
        "train.image_size=64",
        "train.val_fraction=0",
        "train.warmup_epochs=0",
        "train.keep_epochs=false",  # one checkpoint write (last.pth), not two
        "model.num_classes=null",  # the seed config names GLDv2-clean's 81,313 classes; the stand-in has fewer
        "num_workers=0",
        "progress=false",
        f"device={sizes.device}",
    ]


# ------------------------------------------------------------------------------------------------ real data
def shared_data() -> Path:
    """``$SHARED_DATA`` or ``<repo>/../shared/data`` (as tests/conftest.py), holding ``revisitop/gnd_*.pkl``."""
    root = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))
    missing = [str(root / "revisitop" / f"gnd_{n}.pkl") for n in DATASETS
               if not (root / "revisitop" / f"gnd_{n}.pkl").is_file()]
    if missing:
        raise StandinError(f"real revisitop ground truth not found: {', '.join(missing)} (set SHARED_DATA to the "
                           "folder holding revisitop/gnd_roxford5k.pkl, or put ../shared/data beside the checkout)")
    return root


def _read_real_gnd(path: Path) -> dict[str, Any]:
    from delg.data.revisitop import safe_load_pickle

    return safe_load_pickle(path)


# ---------------------------------------------------------------------------------------------- image rendering
def _rng(*keys: Any) -> np.random.Generator:
    digest = hashlib.sha256(repr(("standin", *keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


CANVAS = (256, 192)


def _scene(*keys: Any) -> np.ndarray:
    """A facade canvas ``(192, 256, 3)`` uint8 (the embedded benchmark's generator)."""
    from delg.data.minibench import facade_style, render_facade

    rng = _rng("scene", *keys)
    canvas, _ = render_facade(facade_style(rng), rng, CANVAS)
    return canvas


def _view(canvas: np.ndarray, size: tuple[int, int], rng: np.random.Generator, kind: str) -> np.ndarray:
    """A view ``(h, w, 3)`` uint8 of ``canvas``: ``query``/``easy`` near-frontal, ``hard`` strong viewpoint and
    light change, ``junk`` a close-up of a corner, ``other`` anything."""
    from delg.data.minibench import _render_view, camera_homography

    cw, ch = canvas.shape[1], canvas.shape[0]
    fit = 1.05 * max(size[0] / cw, size[1] / ch)  # the facade fills the view
    zoom, tilt, roll, cx, cy = 1.0, 0.0, 0.0, cw / 2, ch / 2
    if kind == "easy":
        zoom, tilt, roll = rng.uniform(0.9, 1.15), rng.uniform(0, 10), rng.uniform(-5, 5)
        cx, cy = cx + rng.normal(0, 0.05 * cw), cy + rng.normal(0, 0.05 * ch)
    elif kind == "hard":
        zoom, tilt, roll = rng.uniform(0.7, 1.6), rng.uniform(15, 35), rng.uniform(-20, 20)
        cx, cy = cx + rng.normal(0, 0.1 * cw), cy + rng.normal(0, 0.1 * ch)
    elif kind == "junk":
        zoom, tilt, roll = rng.uniform(2.5, 3.5), rng.uniform(20, 45), rng.uniform(-30, 30)
        cx, cy = rng.choice([0.1, 0.9]) * cw, rng.choice([0.1, 0.9]) * ch
    elif kind == "other":
        zoom, tilt, roll = rng.uniform(0.8, 1.6), rng.uniform(0, 30), rng.uniform(-15, 15)
    ta = rng.uniform(0, 2 * math.pi)
    H = camera_homography((cx, cy), fit * zoom, roll, tilt * math.sin(ta), tilt * math.cos(ta), size)
    img = _render_view(canvas, H, size, rng)
    if kind in ("hard", "other"):
        img = img * rng.uniform(0.6, 1.3) + rng.uniform(-25, 25)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _size(long_side: int, portrait: bool) -> tuple[int, int]:
    short = int(round(long_side * 0.75))
    return (short, long_side) if portrait else (long_side, short)


def _save_jpg(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90)


# ------------------------------------------------------------------------------------------- revisitop stand-in
def landmark_groups(gnd: Sequence[dict[str, Any]]) -> list[int]:
    """Landmark index of every query: queries that share a positive (easy or hard) are one landmark."""
    parent = list(range(len(gnd)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for q, g in enumerate(gnd):
        for i in list(g["easy"]) + list(g["hard"]):
            if i in owner:
                parent[find(q)] = find(owner[i])
            else:
                owner[i] = q
    roots = sorted({find(q) for q in range(len(gnd))})
    return [roots.index(find(q)) for q in range(len(gnd))]


def subset_database(real: dict[str, Any], db_per_query: int | None, db_others: int, seed: int = 0) -> list[int]:
    """Sorted indices (into the real ``imlist``) kept in the stand-in database.

    Every query keeps its first ``db_per_query`` easy, hard and junk images (the lowest indices, so that queries
    of one landmark share them), and ``db_others`` images that are nobody's positive or junk join them.
    """
    n = len(real["imlist"])
    if db_per_query is None:
        return list(range(n))
    keep: set[int] = set()
    for g in real["gnd"]:
        for kind in ("easy", "hard", "junk"):
            keep.update(sorted(int(i) for i in g[kind])[:db_per_query])
    used = set()
    for g in real["gnd"]:
        for kind in ("easy", "hard", "junk"):
            used.update(int(i) for i in g[kind])
    others = np.array(sorted(set(range(n)) - used))
    pick = np.random.default_rng(seed).choice(len(others), size=min(db_others, len(others)), replace=False)
    keep.update(int(i) for i in others[pick])
    return sorted(keep)


def remap_gnd(real: dict[str, Any], keep: Sequence[int]) -> dict[str, Any]:
    """The ground truth of the database subset ``keep``: indices remapped into its ``imlist`` (images outside the
    subset leave every list; ``bbx`` unchanged); revisitop's pkl layout."""
    new = {int(old): i for i, old in enumerate(keep)}
    gnd = []
    for g in real["gnd"]:
        entry = {k: [new[int(i)] for i in g[k] if int(i) in new] for k in ("easy", "hard", "junk")}
        entry["bbx"] = [float(v) for v in g["bbx"]]
        gnd.append(entry)
    return {"imlist": [real["imlist"][i] for i in keep], "qimlist": list(real["qimlist"]), "gnd": gnd}


def _query_box(bbx: Sequence[float], size: tuple[int, int], s: float, min_crop: int) -> list[float]:
    """The real box scaled by ``s`` into a ``size`` image, grown to ``min_crop`` px where smaller."""
    x1, y1, x2, y2 = (float(v) * s for v in bbx)
    out = []
    for lo, hi, side in ((x1, x2, size[0]), (y1, y2, size[1])):
        lo, hi = max(0.0, lo), min(float(side - 1), hi)
        if hi - lo < min_crop:
            c = min(max((lo + hi) / 2, min_crop / 2), side - 1 - min_crop / 2)
            lo, hi = c - min_crop / 2, c + min_crop / 2
        out.append((lo, hi))
    return [round(out[0][0], 2), round(out[1][0], 2), round(out[0][1], 2), round(out[1][1], 2)]


def build_revisitop(out: Path, name: str, sizes: Sizes, shared: Path) -> dict[str, Any]:
    """Write ``out/<name>/jpg/*.jpg`` and ``out/<name>/gnd_<name>.pkl``; returns what was built."""
    real = _read_real_gnd(shared / "revisitop" / f"gnd_{name}.pkl")
    keep = subset_database(real, sizes.db_per_query, sizes.db_others)
    groups = landmark_groups(real["gnd"])
    scenes = {lm: _scene(name, "landmark", lm) for lm in sorted(set(groups))}
    others = [_scene(name, "other", k) for k in range(24)]
    root = out / name
    jpg = root / "jpg"
    # role of every kept database image: the first query (in order) naming it decides
    role: dict[int, tuple[str, int]] = {}
    for q, g in enumerate(real["gnd"]):
        for kind in ("easy", "hard", "junk"):
            for i in g[kind]:
                role.setdefault(int(i), (kind, groups[q]))
    for i in keep:
        rng = _rng(name, "db", i)
        kind, lm = role.get(i, ("other", -1))
        canvas = scenes[lm] if lm >= 0 else others[int(rng.integers(len(others)))]
        img = _view(canvas, _size(sizes.long_side, rng.random() < 0.2), rng, kind)
        _save_jpg(jpg / f"{real['imlist'][i]}.jpg", img)
    gnd = remap_gnd(real, keep)
    s = sizes.query_long_side / REAL_LONG_SIDE
    for q, g in enumerate(gnd["gnd"]):
        # the real images are 1024x768 or 768x1024: a box reaching below y=768 can only be in a portrait one
        size = _size(sizes.query_long_side, max(g["bbx"][1], g["bbx"][3]) > 0.75 * REAL_LONG_SIDE + 1)
        g["bbx"] = _query_box(g["bbx"], size, s, sizes.min_crop)
        _save_jpg(jpg / f"{real['qimlist'][q]}.jpg", _view(scenes[groups[q]], size, _rng(name, "query", q), "query"))
    with (root / f"gnd_{name}.pkl").open("wb") as f:
        pickle.dump(gnd, f, protocol=4)
    return {"root": str(root), "n_db": len(keep), "n_db_real": len(real["imlist"]), "n_queries": len(real["qimlist"]),
            "landmarks": len(scenes)}


def build_distractors(out: Path, n: int, long_side: int) -> Path:
    """``n`` tiny views of facades under ``out/jpg/<k>/`` (500 a folder, as the 1M is split in folders)."""
    jpg = out / "jpg"
    scenes = [_scene("distractor", k) for k in range(32)]
    for i in range(n):
        rng = _rng("distractor", i)
        img = _view(scenes[int(rng.integers(len(scenes)))], _size(long_side, rng.random() < 0.2), rng, "other")
        _save_jpg(jpg / f"{i // 500:03d}" / f"d{i:07d}.jpg", img)
    return jpg


def build_gldv2(out: Path, n_classes: int, per_class: int) -> tuple[Path, Path]:
    """GLDv2-clean layout: ``out/train_clean.csv`` (``landmark_id,images``) and ``out/train/a/b/c/<id>.jpg``."""
    from delg.data.gldv2 import image_path

    rows = [["landmark_id", "images"]]
    for c in range(n_classes):
        canvas = _scene("gldv2", c)
        ids = []
        for k in range(per_class):
            image_id = hashlib.sha256(f"gld-{c}-{k}".encode()).hexdigest()[:16]
            rng = _rng("gldv2", c, k)
            _save_jpg(image_path(out / "train", image_id), _view(canvas, _size(96, False), rng, "easy"))
            ids.append(image_id)
        rows.append([str(1000 + 7 * c), " ".join(ids)])
    csv_path = out / "train_clean.csv"
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return csv_path, out / "train"


# ------------------------------------------------------------------------------------------------- weights
def pycls_resnet_state(depth: int, n_cls: int, dim: int, seed: int | Any = 0) -> dict[str, Any]:
    """A random pycls DELG ``model_state`` (feymanpriv/DELG model/resnet.py names), ResNet-50 or -101.

    ``seed``: an int, or a ``torch.Generator`` to draw from (tests share one)."""
    import torch

    stages = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    sd: dict[str, Any] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * (2 / (cin * k * k)) ** 0.5

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.running_var"] = 1 + 0.1 * torch.rand(c, generator=gen)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(5)

    conv("globalmodel.stem.conv", 64, 3, 7)
    bn("globalmodel.stem.bn", 64)
    w_in = 64
    for s, (d, w_out) in enumerate(zip(stages, (256, 512, 1024, 2048)), start=1):
        w_b = w_out // 4
        for b in range(1, d + 1):
            pre = f"globalmodel.s{s}.b{b}"
            cin = w_in if b == 1 else w_out
            if b == 1:
                conv(f"{pre}.proj", w_out, cin, 1)
                bn(f"{pre}.bn", w_out)
            conv(f"{pre}.f.a", w_b, cin, 1)
            bn(f"{pre}.f.a_bn", w_b)
            conv(f"{pre}.f.b", w_b, w_b, 3)
            bn(f"{pre}.f.b_bn", w_b)
            conv(f"{pre}.f.c", w_out, w_b, 1)
            bn(f"{pre}.f.c_bn", w_out)
        w_in = w_out
    sd["globalmodel.head.pool.p"] = torch.tensor([2.7])
    sd["globalmodel.head.fc.weight"] = torch.randn(dim, 2048, generator=gen) * 0.02
    sd["globalmodel.head.fc.bias"] = torch.randn(dim, generator=gen) * 0.02
    sd["desc_cls.weight"] = torch.randn(n_cls, dim, generator=gen)
    sd["desc_cls.t"] = torch.zeros(1)
    sd["localmodel.conv1.weight"] = torch.randn(512, 1024, 1, 1, generator=gen) * 0.03
    sd["localmodel.conv1.bias"] = torch.randn(512, generator=gen) * 0.03
    bn("localmodel.bn", 512)
    sd["localmodel.conv2.weight"] = torch.randn(1, 512, 1, 1, generator=gen) * 0.03
    sd["localmodel.conv2.bias"] = torch.randn(1, generator=gen) * 0.03
    sd["att_cls.fc.weight"] = torch.randn(n_cls, 512, generator=gen) * 0.03
    sd["att_cls.fc.bias"] = torch.randn(n_cls, generator=gen) * 0.03
    return sd


def write_pycls_checkpoint(path: Path, depth: int = 50, n_cls: int = 11, dim: int = 512, seed: int = 0) -> Path:
    """A random checkpoint in the seed's pycls layout (``{'epoch', 'model_state', 'optimizer_state', 'cfg'}``)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 10, "model_state": pycls_resnet_state(depth, n_cls, dim, seed), "optimizer_state": {},
                "cfg": f"MODEL:\n  DEPTH: {depth}\n"}, path)
    return path


def write_delg_checkpoint(path: Path, backbone: str, global_dim: int = 2048, local_dim: int = 128,
                          n_cls: int = 10, seed: int = 0) -> Path:
    """A random checkpoint in our format, with trained global and local heads as a trained model has."""
    import torch

    from delg.model.delg import model_from_meta

    torch.manual_seed(seed)
    model = model_from_meta({"backbone": backbone, "whiten_dim": global_dim, "local_dim": local_dim,
                             "attention_dim": 512, "num_classes": n_cls, "local_arch": "delg",
                             "trained_global": True, "trained_local": True})
    return model.save(path)


def write_loftr_checkpoint(path: Path, seed: int = 0) -> Path:
    """Random LoFTR weights in the official zju3dv layout (``{'state_dict': {'matcher.<name>': tensor}}``).

    The backbone's coarse output is scaled by 0.1 so that position dominates the coarse tokens and random weights
    still give matches (see tests/test_loftr.py)."""
    import torch
    from kornia.feature import LoFTR

    torch.manual_seed(seed)
    model = LoFTR(pretrained=None)
    with torch.no_grad():
        model.backbone.layer3_outconv.weight.mul_(0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "state_dict": {f"matcher.{k}": v.clone() for k, v in model.state_dict().items()}}, path)
    return path


def write_imagenet_state(folder: Path, name: str) -> Path:
    """A random timm ``name`` state dict at ``folder/<name>_imagenet.pth`` (where ``$DELG_WEIGHTS`` is looked up)."""
    import timm
    import torch

    torch.manual_seed(0)
    path = folder / f"{name}_imagenet.pth"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(timm.create_model(name, pretrained=False).state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------- build everything
@dataclass
class Standin:
    """Paths of the stand-in data and weights under ``<out>``."""

    out: Path
    data: dict[str, Path]
    distractors: Path
    gld_csv: Path
    gld_images: Path
    weights: dict[str, Path]
    info: dict[str, Any]


def build(out: Path, sizes: Sizes, need_loftr: bool = True, log: Any = print) -> Standin:
    """Build (or reuse, when ``<out>/data/STANDIN.json`` records the same sizes) the stand-in under ``out``."""
    shared = shared_data()
    data, wdir = out / "data", out / "weights"
    stamp = data / "STANDIN.json"
    key = {k: v for k, v in asdict(sizes).items() if k != "device"}
    paths = {n: data / n for n in DATASETS}
    weights = {"seed_r50": wdir / "r50_delg_s512.pyth", "seed_r101": wdir / "r101_delg_s512.pyth",
               "r50": wdir / "r50_delg_2048.pth", "r101": wdir / "r101_delg_2048.pth",
               "loftr": wdir / "outdoor_ds.ckpt", "imagenet": wdir / "imagenet"}
    res = Standin(out, paths, data / "revisitop1m" / "jpg", data / "gldv2" / "train_clean.csv",
                  data / "gldv2" / "train", weights, {})
    if stamp.is_file() and json.loads(stamp.read_text()).get("sizes") == key and all(
            p.exists() for n, p in weights.items() if n != "loftr" or need_loftr):
        res.info = json.loads(stamp.read_text())
        return res
    t = time.time()
    info: dict[str, Any] = {"sizes": key, "datasets": {}}
    for n in DATASETS:
        info["datasets"][n] = build_revisitop(data, n, sizes, shared)
    build_distractors(data / "revisitop1m", sizes.distractors, sizes.distractor_long_side)
    build_gldv2(data / "gldv2", sizes.gld_classes, sizes.gld_per_class)
    write_pycls_checkpoint(weights["seed_r50"], 50)
    write_pycls_checkpoint(weights["seed_r101"], 101, seed=1)
    write_delg_checkpoint(weights["r50"], "resnet50")
    write_delg_checkpoint(weights["r101"], "resnet101", seed=1)
    for name in ("resnet50", "resnet101"):
        write_imagenet_state(weights["imagenet"], name)
    if need_loftr:
        try:
            write_loftr_checkpoint(weights["loftr"])
        except ImportError as e:  # no kornia: the LoFTR verifier reports itself unavailable, as without weights
            log(f"paper_standin: no LoFTR checkpoint written ({e})")
    info["build_s"] = round(time.time() - t, 1)
    stamp.write_text(json.dumps(info, indent=1))
    log(f"paper_standin: built the stand-in in {info['build_s']} s: " + ", ".join(
        f"{n} {d['n_db']}/{d['n_db_real']} db + {d['n_queries']} queries" for n, d in info["datasets"].items())
        + f", {sizes.distractors} distractors")
    res.info = info
    return res


# ------------------------------------------------------------------------------------------------- run configs
def paper_configs() -> list[str]:
    """Names of every runnable paper config (``_retrieval.yaml`` is only a base)."""
    return sorted(p.stem for p in PAPER_CONFIGS.glob("*.yaml") if not p.stem.startswith("_"))


def config_overrides(name: str, raw: dict[str, Any], st: Standin, sizes: Sizes, out_dir: Path) -> tuple[str, list[str]]:
    """``(kind, overrides)`` of one config: ``train`` or ``retrieval``, stand-in paths and shrinking overrides."""
    if (raw.get("train") or {}).get("data") == "gldv2":
        ov = [f"train.csv={st.gld_csv}", f"train.images={st.gld_images}", *train_overrides(sizes)]
        ckpt = str(raw.get("model", {}).get("checkpoint") or "")
        if ckpt:
            ov.append(f"model.checkpoint={st.weights['seed_r101' if 'r101' in ckpt else 'seed_r50']}")
        return "train", [*ov, f"output_dir={out_dir}"]
    ds = raw.get("dataset", {})
    ov = [f"dataset.root={st.data[ds['name']]}", f"loftr.weights={st.weights['loftr']}",
          *retrieval_overrides(sizes), f"output_dir={out_dir}"]
    if ds.get("distractors"):
        # the +1M configs share one distractor store (extract.distractor_dir): here it is shared inside <out>
        ov += [f"dataset.distractors={st.distractors}", f"extract.distractor_dir={out_dir.parent / 'features'}"]
    model = raw.get("model", {})
    ckpt = str(model.get("checkpoint") or "")
    depth = "r101" if model.get("backbone") == "resnet101" else "r50"
    ov.append(f"model.checkpoint={st.weights[('seed_' + depth) if ckpt else depth]}")
    return "retrieval", ov


def _raw_yaml(path: Path) -> dict[str, Any]:
    """The settings a config file writes (its ``_base_`` chain merged), without defaults or validation: which
    overrides a config needs is read from it before the real loader sees the config with those overrides."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("_base_", None)
    if not base:
        return data
    merged = _raw_yaml(path.parent / base)
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _train_summary(out_dir: Path, last: Path, conf: Any) -> dict[str, Any]:
    rows = []
    log = out_dir / "train_log.csv"
    if log.is_file():
        with log.open(newline="") as f:
            rows = list(csv.DictReader(f))
    final = rows[-1] if rows else {}
    loss = {k: float(v) for k, v in final.items() if k in ("loss", "ce", "supcon", "attention", "reconstruction")
            and v not in ("", None)}
    images = sum(int(r.get("images") or 0) for r in rows)
    return {"kind": "train", "checkpoint": str(last), "epochs": len(rows), "images": images,
            "steps": math.ceil(images / int(conf.train.batch_size)), "final_loss": loss,
            "loss_global": conf.loss["global"], "backbone": conf.model.backbone, "log": rows}


def run_one(name: str, st: Standin, sizes: Sizes, out: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run config ``name`` in this process; returns ``{'name', 'status', 'seconds', 'maps'|'error', ...}``."""
    from delg.config import load_config

    t, cpu = time.time(), time.process_time()
    out_dir = out / name
    rec: dict[str, Any] = {"name": name}
    # a rerun reuses features and caches, but never an earlier run's results.json: a failure must not leave one
    (out_dir / "results.json").unlink(missing_ok=True)
    try:
        raw = _raw_yaml(PAPER_CONFIGS / f"{name}.yaml")
        kind, ov = config_overrides(name, raw, st, sizes, out_dir)
        conf = load_config(PAPER_CONFIGS / f"{name}.yaml", [*ov, *extra])
        rec.update(kind=kind, overrides=[*ov, *extra])
        if kind == "train":
            from delg.train import main as train_main

            last = train_main(conf)
            summary = {"config": name, **_train_summary(out_dir, last, conf), "overrides": rec["overrides"]}
            res = out_dir / "results.json"
            res.write_text(json.dumps(summary, indent=1))
            if not summary["final_loss"] or not all(math.isfinite(v) for v in summary["final_loss"].values()):
                raise StandinError(f"{name}: training logged no finite loss ({out_dir / 'train_log.csv'})")
            rec["loss"] = summary["final_loss"]
        else:
            from delg.retrieve import main as retrieve_main

            res = retrieve_main(conf)
            payload = json.loads(Path(res).read_text())
            rec["maps"] = {m: (r.get("M") or {}).get("mAP") for m, r in payload["methods"].items()}
            rec["skipped_methods"] = [s["method"] for s in payload.get("skipped_methods", [])]
            bad = [m for m, v in rec["maps"].items() if v is None or not math.isfinite(v)]
            if bad:
                raise StandinError(f"{name}: no finite Medium mAP for {', '.join(bad)} ({res})")
        rec["status"] = "ok"
        rec["results"] = str(res)
    except Exception as e:  # one config failing must not stop the others; its line says why
        rec["status"] = "FAILED"
        rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if not isinstance(e, ProjectError):
            rec["traceback"] = traceback.format_exc(limit=8)
    rec["seconds"] = round(time.time() - t, 1)
    rec["cpu_s"] = round(time.process_time() - cpu, 1)  # what the wall time would be on one idle core
    return rec


def format_line(rec: dict[str, Any]) -> str:
    """``name  status  seconds  M mAP of global and each verifier`` (or the loss, or the error)."""
    head = f"{rec['name']:<26} {rec['status']:<6} {rec['seconds']:7.1f}s"
    if rec["status"] != "ok":
        return f"{head}  {rec.get('error', '')}"
    if "maps" in rec:
        parts = [f"{m} {v:.2f}" for m, v in rec["maps"].items()]
        parts += [f"{m} skipped" for m in rec.get("skipped_methods", [])]
        return f"{head}  M mAP: " + ", ".join(parts)
    return f"{head}  loss: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.get("loss", {}).items())


def main(out: str | Path, configs: Iterable[str] | None = None, quick: bool = False, sizes: Sizes | None = None,
         overrides: Sequence[str] = (), log: Any = print) -> int:
    """Build the stand-in under ``out`` and run ``configs`` (default: all, or :data:`QUICK_CONFIGS` with ``quick``).

    Returns the exit status: 0 when every config ran, 1 when any failed.  ``<out>/standin.json`` lists them all.
    """
    out = Path(out).resolve()
    sizes = (sizes or (QUICK if quick else Sizes())).check()
    names = list(configs) if configs else (list(QUICK_CONFIGS) if quick else paper_configs())
    known = paper_configs()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StandinError(f"configs: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    t0 = time.time()
    st = build(out, sizes, log=log)
    prev = os.environ.get("DELG_WEIGHTS")
    os.environ["DELG_WEIGHTS"] = str(st.weights["imagenet"])  # the training configs' "ImageNet" backbones
    records = []
    try:
        for name in names:
            rec = run_one(name, st, sizes, out, overrides)
            records.append(rec)
            log(f"paper_standin: {format_line(rec)}")
            if "traceback" in rec:
                print(rec["traceback"], file=sys.stderr)
    finally:
        if prev is None:
            os.environ.pop("DELG_WEIGHTS", None)
        else:
            os.environ["DELG_WEIGHTS"] = prev
    failed = [r["name"] for r in records if r["status"] != "ok"]
    summary = {"sizes": asdict(sizes), "data": st.info, "configs": records, "failed": failed,
               "total_s": round(time.time() - t0, 1)}
    (out / "standin.json").write_text(json.dumps(summary, indent=1))
    log("")
    for rec in records:
        log(format_line(rec))
    log(f"paper_standin: {len(records) - len(failed)}/{len(records)} configs ok in {summary['total_s']} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "") + f" ({out / 'standin.json'})")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------------- CLI
_OWN = {"out", "output_dir", "quick", "configs", "db_per_query", "db_others", "distractors", "device"}


def parse_args(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``--out DIR [--quick] [configs=a,b] [db_per_query=N|all] [db_others=N] [distractors=N] [device=...]``;
    any other ``key=value`` (a dotted config key) is passed to every config."""
    ap = argparse.ArgumentParser(prog="paper_standin", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", "--output_dir", "--output-dir", dest="out", default=None)
    ap.add_argument("--quick", action="store_true", help=f"the CI subset: {', '.join(QUICK_CONFIGS)}, smaller sizes")
    ap.add_argument("--configs", default=None, help="comma-separated config names (default: all)")
    args, rest = ap.parse_known_args(list(argv))
    kv: dict[str, str] = {}
    overrides: list[str] = []
    for a in rest:
        if a.startswith("-") or "=" not in a:
            ap.error(f"unrecognized argument: {a}")
        k, v = (x.strip() for x in a.split("=", 1))
        if k in _OWN:
            kv[k] = v
        elif "." in k:
            overrides.append(a)
        else:
            ap.error(f"unknown setting '{k}' (own settings: {', '.join(sorted(_OWN))}; config keys are dotted)")
    out = kv.get("out") or kv.get("output_dir") or args.out
    if not out:
        ap.error("--out DIR is required")
    quick = args.quick or kv.get("quick", "false").lower() in ("1", "true", "yes", "on")
    base = QUICK if quick else Sizes()
    upd: dict[str, Any] = {}
    for k in ("db_per_query", "db_others", "distractors"):
        if k in kv:
            if k == "db_per_query" and kv[k].lower() in ("all", "null", "none"):
                upd[k] = None
                continue
            try:
                upd[k] = int(kv[k])
            except ValueError:
                ap.error(f"{k}={kv[k]}: expected an integer" + (" or 'all'" if k == "db_per_query" else ""))
    if "device" in kv:
        upd["device"] = kv["device"]
    configs = kv.get("configs") or args.configs
    names = [c.strip().removesuffix(".yaml") for c in configs.strip("[]").split(",") if c.strip()] if configs else None
    return {"out": out, "quick": quick, "configs": names, "sizes": replace(base, **upd)}, overrides


def cli(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return main(args["out"], args["configs"], args["quick"], args["sizes"], overrides)
    except ProjectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
