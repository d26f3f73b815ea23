"""The input conventions a model's weights carry: channel order and normalisation statistics.

Their own module (no torch) so that the model (:mod:`delg.model.delg`) and the checkpoint readers
(:mod:`delg.model.checkpoints`) both use them without importing each other.
"""

from __future__ import annotations

from delg.model.backbones import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The same statistics in B, G, R order: what pycls (the seed's PyTorch DELG) normalises cv2.imread images with.
BGR_MEAN = IMAGENET_MEAN[::-1]
BGR_STD = IMAGENET_STD[::-1]
INPUT_COLOURS = ("rgb", "bgr")


def default_stats(colour: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet ``(mean, std)`` in the channel order of ``colour`` ('rgb' | 'bgr')."""
    if colour not in INPUT_COLOURS:
        raise ModelError(f"input_colour must be one of {', '.join(INPUT_COLOURS)}, got {colour!r}")
    return (IMAGENET_MEAN, IMAGENET_STD) if colour == "rgb" else (BGR_MEAN, BGR_STD)
