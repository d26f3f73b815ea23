"""The one device rule of the project (extraction, search, training, verifiers, benches).

``auto`` (or ``None``) -> ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``; ``cuda`` without an index ->
``cuda:<LOCAL_RANK>`` (under torchrun each process gets its own GPU; 0 otherwise); ``cuda:N`` and ``cpu`` as given.
Asking for CUDA where there is none is an error, never a silent fallback (a 'cuda' run on CPU would be hours slower).
"""

from __future__ import annotations

import os

import torch

from delg.errors import ConfigError


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` ('auto' | 'cpu' | 'cuda' | 'cuda:N', or a torch.device) by the module's rule.

    Raises:
        ConfigError: CUDA asked for but not available (the message names the value).
    """
    d = "auto" if device is None else str(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if d == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: '{d}' asked but CUDA is not available; use device=cpu or device=auto")
    return torch.device(f"cuda:{local_rank}" if d == "cuda" else d)
