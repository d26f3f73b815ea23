"""What every verifier is: ``prepare`` an image once (cached), ``match`` two prepared images.

Adding a verifier is exactly three things:

1. one new file ``loftr_tools/<name>.py``: a :class:`Verifier` subclass that sets ``name`` and ``default_conf``
   (every setting, with the defaults of its YAML section) and implements ``prepare`` and ``match`` (and, if useful,
   the optional hooks below); ``loftr_tools/xfeat.py`` is a short example;
2. one line in ``loftr_tools.registry.VERIFIERS`` (method key -> module, class, config section) and the method key
   in ``delg.settings.METHODS``;
3. its config section ``delg/conf/<section>.yaml`` (settings plus a ``ransac:`` mapping) with its typed model in
   ``delg.settings.SECTIONS`` (tests check that YAML, schema and ``default_conf`` agree).

RANSAC, scoring, the inlier cache (its identity derives from the resolved settings, see :meth:`Verifier.identity`),
out-of-memory retries and pair ordering are shared (``loftr_tools.ransac``, ``loftr_tools.rerank``).

Hooks the reranker uses, all declared here: :meth:`Verifier.prepare`, :meth:`Verifier.match`,
:meth:`Verifier.match_many` with :attr:`Verifier.batch_size`, :meth:`Verifier.close`, :attr:`Verifier.reads_store`,
:meth:`Verifier.feature_nbytes`, :meth:`Verifier.identity_extra` and :meth:`Verifier.cache_tag`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import torch

from delg.errors import ProjectError

BBox = tuple[float, float, float, float]
# Score of an image paired with itself (same file, no crop; folder datasets, where queries are database images too):
# above any real inlier count, so an exact duplicate of the query ranks first; never matched (it would only cost time).
IDENTICAL_INLIERS = 1_000_000


@dataclass(frozen=True)
class ImageRef:
    """An image as the reranker sees it: queries carry their crop box so every verifier matches the crop."""

    key: str  # unique cache key, 'query/<name>' or 'db/<name>'
    name: str  # the name in the dataset / feature store
    path: Path
    crop: BBox | None = None


class VerifierUnavailable(ProjectError, RuntimeError):
    """The verifier cannot run here (missing weights, untrained head); the message says what to do."""


class Verifier(ABC):
    """Base class. ``conf`` is this verifier's section merged over ``default_conf``, read-only once built (an
    out-of-memory retry passes its smaller size to :meth:`prepare`, it never edits the settings)."""

    name: str = ""
    default_conf: ClassVar[dict[str, Any]] = {}
    # True for verifiers whose features come from the feature stores (by ``ref.key``, query or db split), not from
    # the image file: the reranker then keys cached features by split and keeps (query, db) pairs ordered.
    reads_store: ClassVar[bool] = False

    def __init__(self, conf: Mapping[str, Any] | None = None, device: torch.device | str = "cpu") -> None:
        self.conf: Mapping[str, Any] = MappingProxyType(_frozen({**self.default_conf, **(conf or {})}))
        self.device = torch.device(device)
        # Device policy: run where asked, never fall back silently (a 'cuda' run on CPU would be hours slower).
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise VerifierUnavailable(f"device '{device}' requested but CUDA is not available; use device=cpu")

    @abstractmethod
    def prepare(self, ref: ImageRef, size_factor: float = 1.0) -> Any:
        """Per-image work (features), done once per image and cached by the reranker.

        ``size_factor`` < 1 (out-of-memory retries only; those features are not cached) runs the image at that
        fraction of the configured long side (:func:`loftr_tools.resize.scaled_long_side`); verifiers without an
        image size (stored features) ignore it."""

    @abstractmethod
    def match(self, f0: Any, f1: Any) -> tuple[np.ndarray, np.ndarray]:
        """Tentative correspondences ``(pts0, pts1)``, each ``(N, 2)`` float32 pixel xy in the coordinates of the
        (cropped) original images, so that RANSAC thresholds mean the same thing for every verifier."""

    @property
    def batch_size(self) -> int:
        """Pairs of one first image the reranker hands to :meth:`match_many` at once (1 = pair by pair)."""
        return 1

    def match_many(self, f0: Any, f1s: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[self.match(f0, f1) for f1 in f1s]``; verifiers that batch pairs (LoFTR) override it, with the same
        result per pair as :meth:`match`."""
        return [self.match(f0, f1) for f1 in f1s]

    def close(self) -> None:  # noqa: B027 - an optional hook: most verifiers hold nothing to release
        """Release files or devices held (the reranker calls it once at the end); nothing by default."""

    def feature_nbytes(self, feats: Any) -> int:
        """Memory held by prepared features; the reranker keeps its cache within a budget with it."""
        total = 0
        items = feats.values() if isinstance(feats, dict) else [feats]
        for v in items:
            if isinstance(v, torch.Tensor):
                total += v.element_size() * v.nelement()
            elif isinstance(v, np.ndarray):
                total += v.nbytes
        return total

    def cache_tag(self) -> str:
        """A short readable string naming cache files (the full identity is :meth:`identity`)."""
        return self.name

    def identity(self) -> dict[str, Any]:
        """What the matches depend on besides the images: the method, every setting of the resolved section (the
        RANSAC mapping excepted: the reranker adds the one it uses) and :meth:`identity_extra`. Derived from the
        settings, not listed by hand, so a new setting joins the inlier cache's identity by itself; settings that
        cannot change a count are in ``loftr_tools.caches.NOT_IN_IDENTITY``."""
        return {"method": self.name, "settings": {k: v for k, v in self.conf.items() if k != "ransac"},
                **self.identity_extra()}

    def identity_extra(self) -> dict[str, Any]:
        """Inputs that are not settings: weight file contents, the feature stores read."""
        return {}


def _frozen(x: Any) -> Any:
    """Nested mappings read-only too (the ``ransac`` mapping), lists as tuples."""
    if isinstance(x, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in x.items()})
    if isinstance(x, list):
        return tuple(_frozen(v) for v in x)
    return x
