"""GLDv2's on-disk layout, coded once: the image path ``<images>/a/b/c/<id>.jpg`` and the label files.

Used by the training reader (:mod:`delg.data.gldv2`), the downloader (:mod:`delg.download`, which checks the
extracted images against ``train_clean.csv``) and the embedded benchmark (whose training split is written in this
layout).  Standard library only: the downloader must not need numpy or torch.

Label files, detected from the header:

* ``train_clean.csv``: ``landmark_id,images`` (images = space-separated ids)      -- GLDv2-clean, 81,313 classes
* ``train.csv``:       ``id,url,landmark_id``                                      -- GLDv2 full
* Kaggle 2021 ``train.csv``: ``id,landmark_id``                                    -- the clean set, one row per image

Image ids are 3 to 64 letters and digits (GLDv2: 16 hex digits): anything else (``../x``) is refused, since ids
become paths.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from delg.errors import ProjectError
from delg.io import atomic_write_text

CLEAN_HEADER = ["landmark_id", "images"]
_IMAGE_ID = re.compile(r"[0-9A-Za-z]{3,64}")


class GLDv2Error(ProjectError, ValueError):
    """A label file is malformed; the message names the file, the line and the field."""


def image_path(images: str | Path, image_id: str) -> Path:
    """``<images>/a/b/c/<id>.jpg`` (a, b, c: the first three characters of the id)."""
    if len(image_id) < 3:
        raise GLDv2Error(f"image id '{image_id}' is shorter than 3 characters")
    return Path(images) / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def _image_id(value: str, where: str) -> str:
    value = value.strip()
    if not _IMAGE_ID.fullmatch(value):
        raise GLDv2Error(f"{where}: bad image id {value!r}")
    return value


def read_labels(csv_path: str | Path, clean_only: bool = False) -> list[tuple[str, int]]:
    """``[(image_id, landmark_id)]`` in file order, from any of the three label formats (see module doc).

    Args:
        csv_path: the label file.
        clean_only: accept only ``train_clean.csv``'s format (``landmark_id,images``).

    Raises:
        GLDv2Error: missing file, unknown header, a bad landmark id or image id (names the file and line), or no
            image at all.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise GLDv2Error(f"GLDv2 label file not found: {csv_path}")
    rows: list[tuple[str, int]] = []
    with csv_path.open(newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if header[:2] == CLEAN_HEADER:
            clean = True
        elif "id" in header and "landmark_id" in header and not clean_only:
            clean = False
            i_id, i_lm = header.index("id"), header.index("landmark_id")
        else:
            expected = "'landmark_id,images'" + ("" if clean_only else ", 'id,url,landmark_id', 'id,landmark_id'")
            raise GLDv2Error(f"{csv_path}: header {header} is none of {expected}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            where = f"{csv_path}:{line}"
            if clean and len(row) < 2:
                raise GLDv2Error(f"{where}: field 'images' is missing")
            try:
                lm, ids = (int(row[0]), row[1].split()) if clean else (int(row[i_lm]), [row[i_id]])
            except (ValueError, IndexError):
                raise GLDv2Error(f"{where}: bad landmark_id or missing field in {row[:3]}") from None
            field = "images" if clean else "id"
            rows.extend((_image_id(i, f"{where}: field '{field}'"), lm) for i in ids)
    if not rows:
        raise GLDv2Error(f"{csv_path}: no images listed")
    return rows


def read_train_clean(path: str | Path) -> list[tuple[str, int]]:
    """``[(image_id, landmark_id)]`` of a ``train_clean.csv`` (``landmark_id,images``), in file order."""
    return read_labels(path, clean_only=True)


def write_train_clean(path: str | Path, rows: Iterable[tuple[int, Sequence[str]]]) -> Path:
    """Write ``train_clean.csv`` from ``[(landmark_id, [image ids])]`` (``\\n`` line ends), atomically."""
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(CLEAN_HEADER)
    wr.writerows((lm, " ".join(ids)) for lm, ids in rows)
    return atomic_write_text(path, buf.getvalue())
