"""OpenCV SIFT + Lowe's ratio test (method ``sift``): the classical baseline, needs no weights.

``prepare`` detects up to ``sift.max_keypoints`` keypoints on the grayscale image resized by
:mod:`loftr_tools.resize` (``sift.long_side``, default 1024) and stores them in original (cropped) pixels;
``match`` keeps nearest neighbours that pass the ratio test (``sift.ratio``, 0.8), optionally mutual.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import torch

from loftr_tools.base import ImageRef, Verifier
from loftr_tools.resize import load_resized, scaled_long_side


class SiftVerifier(Verifier):
    """SIFT keypoints + ratio-test matching. Config section ``sift``."""

    name = "sift"
    default_conf: dict[str, Any] = {
        "long_side": 1024,
        "max_keypoints": 4096,
        "ratio": 0.8,
        "mutual": False,
        "root_sift": True,
    }

    def __init__(self, conf: Mapping[str, Any] | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__(conf, device)
        if not 0 < float(self.conf["ratio"]) <= 1:
            raise ValueError(f"sift.ratio: must be in (0, 1], got {self.conf['ratio']}")
        # One detector per verifier; SIFT is deterministic.
        self.sift = cv2.SIFT_create(nfeatures=int(self.conf["max_keypoints"]))

    def prepare(self, ref: ImageRef, size_factor: float = 1.0) -> dict[str, np.ndarray]:
        """``keypoints`` :math:`(N, 2)` float32 xy in original (cropped) pixels, ``descriptors`` :math:`(N, 128)`
        float32 (RootSIFT when ``root_sift``); at ``size_factor`` times ``long_side`` (see the base class)."""
        r = load_resized(ref, scaled_long_side(self.conf["long_side"], size_factor), 1, gray=True)
        kps, desc = self.sift.detectAndCompute(r.image, None)
        if desc is None or len(kps) == 0:
            return {"keypoints": np.zeros((0, 2), np.float32), "descriptors": np.zeros((0, 128), np.float32)}
        xy = np.array([k.pt for k in kps], dtype=np.float32)
        desc = desc.astype(np.float32)
        if self.conf["root_sift"]:
            # RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise then sqrt, so L2 distance ~ Hellinger kernel.
            desc = np.sqrt(desc / np.maximum(desc.sum(1, keepdims=True), 1e-8))
        # OpenCV keypoints use pixel centres at integer coordinates, like Resized.to_original expects.
        return {"keypoints": r.to_original(xy), "descriptors": np.ascontiguousarray(desc)}

    def match(self, f0: dict[str, np.ndarray], f1: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Ratio-test correspondences ``(pts0, pts1)``, each :math:`(M, 2)` float32 xy in original pixels."""
        return ratio_match(f0["keypoints"], f0["descriptors"], f1["keypoints"], f1["descriptors"],
                           float(self.conf["ratio"]), bool(self.conf["mutual"]))

    def cache_tag(self) -> str:
        c = self.conf
        return (f"sift-{c['long_side']}px-{c['max_keypoints']}kp-r{float(c['ratio']):g}"
                f"{'-mutual' if c['mutual'] else ''}{'-root' if c['root_sift'] else ''}")


def ratio_match(
    k0: np.ndarray, d0: np.ndarray, k1: np.ndarray, d1: np.ndarray, ratio: float = 0.8, mutual: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour matches of ``d0`` :math:`(N, D)` in ``d1`` :math:`(M, D)` passing Lowe's ratio test.

    Returns the matched keypoints ``(k0[i], k1[j])`` as two :math:`(K, 2)` float32 arrays.
    """
    empty = np.zeros((0, 2), np.float32)
    if len(d0) < 1 or len(d1) < 2:
        return empty, empty
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    knn = matcher.knnMatch(np.ascontiguousarray(d0, np.float32), np.ascontiguousarray(d1, np.float32), k=2)
    i0, i1 = [], []
    for pair in knn:
        if len(pair) == 2 and pair[0].distance < ratio * pair[1].distance:
            i0.append(pair[0].queryIdx)
            i1.append(pair[0].trainIdx)
    if not i0:
        return empty, empty
    a0, a1 = np.asarray(i0), np.asarray(i1)
    if mutual:
        back = matcher.match(np.ascontiguousarray(d1, np.float32), np.ascontiguousarray(d0, np.float32))
        nn10 = np.full(len(d1), -1)
        for m in back:
            nn10[m.queryIdx] = m.trainIdx
        keep = nn10[a1] == a0
        a0, a1 = a0[keep], a1[keep]
    return k0[a0].astype(np.float32), k1[a1].astype(np.float32)
