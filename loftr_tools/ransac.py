"""The one RANSAC of the project: OpenCV USAC with MAGSAC++ scoring.

Every verifier (LoFTR, LightGlue, SIFT, DELG-local) returns tentative correspondences in the pixel coordinates of
the (cropped) original images; :func:`ransac_inliers` turns them into an inlier count, which is the score of the
pair. Keeping a single geometric check means verifiers are compared on their matches only.

    mask, n = ransac_inliers(pts0, pts1, model="fundamental", threshold=1.0)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)

MODELS = ("fundamental", "homography")
# Minimal sample sizes: the 7-point algorithm needs 7, but OpenCV's USAC path asks for at least 8 for F
# (fewer raise or return garbage); a homography needs 4.
MIN_MATCHES = {"fundamental": 8, "homography": 4}


@dataclass(frozen=True)
class RansacConf:
    """Settings of :func:`ransac_inliers` (the ``ransac`` config section)."""

    model: str = "fundamental"
    threshold: float = 1.0  # px, in original (cropped) image pixels
    confidence: float = 0.999
    max_iters: int = 10000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"ransac.model: '{self.model}' is not one of {MODELS}")
        if not self.threshold > 0:
            raise ValueError(f"ransac.threshold: must be > 0, got {self.threshold}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"ransac.confidence: must be in (0, 1), got {self.confidence}")
        if int(self.max_iters) < 1:
            raise ValueError(f"ransac.max_iters: must be >= 1, got {self.max_iters}")

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any] | RansacConf | None) -> RansacConf:
        """From the ``ransac`` config section (unknown keys are ignored: the schema already validated them)."""
        if isinstance(conf, RansacConf):
            return conf
        conf = dict(conf or {})
        fields = {k: conf[k] for k in ("model", "threshold", "confidence", "max_iters", "seed") if k in conf}
        return cls(**fields)

    def tag(self) -> str:
        """Short string for cache file names: changes whenever the settings change the inlier counts."""
        return f"{self.model[0].upper()}{self.threshold:g}px-c{self.confidence:g}-it{int(self.max_iters)}-s{self.seed}"


def ransac_inliers(
    pts0: np.ndarray,
    pts1: np.ndarray,
    model: str | None = None,
    threshold: float | None = None,
    confidence: float | None = None,
    max_iters: int | None = None,
    conf: Mapping[str, Any] | RansacConf | None = None,
) -> tuple[np.ndarray, int]:
    """Robustly fit a fundamental matrix or homography with MAGSAC++ and return its inliers.

    Args:
        pts0: :math:`(N, 2)` xy pixel coordinates in image 0 (float32 or float64; other dtypes are converted).
        pts1: :math:`(N, 2)` corresponding xy in image 1.
        model: ``'fundamental'`` or ``'homography'``; overrides ``conf.model``.
        threshold: inlier threshold in pixels; overrides ``conf.threshold``.
        confidence: RANSAC confidence; overrides ``conf.confidence``.
        max_iters: iteration cap; overrides ``conf.max_iters``.
        conf: the ``ransac`` config section (or a :class:`RansacConf`); defaults where absent.

    Returns:
        ``(mask, n_inliers)``: a :math:`(N,)` bool inlier mask and its sum. Fewer matches than the minimal sample
        (8 for F, 4 for H), non-finite points or a degenerate configuration give all-False and 0, never an error.
    """
    rc = RansacConf.from_conf(conf)
    over = {"model": model, "threshold": threshold, "confidence": confidence, "max_iters": max_iters}
    over = {k: v for k, v in over.items() if v is not None}
    if over:
        rc = RansacConf(**{**rc.__dict__, **over})

    p0 = np.asarray(pts0, dtype=np.float64).reshape(-1, 2)
    p1 = np.asarray(pts1, dtype=np.float64).reshape(-1, 2)
    if p0.shape != p1.shape:
        raise ValueError(f"ransac_inliers: pts0 {p0.shape} and pts1 {p1.shape} differ in shape")
    n = p0.shape[0]
    mask = np.zeros(n, dtype=bool)
    finite = np.isfinite(p0).all(1) & np.isfinite(p1).all(1)
    if int(finite.sum()) < MIN_MATCHES[rc.model]:
        return mask, 0
    q0 = np.ascontiguousarray(p0[finite])
    q1 = np.ascontiguousarray(p1[finite])
    # Exactly repeated points (e.g. several descriptors at one keypoint) make a degenerate minimal sample likely;
    # they are left in (they are legitimate tentative matches) and any OpenCV failure below counts as 0 inliers.
    cv2.setRNGSeed(int(rc.seed))
    try:
        if rc.model == "fundamental":
            _, m = cv2.findFundamentalMat(
                q0, q1, cv2.USAC_MAGSAC, float(rc.threshold), float(rc.confidence), int(rc.max_iters)
            )
        else:
            _, m = cv2.findHomography(
                q0, q1, cv2.USAC_MAGSAC, float(rc.threshold), maxIters=int(rc.max_iters),
                confidence=float(rc.confidence),
            )
    except cv2.error as e:
        # Degenerate input (collinear points, all points identical): no model, no inliers.
        log.debug("RANSAC failed on %d matches: %s", len(q0), e)
        return mask, 0
    if m is None or m.size != len(q0):
        return mask, 0
    mask[np.flatnonzero(finite)] = m.reshape(-1).astype(bool)
    return mask, int(mask.sum())
