"""What every verifier is: ``prepare`` an image once (cached), ``match`` two prepared images.

Adding a matcher is one file: subclass :class:`Verifier`, set ``name`` and ``default_conf``, implement
``prepare_image`` (or ``prepare`` for verifiers that read stored features) and ``match``, and register it in
``loftr_tools.registry``.  RANSAC, scoring, caching and pair ordering are shared (``loftr_tools.ransac``,
``loftr_tools.rerank``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """Base class. ``conf`` is this verifier's section merged over ``default_conf``."""

    name: str = ""
    default_conf: dict[str, Any] = {}

    def __init__(self, conf: dict[str, Any] | None = None, device: torch.device | str = "cpu") -> None:
        self.conf = {**self.default_conf, **(conf or {})}
        self.device = torch.device(device)
        # Device policy: run where asked, never fall back silently (a 'cuda' run on CPU would be hours slower).
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise VerifierUnavailable(f"device '{device}' requested but CUDA is not available; use device=cpu")

    @abstractmethod
    def prepare(self, ref: ImageRef) -> Any:
        """Per-image work (features), done once per image and cached by the reranker."""

    @abstractmethod
    def match(self, f0: Any, f1: Any) -> tuple[np.ndarray, np.ndarray]:
        """Tentative correspondences ``(pts0, pts1)``, each ``(N, 2)`` float32 pixel xy in the coordinates of the
        (cropped) original images, so that RANSAC thresholds mean the same thing for every verifier."""

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
