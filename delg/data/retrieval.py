"""The one dataset type every stage sees (:class:`RetrievalDataset`) and what any benchmark type can add to it
(distractors).  A module of its own so that the loaders (:mod:`delg.data.dataset`, :mod:`delg.data.folders`) import
it without importing each other."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from delg.data.images import IMAGE_EXTENSIONS
from delg.data.revisitop import GroundTruth

DISTRACTOR_PREFIX = "distractors/"


@dataclass
class RetrievalDataset:
    """Database ``i`` is ``db_paths[i]`` / ``db_names[i]`` (row ``i`` of a ranking); query ``j`` likewise.

    ``gnd.gnd[j]`` indexes the database.  Distractors (if any) are appended after the ground truth's ``imlist``,
    so they never appear in easy/hard/junk and count as negatives for every query.
    """

    name: str  # dataset identifier used in file names, e.g. 'minibench-default', 'roxford5k', 'folders-images'
    db_paths: list[Path]
    db_names: list[str]  # unique keys in the feature store (relative names, e.g. 'all_souls_000013')
    query_paths: list[Path]
    query_names: list[str]
    query_bbx: list[tuple[float, float, float, float] | None]  # crop box of each query, None = whole image
    gnd: GroundTruth
    n_distractors: int = 0  # the last n_distractors database images are distractors
    # Identity of the distractor folder (``distractors-<hash of its absolute path>``): names the distractor feature
    # store, shared by ROxford+1M and RParis+1M; None keeps every database image in the benchmark's own store.
    distractor_id: str | None = None
    notes: dict[str, str] = field(default_factory=dict)  # how it was made, for results.json

    @property
    def n_db(self) -> int:
        return len(self.db_paths)

    @property
    def n_queries(self) -> int:
        return len(self.query_paths)

    @property
    def n_own(self) -> int:
        """Database images of the benchmark itself (before the distractors)."""
        return self.n_db - self.n_distractors


def folder_tag(root: str | Path) -> str:
    """6 hex digits of the folder's absolute path: two different folders of the same name get different dataset
    names, hence different feature stores (features are kept per dataset name and image name)."""
    return hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:6]


def safe_name(text: str) -> str:
    """A filesystem-safe identifier: letters, digits and ``._+-``; anything else becomes ``_``."""
    out = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._")
    return out or "dataset"


# ------------------------------------------------------------------------------------------------ distractors


def list_distractors(root: str | Path, progress: bool = False, exclude: Path | None = None) -> tuple[list[Path], list[str]]:
    """Every image under ``root`` (recursively, any common format), sorted by relative path.

    Returns ``(paths, names)`` with names ``'distractors/<relative path>'``.  Uses ``os.scandir`` so that a
    million files (revisitop 1M) list in seconds; ``exclude`` skips a folder inside ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"distractor folder not found: {root}")
    exts = set(IMAGE_EXTENSIONS)
    skip = os.path.realpath(exclude) if exclude is not None else None
    rel: list[str] = []
    stack = [""]
    bar = tqdm(desc=f"listing {root.name}", unit=" img", disable=not progress)
    while stack:
        sub = stack.pop()
        d = os.path.join(root, sub) if sub else str(root)
        if skip is not None and os.path.realpath(d) == skip:
            continue
        with os.scandir(d) as it:
            for e in it:
                r = f"{sub}/{e.name}" if sub else e.name
                if e.is_dir():
                    stack.append(r)
                elif os.path.splitext(e.name)[1].lower() in exts and e.is_file():
                    rel.append(r)
                    bar.update(1)
    bar.close()
    rel.sort()
    return [root / r for r in rel], [DISTRACTOR_PREFIX + r for r in rel]


def add_distractors(ds: RetrievalDataset, root: str | Path, progress: bool = False) -> RetrievalDataset:
    """Append every image under ``root`` to the database only (negatives for every query)."""
    paths, names = list_distractors(root, progress)
    if not paths:
        raise FileNotFoundError(f"distractor folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    clash = set(names).intersection(ds.db_names)
    if clash:
        raise ValueError(f"distractor names clash with database names, e.g. '{next(iter(clash))}'")
    notes = dict(ds.notes, distractors=f"{len(paths)} images from {root}, database only (negatives)")
    return replace(
        ds,
        name=f"{ds.name}+distractors-{len(paths)}-{folder_tag(root)}",
        db_paths=ds.db_paths + paths,
        db_names=ds.db_names + names,
        n_distractors=ds.n_distractors + len(paths),
        distractor_id=f"distractors-{folder_tag(root)}" if ds.n_distractors == 0 else None,
        notes=notes,
    )
