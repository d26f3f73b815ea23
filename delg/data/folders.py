"""``<root>/<landmark>/<image>`` photo folders as a retrieval benchmark.

Every image of a landmark folder is a query against all the other images (itself excluded as junk, since it
is also in the database); its positives are the other images of its landmark, all *easy*, so Easy and Medium
coincide and Hard is n/a.  Deeper sub-folders belong to their top-level landmark folder.

Decisions for the awkward cases (recorded in ``RetrievalDataset.notes``):

* images directly in ``root`` (no landmark folder) have no known landmark: they join the database only, as
  negatives for every query, and are not queries;
* a landmark folder with a single image: that image has no positive to find, so it is database-only too (as a
  query it would only be left out of the mean); it still counts as a negative for every other query.

Names are relative paths (``'british_museum/29057984_287139632.jpg'``) and are the feature-store keys;
``distractors=DIR`` adds every image under ``DIR`` as ``'distractors/<relative path>'``, database only.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from delg.data.images import IMAGE_EXTENSIONS, list_images
from delg.data.retrieval import RetrievalDataset, add_distractors, folder_tag, safe_name
from delg.data.revisitop import GroundTruth, QueryGroundTruth


def load_folders(root: str | Path, distractors: str | Path | None = None, progress: bool = False) -> RetrievalDataset:
    """Read ``<root>/<landmark>/<image>`` (any common image format) as a :class:`RetrievalDataset`.

    Args:
        root: the photo folder.
        distractors: optional folder whose images (recursively) join the database only.
        progress: show a progress bar while listing distractors.

    Database rows are all images of ``root`` sorted by relative path, then the distractors; queries are the
    images of landmarks with at least two images, in the same order.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.root not found: {root} (expected <root>/<landmark>/<image>)")
    paths = list_images(root)
    if distractors is not None:
        # A distractor folder inside root would otherwise be read twice, once as a landmark.
        dis = Path(distractors).resolve()
        paths = [p for p in paths if not p.resolve().is_relative_to(dis)]
    if not paths:
        raise FileNotFoundError(f"{root}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    names = [p.relative_to(root).as_posix() for p in paths]
    by_landmark: dict[str, list[int]] = defaultdict(list)
    loose: list[int] = []
    for i, n in enumerate(names):
        if "/" in n:
            by_landmark[n.split("/", 1)[0]].append(i)
        else:
            loose.append(i)
    singles = sorted(lm for lm, ids in by_landmark.items() if len(ids) == 1)
    members = {lm: np.asarray(ids, np.int64) for lm, ids in by_landmark.items() if len(ids) > 1}
    if not members:
        raise FileNotFoundError(
            f"{root}: no landmark folder with two or more images, so there is no query with a positive "
            "(expected <root>/<landmark>/<image>)"
        )
    query_ids = sorted(i for ids in members.values() for i in ids.tolist())
    gnd = []
    for i in query_ids:
        same = members[names[i].split("/", 1)[0]]
        gnd.append(QueryGroundTruth(
            easy=same[same != i],
            hard=np.zeros(0, np.int64),
            junk=np.array([i], np.int64),  # the query itself is in the database: neither positive nor negative
            bbx=None,
        ))
    qnames = [names[i] for i in query_ids]
    g = GroundTruth(name=safe_name(f"folders-{root.resolve().name}-{folder_tag(root)}"), imlist=names, qimlist=qnames, gnd=gnd,
                    source=root, format="folders")
    notes = {
        "source": f"photo folders {root} ({len(members)} landmarks with 2+ images)",
        "query_crop": "whole images (folders have no boxes)",
        "junk": "each query is in the database too and is junk for itself; positives = the other images of its "
                "landmark, all easy (Easy = Medium, Hard n/a)",
    }
    broken = [n for n, p in zip(names, paths) if p.is_symlink() and not p.exists()]
    if broken:  # kept in the dataset: the extraction reports each as unreadable (skipped.json, results.json)
        notes["broken_symlinks"] = (f"{len(broken)} symlinks point to missing files (skipped as unreadable): "
                                    + ", ".join(broken[:5]) + (" ..." if len(broken) > 5 else ""))
    if loose:
        notes["loose_images"] = f"{len(loose)} images directly in {root} have no landmark: database only"
    if singles:
        notes["single_image_landmarks"] = (
            f"{len(singles)} landmark folders with one image are database only: {', '.join(singles[:5])}"
            + (" ..." if len(singles) > 5 else "")
        )
    ds = RetrievalDataset(
        name=g.name,
        db_paths=list(paths),
        db_names=names,
        query_paths=[paths[i] for i in query_ids],
        query_names=qnames,
        query_bbx=[None] * len(query_ids),
        gnd=g,
        notes=notes,
    )
    if distractors is not None:
        ds = add_distractors(ds, distractors, progress)
    return ds
