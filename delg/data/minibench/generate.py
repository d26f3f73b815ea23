"""The content of the embedded benchmark: which scenes exist (the plan), their views, the measured ground truth,
written in revisitop's layout (test split) and GLDv2's layout (training split) by those formats' own writers."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from delg.data.gldv2_layout import image_path as gldv2_image_path
from delg.data.gldv2_layout import write_train_clean
from delg.data.minibench.geometry import (
    EASY_ANISO,
    EASY_ROT,
    EASY_SCALE,
    EASY_VISIBLE,
    JUNK_MIN_SIDE,
    JUNK_VISIBLE,
    label_view,
    measure_overlap,
)
from delg.data.minibench.render import _load_photo, _rng, available_photos, facade_style, render_facade
from delg.data.minibench.spec import (
    GND_NAME,
    JPEG_QUALITY,
    PRESETS,
    TEST_DISTRACTOR_PHOTOS,
    TEST_LANDMARK_PHOTOS,
    TRAIN_PHOTO_PAIRS,
    TRAIN_PHOTOS,
    VERSION,
    MinibenchError,
    Preset,
)
from delg.data.minibench.views import Scene, _make_view, _query_view
from delg.data.revisitop import write_gnd

# ----------------------------------------------------------------------------------------------------------------
# the build


def _jpeg_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _r(a: np.ndarray) -> list[list[float]]:
    return [[float(f"{v:.9g}") for v in row] for row in np.asarray(a, np.float64)]


def _facade_scene(key: str, style: Mapping[str, Any], layout_seed: tuple[Any, ...], size: tuple[int, int],
                  long_side: int, mural: tuple[str, Path] | None, src_tag: str) -> Scene:
    rng = _rng("layout", *layout_seed)
    photo = _load_photo(mural[1]) if mural else None
    canvas, focus = render_facade(style, rng, size, photo)
    sources = [f"procedural:facade:{src_tag}"]
    if mural:
        sources.append(mural[0])
    # keep the two query focus boxes apart: the first one, then the farthest of the others
    f0 = focus[0]
    rest = sorted(focus[1:], key=lambda b: -abs((b[0] + b[2]) - (f0[0] + f0[2])))
    focus = [f0, *rest]
    # a focus box should be a sizeable part of the facade: grow small ones around their centre
    grown = []
    for b in focus:
        bw, bh = b[2] - b[0], b[3] - b[1]
        gw, gh = max(bw, 0.3 * size[0]), max(bh, 0.3 * size[1])
        cx = min(max((b[0] + b[2]) / 2, gw / 2), size[0] - gw / 2)
        cy = min(max((b[1] + b[3]) / 2, gh / 2), size[1] - gh / 2)
        grown.append((cx - gw / 2, cy - gh / 2, cx + gw / 2, cy + gh / 2))
    base_scale = 0.62 * long_side / max(grown[0][2] - grown[0][0], (grown[0][3] - grown[0][1]) / 0.75)
    return Scene(key, canvas, grown, sources, base_scale)


def _plan(preset: Preset) -> dict[str, Any]:
    """Which scenes exist: test landmarks, confusers, distractors and training classes (no rendering)."""
    lm_photos = available_photos(TEST_LANDMARK_PHOTOS)[: preset.n_photo_landmarks]
    dis_photos = available_photos(TEST_DISTRACTOR_PHOTOS)[: preset.n_photo_distractors]
    train_photos = available_photos(TRAIN_PHOTOS)
    n_lm = preset.n_photo_landmarks + preset.n_facade_landmarks
    landmarks = []
    for i in range(n_lm):
        mural = lm_photos[i] if i < len(lm_photos) else None
        name = Path(mural[1]).stem if mural else "facade"
        landmarks.append({"key": f"lm{i:02d}_{name}", "style_seed": ("test", i), "mural": mural})
    distractors = []
    for i in range(preset.n_photo_distractors + preset.n_plain_distractors):
        mural = dis_photos[i] if i < len(dis_photos) else None
        name = Path(mural[1]).stem if mural else "facade"
        distractors.append({"key": f"dis{i:02d}_{name}", "style_seed": ("distractor", i), "mural": mural})
    n_train_photo = min(len(train_photos), preset.train_classes // 3 if preset.train_classes >= 9 else 2)
    train = []
    for i in range(preset.train_classes):
        photo = train_photos[i] if i < n_train_photo else None
        train.append({"style_seed": ("train", i), "photo": photo})
    return {"landmarks": landmarks, "distractors": distractors, "train": train}


def _photo_scene(key: str, photo: tuple[str, Path], size: tuple[int, int], long_side: int) -> Scene:
    """A photograph used directly as the scene (training classes), resized to fit ``size``."""
    img = _load_photo(photo[1])
    s = min(size[0] / img.shape[1], size[1] / img.shape[0])
    img = cv2.resize(img, (max(8, round(img.shape[1] * s)), max(8, round(img.shape[0] * s))),
                     interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    h, w = img.shape[:2]
    box = (0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h)
    return Scene(key, img, [box], [photo[0]], 0.9 * long_side / max(w, h / 0.75))


def _negative_views(scene: Scene, n: int, first_tier: str, stream: tuple[str, int], prefix: str,
                    long_side: int) -> list[dict[str, Any]]:
    """``n`` database views of a scene that is no landmark (a confuser or a distractor): ``first_tier``, then
    random views; view ``k`` draws from the stream ``(*stream, k)`` and is named ``<prefix>_v<k>``."""
    views = []
    for vi in range(n):
        v = _make_view(scene, first_tier if vi == 0 else "random", _rng(*stream, vi), long_side, scene.focus[:2])
        v.update(name=f"{prefix}_v{vi:02d}", landmark=None, scene=scene)
        views.append(v)
    return views


def _iter_build(out: Path, preset_name: str) -> Iterator[str]:
    """Write the whole benchmark into ``out`` (an empty folder); yields a label per step for the progress bar."""
    preset = PRESETS[preset_name]
    plan = _plan(preset)
    jpg = out / "jpg"
    images_meta: dict[str, Any] = {}
    db_entries: list[dict[str, Any]] = []  # {'name','landmark','view'}
    queries: list[dict[str, Any]] = []
    test_sources: set[str] = set()

    for li, lm in enumerate(plan["landmarks"]):
        style = facade_style(_rng("style", *lm["style_seed"]))
        scene = _facade_scene(lm["key"], style, ("test", li), preset.canvas, preset.long_side, lm["mural"],
                              f"test:{li}")
        test_sources.update(scene.sources)
        targets = scene.focus[:2] if len(scene.focus) > 1 else scene.focus * 2
        for qi in range(2):
            q = _query_view(scene, targets[qi], _rng("query", li, qi), preset.long_side)
            q.update(name=f"{lm['key']}_q{qi}", landmark=lm["key"], scene=scene)
            queries.append(q)
        for vi, tier in enumerate(preset.view_tiers):
            v = _make_view(scene, tier, _rng("view", li, vi), preset.long_side, targets)
            v.update(name=f"{lm['key']}_v{vi:02d}", landmark=lm["key"], scene=scene)
            db_entries.append(v)
        # confuser: same style (palette, window type, texture), another layout, no mural
        conf_scene = _facade_scene(f"{lm['key']}_confuser", style, ("confuser", li), preset.canvas,
                                   preset.long_side, None, f"confuser:{li}")
        test_sources.update(conf_scene.sources)
        db_entries += _negative_views(conf_scene, preset.n_confuser_views, "easyc", ("confuser-view", li),
                                      f"confuser{li:02d}", preset.long_side)
        yield f"landmark {lm['key']}"
    for di, dis in enumerate(plan["distractors"]):
        style = facade_style(_rng("style", *dis["style_seed"]))
        scene = _facade_scene(dis["key"], style, ("distractor", di), preset.canvas, preset.long_side, dis["mural"],
                              f"distractor:{di}")
        test_sources.update(scene.sources)
        db_entries += _negative_views(scene, preset.views_per_distractor, "easy0", ("distractor-view", di),
                                      dis["key"], preset.long_side)
        yield f"distractor {dis['key']}"

    # database order: a fixed shuffle, so that views of one landmark are not contiguous (rank ties)
    order = _rng("db-order", preset_name).permutation(len(db_entries))
    db_entries = [db_entries[i] for i in order]
    imlist = [e["name"] for e in db_entries]
    for e in db_entries + queries:
        _write(jpg / f"{e['name']}.jpg", _jpeg_bytes(e["image"]))
        images_meta[f"jpg/{e['name']}.jpg"] = {
            "split": "test", "role": "query" if e["tier"] == "query" else ("db" if e["landmark"] else "distractor"),
            "landmark": e["landmark"], "scene": e["scene"].key, "sources": e["scene"].sources,
            "canvas_size": [e["scene"].canvas.shape[1], e["scene"].canvas.shape[0]], "size": list(e["size"]),
            "H": _r(e["H"]), "tier": e["tier"], "photometric": e["photometric"], "photo_level": e["photo_level"],
            "occluded_fraction": round(float(e["occluder"].mean()), 5),
            **({"camera": e["camera"]} if "camera" in e else {}),
            **({"bbx": e["bbx"]} if "bbx" in e else {}),
        }
    gnd, gnd_meta = [], []
    for q in queries:
        lists: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
        views = {}
        for i, e in enumerate(db_entries):
            if e["landmark"] != q["landmark"]:
                continue
            canvas_size = (e["scene"].canvas.shape[1], e["scene"].canvas.shape[0])
            m = measure_overlap(q["H"], q["bbx"], e["H"], e["size"], canvas_size, e["occluder"])
            label = label_view(m, e["photo_level"], preset.long_side)
            lists[label].append(i)
            views[e["name"]] = {**m, "photo_level": e["photo_level"], "label": label}
        if not lists["easy"] and not lists["hard"]:
            raise MinibenchError(f"{out}: query {q['name']} has no positive view (generator bug)")
        gnd.append({"bbx": [float(v) for v in q["bbx"]], **{k: sorted(v) for k, v in lists.items()}})
        gnd_meta.append({"query": q["name"], "landmark": q["landmark"], "views": views})
    write_gnd(out / GND_NAME, imlist, [q["name"] for q in queries], gnd)
    yield "test split written"

    # training split (GLDv2 layout)
    train_sources: set[str] = set()
    rows = []
    for ci, cls in enumerate(plan["train"]):
        scenes: list[Scene]
        if cls["photo"] is not None:
            scenes = [_photo_scene(f"train{ci:02d}", cls["photo"], preset.train_canvas, preset.train_long_side)]
            pair = TRAIN_PHOTO_PAIRS.get(cls["photo"][0])
            second = available_photos([pair]) if pair else []
            if second:
                scenes.append(_photo_scene(f"train{ci:02d}b", second[0], preset.train_canvas, preset.train_long_side))
        else:
            style = facade_style(_rng("style", *cls["style_seed"]))
            scenes = [_facade_scene(f"train{ci:02d}", style, ("train", ci), preset.train_canvas,
                                    preset.train_long_side, None, f"train:{ci}")]
        ids = []
        for k in range(preset.train_per_class):
            scene = scenes[k % len(scenes)]
            train_sources.update(scene.sources)
            tier = ("easy0", "zoomin", "tilt0", "random", "night", "occl", "rot", "zoomout")[k % 8]
            v = _make_view(scene, tier, _rng("train-view", ci, k), preset.train_long_side, scene.focus[:2])
            iid = hashlib.sha256(f"minibench-{preset_name}-train-{ci}-{k}".encode()).hexdigest()[:16]
            path = gldv2_image_path(out / "train", iid)
            rel = path.relative_to(out).as_posix()
            _write(path, _jpeg_bytes(v["image"]))
            images_meta[rel] = {"split": "train", "role": "train", "landmark": ci, "scene": scene.key,
                                "sources": scene.sources, "size": list(v["size"]), "H": _r(v["H"]), "tier": tier,
                                "photometric": v["photometric"]}
            ids.append(iid)
        rows.append((ci, ids))
        yield f"train class {ci}"
    write_train_clean(out / "train_clean.csv", rows)
    shared = test_sources & train_sources
    if shared:
        raise MinibenchError(f"{out}: sources shared by the test and training splits: {sorted(shared)}")
    manifest = {
        "version": VERSION, "preset": preset_name,
        "rule": {"junk_visible": JUNK_VISIBLE, "junk_min_side": JUNK_MIN_SIDE, "easy_visible": EASY_VISIBLE,
                 "easy_scale": EASY_SCALE, "easy_aniso": EASY_ANISO, "easy_rot": EASY_ROT,
                 "long_side": preset.long_side},
        "sources": {"test": sorted(test_sources), "train": sorted(train_sources)},
        "images": images_meta,
        "gnd_meta": gnd_meta,
    }
    (out / "sources.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    yield "manifest written"


def _n_steps(preset: Preset) -> int:
    return (preset.n_photo_landmarks + preset.n_facade_landmarks + preset.n_photo_distractors
            + preset.n_plain_distractors + 1 + preset.train_classes + 1)

