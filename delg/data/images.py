"""The one image loader of the project.

Every stage (extraction, verification, the report, training) reads images through :func:`load_image`, so EXIF
orientation, colour modes and query cropping are handled the same way everywhere.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from delg.errors import ProjectError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Large photos are legitimate here (the 1M distractors include some); keep PIL's bomb check but raise the limit.
Image.MAX_IMAGE_PIXELS = 20000 * 20000


class ImageReadError(ProjectError, RuntimeError):
    """An image could not be read or decoded; the message names the file."""


BBox = tuple[float, float, float, float]


# EXIF orientation -> the PIL transpose that makes the image upright (as ImageOps.exif_transpose does).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def load_pil(path: str | Path, crop: BBox | Sequence[float] | None = None) -> Image.Image:
    """Open an image as RGB, cropped to ``crop = (x1, y1, x2, y2)`` if given, then EXIF-rotated upright.

    The crop is revisitop's ``PIL.Image.crop(bbx)`` exactly, on the pixels as stored in the file: revisitop's
    loader ignores EXIF orientation, so its boxes are in that frame.  Rotating afterwards keeps the same region
    and only turns the result upright.  Grayscale, palette, CMYK and alpha images are converted to RGB (alpha
    composited on white).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            orientation = im.getexif().get(0x0112, 1)
            if crop is not None:
                x1, y1, x2, y2 = (float(c) for c in crop)
                if not (x2 > x1 and y2 > y1):
                    raise ImageReadError(f"{path}: empty crop box {tuple(crop)}")
                im = im.crop((x1, y1, x2, y2))
            if orientation in _EXIF_TRANSPOSE:
                im = im.transpose(_EXIF_TRANSPOSE[orientation])
            im = _to_rgb(im)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")  # convert() would copy an RGBA image too
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        arr = (255 * (arr - arr.min()) / max(arr.max() - arr.min(), 1)).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | Path, crop: BBox | Sequence[float] | None = None) -> np.ndarray:
    """Read an image as an ``(H, W, 3)`` uint8 RGB array (see :func:`load_pil`)."""
    return np.asarray(load_pil(path, crop))


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` after EXIF rotation, read from the header only."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = _header_orientation(im)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: cannot read image header ({type(e).__name__}: {e})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _header_orientation(im: Image.Image) -> int:
    """EXIF orientation without decoding the pixels.  ``getexif()`` on a PNG decodes the whole image to look for
    an eXIf chunk after the pixel data (a 24000x24000 PNG: 1.7 GB); an eXIf chunk before it is already in
    ``info``, and one after it is ignored here (revisitop and the benchmarks have none)."""
    if im.format == "PNG":
        raw = im.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw if isinstance(raw, bytes) else bytes(raw))
        return int(exif.get(0x0112, 1))
    return int(im.getexif().get(0x0112, 1))


def resize_max_side(im: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale so that the long side is at most ``max_side`` (never upscales); bilinear with antialiasing."""
    if not max_side or max(im.size) <= max_side:
        return im
    s = max_side / max(im.size)
    size = (max(1, round(im.width * s)), max(1, round(im.height * s)))
    return im.resize(size, Image.BILINEAR)


def list_images(root: str | Path) -> list[Path]:
    """All images under ``root`` (recursively, any common format), sorted for determinism.

    Symlinked folders are followed (a folder reached twice, e.g. through a link loop, is read once, with a
    warning).  A symlink to a missing file is listed like any image: reading it fails, so the extraction reports it
    with the reason (``<store>.skipped.json``, ``results.json``'s ``skipped``) like any unreadable image, instead
    of it vanishing from the dataset.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    out: list[Path] = []
    seen: set[str] = set()
    for d, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:  # a link back to a folder already read (a loop, or two links to one folder)
            warnings.warn(f"{d}: links to {real}, already listed; read once", stacklevel=2)
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        out.extend(Path(d) / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(out)
