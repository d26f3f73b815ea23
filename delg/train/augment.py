"""Training augmentation: random resized crop + photometric jitter, then the model's normalisation.

The normalisation belongs to the weights being trained (``DELG.input_colour`` / ``mean`` / ``std``): a fine-tune
of a pycls (seed) checkpoint is fed B, G, R with the statistics in that order, as pycls trained it; timm/ImageNet
weights get RGB.  Pass ``norm=normalisation(model)``; the default is RGB ImageNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from delg.model.conventions import IMAGENET_MEAN, IMAGENET_STD

Norm = tuple[str, tuple[float, ...], tuple[float, ...]]
RGB_IMAGENET: Norm = ("rgb", IMAGENET_MEAN, IMAGENET_STD)


def normalisation(model: Any) -> Norm:
    """``(input_colour, mean, std)`` of a DELG (or DDP-wrapped one)."""
    m = model.module if hasattr(model, "module") else model
    return (str(getattr(m, "input_colour", "rgb")), tuple(m.mean), tuple(m.std))


class _ToBGR:
    """(3, H, W) RGB tensor -> B, G, R (a class, not a lambda: DataLoader workers pickle the transform)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(0)


def _normalise_ops(norm: Norm) -> list[Any]:
    colour, mean, std = norm
    return [T.ToTensor(), *([_ToBGR()] if colour == "bgr" else []), T.Normalize(mean, std)]


def train_transform(conf: Mapping[str, Any], norm: Norm = RGB_IMAGENET) -> T.Compose:
    """PIL RGB image -> (3, S, S) float tensor, S = ``train.image_size``; random every call (two views differ)."""
    size = int(conf.get("image_size", 224))
    ops: list[Any] = [T.RandomResizedCrop(size, scale=(float(conf.get("min_scale", 0.25)), 1.0), ratio=(0.75, 1.333))]
    if conf.get("flip", False):
        ops.append(T.RandomHorizontalFlip())
    j = float(conf.get("color_jitter", 0.3))
    if j > 0:
        ops.append(T.ColorJitter(j, j, j, min(0.1, j / 3)))
    ops += _normalise_ops(norm)
    return T.Compose(ops)


def eval_transform(conf: Mapping[str, Any], norm: Norm = RGB_IMAGENET) -> T.Compose:
    """Deterministic: resize the short side to ``image_size`` and centre-crop (validation accuracy)."""
    size = int(conf.get("image_size", 224))
    return T.Compose([T.Resize(size, interpolation=Image.BILINEAR), T.CenterCrop(size), *_normalise_ops(norm)])


def whole_transform(max_side: int, norm: Norm = RGB_IMAGENET) -> T.Compose:
    """Deterministic: the whole image, downscaled so its long side is at most ``max_side`` (never upscaled), as
    retrieval sees it -> (3, H, W) normalised float tensor (the PCA initialisation of the whitening)."""
    from delg.data.images import resize_max_side

    return T.Compose([T.Lambda(lambda im: resize_max_side(im, max_side)), *_normalise_ops(norm)])


def to_tensor(im: Image.Image) -> torch.Tensor:
    return T.ToTensor()(im)
