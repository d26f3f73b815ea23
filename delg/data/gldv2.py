"""Google Landmarks v2 training data (and the embedded benchmark's training split, which uses the same layout).

Reads any of the three GLDv2 label files (formats and the image layout: :mod:`delg.data.gldv2_layout`).
Images live at ``<images>/<a>/<b>/<c>/<id>.jpg`` (a, b, c = first three characters of the id).  Landmark ids
are relabelled contiguously (sorted original ids -> 0..K-1).  Unreadable images are counted, written to a report
and skipped by the training loader; they never stop a run.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from delg.data.gldv2_layout import GLDv2Error, image_path, read_labels
from delg.data.images import ImageReadError, load_pil


@dataclass
class LandmarkSet:
    """Training images with contiguous labels.  ``landmark_ids[label]`` is the original landmark id."""

    paths: list[Path]
    image_ids: list[str]
    labels: np.ndarray  # (N,) int64 in [0, num_classes)
    landmark_ids: list[int]
    source: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.landmark_ids)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: Sequence[int] | np.ndarray) -> LandmarkSet:
        """The rows ``idx``, keeping the label space (so train and val share classes)."""
        idx = np.asarray(idx, dtype=np.int64)
        return LandmarkSet([self.paths[i] for i in idx], [self.image_ids[i] for i in idx], self.labels[idx],
                           self.landmark_ids, self.source, dict(self.notes))


def load_landmarks(csv_path: str | Path, images: str | Path, min_images_per_class: int = 1,
                   max_classes: int | None = None) -> LandmarkSet:
    """Read a label file and relabel landmarks contiguously (sorted original ids -> 0..K-1).

    Args:
        csv_path: a GLDv2 label file.
        images: root of ``a/b/c/<id>.jpg``.
        min_images_per_class: drop landmarks with fewer images.
        max_classes: keep only the first landmarks (sorted by id), for quick runs.
    """
    rows = read_labels(csv_path)
    by_lm: dict[int, list[str]] = defaultdict(list)
    for i, lm in rows:
        by_lm[lm].append(i)
    keep = sorted(lm for lm, ids in by_lm.items() if len(ids) >= min_images_per_class)
    if max_classes:
        keep = keep[: int(max_classes)]
    if not keep:
        raise GLDv2Error(f"{csv_path}: no landmark has >= {min_images_per_class} images")
    paths, ids, labels = [], [], []
    for label, lm in enumerate(keep):
        for i in by_lm[lm]:
            paths.append(image_path(images, i))
            ids.append(i)
            labels.append(label)
    return LandmarkSet(paths, ids, np.asarray(labels, dtype=np.int64), keep, str(csv_path))


def rows_by_class(labels: np.ndarray) -> list[np.ndarray]:
    """``[rows of class 0, rows of class 1, ...]`` for the classes present, in one sort (GLDv2: 81k classes)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return []
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, cuts)


def split_train_val(data: LandmarkSet, val_fraction: float, seed: int = 0) -> tuple[LandmarkSet, LandmarkSet]:
    """Reproducible split stratified by landmark: about ``val_fraction`` of each landmark's images go to val.

    The choice depends only on ``(seed, image id)`` (not on row order); a landmark always keeps at least one
    training image, and landmarks with fewer than 3 images stay entirely in training.
    """
    if val_fraction <= 0:
        return data, data.subset([])
    key = np.array([int(hashlib.sha1(f"{seed}:{i}".encode()).hexdigest()[:12], 16) for i in data.image_ids])
    val: list[int] = []
    for rows in rows_by_class(data.labels):
        if len(rows) < 3:
            continue
        n_val = min(len(rows) - 1, max(1, round(val_fraction * len(rows))))
        val.extend(rows[np.argsort(key[rows], kind="stable")[:n_val]].tolist())
    val_set = set(val)
    train = [i for i in range(len(data)) if i not in val_set]
    return data.subset(train), data.subset(sorted(val))


class LandmarkDataset(Dataset):
    """Images of a :class:`LandmarkSet` through ``transform``; ``n_views`` independently augmented views each.

    ``__getitem__`` returns ``(views (n_views, 3, H, W), label, index)`` or, for an unreadable image,
    ``(None, label, index, reason)``; :func:`collate_skip` drops those and reports them.
    """

    def __init__(self, data: LandmarkSet, transform, n_views: int = 1) -> None:
        self.data, self.transform, self.n_views = data, transform, int(n_views)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        label = int(self.data.labels[i])
        try:
            im = load_pil(self.data.paths[i])
        except ImageReadError as e:
            return None, label, i, str(e)
        views = torch.stack([self.transform(im) for _ in range(self.n_views)])
        return views, label, i


def collate_skip(batch: list) -> dict:
    """Stack readable samples; ``bad`` lists ``(index, reason)`` of the unreadable ones."""
    good = [b for b in batch if b[0] is not None]
    bad = [(b[2], b[3]) for b in batch if b[0] is None]
    if good:
        views = torch.stack([b[0] for b in good])  # (B, V, 3, H, W)
        labels = torch.tensor([b[1] for b in good], dtype=torch.int64)
        index = torch.tensor([b[2] for b in good], dtype=torch.int64)
    else:
        views, labels, index = None, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return {"views": views, "labels": labels, "index": index, "bad": bad}


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices for one epoch, identical on every rank, split between ranks (rank r takes r::world).

    ``balanced=False``: a shuffled pass over all images in batches of ``batch_size`` (last partial batch dropped
    when smaller than 2: BatchNorm needs two samples).  ``balanced=True`` (SupCon): each landmark's images are
    shuffled and cut into groups of ``images_per_class`` (a short last group is filled by re-drawing from the same
    landmark), groups are shuffled and packed ``batch_size // images_per_class`` per batch, so every batch holds
    at least ``images_per_class`` images of each landmark in it and an epoch still sees every image once.
    Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, balanced: bool = False, images_per_class: int = 2,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.labels = np.asarray(labels)
        self.batch_size, self.balanced, self.k = int(batch_size), bool(balanced), int(images_per_class)
        if self.balanced and self.batch_size < self.k:
            raise ValueError(f"train.batch_size ({batch_size}) must be >= train.images_per_class ({images_per_class})")
        self.seed, self.rank, self.world = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self._classes = rows_by_class(self.labels) if self.balanced else []
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self) -> list[list[int]]:
        """All global batches of the current epoch (cached)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._all_batches())
        return self._cache[1]

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if not self.balanced:
            order = rng.permutation(len(self.labels))
            batches = [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        else:
            groups = []
            for cls_rows in self._classes:
                rows = rng.permutation(cls_rows)
                for i in range(0, len(rows), self.k):
                    g = rows[i:i + self.k].tolist()
                    if len(g) < self.k:
                        g += rng.choice(rows, self.k - len(g), replace=True).tolist()
                    groups.append(g)
            order = rng.permutation(len(groups))
            per = max(1, self.batch_size // self.k)
            batches = [sum((groups[j] for j in order[i:i + per]), []) for i in range(0, len(order), per)]
        return [b for b in batches if len(b) >= 2]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        n = len(batches) // self.world if self.world > 1 else len(batches)  # equal counts: DDP must not hang
        yield from batches[self.rank::self.world][:n]

    def __len__(self) -> int:
        n = len(self.batches())
        return n // self.world if self.world > 1 else n
