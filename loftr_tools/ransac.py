"""The one RANSAC of the project: every verifier's tentative matches -> an inlier count, the score of the pair.

Every verifier (LoFTR, LightGlue, SIFT, DELG-local) returns tentative correspondences in the pixel coordinates of
the (cropped) original images; :func:`ransac_inliers` fits one of three models and counts its inliers:

* ``fundamental``: OpenCV USAC MAGSAC++, any rigid 3D scene (8+ matches);
* ``homography``: OpenCV USAC MAGSAC++, planar scenes (4+ matches);
* ``affine``: ``cv2.estimateAffine2D`` with plain RANSAC (3+ matches), the model of DELG's local verification
  (``skimage.measure.ransac(AffineTransform, min_samples=3, residual_threshold=20, max_trials=1000)``), which
  tolerates the stride-16 quantisation of DELG keypoints that a 1 px epipolar threshold does not.

Each verifier has its own settings (``<verifier section>.ransac``: model, threshold, trials, minimum inliers), chosen
for its keypoint precision; see the README for the measurement behind the defaults.

    mask, n = ransac_inliers(pts0, pts1, model="affine", threshold=20.0)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from delg.config import ConfigError

log = logging.getLogger(__name__)

MODELS = ("fundamental", "homography", "affine")
# Minimal sample sizes: the 7-point algorithm needs 7, but OpenCV's USAC path asks for at least 8 for F
# (fewer raise or return garbage); a homography needs 4, an affine map 3.
MIN_MATCHES = {"fundamental": 8, "homography": 4, "affine": 3}
FIELDS = ("model", "threshold", "confidence", "max_iters", "seed", "min_inliers", "evidence_low", "evidence_high")


@dataclass(frozen=True)
class RansacConf:
    """Settings of :func:`ransac_inliers` (a verifier section's ``ransac`` mapping, e.g. ``delg_local.ransac``).

    The defaults here are only those of a bare call; every verifier's defaults live in its
    ``delg/conf/<section>.yaml``. Invalid values raise :class:`~delg.config.ConfigError` (a ``ValueError``).
    """

    model: str = "fundamental"
    threshold: float = 1.0  # px, in original (cropped) image pixels
    confidence: float = 0.999
    max_iters: int = 10000
    seed: int = 0
    min_inliers: int = 0  # counts below this are 0 (a pair with a handful of chance inliers is no match)
    # What a count means beyond pairwise order (loftr_tools.expansion.evidence): <= evidence_low is no evidence that
    # two images show the same place, >= evidence_high is certain. Applied to cached counts, never to RANSAC itself.
    evidence_low: float = 30.0
    evidence_high: float = 80.0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"ransac.model: '{self.model}' is not one of {MODELS}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold > 0:
            raise ConfigError(f"ransac.threshold: must be a number > 0 (pixels), got {self.threshold!r}")
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) \
                or not 0 < self.confidence < 1:
            raise ConfigError(f"ransac.confidence: must be in (0, 1), got {self.confidence!r}")
        for key in ("max_iters", "seed", "min_inliers"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ConfigError(f"ransac.{key}: must be an integer, got {v!r}")
        if self.max_iters < 1:
            raise ConfigError(f"ransac.max_iters: must be >= 1, got {self.max_iters}")
        if self.min_inliers < 0:
            raise ConfigError(f"ransac.min_inliers: must be >= 0, got {self.min_inliers}")
        for key in ("evidence_low", "evidence_high"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v >= 0:
                raise ConfigError(f"ransac.{key}: must be a number >= 0 (inliers), got {v!r}")
        if not self.evidence_high > self.evidence_low:
            raise ConfigError(f"ransac.evidence_high: must be above ransac.evidence_low ({self.evidence_low:g}), "
                              f"got {self.evidence_high:g}")

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any] | RansacConf | None) -> RansacConf:
        """From a ``ransac`` mapping; an unknown key is an error (a typo must not fall back to a default)."""
        if isinstance(conf, RansacConf):
            return conf
        conf = dict(conf or {})
        unknown = sorted(set(conf) - set(FIELDS))
        if unknown:
            raise ConfigError(f"ransac.{unknown[0]}: unknown key; valid: {', '.join(FIELDS)}")
        return cls(**conf)

    def to_dict(self) -> dict[str, Any]:
        """Plain settings (results.json, cache identity)."""
        return dataclasses.asdict(self)

    def tag(self) -> str:
        """Short readable string for cache file names (the full identity is in the reranker's cache key)."""
        return f"{self.model[0].upper()}{self.threshold:g}px-c{self.confidence:g}-it{int(self.max_iters)}-s{self.seed}"


def ransac_inliers(
    pts0: np.ndarray,
    pts1: np.ndarray,
    model: str | None = None,
    threshold: float | None = None,
    confidence: float | None = None,
    max_iters: int | None = None,
    conf: Mapping[str, Any] | RansacConf | None = None,
    min_inliers: int | None = None,
) -> tuple[np.ndarray, int]:
    """Robustly fit a fundamental matrix, homography or affine map and return its inliers.

    Args:
        pts0: :math:`(N, 2)` xy pixel coordinates in image 0 (float32 or float64; other dtypes are converted).
        pts1: :math:`(N, 2)` corresponding xy in image 1.
        model: ``'fundamental'``, ``'homography'`` or ``'affine'``; overrides ``conf.model``.
        threshold: inlier threshold in pixels; overrides ``conf.threshold``.
        confidence: RANSAC confidence; overrides ``conf.confidence``.
        max_iters: iteration (trial) cap; overrides ``conf.max_iters``.
        conf: a ``ransac`` mapping (or a :class:`RansacConf`); defaults where absent.
        min_inliers: counts below this give 0; overrides ``conf.min_inliers``.

    Returns:
        ``(mask, n_inliers)``: a :math:`(N,)` bool inlier mask and its sum. Fewer matches than the minimal sample
        (8 for F, 4 for H, 3 for affine), fewer inliers than ``min_inliers``, non-finite points or a degenerate
        configuration give all-False and 0, never an error.
    """
    rc = RansacConf.from_conf(conf)
    over = {"model": model, "threshold": threshold, "confidence": confidence, "max_iters": max_iters,
            "min_inliers": min_inliers}
    over = {k: v for k, v in over.items() if v is not None}
    if over:
        rc = dataclasses.replace(rc, **over)

    p0 = np.asarray(pts0, dtype=np.float64).reshape(-1, 2)
    p1 = np.asarray(pts1, dtype=np.float64).reshape(-1, 2)
    if p0.shape != p1.shape:
        raise ConfigError(f"ransac_inliers: pts0 {p0.shape} and pts1 {p1.shape} differ in shape")
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
        elif rc.model == "homography":
            _, m = cv2.findHomography(
                q0, q1, cv2.USAC_MAGSAC, float(rc.threshold), maxIters=int(rc.max_iters),
                confidence=float(rc.confidence),
            )
        else:
            # Plain RANSAC with a hard residual threshold, like DELG's skimage call (MAGSAC++ would weight residuals
            # within the threshold instead of counting them; OpenCV's affine RANSAC is deterministic by itself).
            _, m = cv2.estimateAffine2D(
                q0, q1, method=cv2.RANSAC, ransacReprojThreshold=float(rc.threshold), maxIters=int(rc.max_iters),
                confidence=float(rc.confidence),
            )
    except cv2.error as e:
        # Degenerate input (collinear points, all points identical): no model, no inliers.
        log.debug("RANSAC failed on %d matches: %s", len(q0), e)
        return mask, 0
    if m is None or m.size != len(q0):
        return mask, 0
    mask[np.flatnonzero(finite)] = m.reshape(-1).astype(bool)
    count = int(mask.sum())
    if count < rc.min_inliers:
        return np.zeros(n, dtype=bool), 0
    return mask, count
