"""Input conventions a model's weights carry: channel order and normalisation statistics.

A module of its own so that the model (:mod:`delg.model.delg`) and the checkpoint reader
(:mod:`delg.model.checkpoints`, which stamps converted pycls weights with them) share them without importing
each other.
"""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The same statistics in B, G, R order: what pycls (the seed's PyTorch DELG) normalises cv2.imread images with.
BGR_MEAN = IMAGENET_MEAN[::-1]
BGR_STD = IMAGENET_STD[::-1]
INPUT_COLOURS = ("rgb", "bgr")
