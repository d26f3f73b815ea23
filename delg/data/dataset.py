"""One view of every benchmark: database images, query images (with crop boxes) and revisitop ground truth.

``load_dataset(conf)`` dispatches on ``conf.dataset.type``; every later stage only sees :class:`RetrievalDataset`.

* ``minibench``: the embedded benchmark, built on demand by :func:`delg.data.minibench.ensure_built` into
  revisitop's layout (``jpg/<name>.jpg`` + ``gnd_<name>.pkl``), then read like revisitop.
* ``revisitop``: ``conf.dataset.root`` holds ``jpg/`` and ``gnd_<name>.pkl`` (or ``.mat``), ``name`` is
  ``roxford5k`` or ``rparis6k`` (any ``gnd_<name>`` works).
* ``folders``: ``<root>/<landmark>/<image>`` photo folders (see :mod:`delg.data.folders`).

``conf.dataset.distractors`` appends every image under that folder to the database (named
``distractors/<relative path>``), for any type; ``conf.dataset.query_crop=false`` drops the query boxes.
The distractors keep an identity of their own (``distractor_id``, from the folder's absolute path): their
features go to one store shared by every benchmark run with the same folder and model settings (``delg.extract``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from delg.config import ConfigError
from delg.data.retrieval import (  # noqa: F401  (re-exported: the names users import from here)
    DISTRACTOR_PREFIX,
    RetrievalDataset,
    add_distractors,
    folder_tag,
    list_distractors,
    safe_name,
)
from delg.data.revisitop import GroundTruthError, find_gnd, image_path, read_gnd

DATASET_TYPES = ("minibench", "revisitop", "folders")


# ---------------------------------------------------------------------------------------------- revisitop


def from_revisitop(
    root: str | Path, name: str, query_crop: bool = True, check_images: bool = True, dataset_name: str | None = None
) -> RetrievalDataset:
    """A revisitop-layout folder: ``<root>/jpg/<image>.jpg`` and ``<root>/gnd_<name>.pkl`` (or ``.mat``).

    Also accepts revisitop's download layout, ``<root>/<name>/jpg`` (``<data>/datasets/roxford5k``).
    """
    root = Path(root)
    if not (root / "jpg").is_dir() and (root / name / "jpg").is_dir():
        root = root / name
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root} (expected a folder with jpg/ and gnd_{name}.pkl)")
    gnd = read_gnd(find_gnd(root, name))
    images = root / "jpg"
    if not images.is_dir():
        raise FileNotFoundError(f"{root}: missing image folder jpg/ (expected {images}/<name>.jpg)")
    db_paths = [image_path(images, n) for n in gnd.imlist]
    q_paths = [image_path(images, n) for n in gnd.qimlist]
    if check_images:
        # One directory listing instead of thousands of stat calls.
        present = {e.name for e in os.scandir(images)}
        missing = [n for n in dict.fromkeys([*gnd.qimlist, *gnd.imlist]) if f"{n}.jpg" not in present]
        listed = len(gnd.qimlist) + len(gnd.imlist)
        msg = (f"{images}: {len(missing)} of the {listed} images listed in {gnd.source.name} are missing, "
               f"e.g. {', '.join(m + '.jpg' for m in missing[:3])}")
        # Mostly missing = a wrong folder or an unfinished download: stop. A few = real-world losses: the run
        # goes on, extraction reports each one as a skipped image and results.json marks the run incomplete.
        if missing and len(missing) * 2 > listed:
            raise FileNotFoundError(msg)
        if missing:
            print(f"warning: {msg}; they are skipped and reported", file=sys.stderr)
    bbx = [q.bbx if query_crop else None for q in gnd.gnd]
    notes = {
        "ground_truth": str(gnd.source),
        "query_crop": "queries cropped to their bbx (revisitop protocol)" if query_crop else "whole query images (query_crop=false)",
        "junk": "E: ok=easy, junk=junk+hard; M: ok=easy+hard, junk=junk; H: ok=hard, junk=junk+easy",
    }
    q_names = list(gnd.qimlist)
    if gnd.format == "original":
        notes["format"] = "original Oxford5k/Paris6k ground truth: ok -> easy, no hard; queries are database images"
        # Same name for the cropped query and the full database image would collide in the feature store.
        q_names = [f"query/{n}" for n in gnd.qimlist]
    return RetrievalDataset(
        name=safe_name(dataset_name or gnd.name),
        db_paths=db_paths,
        db_names=list(gnd.imlist),
        query_paths=q_paths,
        query_names=q_names,
        query_bbx=bbx,
        gnd=gnd,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------- dispatcher


def _get(section: Any, key: str, default: Any = None) -> Any:
    try:
        v = section[key]
    except (KeyError, TypeError):
        return default
    return default if v is None else v


def load_dataset(conf: Any) -> RetrievalDataset:
    """Build the :class:`RetrievalDataset` that ``conf.dataset`` describes (see the module docstring).

    Raises:
        ConfigError: unknown ``dataset.type``, or a missing ``dataset.root`` / ``dataset.name``.
        FileNotFoundError / GroundTruthError: the data on disk is missing or malformed.
    """
    d = conf["dataset"] if "dataset" in conf else conf
    kind = _get(d, "type", "minibench")
    progress = bool(_get(conf, "progress", True))
    query_crop = bool(_get(d, "query_crop", True))
    check_images = bool(_get(d, "check_images", True))
    distractors = _get(d, "distractors")
    if kind == "minibench":
        from delg.data.minibench import ensure_built  # imported here: it pulls in the benchmark builder

        root = Path(ensure_built(conf))
        preset = _get(d, "preset", "default")
        # The ground truth is always gnd_minibench.pkl; dataset.name only renames the run's files.
        name = _get(d, "name") or "minibench"
        ds = from_revisitop(root, "minibench", query_crop, check_images, dataset_name=f"{name}-{preset}")
        ds.notes["source"] = f"embedded benchmark (preset {preset}) built at {root}"
    elif kind == "revisitop":
        root, name = _get(d, "root"), _get(d, "name")
        if not root or not name:
            missing = " and ".join(k for k, v in (("dataset.root", root), ("dataset.name", name)) if not v)
            raise ConfigError(
                f"dataset.type=revisitop needs {missing}: dataset.root is a folder with jpg/<image>.jpg and "
                "gnd_<name>.pkl (or .mat), dataset.name is roxford5k or rparis6k"
            )
        try:
            ds = from_revisitop(root, str(name), query_crop, check_images)
        except GroundTruthError as e:
            raise GroundTruthError(f"dataset.root={root}, dataset.name={name}: {e}") from None
    elif kind == "folders":
        root = _get(d, "root")
        if not root:
            raise ConfigError("dataset.type=folders needs dataset.root: a folder of <landmark>/<image> photos")
        from delg.data.folders import load_folders

        return load_folders(root, distractors, progress=progress)
    else:
        raise ConfigError(f"unknown dataset.type '{kind}' (valid types: {', '.join(DATASET_TYPES)})")
    if distractors:
        ds = add_distractors(ds, distractors, progress)
    return ds
