"""Configuration: YAML files + dotted command-line overrides, validated against the defaults.

The schema is the union of the section files in ``delg/conf/*.yaml`` (``base.yaml`` holds the top-level keys,
``<section>.yaml`` holds the keys of ``<section>``).  A user config (``configs/*.yaml``) and the command line may
only set keys that exist there: an unknown key is an error naming the key and the nearest valid one.  The type and
range of every key are declared in :mod:`delg.settings` and checked once everything is merged, before any work: a
bad value is one line naming the key, the value and what is allowed.

    conf = load_config("configs/demo.yaml", ["model.backbone=resnet101", "overwrite=true"])
    conf.model.backbone  # 'resnet101'
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from delg.errors import ConfigError, ProjectError, report_error
from delg.io import atomic_write_text

CONF_DIR = Path(__file__).resolve().parent / "conf"
REPO_ROOT = Path(__file__).resolve().parent.parent


class Config(dict):
    """A dict with attribute access (``conf.model.backbone``); nested dicts are Configs too."""

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        for k, v in (data or {}).items():
            self[k] = Config(v) if isinstance(v, Mapping) else v

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = Config(value) if isinstance(value, Mapping) and not isinstance(value, Config) else value

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def default_schema() -> dict[str, Any]:
    """The full default config: base.yaml at top level, every other ``conf/<section>.yaml`` under ``<section>``."""
    schema = _read_yaml(CONF_DIR / "base.yaml")
    for f in sorted(CONF_DIR.glob("*.yaml")):
        if f.stem != "base":
            schema[f.stem] = _read_yaml(f)
    return schema


def _all_keys(d: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, Mapping):
            out.extend(_all_keys(v, prefix + k + "."))
    return out


# Keys that moved or went away: the error says where to (or why) instead of guessing a neighbour.
RENAMED = {"search.depth": "it is now 'ranks.depth'",
           "model.checkpoint_trust": "removed: checkpoints are always read with torch.load(weights_only=True)",
           # Each verifier has its own RANSAC (its keypoints' precision differs: DELG's sit on a stride-16 grid).
           "ransac": "moved: each verifier has its own, '<verifier section>.ransac.*' (loftr.ransac, lightglue.ransac, "
                     "sift.ransac, delg_local.ransac)",
           # One name for "long side in pixels", as the verifiers' long_side (lightglue.long_side, sift.long_side ...).
           "extract.max_size": "renamed: 'extract.long_side' (same meaning and values)",
           "rerank.min_inliers": "moved: '<verifier section>.ransac.min_inliers' (e.g. lightglue.ransac.min_inliers)"}


def _unknown(key: str, schema: Mapping[str, Any], source: str) -> ConfigError:
    """The error for ``key``, naming the nearest valid key: a close spelling when there is one, else the key whose
    last part is most alike (``zzzz`` still gets a suggestion and the place to look up the rest)."""
    keys = _all_keys(schema)
    # A key under a moved section ('ransac.threshold') is reported with the section's note.
    moved = next((k for k in (key, *(key.rsplit(".", i)[0] for i in range(1, key.count(".") + 1))) if k in RENAMED), None)
    if moved is not None:
        return ConfigError(f"{source}: unknown config key '{key}' ({RENAMED[moved]})")
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not near:  # nothing close as a whole: compare the last part only, always yielding a candidate
        last = key.rsplit(".", 1)[-1]
        near = [max(keys, key=lambda k: difflib.SequenceMatcher(None, last, k.rsplit(".", 1)[-1]).ratio())] if keys else []
    hint = f" (nearest valid key: '{near[0]}'; all keys and their meaning: delg/conf/*.yaml)" if near else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _merge(dst: dict[str, Any], src: Mapping[str, Any], schema: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Merge ``src`` into ``dst`` in place, checking every key against ``schema``."""
    for k, v in src.items():
        full = prefix + str(k)
        if k not in schema:
            raise _unknown(full, _root_schema(schema, prefix), source)
        sub = schema[k]
        if isinstance(sub, Mapping):
            if v is None:
                continue
            if not isinstance(v, Mapping):
                raise ConfigError(f"{source}: '{full}' is a section; give its keys (e.g. {full}.{next(iter(sub), 'key')}=...)")
            _merge(dst[k], v, sub, source, full + ".")
        else:
            dst[k] = copy.deepcopy(v)


_ROOT: dict[str, Any] = {}


def _root_schema(schema: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    # Nearest-key suggestions are made against the whole schema so that 'backbon' suggests 'model.backbone'.
    return _ROOT or schema


def parse_override(text: str) -> tuple[str, Any]:
    """``'a.b=value'`` -> ``('a.b', value)``; the value is parsed as YAML (``true``, ``3``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. model.backbone=resnet101)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _load_file_chain(path: Path, schema: Mapping[str, Any], seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """A config may name a parent with ``_base_: other.yaml`` (relative to itself); parents come first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle")
    data = _read_yaml(path)
    chain: list[tuple[Path, dict[str, Any]]] = []
    base = data.pop("_base_", None)
    if base:
        chain.extend(_load_file_chain((path.parent / base), schema, (*seen, path)))
    chain.append((path, data))
    return chain


# Keys whose values are file or folder paths.  A relative path written in a config file is read against the
# repository root when the file lives in the repository (its configs say ``datasets/...``, ``logs/...``), else
# against the file's own folder, so a config means the same files from whatever folder a script is run in.
# Paths given on the command line stay relative to the current folder, as in any command.
PATH_KEYS = ("output_dir", "query", "dataset.root", "dataset.distractors", "model.checkpoint", "train.csv",
             "train.images", "loftr.weights", "rerank.global_ranks", "extract.distractor_dir")


def _anchor_paths(data: dict[str, Any], config_file: Path) -> dict[str, Any]:
    """A copy of one config file's ``data`` with the relative paths of :data:`PATH_KEYS` made absolute."""
    base = REPO_ROOT if config_file.is_relative_to(REPO_ROOT) else config_file.parent
    out = copy.deepcopy(data)
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node: Any = out
        for k in parents:
            node = node.get(k) if isinstance(node, Mapping) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf]:
            value = Path(node[leaf]).expanduser()
            if not value.is_absolute():
                node[leaf] = str(base / value)
    return out


def resolve_config_path(path: str | Path) -> Path:
    """Find a config by path, or by name in ``configs/`` (``demo`` -> ``configs/demo.yaml``)."""
    p = Path(path)
    for cand in (p, REPO_ROOT / p, REPO_ROOT / "configs" / p, REPO_ROOT / "configs" / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {path}")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then the config file (and its ``_base_`` chain), then the overrides, in that order.

    An override ``config=FILE`` among ``overrides`` is the same as ``path=FILE``.
    """
    global _ROOT
    schema = default_schema()
    _ROOT = schema
    conf = copy.deepcopy(schema)
    overrides = list(overrides)
    rest = []
    for o in overrides:
        k, v = parse_override(o)
        if k == "config":
            path = v
        else:
            rest.append((o, k, v))
    if path is not None:
        for f, data in _load_file_chain(resolve_config_path(path), schema):
            _merge(conf, _anchor_paths(data, f), schema, str(f))
    for o, k, v in rest:
        _merge(conf, _nest(k, v), schema, f"override '{o}'")
    from delg.settings import validate_config

    return Config(validate_config(conf))


def dump_config(conf: Mapping[str, Any], path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = conf.to_dict() if isinstance(conf, Config) else dict(conf)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))  # per-process temp: sharded ranks write it too
    return path


def split_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """``['--config', 'x.yaml', 'a=1']`` -> ``('x.yaml', ['a=1'])``; also accepts ``--config=x.yaml``."""
    path = None
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--config":
            path = next(it, None)
            if path is None:
                raise ConfigError("--config needs a file")
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a in ("-h", "--help"):
            rest.append(a)
        else:
            rest.append(a)
    return path, rest


OUTPUT_LOCK = ".run.lock"  # in output_dir, held by a command for its whole run


class OutputDirError(ConfigError):
    """``output_dir`` cannot receive this run's outputs (a file, read-only, in use by another run)."""


def check_output_dir(path: str | Path) -> Path:
    """``output_dir`` as a folder this process can write (created when missing); else one-line OutputDirError."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputDirError(f"output_dir: {p} is not allowed: it is an existing file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")  # a real write: access() says yes to root on a read-only folder
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"output_dir: {p} is not allowed: cannot write there ({e.strerror or e})") from None
    return p


def _cooperating_process(conf: Mapping[str, Any]) -> bool:
    """One of several processes of one run (``shard=i/n``, torchrun ranks): they share the output folder."""
    return bool(conf.get("shard")) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def lock_output_dir(conf: Mapping[str, Any]) -> tuple[Path, int]:
    """Check ``output_dir`` and lock it for this run (:mod:`delg.locks`, re-entrant in the process): a second run
    on the same folder fails at once naming the first; the ranks / shards of one run share the lock.  Returns what
    :func:`delg.locks.release` needs."""
    from delg.locks import acquire

    out = check_output_dir(conf["output_dir"])
    lock = out / OUTPUT_LOCK
    fd = acquire(lock, f"output_dir {out}", shared=_cooperating_process(conf), reentrant=True, busy=OutputDirError)
    return lock, fd


def run_stage(
    main: Callable[[Config], Any],
    argv: list[str],
    doc: str | None = None,
    default_config: str | None = None,
) -> int:
    """The thin CLI of every stage: ``[--config FILE] [key=value ...]``, ``-h`` prints ``doc``.

    The config is resolved and checked, then ``output_dir`` is checked and locked for the whole run, then ``main``
    runs.  Expected failures (any :class:`~delg.errors.ProjectError`, ``FileNotFoundError``) are one line
    ``error: ...`` on stderr, exit code 2 (:func:`delg.errors.report_error`)."""
    from delg.locks import release

    try:
        path, overrides = split_cli(argv)
        if "-h" in overrides or "--help" in overrides:
            print(doc or "")
            return 0
        conf = load_config(path or default_config, overrides)
        lock, fd = lock_output_dir(conf)
        try:
            out = main(conf)
        finally:
            release(lock, fd)
    except (ProjectError, FileNotFoundError) as e:
        return report_error(e)
    if out is not None:
        print(out)
    return 0
