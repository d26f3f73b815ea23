"""Building the embedded benchmark in place: atomic (a private temporary sibling folder moved into place), cached
(``BUILD.json`` with a content checksum, written last) and safe with concurrent builders (see
:mod:`delg.data.minibench`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from delg.data.minibench.generate import _iter_build, _n_steps
from delg.data.minibench.spec import PRESETS, VERSION, MinibenchError


def content_checksum(root: Path) -> tuple[str, int]:
    """sha256 over the relative path and bytes of every file except BUILD.json; returns (hex, file count)."""
    h = hashlib.sha256()
    n = 0
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == "BUILD.json" and p.parent == root:
            continue
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
        n += 1
    return h.hexdigest(), n


def read_build_info(root: Path) -> dict[str, Any] | None:
    """The ``BUILD.json`` of a complete build, or None."""
    f = Path(root) / "BUILD.json"
    if not f.is_file():
        return None
    try:
        info = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _is_complete(root: Path, preset: str) -> bool:
    info = read_build_info(root)
    return bool(info) and info.get("preset") == preset and info.get("version") == VERSION


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _remove_stale_tmp(out: Path) -> list[Path]:
    """Remove temp folders of killed builds (``.<name>.tmp-<host>-<pid>-<uuid>`` whose process is gone)."""
    removed = []
    host = os.uname().nodename if hasattr(os, "uname") else "host"
    for p in out.parent.glob(_tmp_prefix(out) + "*"):
        parts = p.name[len(_tmp_prefix(out)):].rsplit("-", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and _pid_alive(int(parts[1])):
            continue  # a live concurrent builder on this machine
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)
    return removed


def build(out: str | Path, preset: str = "default", force: bool = False, progress: bool = False,
          _fail_after: int | None = None) -> Path:
    """Build the benchmark into ``out`` (atomically) unless a complete build of ``preset`` is already there.

    Args:
        out: target folder; created with its parents.
        preset: 'default' or 'tiny' (see :data:`PRESETS`).
        force: rebuild even if a complete build exists (it is replaced atomically).
        progress: show a tqdm bar.
        _fail_after: testing hook: raise after this many build steps (simulates a crash mid-build).

    Returns:
        ``out``.
    """
    out = Path(out).absolute()
    if preset not in PRESETS:
        raise MinibenchError(f"{out}: unknown minibench preset {preset!r} (choose from {sorted(PRESETS)})")
    if not force and _is_complete(out, preset):
        return out
    if out.exists() and not out.is_dir():
        raise MinibenchError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and read_build_info(out) is None and not force:
        raise MinibenchError(f"{out}: exists, is not empty and has no BUILD.json (not a minibench build); "
                             "remove it or pass force=True / --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    host = os.uname().nodename if hasattr(os, "uname") else "host"
    tmp = out.parent / f"{_tmp_prefix(out)}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        steps = _iter_build(tmp, preset)
        bar: Any = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=_n_steps(PRESETS[preset]), desc=f"minibench ({preset})", unit="step")
        for k, label in enumerate(steps):
            if bar is not None:
                bar.set_postfix_str(label)
                bar.update(1)
            if _fail_after is not None and k + 1 >= _fail_after:
                raise RuntimeError(f"simulated failure after {k + 1} steps")
        if bar is not None:
            bar.close()
        checksum, n_files = content_checksum(tmp)
        info = {"preset": preset, "version": VERSION, "files": n_files, "checksum": checksum}
        (tmp / "BUILD.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        # another builder may have finished first: keep its (identical) result
        if not force and _is_complete(out, preset):
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        try:
            if out.exists():
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except OSError:
            # lost a race with a concurrent builder that moved its (identical) build into place first
            if not _is_complete(out, preset):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_root(preset: str) -> Path:
    """``<repo>/datasets/minibench/<preset>``."""
    from delg.config import REPO_ROOT

    return REPO_ROOT / "datasets" / "minibench" / preset


def ensure_built(conf: Mapping[str, Any], log: Callable[[str], None] = print) -> Path:
    """The root of the embedded benchmark of ``conf`` (``conf.dataset.root`` / ``.preset``), built if missing."""
    ds = conf["dataset"]
    preset = ds.get("preset") or "default"
    root = Path(ds["root"]) if ds.get("root") else default_root(preset)
    if not _is_complete(root.absolute(), preset):
        log(f"building the embedded benchmark (preset {preset}) in {root} (about a minute, once)")
        build(root, preset=preset, progress=bool(conf.get("progress", True)))
    return root
