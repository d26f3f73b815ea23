"""What a feature store holds and where it lives: the identity of extracted features and the stores' file names.

Every stage after extraction reads the stores through these names, so they live here, beside the store
(:mod:`delg.store`), not inside the extraction code:

* identity: :class:`ExtractSettings` (the typed ``extract.*`` settings), :func:`model_conventions` (colour order,
  normalisation, attention variant of the weights) and :func:`extraction_settings` (everything that changes the
  stored features: recorded in each store and hashed into :func:`preset_name`);
* paths: :func:`features_dir`, :func:`store_path` (one split), :func:`query_store_path` (the db store when every
  query is a whole database image, :func:`queries_in_db`), the shared distractor stores
  (:func:`distractor_store_path`, :func:`distractor_local_path`), shard part files (:func:`part_path`) and sidecars
  (:func:`sidecar`: ``.skipped.json``, ``.progress.json``);
* :func:`open_db_store`: the one way a stage opens the database (db store + distractor store as one).

Nothing here imports torch or builds a model; the extraction itself is :mod:`delg.extract`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from delg.config import Config, ConfigError
from delg.errors import ProjectError
from delg.io import file_sha1
from delg.store import FeatureStore, StoreUnion

SCALE_TOL = 1e-6


class ExtractError(ProjectError, ValueError):
    """An extraction setting is invalid; the message names the key."""


@dataclass(frozen=True)
class ExtractSettings:
    scales: tuple[float, ...]
    global_scales: tuple[float, ...]
    long_side: int | None  # extract.long_side: the long side in pixels, as the verifiers' long_side
    local: bool
    max_keypoints: int
    attention_threshold: float
    # Defaults = the behaviour before these keys existed (scripts that build settings by hand keep it).
    global_aggregation: str = "l2_per_scale"
    resize: str = "antialias"
    threshold_halve_until: int = 0
    nms_iou: float = 0.0

    @classmethod
    def from_conf(cls, conf: Config) -> ExtractSettings:
        """The settings of ``conf.extract``: types and ranges by the schema (:mod:`delg.settings`, re-checked here
        for a config changed after load_config), then the rules between keys."""
        from delg.settings import validate_section

        x = validate_section("extract", conf.extract, error=ExtractError)
        scales = tuple(float(s) for s in x["scales"])
        gscales = tuple(float(s) for s in x["global_scales"])
        for g in gscales:
            if not any(abs(g - s) < SCALE_TOL for s in scales):
                raise ExtractError(f"extract.global_scales: {g} is not one of extract.scales {list(scales)}")
        thr, halve = x["attention_threshold"], x["threshold_halve_until"]
        if halve and (thr is None or thr <= 0):
            raise ExtractError("extract.threshold_halve_until: needs a positive extract.attention_threshold to halve")
        return cls(
            scales=scales,
            global_scales=gscales,
            long_side=x["long_side"],
            local=x["local"],
            max_keypoints=x["max_keypoints"],
            attention_threshold=float(thr if thr is not None else -np.inf),
            global_aggregation=x["global_aggregation"],
            resize=x["resize"],
            threshold_halve_until=halve,
            nms_iou=x["nms_iou"],
        )

    def is_global(self, s: float) -> bool:
        return any(abs(s - g) < SCALE_TOL for g in self.global_scales)


MODEL_KEYS = ("backbone", "pretrained", "global_dim", "local_dim", "gem_p", "checkpoint", "random_weights")


def check_weights(conf: Config) -> None:
    """Retrieval needs real weights: ``model.pretrained: false`` without ``model.checkpoint`` would run a random
    network without a word (a forgotten checkpoint), so it is an error unless ``model.random_weights: true`` says
    random weights are meant (tests, speed checks).  Training from scratch does not come through here."""
    m = conf.model
    if not m.get("checkpoint") and not m.get("pretrained", True) and not m.get("random_weights", False):
        raise ConfigError(
            "model.checkpoint: not set while model.pretrained is false, so the model would have random weights; "
            "give model.checkpoint=PATH (or model.pretrained=true for ImageNet weights, or "
            "model.random_weights=true if random weights are really meant)"
        )


@lru_cache(maxsize=8)
def _checkpoint_conventions(path: str, digest: str) -> dict[str, Any]:
    """Input colour, normalisation and attention variant recorded by a checkpoint (``digest`` keys the cache)."""
    from delg.model.checkpoints import read_model_checkpoint
    from delg.model.conventions import default_stats

    meta, _ = read_model_checkpoint(path)
    # The same defaults as delg.model.model_from_meta: files written before these keys are RGB / 'recon'.
    colour = meta.get("input_colour", "rgb")
    mean, std = default_stats(colour)
    return {
        "input_colour": colour,
        "mean": [float(v) for v in meta.get("mean") or mean],
        "std": [float(v) for v in meta.get("std") or std],
        "attention_input": meta.get("attention_input", "recon") if meta.get("local_arch", "delg") == "delg" else None,
    }


def model_conventions(conf: Config) -> dict[str, Any]:
    """How the configured model's weights want their input (colour order, mean/std) and which attention variant
    its local head runs: part of the extraction identity, so stores made before these were honoured (or with a
    model that differs only in them) are never reused."""
    from delg.model.conventions import default_stats

    ck = conf.model.get("checkpoint")
    if ck and Path(ck).is_file():
        return dict(_checkpoint_conventions(str(Path(ck).resolve()), _file_digest(str(Path(ck).resolve()))))
    mean, std = default_stats("rgb")  # timm / ImageNet weights (or random ones) are RGB
    return {"input_colour": "rgb", "mean": list(mean), "std": list(std), "attention_input": "block3"}


@lru_cache(maxsize=8)
def _file_digest(path: str) -> str:
    return file_sha1(path, 10)  # cached: a checkpoint is hashed once per process, not once per preset lookup


def extraction_settings(conf: Config, split: str | None = None) -> dict[str, Any]:
    """Everything that changes the stored features: recorded in the store and hashed into the preset name."""
    check_weights(conf)
    xs = ExtractSettings.from_conf(conf)
    model = {k: conf.model.get(k) for k in MODEL_KEYS}
    model["random_weights"] = bool(model["random_weights"])
    if model["checkpoint"]:
        ckpt = Path(model["checkpoint"])
        if not ckpt.is_file():
            raise ConfigError(f"model.checkpoint: file not found: {ckpt}")
        model["checkpoint_sha1"] = _file_digest(str(ckpt.resolve()))
        model["checkpoint"] = ckpt.name  # the content digest identifies it; the folder it sits in does not matter
    else:
        model["seed"] = conf.seed  # the untrained local head is randomly initialised from the seed
    model.update(model_conventions(conf))
    out: dict[str, Any] = {
        "model": model,
        "scales": list(xs.scales),
        "global_scales": list(xs.global_scales),
        # Named max_size here (the key's name before it became extract.long_side): this dict is hashed into every
        # store preset, so stores extracted before the rename keep their names and stay valid.
        "max_size": xs.long_side,
        "local": xs.local,
        "float16": bool(conf.extract.float16),
        "global_aggregation": xs.global_aggregation,
        "resize": xs.resize,
    }
    if xs.local:
        out["max_keypoints"] = xs.max_keypoints
        out["attention_threshold"] = xs.attention_threshold
        out["threshold_halve_until"] = xs.threshold_halve_until
        out["nms_iou"] = xs.nms_iou
    if split is not None:
        out["split"] = split
    return out


def preset_name(conf: Config) -> str:
    """``feats-<backbone>-<weights>-s<n scales>-<long_side>-<hash>``, e.g. ``feats-resnet50-imagenet-s7-1024-3f2a9c1b``.

    ``weights`` is ``ckpt<digest>`` (a checkpoint), ``imagenet`` or ``random``; the hash covers every setting of
    :func:`extraction_settings`, so different settings never share a file.
    """
    s = extraction_settings(conf)
    m = s["model"]
    weights = f"ckpt{m['checkpoint_sha1'][:6]}" if m.get("checkpoint") else ("imagenet" if m["pretrained"] else "random")
    size = s["max_size"] or "full"
    tag = "" if s["local"] else "-global"
    h = hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]
    return f"feats-{m['backbone']}-{weights}-s{len(s['scales'])}-{size}{tag}-{h}"


def split_tag(conf: Config, split: str) -> str:
    if split == "query" and not conf.dataset.get("query_crop", True):
        return "query_full"
    return split


def features_dir(conf: Config, dataset_name: str) -> Path:
    return Path(conf.output_dir) / "features" / dataset_name


def store_path(conf: Config, dataset_name: str, split: str) -> Path:
    """Path of the (merged) store of one split: ``<output_dir>/features/<dataset>/<preset>-<split>.h5``."""
    return features_dir(conf, dataset_name) / f"{preset_name(conf)}-{split_tag(conf, split)}.h5"


def queries_in_db(conf: Config, dataset: Any) -> bool:
    """Every query is a database image read whole (same name, same file, no crop in effect): a folder dataset, or
    revisitop with ``dataset.query_crop=false``.  Their features are then the database's, so the queries are not
    extracted a second time: the query split reads (and fills) the db store."""
    if not dataset.query_names:
        return False
    crop = bool(conf.dataset.get("query_crop", True))
    bbx = list(getattr(dataset, "query_bbx", None) or [None] * len(dataset.query_names))
    if crop and any(b is not None for b in bbx):
        return False
    db = dict(zip(dataset.db_names, dataset.db_paths))
    return all(n in db and Path(db[n]) == Path(p) for n, p in zip(dataset.query_names, dataset.query_paths))


def query_store_path(conf: Config, dataset: Any) -> Path:
    """The store holding the queries' features: the query store, or the db store when :func:`queries_in_db`."""
    return store_path(conf, dataset.name, "db" if queries_in_db(conf, dataset) else "query")


def distractor_dir(conf: Config) -> Path:
    """Root of the distractor stores: ``extract.distractor_dir``, default ``<output_dir>/features``."""
    d = conf.extract.get("distractor_dir")
    if d in (None, ""):
        return Path(conf.output_dir) / "features"
    if not isinstance(d, (str, Path)):
        raise ExtractError(f"extract.distractor_dir: expected a folder path, got {d!r}")
    return Path(d)


def distractor_store_path(conf: Config, dataset: Any) -> Path | None:
    """Globals of the distractors: ``<distractor_dir>/<distractor id>/<preset>-distractors.h5``; ``None`` when the
    dataset has no separately stored distractors.  Nothing of the benchmark is in the path: ROxford+1M and
    RParis+1M with the same model and settings (same preset) share one file."""
    did = getattr(dataset, "distractor_id", None)
    if not did or not getattr(dataset, "n_distractors", 0):
        return None
    return distractor_dir(conf) / did / f"{preset_name(conf)}-distractors.h5"


def distractor_local_path(conf: Config, dataset: Any) -> Path | None:
    """Local features of the distractors that reached some top K (on demand), beside the distractor store."""
    p = distractor_store_path(conf, dataset)
    return None if p is None else p.with_name(f"{preset_name(conf)}-distractors-local.h5")


def distractor_settings(conf: Config) -> dict[str, Any]:
    """Settings recorded in the distractor store: the run's (hashed into the preset) + globals only."""
    return dict(extraction_settings(conf, "distractors"), stored="global")


def db_store_paths(conf: Config, dataset: Any) -> list[Path]:
    """The files that hold the database: the benchmark's db store, then the distractor store if any."""
    d = distractor_store_path(conf, dataset)
    return [store_path(conf, dataset.name, "db")] + ([d] if d is not None else [])


def open_db_store(conf: Config, dataset: Any) -> FeatureStore | StoreUnion:
    """The database for reading, one view whatever the files: the db store, or the db store + the distractor store
    (:class:`delg.store.StoreUnion`).  The one way stages open the database."""
    preset = preset_name(conf)
    paths = db_store_paths(conf, dataset)
    own = FeatureStore(paths[0], "r", preset=preset)
    if len(paths) == 1:
        return own
    try:
        dis = FeatureStore(paths[1], "r", preset=preset)
    except BaseException:
        own.close()
        raise
    return StoreUnion([own, dis])


def part_path(main: Path, i: int, n: int) -> Path:
    return main.with_name(f"{main.stem}.part-{i}-of-{n}.h5")


def sidecar(store: Path, kind: str) -> Path:
    """``x.h5`` -> ``x.<kind>.json`` (kind: skipped, progress)."""
    return store.with_name(f"{store.stem}.{kind}.json")
