"""One view of every benchmark: database images, query images (with crop boxes) and revisitop ground truth.

``load_dataset(conf)`` dispatches on ``conf.dataset.type``; every later stage only sees :class:`RetrievalDataset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from delg.data.revisitop import GroundTruth


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
    n_distractors: int = 0
    notes: dict[str, str] = field(default_factory=dict)  # how it was made, for results.json

    @property
    def n_db(self) -> int:
        return len(self.db_paths)

    @property
    def n_queries(self) -> int:
        return len(self.query_paths)
