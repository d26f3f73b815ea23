"""The embedded benchmark ("minibench"): a small, deterministic landmark retrieval benchmark built offline.

Nothing is downloaded.  Every image comes from (a) photographs that installed packages ship on disk (the
scikit-image ``data`` folder, matplotlib's ``sample_data``) and (b) procedural scenes: synthetic building
facades (plaster/brick walls, window grids with frames, shutters and balconies, cornices, shop signs with random
text, posters, emblems, clocks, graffiti) that are rich in corners so that local features have something to match.

Scenes and views
----------------
A *landmark* is a planar scene (a facade canvas, possibly with a source photograph painted on it as a mural).
Every image of a landmark is rendered by a virtual pinhole camera looking at the plane: position, distance
(scale), roll and out-of-plane tilt (pitch/yaw up to ~55 degrees) give a plane-to-image homography ``H``
(``sources.json`` stores it).  Pixels that do not see the facade show plain "surroundings" (sky, ground), and
views may add occluders (trees, poles, vehicles, people) and photometric changes (brightness, contrast, colour
cast, blur, noise, haze, "night" gamma).  Every image is written as JPEG with a fixed quality and no metadata.

Test split (revisitop layout): ``<out>/jpg/<name>.jpg`` and ``<out>/gnd_minibench.pkl`` with ``imlist``,
``qimlist`` (queries are not in ``imlist``) and ``gnd[i] = {'bbx', 'easy', 'hard', 'junk'}`` (0-based indices
into ``imlist``; plain lists, ints and floats).  Each landmark has two queries, near-frontal views whose ``bbx``
frames a distinctive part of the facade (for photo landmarks: the mural).  Distractors (database only) are
views of other scenes: *confusers* (the same facade style as a test landmark -- palette, window type, texture --
with a different layout), other facades with murals of photographs that no landmark uses, and plain facades.

Ground truth rule (measured, not random)
----------------------------------------
For query ``q`` (homography ``H_q``, box ``bbx``) and a database view ``v`` of the *same* landmark, a regular
grid of points inside ``bbx`` is mapped to the view by ``H_v @ inv(H_q)``; points that fall outside the facade
canvas are ignored (they show surroundings, not the landmark).  We measure

- ``visible``: fraction of the grid points that land inside the view, in front of the camera and not on an
  occluder (i.e. the fraction of the query region that the view shows);
- ``visible_px``: the area (view pixels) of the visible part of the query region;
- ``scale``: median local scale of the query-to-view map (``sqrt|det J|``) over the visible points;
- ``aniso``: ratio of the singular values of ``J`` at the region centre (viewpoint / perspective change);
- ``rot``: in-plane rotation of ``J`` at the region centre (degrees);
- ``photo_level``: 0 for mild photometric change, 1 for a strong one (night, heavy blur, strong colour cast,
  heavy noise or haze).

and label the view (see :func:`label_view`)::

    junk  if visible < 0.25 or visible_px < (0.08 * long_side)^2     (barely visible, or not visible at all --
                                                                       as revisitop, views of the landmark that
                                                                       do not show the query region are junk)
    easy  if visible >= 0.7 and 1/1.5 <= scale <= 1.5 and aniso <= 1.35 and |rot| <= 25 and photo_level == 0
    hard  otherwise (partial overlap, strong scale / viewpoint / rotation / photometric change)

Views of other landmarks and distractors are negatives.  ``sources.json`` records, for every image, its split,
role, scene, source photographs and homography, plus the measured values and label of every (query, view) pair.

Training split (GLDv2 layout, as ``download_dataset.sh`` leaves GLDv2): ``<out>/train_clean.csv``
(``landmark_id,images``; ``images`` = space-separated 16-hex-digit ids) and ``<out>/train/<a>/<b>/<c>/<id>.jpg``.  Training landmarks are
other scenes: facades generated from a separate seed stream and photographs that the test split never uses
(``sources.json`` lists the source of every image; the two sets are disjoint).

Building is atomic and cached: the benchmark is written into a unique temporary sibling folder which is moved into
place at the end; ``<out>/BUILD.json`` (preset, version, file count, content checksum) is written last.  A complete
build of the same preset/version is reused; temporary folders left by killed builds (their process is gone) are
removed.  Concurrent builders each write their own temporary folder (``.<name>.tmp-<host>-<pid>-<random>``); the
first to finish moves its build into place and the others, finding a complete identical build, discard theirs.
A non-empty ``out`` without ``BUILD.json`` is never deleted (an error asks for ``force``).

    root = build(Path("datasets/minibench/tiny"), preset="tiny")
    root = ensure_built(conf)   # conf.dataset.root or <repo>/datasets/minibench/<conf.dataset.preset>
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from delg.errors import ProjectError

VERSION = 2  # 2: training split in GLDv2's own layout (train_clean.csv at the root, train/a/b/c/<id>.jpg)
GND_NAME = "gnd_minibench.pkl"
JPEG_QUALITY = 90

# Ground-truth thresholds (see the module docstring).
JUNK_VISIBLE = 0.25  # below this fraction of the query region visible: junk
JUNK_MIN_SIDE = 0.08  # visible area below (this * long side)^2 pixels: junk
EASY_VISIBLE = 0.7  # easy needs at least this fraction visible ...
EASY_SCALE = 1.5  # ... a scale change within [1/EASY_SCALE, EASY_SCALE] ...
EASY_ANISO = 1.35  # ... little perspective distortion ...
EASY_ROT = 25.0  # ... little in-plane rotation (degrees) ...
# ... and a mild photometric change (photo_level == 0).


class MinibenchError(ProjectError, RuntimeError):
    """The embedded benchmark cannot be built or the target folder is not ours; the message names the path."""


@dataclass(frozen=True)
class Preset:
    """Sizes of one preset.  ``canvas`` is the facade size in pixels (width, height)."""

    long_side: int  # long side of test images
    canvas: tuple[int, int]  # test facade canvas (w, h)
    n_photo_landmarks: int  # landmarks with a photograph mural (from TEST_LANDMARK_PHOTOS)
    n_facade_landmarks: int  # pure procedural landmarks
    view_tiers: tuple[str, ...]  # database views of each landmark (one per entry, see _VIEW_TIERS)
    n_confuser_views: int  # views of the confuser scene of each landmark
    n_photo_distractors: int  # distractor scenes with a mural (from TEST_DISTRACTOR_PHOTOS)
    n_plain_distractors: int  # distractor scenes: facades of new styles
    views_per_distractor: int
    train_long_side: int
    train_canvas: tuple[int, int]
    train_classes: int
    train_per_class: int


_DEFAULT_TIERS = ("easy0", "easy1", "easyc", "zoomin", "zoomout", "tilt0", "tilt1", "rot", "night", "occl", "partial")
PRESETS: dict[str, Preset] = {
    "default": Preset(
        long_side=512, canvas=(1024, 768), n_photo_landmarks=5, n_facade_landmarks=5, view_tiers=_DEFAULT_TIERS,
        n_confuser_views=2, n_photo_distractors=5, n_plain_distractors=3, views_per_distractor=2,
        train_long_side=288, train_canvas=(576, 432), train_classes=32, train_per_class=6,
    ),
    "tiny": Preset(
        long_side=256, canvas=(512, 384), n_photo_landmarks=1, n_facade_landmarks=2,
        view_tiers=("easy0", "easy1", "zoomin", "tilt0", "night", "occl", "partial"),
        n_confuser_views=1, n_photo_distractors=1, n_plain_distractors=1, views_per_distractor=1,
        train_long_side=192, train_canvas=(384, 288), train_classes=6, train_per_class=4,
    ),
}

# Source photographs. Test and training lists are disjoint (motorcycle_left/right are two views of one scene:
# both go to training).  Entries are (package, file name); a file that is not on disk is skipped.
TEST_LANDMARK_PHOTOS = [("skimage", "astronaut.png"), ("skimage", "coffee.png"), ("skimage", "rocket.jpg"),
                        ("skimage", "chelsea.png"), ("skimage", "camera.png")]
TEST_DISTRACTOR_PHOTOS = [("skimage", "hubble_deep_field.jpg"), ("skimage", "coins.png"), ("skimage", "page.png"),
                          ("skimage", "color.png"), ("skimage", "chessboard_RGB.png")]
TRAIN_PHOTOS = [("matplotlib", "grace_hopper.jpg"), ("skimage", "motorcycle_left.png"), ("skimage", "retina.jpg"),
                ("skimage", "moon.png"), ("skimage", "ihc.png"), ("skimage", "cell.png"),
                ("skimage", "clock_motion.png"), ("skimage", "text.png"), ("skimage", "brick.png"),
                ("skimage", "grass.png"), ("skimage", "gravel.png")]
# A second real view of a training photo (a stereo pair): it joins the same training class.
TRAIN_PHOTO_PAIRS = {"skimage:motorcycle_left.png": ("skimage", "motorcycle_right.png")}


# ----------------------------------------------------------------------------------------------------------------
# determinism helpers


def _rng(*keys: Any) -> np.random.Generator:
    """An independent random stream per key tuple, so adding a scene never changes the others."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _photo_path(package: str, name: str) -> Path | None:
    if package == "skimage":
        import skimage

        p = Path(skimage.__file__).parent / "data" / name
    elif package == "matplotlib":
        try:
            import matplotlib
        except ImportError:
            return None
        p = Path(matplotlib.get_data_path()) / "sample_data" / name
    else:
        raise ValueError(f"unknown photo package {package!r}")
    return p if p.is_file() else None


def available_photos(entries: list[tuple[str, str]]) -> list[tuple[str, Path]]:
    """``[(source_id, path)]`` of the photographs in ``entries`` that are present on disk (no download)."""
    out = []
    for pkg, name in entries:
        p = _photo_path(pkg, name)
        if p is not None:
            out.append((f"{pkg}:{name}", p))
    return out


def _load_photo(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            rgba = im.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.getchannel("A"))
            im = bg
        arr = np.asarray(im.convert("RGB"))
    return arr


_FONT_CACHE: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font: no dependency on system fonts, so the output does not depend on the machine.
    size = max(6, int(size))
    if size not in _FONT_CACHE:
        _FONT_CACHE[size] = ImageFont.load_default(size=size)
    return _FONT_CACHE[size]


_SYLLABLES = ["ka", "ro", "mi", "tel", "san", "lo", "ver", "di", "na", "bar", "co", "pel", "us", "tri", "fa",
              "mon", "ze", "quo", "ri", "al", "ben", "sto", "ga", "lux", "or", "pi", "hau", "ste", "vi", "do"]


def _word(rng: np.random.Generator, n: tuple[int, int] = (2, 4)) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(int(rng.integers(n[0], n[1] + 1)))).upper()


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, 3))  # type: ignore[return-value]


def _jitter(c: tuple[int, int, int], rng: np.random.Generator, amp: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-amp, amp + 1), 0, 255)) for v in c)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# procedural facades


def facade_style(rng: np.random.Generator) -> dict[str, Any]:
    """The "family" of a facade: palette, wall texture, window type, grid density.  Confusers share it."""
    wall = _color(rng, 90, 235)
    return {
        "wall": wall,
        "frame": _color(rng, 0, 256),
        "glass": _color(rng, 20, 110),
        "accents": [_color(rng, 0, 256) for _ in range(4)],
        "brick": bool(rng.random() < 0.45),
        "window": str(rng.choice(["plain", "cross", "arch", "shutters"])),
        "floors": int(rng.integers(3, 6)),
        "cols": int(rng.integers(4, 8)),
    }


def _noise_field(rng: np.random.Generator, w: int, h: int, cells: int, amp: float) -> np.ndarray:
    small = rng.normal(0, 1, (max(2, cells * h // w), cells)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * amp


def render_facade(
    style: Mapping[str, Any], rng: np.random.Generator, size: tuple[int, int], mural: np.ndarray | None = None
) -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    """Draw a facade.

    Args:
        style: from :func:`facade_style`.
        rng: layout randomness (window irregularities, signs, posters, text).
        size: ``(w, h)`` of the canvas.
        mural: optional ``(h, w, 3)`` uint8 photograph painted on the wall.

    Returns:
        ``(H, W, 3)`` uint8 canvas and a list of "focus" boxes ``(x1, y1, x2, y2)`` (distinctive parts:
        the mural, posters, the sign) in canvas pixels, most distinctive first.
    """
    w, h = size
    u = w / 1024.0  # drawing unit: sizes below are for a 1024-pixel-wide canvas
    base = np.array(style["wall"], np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    img += _noise_field(rng, w, h, 6, 14)[..., None]
    fine = cv2.GaussianBlur(rng.normal(0, 7, (h, w)).astype(np.float32), (0, 0), 1.2 * max(u, 0.5))
    img += fine[..., None]
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    accents = [tuple(a) for a in style["accents"]]
    frame = tuple(style["frame"])
    focus: list[tuple[float, float, float, float]] = []

    floors, cols = style["floors"], style["cols"]
    ground_h = h * rng.uniform(0.24, 0.3)
    top_margin = h * rng.uniform(0.04, 0.08)
    floor_h = (h - ground_h - top_margin) / floors
    if style["brick"]:
        bh = max(4, int(14 * u))
        bw = bh * 3
        mortar = tuple(int(c * 0.7) for c in style["wall"])
        for r, y in enumerate(range(0, h, bh)):
            off = (bw // 2) * (r % 2)
            for x in range(-off, w, bw):
                c = _jitter(style["wall"], rng, 18)
                d.rectangle([x + 1, y + 1, x + bw - 2, y + bh - 2], fill=c)
            d.line([(0, y), (w, y)], fill=mortar, width=1)
    # cornices between floors (dentils give many small corners)
    for f in range(floors + 1):
        y = int(top_margin + f * floor_h)
        d.rectangle([0, y - int(6 * u), w, y + int(4 * u)], fill=_jitter(frame, rng, 10))
        if f == 0:
            step = max(6, int(18 * u))
            for x in range(0, w, step):
                d.rectangle([x, y + int(4 * u), x + step // 2, y + int(12 * u)], fill=frame)
    # window grid, with per-window irregularities (the "layout" of the facade)
    col_w = w / cols
    ww, wh = col_w * rng.uniform(0.42, 0.58), floor_h * rng.uniform(0.5, 0.66)
    lit = tuple(int(c) for c in rng.integers(200, 256, 3))
    for f in range(floors):
        for c in range(cols):
            if rng.random() < 0.08:
                continue  # a blind window
            cx = (c + 0.5) * col_w + rng.normal(0, 2 * u)
            y0 = top_margin + f * floor_h + floor_h * 0.22
            x0, x1, y1 = cx - ww / 2, cx + ww / 2, y0 + wh
            fw = max(2, int(5 * u))
            d.rectangle([x0 - fw, y0 - fw, x1 + fw, y1 + fw], fill=frame)
            glass = lit if rng.random() < 0.15 else _jitter(tuple(style["glass"]), rng, 25)
            if style["window"] == "arch":
                d.pieslice([x0 - fw, y0 - ww / 2 - fw, x1 + fw, y0 + ww / 2 + fw], 180, 360, fill=frame)
                d.pieslice([x0, y0 - ww / 2, x1, y0 + ww / 2], 180, 360, fill=glass)
            d.rectangle([x0, y0, x1, y1], fill=glass)
            # a reflection: a light diagonal band at a random place
            t = rng.uniform(0.1, 0.7)
            d.polygon([(x0 + t * ww, y0), (x0 + (t + 0.15) * ww, y0), (x0 + (t - 0.1) * ww, y1),
                       (x0 + (t - 0.25) * ww, y1)], fill=_jitter(glass, rng, 10)[:2] + (min(255, glass[2] + 40),))
            if style["window"] in ("cross", "arch"):
                d.line([(cx, y0), (cx, y1)], fill=frame, width=fw)
                d.line([(x0, y0 + wh * 0.4), (x1, y0 + wh * 0.4)], fill=frame, width=fw)
            if style["window"] == "shutters" and rng.random() < 0.7:
                sc = accents[int(rng.integers(0, 2))]
                for sx in (x0 - fw - ww / 2.2, x1 + fw):
                    d.rectangle([sx, y0, sx + ww / 2.2, y1], fill=sc)
                    for yy in np.arange(y0 + 3 * u, y1, max(3.0, 7 * u)):
                        d.line([(sx + 2, yy), (sx + ww / 2.2 - 2, yy)], fill=_jitter(sc, rng, 40), width=1)
            d.rectangle([x0 - 2 * fw, y1 + fw, x1 + 2 * fw, y1 + 3 * fw], fill=_jitter(frame, rng, 20))
            if rng.random() < 0.25:  # balcony
                by = y1 - wh * 0.3
                d.rectangle([x0 - 3 * fw, y1 + 3 * fw, x1 + 3 * fw, y1 + 5 * fw], fill=accents[3])
                for bx in np.arange(x0 - 3 * fw, x1 + 3 * fw, max(3.0, 8 * u)):
                    d.line([(bx, by), (bx, y1 + 3 * fw)], fill=accents[3], width=max(1, int(2 * u)))
                d.line([(x0 - 3 * fw, by), (x1 + 3 * fw, by)], fill=accents[3], width=max(1, int(3 * u)))
    # ground floor: doors, shop windows, a sign with text and a striped awning
    gy = h - ground_h
    d.rectangle([0, gy, w, h], fill=_jitter(tuple(style["wall"]), rng, 30))
    n_shops = int(rng.integers(2, 4))
    shop_w = w / n_shops
    for s in range(n_shops):
        sx0 = s * shop_w + shop_w * 0.08
        sx1 = (s + 1) * shop_w - shop_w * 0.08
        acc = accents[int(rng.integers(0, 4))]
        sign_y0, sign_y1 = gy + ground_h * 0.06, gy + ground_h * 0.26
        d.rectangle([sx0, sign_y0, sx1, sign_y1], fill=acc)
        txt = _word(rng)
        font = _font((sign_y1 - sign_y0) * 0.7)
        tc = tuple(255 - v for v in acc)
        d.text((sx0 + 8 * u, sign_y0 + (sign_y1 - sign_y0) * 0.12), txt, fill=tc, font=font)
        focus.append((sx0, sign_y0, sx1, sign_y1))
        ay0, ay1 = sign_y1, sign_y1 + ground_h * 0.1
        nstr = int(rng.integers(6, 14))
        for k in range(nstr):
            d.rectangle([sx0 + k * (sx1 - sx0) / nstr, ay0, sx0 + (k + 1) * (sx1 - sx0) / nstr, ay1],
                        fill=acc if k % 2 else (245, 245, 240))
        door_x = rng.uniform(sx0, sx1 - shop_w * 0.25)
        d.rectangle([door_x, ay1 + ground_h * 0.06, door_x + shop_w * 0.2, h], fill=_jitter(frame, rng, 30))
        d.rectangle([door_x + shop_w * 0.03, ay1 + ground_h * 0.12, door_x + shop_w * 0.17, h - ground_h * 0.15],
                    fill=tuple(style["glass"]))
        d.ellipse([door_x + shop_w * 0.15, gy + ground_h * 0.7, door_x + shop_w * 0.18, gy + ground_h * 0.73],
                  fill=(220, 200, 60))
    # unique content: posters with shapes and text, an emblem, a clock, graffiti
    posters = []
    for _ in range(int(rng.integers(3, 6))):
        pw, ph = w * rng.uniform(0.08, 0.16), h * rng.uniform(0.1, 0.2)
        px, py = rng.uniform(0, w - pw), rng.uniform(top_margin, gy - ph)
        d.rectangle([px, py, px + pw, py + ph], fill=_color(rng, 150, 256), outline=(20, 20, 20), width=max(1, int(2 * u)))
        for _ in range(int(rng.integers(3, 7))):
            kind = rng.integers(0, 3)
            cx, cy, r = px + rng.uniform(0.2, 0.8) * pw, py + rng.uniform(0.2, 0.7) * ph, rng.uniform(0.06, 0.2) * pw
            col = _color(rng)
            if kind == 0:
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
            elif kind == 1:
                n = int(rng.integers(3, 7))
                a0 = rng.uniform(0, 2 * np.pi)
                d.polygon([(cx + r * np.cos(a0 + 2 * np.pi * i / n), cy + r * np.sin(a0 + 2 * np.pi * i / n))
                           for i in range(n)], fill=col)
            else:
                d.line([(cx - r, cy - r), (cx + r, cy + r)], fill=col, width=max(1, int(4 * u)))
        d.text((px + 4 * u, py + ph * 0.78), _word(rng, (1, 2)), fill=(0, 0, 0), font=_font(ph * 0.16))
        posters.append((px, py, px + pw, py + ph))
    # emblem: a star polygon
    ex, ey, er = rng.uniform(0.1, 0.9) * w, top_margin * 0.5 + floor_h * 0.1, max(8.0, 30 * u)
    npts = int(rng.integers(5, 9))
    d.polygon([(ex + (er if i % 2 == 0 else er * 0.45) * np.cos(np.pi * i / npts),
                ey + (er if i % 2 == 0 else er * 0.45) * np.sin(np.pi * i / npts) + er)
               for i in range(2 * npts)], fill=accents[2], outline=(0, 0, 0))
    if rng.random() < 0.6:  # a clock
        cx, cy, r = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.5) * h, max(10.0, 38 * u)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(240, 238, 225), outline=(0, 0, 0), width=max(1, int(3 * u)))
        for k in range(12):
            a = 2 * np.pi * k / 12
            d.line([(cx + 0.8 * r * np.cos(a), cy + 0.8 * r * np.sin(a)), (cx + r * np.cos(a), cy + r * np.sin(a))],
                   fill=(0, 0, 0), width=max(1, int(2 * u)))
        for length, a in ((0.5, rng.uniform(0, 2 * np.pi)), (0.8, rng.uniform(0, 2 * np.pi))):
            d.line([(cx, cy), (cx + length * r * np.cos(a), cy + length * r * np.sin(a))], fill=(0, 0, 0),
                   width=max(1, int(3 * u)))
    for _ in range(int(rng.integers(1, 4))):  # graffiti strokes on the ground floor
        pts = [(rng.uniform(0, w), rng.uniform(gy + ground_h * 0.3, h))]
        for _ in range(int(rng.integers(3, 7))):
            pts.append((pts[-1][0] + rng.normal(0, 40 * u), pts[-1][1] + rng.normal(0, 15 * u)))
        d.line(pts, fill=_color(rng), width=max(1, int(rng.uniform(3, 7) * u)), joint="curve")
    if mural is not None:
        # the photograph, painted on the wall with a frame and a caption
        mh, mw = mural.shape[:2]
        target_w = w * rng.uniform(0.4, 0.5)
        s = min(target_w / mw, (gy - top_margin) * 0.9 / mh)
        nw, nh = max(8, round(mw * s)), max(8, round(mh * s))
        mx = int(rng.uniform(0.03, 0.97) * (w - nw))
        my = int(top_margin + rng.uniform(0.1, 0.9) * max(1.0, gy - top_margin - nh))
        fw = max(3, int(10 * u))
        d.rectangle([mx - fw, my - fw, mx + nw + fw, my + nh + fw], fill=frame)
        canvas.paste(Image.fromarray(cv2.resize(mural, (nw, nh), interpolation=cv2.INTER_AREA)), (mx, my))
        focus.insert(0, (float(mx), float(my), float(mx + nw), float(my + nh)))
    focus.extend(posters)
    out = cv2.GaussianBlur(np.asarray(canvas), (0, 0), 0.5)  # soften aliasing of the drawn edges
    return out, focus


# ----------------------------------------------------------------------------------------------------------------
# cameras, views, photometry


def camera_homography(
    center: tuple[float, float], scale: float, roll: float, pitch: float, yaw: float, size: tuple[int, int],
    fov: float = 55.0,
) -> np.ndarray:
    """Plane-to-image homography of a pinhole camera looking at ``center`` of the plane.

    Args:
        center: point of the plane (canvas pixels) seen at the image centre.
        scale: image pixels per canvas pixel at the image centre (before tilt).
        roll, pitch, yaw: camera rotation in degrees (pitch/yaw tilt the plane, roll rotates the image).
        size: image ``(w, h)``.

    Returns:
        ``(3, 3)`` float64 ``H`` mapping canvas ``(x, y, 1)`` to image pixels.
    """
    w, h = size
    f = 0.5 * max(w, h) / math.tan(math.radians(fov) / 2)
    K = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])
    r, p, y = (math.radians(a) for a in (roll, pitch, yaw))
    Rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    Rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    Ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    R = Rz @ Rx @ Ry
    dist = f / scale
    P = K @ np.column_stack([R[:, 0], R[:, 1], [0, 0, dist]])
    T = np.array([[1, 0, -center[0]], [0, 1, -center[1]], [0, 0, 1.0]])
    H = P @ T
    return H / H[2, 2]


def _surroundings(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Featureless surroundings (sky above, ground below): they must not create matches between scenes."""
    sky = np.array(_color(rng, 150, 235), np.float32)
    ground = np.array(_color(rng, 60, 130), np.float32)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    horizon = rng.uniform(0.5, 0.8)
    img = np.where(t < horizon, sky * (1 - 0.2 * t), ground * np.ones_like(t))
    img = np.broadcast_to(img, (h, w, 3)).astype(np.float32)
    return img + _noise_field(rng, w, h, 3, 6)[..., None]


def _render_view(canvas: np.ndarray, H: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Warp the canvas into a view; pre-shrink the canvas for strong downscaling (a cheap mip-map)."""
    w, h = size
    # local scale at the image centre of the view -> how much the canvas may be pre-shrunk without aliasing
    Hinv = np.linalg.inv(H)
    c = Hinv @ np.array([w / 2, h / 2, 1.0])
    scale = math.sqrt(abs(np.linalg.det(_jacobian(H, c[:2] / c[2]))))
    src, Hs = canvas, H
    if scale < 0.75:
        k = max(scale * 1.25, 1.0 / 8)
        src = cv2.resize(canvas, (max(8, round(canvas.shape[1] * k)), max(8, round(canvas.shape[0] * k))),
                         interpolation=cv2.INTER_AREA)
        S = np.diag([canvas.shape[1] / src.shape[1], canvas.shape[0] / src.shape[0], 1.0])
        Hs = H @ S
    view = cv2.warpPerspective(src, Hs, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    inside = cv2.warpPerspective(np.full(src.shape[:2], 255, np.uint8), Hs, (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT)
    a = (inside.astype(np.float32) / 255.0)[..., None]
    return view.astype(np.float32) * a + _surroundings(rng, w, h) * (1 - a)


def _jacobian(M: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Jacobian(s) of the homography ``M`` at point(s) ``p`` (``(2,)`` -> ``(2, 2)``, ``(N, 2)`` -> ``(N, 2, 2)``)."""
    pts = np.atleast_2d(p).astype(np.float64)
    q = pts @ M[:, :2].T + M[:, 2]
    wq = q[:, 2]
    u, v = q[:, 0] / wq, q[:, 1] / wq
    J = np.empty((len(pts), 2, 2))
    J[:, 0, 0] = (M[0, 0] - u * M[2, 0]) / wq
    J[:, 0, 1] = (M[0, 1] - u * M[2, 1]) / wq
    J[:, 1, 0] = (M[1, 0] - v * M[2, 0]) / wq
    J[:, 1, 1] = (M[1, 1] - v * M[2, 1]) / wq
    return J[0] if np.ndim(p) == 1 else J


def _occluders(img: np.ndarray, rng: np.random.Generator, n: int, big: bool) -> np.ndarray:
    """Draw ``n`` occluders (trees, poles, vehicles, people) in place; return the ``(H, W)`` bool mask."""
    h, w = img.shape[:2]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    mask = Image.new("L", (w, h), 0)
    d, dm = ImageDraw.Draw(pil), ImageDraw.Draw(mask)
    s = (0.3 if big else 0.15) * max(w, h)
    for _ in range(n):
        kind = int(rng.integers(0, 4))
        x, y = rng.uniform(0, w), rng.uniform(0.2 * h, h)
        if kind == 0:  # tree: a trunk and a crown of blobs
            green = (int(rng.integers(20, 70)), int(rng.integers(80, 150)), int(rng.integers(20, 70)))
            shapes = [("rect", [x - s * 0.06, y - s * 0.3, x + s * 0.06, h])]
            for _ in range(8):
                cx, cy, r = x + rng.normal(0, s * 0.25), y - s * 0.5 + rng.normal(0, s * 0.2), rng.uniform(0.15, 0.3) * s
                shapes.append(("ell", [cx - r, cy - r, cx + r, cy + r]))
            for k, (t, box) in enumerate(shapes):
                col = (90, 60, 30) if k == 0 else _jitter(green, rng, 20)
                (d.rectangle if t == "rect" else d.ellipse)(box, fill=col)
                (dm.rectangle if t == "rect" else dm.ellipse)(box, fill=255)
        elif kind == 1:  # pole with a sign
            box = [x - s * 0.03, y - s, x + s * 0.03, h]
            sign = [x - s * 0.2, y - s, x + s * 0.2, y - s * 0.75]
            d.rectangle(box, fill=(60, 60, 65))
            d.rectangle(sign, fill=_color(rng))
            dm.rectangle(box, fill=255)
            dm.rectangle(sign, fill=255)
        elif kind == 2:  # vehicle
            box = [x - s, h - s * 0.7, x + s, h]
            d.rounded_rectangle(box, radius=s * 0.2, fill=_color(rng))
            d.rectangle([x - s * 0.7, h - s * 0.65, x + s * 0.6, h - s * 0.4], fill=(40, 50, 60))
            dm.rounded_rectangle(box, radius=s * 0.2, fill=255)
        else:  # person
            body = [x - s * 0.12, y - s * 0.6, x + s * 0.12, y + s * 0.3]
            head = [x - s * 0.08, y - s * 0.8, x + s * 0.08, y - s * 0.62]
            d.ellipse(body, fill=_color(rng, 0, 200))
            d.ellipse(head, fill=(200, 160, 130))
            dm.ellipse(body, fill=255)
            dm.ellipse(head, fill=255)
    img[:] = np.asarray(pil, np.float32)
    return np.asarray(mask) > 127


PHOTOMETRIC_STRONG = ("night", "blur", "color", "noise", "haze")


def _photometric(img: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply a photometric change; ``kind`` is 'mild' or one of PHOTOMETRIC_STRONG."""
    h, w = img.shape[:2]
    info: dict[str, Any] = {"kind": kind}
    gain = rng.uniform(0.88, 1.12) * rng.uniform(0.96, 1.04, 3)
    bias = rng.uniform(-10, 10)
    out = img * gain.astype(np.float32) + bias
    sigma = 2.0
    if kind == "night":
        g = rng.uniform(1.8, 2.4)
        out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** g * 0.6
        out *= np.array([0.8, 0.85, 1.15], np.float32)
        sigma = 5.0
        info["gamma"] = round(float(g), 3)
    elif kind == "blur":
        b = rng.uniform(1.8, 2.6) * max(w, h) / 512
        out = cv2.GaussianBlur(out, (0, 0), b)
        info["blur"] = round(float(b), 3)
    elif kind == "color":
        cg = rng.uniform(0.65, 1.35, 3)
        out = (out - 128) * rng.uniform(0.6, 0.8) + 128
        out *= cg.astype(np.float32)
        info["gains"] = [round(float(v), 3) for v in cg]
    elif kind == "noise":
        sigma = rng.uniform(10, 16)
    elif kind == "haze":
        a = rng.uniform(0.35, 0.5)
        out = out * (1 - a) + 235 * a
        info["haze"] = round(float(a), 3)
    out = out + rng.normal(0, sigma, out.shape).astype(np.float32)
    info["noise"] = round(float(sigma), 3)
    return out, info


# ----------------------------------------------------------------------------------------------------------------
# view tiers: camera parameters relative to a target point (a focus box centre or the scene centre)

_VIEW_TIERS: dict[str, dict[str, Any]] = {
    # target: which point the camera looks at; zoom: multiplies the query scale; tilt/roll: degrees ranges;
    # photo: photometric kind ('mild' or 'strong' = a random one of PHOTOMETRIC_STRONG); occl: occluder count
    "easy0": {"target": 0, "zoom": (0.85, 1.2), "tilt": (0, 10), "roll": (0, 8), "photo": "mild", "occl": 0},
    "easy1": {"target": 1, "zoom": (0.85, 1.2), "tilt": (0, 10), "roll": (0, 8), "photo": "mild", "occl": 0},
    "easyc": {"target": "mid", "zoom": (0.7, 0.9), "tilt": (0, 10), "roll": (0, 6), "photo": "mild", "occl": 1},
    "zoomin": {"target": "any", "zoom": (1.9, 2.6), "tilt": (0, 15), "roll": (0, 10), "photo": "mild", "occl": 0},
    "zoomout": {"target": "centre", "zoom": (0.4, 0.5), "tilt": (0, 15), "roll": (0, 10), "photo": "mild", "occl": 1},
    "tilt0": {"target": 0, "zoom": (0.8, 1.1), "tilt": (38, 52), "roll": (0, 10), "photo": "mild", "occl": 0},
    "tilt1": {"target": 1, "zoom": (0.8, 1.1), "tilt": (38, 52), "roll": (0, 10), "photo": "mild", "occl": 0},
    "rot": {"target": "any", "zoom": (0.8, 1.2), "tilt": (0, 15), "roll": (35, 90), "photo": "mild", "occl": 0},
    "night": {"target": "any", "zoom": (0.8, 1.2), "tilt": (0, 20), "roll": (0, 10), "photo": "strong", "occl": 0},
    "occl": {"target": "any", "zoom": (0.8, 1.2), "tilt": (0, 15), "roll": (0, 10), "photo": "mild", "occl": 4},
    "partial": {"target": "edge", "zoom": (1.0, 1.4), "tilt": (0, 20), "roll": (0, 10), "photo": "mild", "occl": 0},
    "random": {"target": "centre", "zoom": (0.5, 1.6), "tilt": (0, 40), "roll": (0, 30), "photo": "any", "occl": 1},
}


@dataclass
class Scene:
    """A planar scene (one landmark, a confuser or a distractor) and where its content came from."""

    key: str  # e.g. 'lm03'
    canvas: np.ndarray  # (H, W, 3) uint8
    focus: list[tuple[float, float, float, float]]  # distinctive boxes (canvas px)
    sources: list[str]  # source ids (photographs and procedural seeds) of the canvas
    base_scale: float  # query scale: image px per canvas px of a frontal view framing the focus box


def _view_size(rng: np.random.Generator, long_side: int, portrait_p: float = 0.2) -> tuple[int, int]:
    short = int(round(long_side * 0.75))
    return (short, long_side) if rng.random() < portrait_p else (long_side, short)


def _make_view(scene: Scene, tier: str, rng: np.random.Generator, long_side: int,
               targets: list[tuple[float, float, float, float]]) -> dict[str, Any]:
    """Render one view of ``scene``; ``targets`` are the query focus boxes (tier targets 0/1 refer to them)."""
    spec = _VIEW_TIERS[tier]
    ch, cw = scene.canvas.shape[:2]
    size = _view_size(rng, long_side)
    t = spec["target"]
    box = targets[min(int(t), len(targets) - 1)] if isinstance(t, int) else None
    if box is not None:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        cx += rng.normal(0, 0.08) * (box[2] - box[0])
        cy += rng.normal(0, 0.08) * (box[3] - box[1])
    elif t == "mid":
        b0, b1 = targets[0], targets[-1]
        cx, cy = (b0[0] + b0[2] + b1[0] + b1[2]) / 4, (b0[1] + b0[3] + b1[1] + b1[3]) / 4
    elif t == "edge":  # look beside a focus box, so that only part of it is in view
        b = targets[int(rng.integers(0, len(targets)))]
        side = rng.choice([-1, 1])
        cx = (b[0] + b[2]) / 2 + side * rng.uniform(0.55, 0.8) * size[0] / scene.base_scale / 2
        cy = (b[1] + b[3]) / 2 + rng.normal(0, 0.1) * (b[3] - b[1])
    elif t == "any":
        cx, cy = rng.uniform(0.25, 0.75) * cw, rng.uniform(0.25, 0.75) * ch
    else:
        cx, cy = cw / 2 + rng.normal(0, 0.05 * cw), ch / 2 + rng.normal(0, 0.05 * ch)
    zoom = rng.uniform(*spec["zoom"])
    tilt = rng.uniform(*spec["tilt"])
    ta = rng.uniform(0, 2 * np.pi)  # tilt direction
    roll = rng.uniform(*spec["roll"]) * rng.choice([-1, 1])
    H = camera_homography((cx, cy), scene.base_scale * zoom, roll, tilt * math.sin(ta), tilt * math.cos(ta), size)
    img = _render_view(scene.canvas, H, size, rng)
    n_occl = int(spec["occl"])
    occl = _occluders(img, rng, n_occl, big=tier == "occl") if n_occl else np.zeros(img.shape[:2], bool)
    photo = spec["photo"]
    if photo == "any":
        photo = "mild" if rng.random() < 0.6 else "strong"
    kind = str(rng.choice(PHOTOMETRIC_STRONG)) if photo == "strong" else "mild"
    if tier == "night":
        kind = "night" if rng.random() < 0.6 else str(rng.choice(PHOTOMETRIC_STRONG[1:]))
    img, pinfo = _photometric(img, rng, kind)
    return {
        "image": np.clip(img, 0, 255).round().astype(np.uint8),
        "H": H,
        "size": size,
        "occluder": occl,
        "tier": tier,
        "photometric": pinfo,
        "photo_level": 0 if kind == "mild" else 1,
        "camera": {"center": [round(float(cx), 3), round(float(cy), 3)], "zoom": round(float(zoom), 4),
                   "tilt": round(float(tilt), 3), "roll": round(float(roll), 3)},
    }


def _query_view(scene: Scene, focus: tuple[float, float, float, float], rng: np.random.Generator,
                long_side: int) -> dict[str, Any]:
    """A near-frontal view framing ``focus``; its ``bbx`` is the focus box as seen in the view."""
    size = _view_size(rng, long_side, portrait_p=0.0)
    fw, fh = focus[2] - focus[0], focus[3] - focus[1]
    # the scene's reference scale (so that database views of either focus box see similar scales), reduced
    # where the box would not fit in the image
    s = min(scene.base_scale * rng.uniform(0.9, 1.1), 0.85 * min(size[0] / fw, size[1] / fh))
    cx = (focus[0] + focus[2]) / 2 + rng.normal(0, 0.05) * fw
    cy = (focus[1] + focus[3]) / 2 + rng.normal(0, 0.05) * fh
    tilt, ta = rng.uniform(0, 8), rng.uniform(0, 2 * np.pi)
    H = camera_homography((cx, cy), s, rng.uniform(-4, 4), tilt * math.sin(ta), tilt * math.cos(ta), size)
    img = _render_view(scene.canvas, H, size, rng)
    img, pinfo = _photometric(img, rng, "mild")
    corners = np.array([[focus[0], focus[1]], [focus[2], focus[1]], [focus[2], focus[3]], [focus[0], focus[3]]])
    proj = cv2.perspectiveTransform(corners[None].astype(np.float64), H)[0]
    x1, y1 = np.clip(proj.min(0), 0, [size[0] - 1, size[1] - 1])
    x2, y2 = np.clip(proj.max(0), 0, [size[0] - 1, size[1] - 1])
    return {
        "image": np.clip(img, 0, 255).round().astype(np.uint8), "H": H, "size": size, "tier": "query",
        "photometric": pinfo, "photo_level": 0, "occluder": np.zeros(img.shape[:2], bool),
        "bbx": [round(float(x1), 2), round(float(y1), 2), round(float(x2), 2), round(float(y2), 2)],
    }


# ----------------------------------------------------------------------------------------------------------------
# ground truth: measured overlap


def measure_overlap(
    H_q: np.ndarray, bbx: list[float], H_v: np.ndarray, view_size: tuple[int, int], canvas_size: tuple[int, int],
    occluder: np.ndarray | None = None, grid: int = 40,
) -> dict[str, float]:
    """How much of the query region ``bbx`` (in the query image) a view shows.

    Args:
        H_q: ``(3, 3)`` canvas-to-query homography.
        bbx: ``[x1, y1, x2, y2]`` query region in the query image.
        H_v: ``(3, 3)`` canvas-to-view homography.
        view_size: ``(w, h)`` of the view.
        canvas_size: ``(w, h)`` of the canvas; query points outside it are not part of the landmark.
        occluder: ``(h, w)`` bool mask of occluded view pixels, or None.
        grid: the region is sampled on a ``grid x grid`` lattice.

    Returns:
        dict with ``visible`` (fraction), ``visible_px`` (view pixels), ``scale``, ``aniso``, ``rot`` (degrees).
    """
    x1, y1, x2, y2 = bbx
    gx, gy = np.meshgrid(np.linspace(x1, x2, grid), np.linspace(y1, y2, grid))
    pq = np.stack([gx.ravel(), gy.ravel()], 1)
    Hq_inv = np.linalg.inv(H_q)
    hom = np.c_[pq, np.ones(len(pq))] @ Hq_inv.T
    pc = hom[:, :2] / hom[:, 2:3]
    on_canvas = (pc[:, 0] >= 0) & (pc[:, 0] < canvas_size[0]) & (pc[:, 1] >= 0) & (pc[:, 1] < canvas_size[1])
    M = H_v @ Hq_inv  # query image -> view
    hv = np.c_[pq, np.ones(len(pq))] @ M.T
    # the plane point must be in front of the view camera: same sign of w as the canvas->view map of a point
    # known to be in front (the view centre's back-projection)
    wv = (np.c_[pc, np.ones(len(pc))] @ H_v.T)[:, 2]
    c = np.linalg.inv(H_v) @ np.array([view_size[0] / 2, view_size[1] / 2, 1.0])
    front_sign = np.sign((H_v @ (c / c[2]))[2])
    front = np.sign(wv) == front_sign
    with np.errstate(divide="ignore", invalid="ignore"):
        pv = hv[:, :2] / hv[:, 2:3]
    inside = front & np.isfinite(pv).all(1)
    inside &= (pv[:, 0] >= 0) & (pv[:, 0] < view_size[0]) & (pv[:, 1] >= 0) & (pv[:, 1] < view_size[1])
    if occluder is not None and inside.any():
        xi = np.clip(pv[inside, 0].astype(int), 0, view_size[0] - 1)
        yi = np.clip(pv[inside, 1].astype(int), 0, view_size[1] - 1)
        idx = np.flatnonzero(inside)
        inside[idx[occluder[yi, xi]]] = False
    vis = inside & on_canvas
    n_region = int(on_canvas.sum())
    visible = float(vis.sum()) / max(n_region, 1)
    cell = (x2 - x1) * (y2 - y1) / max(len(pq), 1)
    out = {"visible": visible, "visible_px": 0.0, "scale": 0.0, "aniso": 1.0, "rot": 0.0}
    if vis.any():
        J = _jacobian(M, pq[vis])
        dets = np.abs(np.linalg.det(J))
        out["visible_px"] = float(dets.sum() * cell)
        out["scale"] = float(np.median(np.sqrt(dets)))
    # viewpoint change at the region centre (defined even if the centre is not visible)
    ctr = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    Jc = _jacobian(M, ctr)
    sv = np.linalg.svd(Jc, compute_uv=False)
    out["aniso"] = float(sv[0] / max(sv[1], 1e-9))
    out["rot"] = float(math.degrees(math.atan2(Jc[1, 0] - Jc[0, 1], Jc[0, 0] + Jc[1, 1])))
    if not vis.any():
        out["scale"] = float(math.sqrt(abs(np.linalg.det(Jc))))
    return {k: round(v, 5) for k, v in out.items()}


def label_view(m: Mapping[str, float], photo_level: int, long_side: int) -> str:
    """'easy' | 'hard' | 'junk' for a view of the query's landmark, from :func:`measure_overlap` (docstring rule)."""
    if m["visible"] < JUNK_VISIBLE or m["visible_px"] < (JUNK_MIN_SIDE * long_side) ** 2:
        return "junk"
    if (m["visible"] >= EASY_VISIBLE and 1 / EASY_SCALE <= m["scale"] <= EASY_SCALE and m["aniso"] <= EASY_ANISO
            and abs(m["rot"]) <= EASY_ROT and photo_level == 0):
        return "easy"
    return "hard"


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
        for vi in range(preset.n_confuser_views):
            tier = "easyc" if vi == 0 else "random"
            v = _make_view(conf_scene, tier, _rng("confuser-view", li, vi), preset.long_side, conf_scene.focus[:2])
            v.update(name=f"confuser{li:02d}_v{vi:02d}", landmark=None, scene=conf_scene)
            db_entries.append(v)
        yield f"landmark {lm['key']}"
    for di, dis in enumerate(plan["distractors"]):
        style = facade_style(_rng("style", *dis["style_seed"]))
        scene = _facade_scene(dis["key"], style, ("distractor", di), preset.canvas, preset.long_side, dis["mural"],
                              f"distractor:{di}")
        test_sources.update(scene.sources)
        for vi in range(preset.views_per_distractor):
            tier = "easy0" if vi == 0 else "random"
            v = _make_view(scene, tier, _rng("distractor-view", di, vi), preset.long_side, scene.focus[:2])
            v.update(name=f"{dis['key']}_v{vi:02d}", landmark=None, scene=scene)
            db_entries.append(v)
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
    with open(out / GND_NAME, "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": [q["name"] for q in queries], "gnd": gnd}, f, protocol=4)
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
            rel = f"train/{iid[0]}/{iid[1]}/{iid[2]}/{iid}.jpg"
            _write(out / rel, _jpeg_bytes(v["image"]))
            images_meta[rel] = {"split": "train", "role": "train", "landmark": ci, "scene": scene.key,
                                "sources": scene.sources, "size": list(v["size"]), "H": _r(v["H"]), "tier": tier,
                                "photometric": v["photometric"]}
            ids.append(iid)
        rows.append((ci, " ".join(ids)))
        yield f"train class {ci}"
    with open(out / "train_clean.csv", "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(["landmark_id", "images"])
        wr.writerows(rows)
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


def content_checksum(root: Path) -> tuple[str, int]:
    """sha256 over the relative path and bytes of every file except BUILD.json; returns (hex, file count)."""
    h = hashlib.sha256()
    n = 0
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == "BUILD.json" and p.parent == root:
            continue
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
        n += 1
    return h.hexdigest(), n


def read_build_info(root: Path) -> dict[str, Any] | None:
    """The ``BUILD.json`` of a complete build, or None."""
    f = Path(root) / "BUILD.json"
    if not f.is_file():
        return None
    try:
        info = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _is_complete(root: Path, preset: str) -> bool:
    info = read_build_info(root)
    return bool(info) and info.get("preset") == preset and info.get("version") == VERSION


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _remove_stale_tmp(out: Path) -> list[Path]:
    """Remove temp folders of killed builds (``.<name>.tmp-<host>-<pid>-<uuid>`` whose process is gone)."""
    removed = []
    host = os.uname().nodename if hasattr(os, "uname") else "host"
    for p in out.parent.glob(_tmp_prefix(out) + "*"):
        parts = p.name[len(_tmp_prefix(out)):].rsplit("-", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and _pid_alive(int(parts[1])):
            continue  # a live concurrent builder on this machine
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)
    return removed


def build(out: str | Path, preset: str = "default", force: bool = False, progress: bool = False,
          _fail_after: int | None = None) -> Path:
    """Build the benchmark into ``out`` (atomically) unless a complete build of ``preset`` is already there.

    Args:
        out: target folder; created with its parents.
        preset: 'default' or 'tiny' (see :data:`PRESETS`).
        force: rebuild even if a complete build exists (it is replaced atomically).
        progress: show a tqdm bar.
        _fail_after: testing hook: raise after this many build steps (simulates a crash mid-build).

    Returns:
        ``out``.
    """
    out = Path(out).absolute()
    if preset not in PRESETS:
        raise MinibenchError(f"{out}: unknown minibench preset {preset!r} (choose from {sorted(PRESETS)})")
    if not force and _is_complete(out, preset):
        return out
    if out.exists() and not out.is_dir():
        raise MinibenchError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and read_build_info(out) is None and not force:
        raise MinibenchError(f"{out}: exists, is not empty and has no BUILD.json (not a minibench build); "
                             "remove it or pass force=True / --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    host = os.uname().nodename if hasattr(os, "uname") else "host"
    tmp = out.parent / f"{_tmp_prefix(out)}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        steps = _iter_build(tmp, preset)
        bar: Any = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=_n_steps(PRESETS[preset]), desc=f"minibench ({preset})", unit="step")
        for k, label in enumerate(steps):
            if bar is not None:
                bar.set_postfix_str(label)
                bar.update(1)
            if _fail_after is not None and k + 1 >= _fail_after:
                raise RuntimeError(f"simulated failure after {k + 1} steps")
        if bar is not None:
            bar.close()
        checksum, n_files = content_checksum(tmp)
        info = {"preset": preset, "version": VERSION, "files": n_files, "checksum": checksum}
        (tmp / "BUILD.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        # another builder may have finished first: keep its (identical) result
        if not force and _is_complete(out, preset):
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        try:
            if out.exists():
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except OSError:
            # lost a race with a concurrent builder that moved its (identical) build into place first
            if not _is_complete(out, preset):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_root(preset: str) -> Path:
    """``<repo>/datasets/minibench/<preset>``."""
    from delg.config import REPO_ROOT

    return REPO_ROOT / "datasets" / "minibench" / preset


def ensure_built(conf: Mapping[str, Any], log: Callable[[str], None] = print) -> Path:
    """The root of the embedded benchmark of ``conf`` (``conf.dataset.root`` / ``.preset``), built if missing."""
    ds = conf["dataset"]
    preset = ds.get("preset") or "default"
    root = Path(ds["root"]) if ds.get("root") else default_root(preset)
    if not _is_complete(root.absolute(), preset):
        log(f"building the embedded benchmark (preset {preset}) in {root} (about a minute, once)")
        build(root, preset=preset, progress=bool(conf.get("progress", True)))
    return root
