"""DELG model: backbones (timm), heads, checkpoints.  ``build_model(conf.model) -> DELG``."""

from delg.model.backbones import SUPPORTED_BACKBONES, ModelError
from delg.model.checkpoints import CheckpointError, read_model_checkpoint, save_checkpoint
from delg.model.conventions import BGR_MEAN, BGR_STD, IMAGENET_MEAN, IMAGENET_STD
from delg.model.delg import DELG, FORMAT_VERSION, build_model, model_from_meta

__all__ = [
    "BGR_MEAN",
    "BGR_STD",
    "DELG",
    "FORMAT_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SUPPORTED_BACKBONES",
    "CheckpointError",
    "ModelError",
    "build_model",
    "model_from_meta",
    "read_model_checkpoint",
    "save_checkpoint",
]
