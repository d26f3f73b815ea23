"""Training augmentation: random resized crop + photometric jitter, then ImageNet normalisation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from delg.model.delg import IMAGENET_MEAN, IMAGENET_STD


def train_transform(conf: Mapping[str, Any]) -> T.Compose:
    """PIL RGB image -> (3, S, S) float tensor, S = ``train.image_size``; random every call (two views differ)."""
    size = int(conf.get("image_size", 224))
    ops: list[Any] = [T.RandomResizedCrop(size, scale=(float(conf.get("min_scale", 0.25)), 1.0), ratio=(0.75, 1.333))]
    if conf.get("flip", False):
        ops.append(T.RandomHorizontalFlip())
    j = float(conf.get("color_jitter", 0.3))
    if j > 0:
        ops.append(T.ColorJitter(j, j, j, min(0.1, j / 3)))
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def eval_transform(conf: Mapping[str, Any]) -> T.Compose:
    """Deterministic: resize the short side to ``image_size`` and centre-crop (validation accuracy)."""
    size = int(conf.get("image_size", 224))
    return T.Compose([T.Resize(size, interpolation=Image.BILINEAR), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def whole_transform(max_side: int) -> T.Compose:
    """Deterministic: the whole image, downscaled so its long side is at most ``max_side`` (never upscaled), as
    retrieval sees it -> (3, H, W) normalised float tensor (the PCA initialisation of the whitening)."""
    from delg.data.images import resize_max_side

    return T.Compose([T.Lambda(lambda im: resize_max_side(im, max_side)), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def to_tensor(im: Image.Image) -> torch.Tensor:
    return T.ToTensor()(im)
