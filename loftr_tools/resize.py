"""The one resolution policy of the image-based verifiers (LoFTR, DISK/ALIKED+LightGlue, SIFT).

Policy (every image verifier goes through :func:`load_resized`):

1. Read with :func:`delg.data.images.load_image` (EXIF rotation, RGB), cropped to ``ref.crop``: a query is cropped
   to its bbx for *every* verifier (revisitop protocol), database images are whole.
2. Downscale so that the long side is at most ``long_side`` (never upscale; ``None``/0 = keep the size).
3. Round both sides *down* to multiples of ``multiple`` (LoFTR needs 8; DISK 16), at least ``multiple``. Rounding
   changes the aspect ratio slightly, so x and y get their own scale factors.
4. Keypoints found in the resized image map back to pixels of the original (cropped) image with the one function
   :func:`to_original` (also :meth:`Resized.to_original`), using pixel *centres*: ``x_orig = (x + 0.5) * sx - 0.5``
   with ``sx = W_orig / W_resized``. All verifiers therefore return matches in the same frame, and one RANSAC threshold
   (in original pixels) means the same for all of them.

Per-verifier sizes (config): LoFTR 640 (multiple 8), LightGlue/DISK 1024 (multiple 16), SIFT 1024 (multiple 1),
XFeat 1024 (multiple 32).

CUDA out-of-memory: :func:`run_with_oom_retry` reruns a pair at smaller long sides (logged), see ``rerank``;
the smaller size is passed to ``Verifier.prepare(ref, size_factor)`` (:func:`scaled_long_side`), settings are never
changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import cv2
import numpy as np
import torch

from delg.data.images import load_image

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Resized:
    """A resized image and how to map its pixels back.

    ``image`` is ``(h, w, 3)`` uint8 RGB (or ``(h, w)`` for grayscale); ``orig_size`` is ``(W, H)`` of the original
    (cropped) image; ``scale`` is ``(sx, sy) = (W / w, H / h)``.
    """

    image: np.ndarray
    orig_size: tuple[int, int]
    scale: tuple[float, float]

    @property
    def size(self) -> tuple[int, int]:
        """``(w, h)`` of the resized image."""
        return int(self.image.shape[1]), int(self.image.shape[0])

    def to_original(self, pts: np.ndarray | torch.Tensor) -> np.ndarray:
        """Map :math:`(N, 2)` xy pixels of the resized image to float32 xy of the original (cropped) image."""
        return to_original(pts, self.scale)

    def tensor(self, device: torch.device | str = "cpu", gray: bool = False) -> torch.Tensor:
        """The image as a float tensor in [0, 1]: :math:`(1, 3, h, w)` RGB, or :math:`(1, 1, h, w)` if ``gray``."""
        im = self.image
        if gray and im.ndim == 3:
            im = cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)
        t = torch.from_numpy(np.array(im, copy=True)).to(device)  # load_image arrays are read-only
        t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
        return t.float() / 255.0


def to_original(pts: np.ndarray | torch.Tensor, scale: Sequence[float] | np.ndarray) -> np.ndarray:
    """The one pixel-centre mapping from a resized image back to the original: :math:`(N, 2)` xy pixels of the
    resized image -> float32 :math:`(N, 2)` xy of the original (cropped) image, ``x_orig = (x + 0.5) * sx - 0.5``
    with ``scale = (sx, sy) = (W_orig / w, H_orig / h)`` (see the module policy, point 4)."""
    p = pts.detach().float().cpu().numpy() if isinstance(pts, torch.Tensor) else np.asarray(pts)
    p = p.reshape(-1, 2).astype(np.float64)
    s = np.asarray(scale, dtype=np.float64).reshape(2)
    return ((p + 0.5) * s - 0.5).astype(np.float32)


def scaled_long_side(long_side: int | None, size_factor: float = 1.0) -> int | None:
    """The long side a verifier uses at ``size_factor`` times its configured ``long_side`` (out-of-memory retries):
    the setting itself at 1.0 or when it is ``None``/0 (keep the size), else ``max(64, int(long_side * factor))``."""
    if not long_side or size_factor == 1.0:
        return long_side
    return max(64, int(long_side * size_factor))


def target_size(width: int, height: int, long_side: int | None, multiple: int = 1) -> tuple[int, int]:
    """``(w, h)`` that :func:`resize_image` produces for a ``width x height`` image (see the module policy)."""
    if width < 1 or height < 1:
        raise ValueError(f"target_size: empty image {width}x{height}")
    multiple = max(1, int(multiple))
    s = 1.0
    if long_side and max(width, height) > long_side:
        s = long_side / max(width, height)
    w = max(multiple, int(round(width * s)) // multiple * multiple)
    h = max(multiple, int(round(height * s)) // multiple * multiple)
    return w, h


def resize_image(image: np.ndarray, long_side: int | None, multiple: int = 1) -> Resized:
    """Resize an ``(H, W[, C])`` uint8 array by the module's policy.

    Downscaling uses area interpolation (no aliasing); the rare upscale (rounding a tiny image up to ``multiple``)
    is bilinear.
    """
    H, W = image.shape[:2]
    w, h = target_size(W, H, long_side, multiple)
    if (w, h) == (W, H):
        out = image
    else:
        interp = cv2.INTER_AREA if (w <= W and h <= H) else cv2.INTER_LINEAR
        out = cv2.resize(image, (w, h), interpolation=interp)
    return Resized(image=out, orig_size=(W, H), scale=(W / w, H / h))


def load_resized(ref: Any, long_side: int | None, multiple: int = 1, gray: bool = False) -> Resized:
    """Load ``ref`` (an :class:`~loftr_tools.base.ImageRef`: ``path`` and ``crop``) and resize it by the policy.

    Raises:
        delg.data.images.ImageReadError: the file cannot be read/decoded (the reranker counts and skips it).
    """
    image = load_image(ref.path, crop=ref.crop)
    if gray:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return resize_image(image, long_side, multiple)


# ---------------------------------------------------------------------------------------------------------------
# CUDA out-of-memory: retry at a smaller size
# ---------------------------------------------------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_with_oom_retry(fn: Callable[[float], T], factors: Sequence[float] = (1.0, 0.75, 0.5), what: str = "") -> T:
    """Call ``fn(factor)`` for each factor in turn until one does not run out of memory.

    ``fn`` receives the size factor (1.0 first) and should run the pair at ``factor`` times its usual long side,
    passing it on explicitly (``Verifier.prepare(ref, size_factor)``: settings stay read-only). Each retry is logged (warning); the last OOM is re-raised.
    """
    last: BaseException | None = None
    for i, f in enumerate(factors):
        try:
            return fn(f)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            last = e
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if i + 1 < len(factors):
                log.warning("out of memory on %s at size x%.2f; retrying at x%.2f", what or "a pair", f, factors[i + 1])
    assert last is not None
    raise last
