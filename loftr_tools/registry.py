"""Verifier registry: method key -> verifier class (imported lazily, so heavy deps load only when used).

    v = build_verifier("lightglue", conf, device="auto")   # conf: the whole run config (or None for defaults)

Adding a verifier: write ``loftr_tools/<name>.py`` with a :class:`~loftr_tools.base.Verifier` subclass, add a line
to :data:`VERIFIERS` and a ``delg/conf/<section>.yaml`` with its settings.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch

from delg.config import ConfigError, default_schema
from delg.devices import resolve_device
from loftr_tools.base import Verifier

# method key -> (module, class, config section)
VERIFIERS: dict[str, tuple[str, str, str]] = {
    "lightglue": ("loftr_tools.lightglue", "DiskLightGlue", "lightglue"),
    "lightglue_aliked": ("loftr_tools.lightglue", "AlikedLightGlue", "lightglue"),
    "sift": ("loftr_tools.sift", "SiftVerifier", "sift"),
    "delg": ("loftr_tools.delg_local", "DelgLocalVerifier", "delg_local"),
    "loftr": ("loftr_tools.loftr", "LoFTRVerifier", "loftr"),
    "xfeat": ("loftr_tools.xfeat", "XFeatLighterGlue", "xfeat"),
}


def verifier_section(method: str) -> str:
    """The config section holding the settings of ``method``."""
    if method not in VERIFIERS:
        raise ConfigError(f"unknown verification method '{method}'; valid: {', '.join(VERIFIERS)}")
    return VERIFIERS[method][2]


def build_verifier(
    method: str, conf: Mapping[str, Any] | None = None, device: torch.device | str | None = "auto", **ctx: Any
) -> Verifier:
    """Build the verifier ``method`` ('lightglue', 'lightglue_aliked', 'sift', 'delg', 'loftr', 'xfeat').

    Args:
        method: a key of :data:`VERIFIERS`.
        conf: the run config; its section ``verifier_section(method)`` configures the verifier (a mapping without
            that section is taken as the section itself; ``None`` = defaults).
        device: 'auto' | 'cpu' | 'cuda' | 'cuda:N' (:func:`delg.devices.resolve_device`).
        ctx: extra constructor arguments (``stores={'query': Path, 'db': Path}`` for 'delg').

    Raises:
        ConfigError: unknown method (the message lists the valid ones); CUDA asked for but not available.
        VerifierUnavailable: the verifier cannot run here (weights, untrained head); the message says what to do.
    """
    cls, sub = _resolve(method, conf)
    return cls(sub, device=resolve_device(device), **ctx)


def _resolve(method: str, conf: Mapping[str, Any] | None) -> tuple[type[Verifier], dict[str, Any]]:
    """The verifier class of ``method`` and the section it is given (see :func:`build_verifier`)."""
    section = verifier_section(method)
    module, cls_name, _ = VERIFIERS[method]
    given: dict[str, Any] = {}
    if conf is not None:
        if isinstance(conf.get(section), Mapping):
            given = dict(conf[section])
        elif "output_dir" not in conf:  # not a run config: the section itself
            given = dict(conf)
    # Over the section's defaults (delg/conf/<section>.yaml, the one owner of defaults, RANSAC included), so a
    # verifier built without a run config verifies with its own RANSAC settings too.
    defaults = default_schema()[section]
    sub = {**defaults, **given}
    if isinstance(defaults.get("ransac"), Mapping) and isinstance(given.get("ransac"), Mapping):
        sub["ransac"] = {**defaults["ransac"], **given["ransac"]}
    cls = getattr(importlib.import_module(module), cls_name)
    # The top-level mixed_precision switch can turn it off for every verifier.
    if conf is not None and "mixed_precision" in conf and "mixed_precision" in cls.default_conf:
        sub["mixed_precision"] = bool(conf["mixed_precision"]) and bool(sub.get("mixed_precision", True))
    return cls, sub


def verifier_settings(method: str, conf: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resolved settings of ``method`` as its verifier will run (for results.json; builds nothing):
    ``{'method', 'section', 'settings': {long_side, ...}, 'ransac': {model, threshold, max_iters, confidence,
    seed, min_inliers}}``. Validates the RANSAC settings, so a bad value fails before any work.

    Raises:
        ConfigError: unknown method or invalid ``<section>.ransac`` value.
    """
    from loftr_tools.ransac import RansacConf

    cls, sub = _resolve(method, conf)
    merged = {**cls.default_conf, **sub}
    ransac = merged.pop("ransac", None)
    try:
        rc = RansacConf.from_conf(ransac)
    except ConfigError as e:
        raise ConfigError(f"{verifier_section(method)}.{e}") from None
    return {"method": method, "section": verifier_section(method), "settings": _plain(merged), "ransac": rc.to_dict()}


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
