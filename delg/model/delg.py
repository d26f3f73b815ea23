"""The DELG model (Cao et al., ECCV 2020): one backbone, a global head at stride 32, a local head at stride 16.

    model = build_model(conf.model)                 # eval mode, CPU
    out = model.extract(x)                          # x (B,3,H,W) normalised with model.mean / model.std
    out["global"] (B, D), out["attention"] (B, h, w), out["local"] (B, h, w, d)
    xy = model.keypoint_centers(h, w)               # (h*w, 2) receptive-field centres in input pixels

Training uses ``model(x, labels)`` (see :meth:`DELG.forward`); the local head always sees a detached stride-16
map so its losses never move the backbone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from delg.model.backbones import Backbone, ModelError, check_backbone
from delg.model.conventions import default_stats
from delg.model.heads import ArcFace, GlobalHead, LocalHead

FORMAT_VERSION = 1


class DELG(nn.Module):
    """Backbone + GeM/whitening global head + ArcFace + attention/autoencoder local head + attention classifier.

    Args:
        backbone: one of ``resnet50``, ``resnet101``, ``efficientnet_lite0``.
        pretrained: load ImageNet weights into the backbone (never downloads).
        whiten_dim: output size of the whitening FC.
        local_dim: local descriptor size (autoencoder bottleneck; ``attention_dim`` for ``local_arch='pycls'``).
        num_classes: classes of the ArcFace and attention classifiers; ``None`` = no classifiers (inference only).
        trained_global: the whitening FC is trained; otherwise the global descriptor is GeM + L2 only.
        trained_local: the local head is trained (DELG-local verification refuses an untrained one).
        input_colour: channel order the weights expect ('rgb' timm/ImageNet, 'bgr' pycls/seed checkpoints and their
            fine-tunes); ``mean`` / ``std`` are in that order (default: ImageNet statistics in that order).
        attention_input: what the local attention sees ('block3' as DELG; 'recon' for checkpoints of older code).
        arcface_scale: ``None`` = sqrt(whiten_dim), DELG's choice (45.25 for 2048-d).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        pretrained: bool = True,
        whiten_dim: int = 512,
        local_dim: int = 64,
        gem_p: float = 3.0,
        num_classes: int | None = None,
        arcface_margin: float = 0.15,
        arcface_scale: float | None = 30.0,
        attention_dim: int = 512,
        local_arch: str = "delg",
        trained_global: bool = False,
        trained_local: bool = False,
        checkpoint: str | None = None,
        input_colour: str = "rgb",
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        attention_input: str = "block3",
    ) -> None:
        super().__init__()
        self.backbone = Backbone(backbone, pretrained=pretrained)
        self.global_head = GlobalHead(self.backbone.channels32, int(whiten_dim), gem_p)
        self.local_head = LocalHead(self.backbone.channels16, int(local_dim), int(attention_dim), local_arch,
                                    recon_relu=backbone.startswith("resnet"), attention_input=attention_input)
        self.whiten_dim = int(whiten_dim)
        self.attention_dim = int(attention_dim)
        if arcface_scale is None:
            arcface_scale = math.sqrt(int(whiten_dim))  # DELG: s = sqrt(d), 45.25 for 2048-d
        self.arcface_margin, self.arcface_scale = float(arcface_margin), float(arcface_scale)
        self.trained_global, self.trained_local = bool(trained_global), bool(trained_local)
        self.checkpoint = checkpoint
        self.arcface: ArcFace | None = None
        self.att_classifier: nn.Linear | None = None
        self.num_classes: int | None = None
        if num_classes:
            self.reset_classifiers(int(num_classes))
        # Colour order and normalisation belong to the weights: extraction and training feed the model what
        # these say (delg.extract._to_input, delg.train.augment), and every checkpoint saved records them.
        dmean, dstd = default_stats(input_colour)
        self.input_colour = input_colour
        self.mean = tuple(float(v) for v in (mean if mean is not None else dmean))
        self.std = tuple(float(v) for v in (std if std is not None else dstd))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ModelError(f"model mean/std must be 3 values (std > 0), got {self.mean} / {self.std}")

    # ------------------------------------------------------------------ description
    @property
    def meta(self) -> dict[str, Any]:
        """What the model is (also what a checkpoint stores to rebuild it)."""
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone.name,
            "global_dim": self.whiten_dim if self.trained_global else self.backbone.channels32,
            "local_dim": self.local_head.local_dim,
            "trained_global": self.trained_global,
            "trained_local": self.trained_local,
            "checkpoint": self.checkpoint,
            "whiten_dim": self.whiten_dim,
            "num_classes": self.num_classes,
            "local_arch": self.local_head.arch,
            "attention_dim": self.attention_dim,
            "arcface_margin": self.arcface_margin,
            "arcface_scale": self.arcface_scale,
            "stride": int(self.backbone.rf_stride),
            "input_colour": self.input_colour,
            "mean": list(self.mean),
            "std": list(self.std),
            "attention_input": self.local_head.attention_input,
        }

    def reset_classifiers(self, num_classes: int) -> None:
        """(Re)create the ArcFace and attention classifiers for ``num_classes`` classes (fine-tuning to new labels)."""
        dev = self.global_head.fc.weight.device
        self.arcface = ArcFace(self.whiten_dim, num_classes, self.arcface_margin, self.arcface_scale).to(dev)
        self.att_classifier = nn.Linear(self.local_head.pooled_dim, num_classes).to(dev)
        self.num_classes = int(num_classes)

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                with_arcface: bool = True) -> dict[str, torch.Tensor]:
        """Training forward. x (B, 3, H, W) normalised; labels (B,) int64 or None; ``with_arcface=False`` skips
        the ArcFace logits (a loss without CE: DDP then sees no unused parameters).

        Returns ``global`` (B, whiten_dim) whitened, not normalised; ``global_logits`` (B, K) ArcFace logits and
        ``local_logits`` (B, K) attention-classifier logits when the model has classifiers; ``recon`` and
        ``f16`` (B, C16, h, w) the autoencoder reconstruction and its (detached) target; ``attention`` (B, 1, h, w).
        """
        f16 = self.backbone.forward16(x)
        g = self.global_head(self.backbone.forward32(f16), whiten=True)
        target = f16.detach()  # DELG: local losses must not move the backbone
        loc = self.local_head(target)
        out = {"global": g, "attention": loc["attention"], "f16": target}
        if "recon" in loc:
            out["recon"] = loc["recon"]
        if self.arcface is not None and with_arcface:
            out["global_logits"] = self.arcface(g, labels)
        if self.att_classifier is not None:
            out["local_logits"] = self.att_classifier(loc["pooled"].float())
        return out

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def extract(self, x: torch.Tensor, want_global: bool = True, want_local: bool = True,
                normalize_global: bool = True) -> dict[str, torch.Tensor]:
        """Descriptors of one scale.

        Args:
            x: (B, 3, H, W) float in [0, 1], channels in ``input_colour`` order, normalised with ``mean`` / ``std``.
            want_global: compute ``global``. When False the backbone stops at stride 16.
            want_local: compute ``attention`` and ``local``.
            normalize_global: L2-normalise ``global`` (False: the raw whitened / GeM descriptor, which the seed's
                multi-scale aggregation sums before normalising).

        Returns:
            ``global`` (B, D) float32, L2-normalised unless ``normalize_global`` is False; ``attention`` (B, h, w) float32 softplus scores;
            ``local`` (B, h, w, d) float32, L2-normalised; with (h, w) the stride-16 map size.
        """
        out: dict[str, torch.Tensor] = {}
        f16 = self.backbone.forward16(x)  # computed once, shared by both heads
        if want_global:
            g = self.global_head(self.backbone.forward32(f16), whiten=self.trained_global)
            out["global"] = F.normalize(g.float(), dim=-1) if normalize_global else g.float()
        if want_local:
            loc = self.local_head(f16)
            out["attention"] = loc["attention"][:, 0].float()
            out["local"] = loc["local"].permute(0, 2, 3, 1).float().contiguous()
        return out

    def keypoint_centers(self, h: int, w: int) -> torch.Tensor:
        """(h*w, 2) float32 xy, row-major: centres of the receptive boxes of the stride-16 cells (DELG's
        ``CalculateReceptiveBoxes``: box = ``[i*stride - padding, i*stride - padding + size - 1]``)."""
        size, stride, pad = self.backbone.rf_size, self.backbone.rf_stride, self.backbone.rf_padding
        ys = torch.arange(h, dtype=torch.float32) * stride - pad + (size - 1) / 2
        xs = torch.arange(w, dtype=torch.float32) * stride - pad + (size - 1) / 2
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)

    # ------------------------------------------------------------------ persistence
    def save(
        self,
        path: str | Path,
        optimizer: torch.optim.Optimizer | None = None,
        epoch: int | None = None,
        config: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a self-describing checkpoint atomically (see :func:`delg.model.checkpoints.save_checkpoint`)."""
        from delg.model.checkpoints import save_checkpoint

        return save_checkpoint(path, self, optimizer=optimizer, epoch=epoch, config=config, extra=extra)


def model_from_meta(meta: Mapping[str, Any], checkpoint: str | None = None) -> DELG:
    """An untrained DELG with the architecture ``meta`` describes (no ImageNet weights loaded)."""
    return DELG(
        backbone=check_backbone(meta["backbone"]),
        pretrained=False,
        whiten_dim=meta["whiten_dim"],
        local_dim=meta["local_dim"],
        num_classes=meta.get("num_classes"),
        arcface_margin=meta.get("arcface_margin", 0.15),
        arcface_scale=meta.get("arcface_scale", 30.0),
        attention_dim=meta.get("attention_dim", 512),
        local_arch=meta.get("local_arch", "delg"),
        trained_global=meta.get("trained_global", True),
        trained_local=meta.get("trained_local", True),
        checkpoint=checkpoint,
        # Checkpoints written before these keys existed were all RGB with ImageNet statistics (pycls files are
        # read by pycls_to_ours, which says 'bgr'), and their 'delg' local head ran attention on the reconstruction.
        input_colour=meta.get("input_colour", "rgb"),
        mean=meta.get("mean"),
        std=meta.get("std"),
        attention_input=meta.get("attention_input", "recon"),
    )


def _get(conf: Mapping[str, Any], key: str, default: Any) -> Any:
    v = conf.get(key, default) if isinstance(conf, Mapping) else getattr(conf, key, default)
    return default if v is None else v


def _raw(conf: Mapping[str, Any], key: str, default: Any) -> Any:
    return conf.get(key, default) if isinstance(conf, Mapping) else getattr(conf, key, default)


def build_model(conf: Mapping[str, Any], num_classes: int | None = None) -> DELG:
    """The model that ``conf.model`` describes, in eval mode on CPU.

    Without ``checkpoint``: ImageNet backbone (``pretrained``) + GeM + L2 (no untrained whitening), untrained
    local head.  With ``checkpoint`` (ours or the pycls/PyTorch-DELG layout): the architecture is rebuilt from
    the checkpoint itself; a backbone other than ``conf.backbone`` is an error.

    Args:
        conf: the ``model`` section (delg/conf/model.yaml).
        num_classes: classifier size for training; ``None`` = ``conf.num_classes`` (or the checkpoint's).
    """
    from delg.model.checkpoints import load_into_model, read_model_checkpoint

    backbone = check_backbone(_get(conf, "backbone", "efficientnet_lite0"))
    ckpt = _get(conf, "checkpoint", None)
    n_cls = num_classes or _get(conf, "num_classes", None)
    if ckpt:
        meta, state = read_model_checkpoint(ckpt)
        if meta["backbone"] != backbone:
            raise ModelError(
                f"{ckpt}: checkpoint backbone is {meta['backbone']} but model.backbone={backbone}; "
                f"set model.backbone={meta['backbone']}"
            )
        model = model_from_meta(meta, checkpoint=str(ckpt))
        load_into_model(model, state, str(ckpt))
    else:
        model = DELG(
            backbone=backbone,
            pretrained=bool(_get(conf, "pretrained", True)),
            whiten_dim=int(_get(conf, "global_dim", 512)),
            local_dim=int(_get(conf, "local_dim", 64)),
            gem_p=float(_get(conf, "gem_p", 3.0)),
            num_classes=n_cls,
            arcface_margin=float(_get(conf, "arcface_margin", 0.15)),
            arcface_scale=None if _raw(conf, "arcface_scale", 30.0) is None else float(_get(conf, "arcface_scale", 30.0)),
            attention_dim=int(_get(conf, "attention_dim", 512)),
        )
    return model.eval()
