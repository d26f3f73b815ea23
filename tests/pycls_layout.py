"""Test helper: checkpoints in the seed's pycls layout (feymanpriv/DELG), written from its architecture."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch


def pycls_resnet50_state(n_cls: int, dim: int, gen: torch.Generator) -> OrderedDict:
    """A pycls DELG ``model_state`` written from the pycls architecture (feymanpriv/DELG model/resnet.py); the one
    writer lives in the package (``delg.paper_standin``), which the stand-in script uses too."""
    from delg.paper_standin import pycls_resnet_state

    return OrderedDict(pycls_resnet_state(50, n_cls, dim, gen))


def write_pycls_checkpoint(path: Path, n_cls: int = 11, dim: int = 512, seed: int = 0) -> tuple[Path, OrderedDict]:
    """A random pycls DELG R50 checkpoint at ``path`` (as the seed saves it); returns ``(path, model_state)``."""
    sd = pycls_resnet50_state(n_cls=n_cls, dim=dim, gen=torch.Generator().manual_seed(seed))
    torch.save({"epoch": 10, "model_state": sd, "optimizer_state": {}, "cfg": "MODEL:\n  DEPTH: 50\n"}, path)
    return path, sd
