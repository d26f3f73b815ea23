"""DELG training: losses, augmentation and the one trainer.  ``python -m delg.train --config FILE key=value``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from delg.train.losses import DELGLoss, supcon_loss

if TYPE_CHECKING:
    from delg.config import Config

__all__ = ["DELGLoss", "main", "supcon_loss"]


def main(conf: Config) -> Path:
    """Train (see :func:`delg.train.trainer.main`); imported lazily so ``delg.train`` stays light."""
    from delg.train.trainer import main as _main

    return _main(conf)
