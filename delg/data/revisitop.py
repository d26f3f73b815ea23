"""Revisited Oxford / Paris ground truth (revisitop protocol): the one reader of ``gnd_<name>.pkl`` / ``.mat``.

TODO(helper): readers for .pkl (0-based, restricted unpickler) and .mat (1-based), validation, paths, crop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class QueryGroundTruth:
    """Ground truth of one query. Indices are 0-based rows of ``GroundTruth.imlist``."""

    easy: np.ndarray  # (n_easy,) int64
    hard: np.ndarray  # (n_hard,) int64
    junk: np.ndarray  # (n_junk,) int64
    bbx: tuple[float, float, float, float] | None  # (x1, y1, x2, y2) in the full query image; None = whole image


@dataclass
class GroundTruth:
    """A revisitop-style benchmark: database names, query names and per-query easy/hard/junk/bbx."""

    name: str  # e.g. roxford5k
    imlist: list[str]  # database image names without extension
    qimlist: list[str]  # query image names without extension (not in imlist)
    gnd: list[QueryGroundTruth]
    source: Path | None = field(default=None)  # file it was read from

    @property
    def n_db(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)
