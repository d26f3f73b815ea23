"""Views of a scene: where the camera of each view tier looks from (scale, tilt, roll, target), rendered through
:mod:`.render` with the homography of :mod:`.geometry`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from delg.data.minibench.geometry import camera_homography
from delg.data.minibench.render import PHOTOMETRIC_STRONG, _occluders, _photometric, _render_view

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


