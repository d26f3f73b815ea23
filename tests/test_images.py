"""The one image loader: EXIF orientation, colour modes, revisitop's crop, unreadable files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from delg.data.images import ImageReadError, image_size, load_image, load_pil


def _pattern(w: int = 40, h: int = 24) -> np.ndarray:
    """An (h, w, 3) image whose every pixel differs, so any flip or rotation shows."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6, y * 10, (x + 3 * y) % 256], -1).astype(np.uint8)


def _save_with_orientation(path: Path, arr: np.ndarray, orientation: int) -> None:
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, format="PNG", exif=exif)  # PNG: lossless, so pixels compare exactly


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_upright_and_crop_in_stored_frame(tmp_path: Path, orientation: int) -> None:
    raw = _pattern()
    p = tmp_path / f"o{orientation}.png"
    _save_with_orientation(p, raw, orientation)
    with Image.open(p) as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(load_image(p), upright)
    assert image_size(p) == (upright.shape[1], upright.shape[0])
    # revisitop crops the pixels as stored (its loader ignores EXIF): same region, then turned upright
    bbx = (5.4, 3.6, 30.2, 17.5)
    expected = Image.fromarray(raw).crop(bbx)
    if orientation != 1:
        tmp = tmp_path / "crop.png"
        _save_with_orientation(tmp, np.asarray(expected), orientation)
        with Image.open(tmp) as im:
            expected = ImageOps.exif_transpose(im)
    np.testing.assert_array_equal(load_image(p, crop=bbx), np.asarray(expected.convert("RGB")))


def test_colour_modes_become_rgb(tmp_path: Path) -> None:
    rgb = _pattern()
    gray = Image.fromarray(rgb[..., 0])
    gray.save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (24, 40, 3) and np.array_equal(out[..., 0], rgb[..., 0]) and np.array_equal(out[..., 0], out[..., 2])

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == (24, 40, 3) and np.abs(out.astype(int) - rgb).mean() < 8

    rgba = np.dstack([rgb, np.where(np.arange(40) < 20, 255, 0)[None, :].repeat(24, 0)]).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out[:, :20], rgb[:, :20])  # opaque half unchanged
    assert (out[:, 20:] == 255).all()  # transparent half composited on white

    v16 = rgb[..., 0].astype(np.uint16) * 257
    Image.fromarray(v16).save(tmp_path / "i16.png")  # 16-bit grayscale
    out = load_image(tmp_path / "i16.png")  # the image's own range stretched to 0..255 (not clipped at 255)
    a = v16.astype(np.float64)
    want = (255 * (a - a.min()) / (a.max() - a.min())).astype(np.uint8)
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3) and out.min() == 0 and out.max() == 255
    assert np.array_equal(out[..., 0], want) and np.array_equal(out[..., 0], out[..., 2])


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    Image.fromarray(_pattern(200, 150)).save(good, quality=90)
    data = good.read_bytes()
    cases = {
        "zero.jpg": b"",
        "garbage.jpg": b"not an image at all" * 10,
        "truncated.jpg": data[: len(data) // 3],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
            load_image(tmp_path / name)
    with pytest.raises(ImageReadError, match=r"missing\.jpg: file not found"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageReadError, match="empty crop box"):
        load_pil(good, crop=(10, 10, 10, 20))
