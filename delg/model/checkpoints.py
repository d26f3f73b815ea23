"""Checkpoints: our self-describing format, and import of the PyTorch DELG (pycls) checkpoints.

Ours (``format_version`` 1)::

    {'format_version': 1, 'meta': {...architecture...}, 'model_state': state_dict,
     'optimizer_state': dict | None, 'epoch': int | None, 'config': dict | None}

pycls / PyTorch DELG (e.g. ``r50_delg_s512.pyth``)::

    {'model_state': {'globalmodel.stem.conv.weight', 'globalmodel.s1.b1.proj.weight', 'globalmodel.s1.b1.f.a.weight',
                     ..., 'globalmodel.head.pool.p', 'globalmodel.head.fc.weight', 'desc_cls.weight', 'desc_cls.t',
                     'localmodel.conv1.*', 'localmodel.bn.*', 'localmodel.conv2.*', 'att_cls.fc.*'},
     'epoch', 'optimizer_state', 'cfg'}

Files are always read with ``torch.load(weights_only=True)``: a checkpoint is untrusted input, and a full unpickle
runs whatever code the file names.  Besides tensors and plain containers, numpy scalars and dtypes are allowed
(older training scripts save ``np.float64`` metrics); any other pickled object is refused with a message that
names it.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from delg.model.backbones import ModelError
from delg.model.conventions import BGR_MEAN, BGR_STD

FORMAT_VERSION = 1
# Keys of pycls checkpoints that have no counterpart here, dropped on purpose.
#   desc_cls.t: CurricularFace-style running mean of the target logit, only used by their training loss.
PYCLS_IGNORED = ("desc_cls.t",)
_PYCLS_DEPTHS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}


class CheckpointError(ModelError):
    """A checkpoint cannot be read or does not fit the model; the message names the file and the keys."""


def _numpy_safe_globals() -> list[Any]:
    """numpy scalar reconstruction and dtype classes: data only, no code paths (what legacy checkpoints hold)."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    dtypes = [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "bool")]
    return [scalar, np.dtype, *dtypes]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` on CPU; a file that pickles other objects is refused, naming them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint: file not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = sorted(set(re.findall(r"(?:GLOBAL|global) ([\w.]+)", str(e))))
        if not found:  # not refused objects: bytes that are no pickle at all (a text file, a partial download)
            raise CheckpointError(f"model.checkpoint: {path} is not a readable torch checkpoint "
                                  f"({str(e).strip().splitlines()[0] if str(e).strip() else 'UnpicklingError'}); "
                                  "give the checkpoint file written by training or the download") from None
        raise CheckpointError(
            f"{path}: holds pickled objects besides tensors ({', '.join(found)}), refused because unpickling them "
            "would run code; re-save the tensors alone, e.g. torch.save({'model_state': ck['model_state']}, ...) "
            "in a session where you trust the file"
        ) from None
    except Exception as e:  # a truncated, empty or text file makes the (safe) unpickler raise anything
        if path.stat().st_size == 0:
            raise CheckpointError(f"model.checkpoint: {path} is empty (an interrupted download or copy?); "
                                  "give the checkpoint file written by training or the download") from None
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise CheckpointError(f"model.checkpoint: {path} is not a readable torch checkpoint ({why}); give the "
                              "checkpoint file written by training or the download") from None
    if not isinstance(ck, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ck).__name__}")
    return dict(ck)


def is_pycls_state(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("globalmodel.") for k in state)


def read_model_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, state_dict in our names)`` of one of our checkpoints or of a pycls DELG checkpoint."""
    ck = read_checkpoint(path)
    if "format_version" in ck:
        if ck["format_version"] != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {ck['format_version']} is not supported ({FORMAT_VERSION})")
        for k in ("meta", "model_state"):
            if k not in ck:
                raise CheckpointError(f"{path}: field '{k}' missing")
        return dict(ck["meta"]), dict(ck["model_state"])
    state = ck.get("model_state", ck)
    if isinstance(state, Mapping) and is_pycls_state(state):
        return pycls_to_ours(state, str(path))
    raise CheckpointError(
        f"{path}: neither our checkpoint (no 'format_version') nor a pycls DELG one (no 'globalmodel.*' in model_state)"
    )


def load_into_model(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load that lists every missing / unexpected key and shape mismatch in one error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state
              and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 20} more)" if len(items) > 20 else ""
                parts.append(f"{name}: {', '.join(items[:20])}{more}")
        raise CheckpointError(f"{source}: does not fit the model; " + "; ".join(parts))
    model.load_state_dict(dict(state), strict=True)


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{'format_version', 'meta', 'model_state', 'optimizer_state', 'epoch', 'config'}`` atomically.

    ``config`` is stored as a plain dict (``Config.to_dict()``), so the file loads with ``weights_only=True``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = model.module if hasattr(model, "module") else model
    conf = config.to_dict() if hasattr(config, "to_dict") else (dict(config) if config is not None else None)
    meta = dict(m.meta)
    meta["checkpoint"] = None  # where it was loaded from is not part of what it is
    ck = {
        "format_version": FORMAT_VERSION,
        "meta": meta,
        "model_state": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "config": conf,
        **(dict(extra) if extra else {}),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(ck, tmp)
    os.replace(tmp, path)  # a kill during the write never leaves a truncated checkpoint behind
    return path


# ---------------------------------------------------------------------------------------------- pycls import
_BLOCK = {
    "proj": "downsample.0", "bn": "downsample.1",
    "f.a": "conv1", "f.a_bn": "bn1", "f.b": "conv2", "f.b_bn": "bn2", "f.c": "conv3", "f.c_bn": "bn3",
}
_HEAD = {
    "globalmodel.stem.conv": "backbone.stage16.conv1",
    "globalmodel.stem.bn": "backbone.stage16.bn1",
    "globalmodel.head.pool": "global_head.pool",
    "globalmodel.head.fc": "global_head.fc",
    "desc_cls": "arcface",
    "localmodel.conv1": "local_head.att_conv1",
    "localmodel.bn": "local_head.att_bn",
    "localmodel.conv2": "local_head.att_conv2",
    "att_cls.fc": "att_classifier",
}
_STAGE_RE = re.compile(r"^globalmodel\.s([1-4])\.b(\d+)\.(proj|bn|f\.a|f\.a_bn|f\.b|f\.b_bn|f\.c|f\.c_bn)\.(\w+)$")


def pycls_key_to_ours(key: str) -> str | None:
    """Our parameter name for a pycls DELG key, or ``None`` if it has no counterpart."""
    m = _STAGE_RE.match(key)
    if m:
        stage, block, part, leaf = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        where = "stage16" if stage < 4 else "stage32"
        return f"backbone.{where}.layer{stage}.{block - 1}.{_BLOCK[part]}.{leaf}"
    prefix, _, leaf = key.rpartition(".")
    if prefix in _HEAD:
        return f"{_HEAD[prefix]}.{leaf}"
    return None


def pycls_to_ours(state: Mapping[str, Any], source: str = "checkpoint") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Rename a pycls DELG ``model_state`` to our names and infer the architecture (``meta``).

    Raises :class:`CheckpointError` listing keys that map to nothing, and missing essential tensors.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in state.items():
        if k in PYCLS_IGNORED:
            continue
        new = pycls_key_to_ours(k)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise CheckpointError(f"{source}: unexpected pycls keys with no counterpart: {', '.join(unknown[:20])}")
    need = ["global_head.fc.weight", "local_head.att_conv1.weight"]
    missing = [k for k in need if k not in out]
    if missing:
        raise CheckpointError(f"{source}: pycls checkpoint lacks {', '.join(missing)}")
    depths = tuple(
        len({int(m.group(2)) for k in state if (m := _STAGE_RE.match(k)) and int(m.group(1)) == s}) for s in range(1, 5)
    )
    if depths not in _PYCLS_DEPTHS:
        raise CheckpointError(f"{source}: pycls ResNet stage depths {depths} are not ResNet-50/101")
    n_cls = int(out["arcface.weight"].shape[0]) if "arcface.weight" in out else None
    if n_cls is None and "att_classifier.weight" in out:
        raise CheckpointError(f"{source}: att_cls present but desc_cls.weight missing")
    meta = {
        "format_version": FORMAT_VERSION,
        "backbone": _PYCLS_DEPTHS[depths],
        "whiten_dim": int(out["global_head.fc.weight"].shape[0]),
        "local_dim": int(out["local_head.att_conv1.weight"].shape[0]),
        "attention_dim": int(out["local_head.att_conv1.weight"].shape[0]),
        "local_arch": "pycls",
        "num_classes": n_cls,
        "trained_global": True,
        "trained_local": True,
        "arcface_margin": 0.15,
        "arcface_scale": 30.0,
        # pycls reads images with cv2.imread (B, G, R) and normalises with the ImageNet statistics in that order:
        # the first convolution of these weights expects BGR, and a fine-tune of them keeps it (save_checkpoint
        # writes these keys).
        "input_colour": "bgr",
        "mean": list(BGR_MEAN),
        "std": list(BGR_STD),
    }
    return meta, out
