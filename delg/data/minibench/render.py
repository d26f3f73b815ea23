"""Pixels of the embedded benchmark: source photographs, procedural facades, warping a canvas into a view,
occluders and photometric changes.  Every random choice comes from a named stream (:func:`_rng`)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from delg.data.minibench.geometry import _jacobian

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


