"""The type and range of every setting: one pydantic model per config section, checked when a config is resolved.

Defaults and their documentation live in ``delg/conf/*.yaml`` only; the models here declare no defaults (every field
is required, and the merged config always holds every key), so a setting has one owner for its value (the YAML) and
one for what is allowed (this module).  ``tests/test_settings.py`` asserts that both name the same keys.

:func:`validate_config` runs inside :func:`delg.config.load_config`, after the files and the overrides are merged
and before any stage does work (or writes ``config.yaml``).  A bad value is a :class:`~delg.errors.ConfigError`
with one line: ``<key>: <value> is not allowed: <what is allowed>``.  Validation is strict: ``1.5`` is not an
integer, ``'sift'`` is not a list, and a boolean is ``true``/``false`` (or ``yes``/``no``, as YAML reads them).

Rules between several keys (``extract.global_scales`` within ``extract.scales``, ``train.images_per_class`` at most
``train.batch_size``) stay with the code that uses them, which checks them before any work.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from delg.errors import ConfigError


class Allowed:
    """Annotation metadata: the words used for a type in error messages, where the generated ones would be obscure."""

    def __init__(self, text: str) -> None:
        self.text = text


# ------------------------------------------------------------------------------------------------ building blocks
Int = Annotated[int, Field()]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Float = Annotated[float, Field(allow_inf_nan=False)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # [0, 1]
OpenFraction = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]  # (0, 1)
Path_ = Annotated[str, Field(min_length=1), Allowed("a path")]
Name = Annotated[str, Field(min_length=1), Allowed("a name")]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$"), Allowed("auto, cpu, cuda or cuda:N")]
Shard = Annotated[str, Field(pattern=r"^\s*\d+\s*/\s*\d+\s*$"), Allowed("'i/n' (e.g. 0/4)")]
# LightGlue's adaptive depth / width: a confidence in (0, 1], or -1 to disable
LGConfidence = Literal[-1] | Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]

METHODS = ("lightglue", "lightglue_aliked", "sift", "delg", "loftr", "xfeat")  # == loftr_tools.registry.VERIFIERS (tested)
Method = Literal["lightglue", "lightglue_aliked", "sift", "delg", "loftr", "xfeat"]


class Section(BaseModel):
    """Every section: strict types, no key beyond the declared ones (load_config reports unknown keys first)."""

    model_config = ConfigDict(strict=True, extra="forbid")


# ------------------------------------------------------------------------------------------------ sections
class Base(Section):
    output_dir: Path_
    overwrite: bool
    device: Device
    mixed_precision: bool
    seed: NonNegInt
    num_workers: NonNegInt
    shard: Shard | None
    progress: bool
    query: Path_ | None


class Dataset(Section):
    type: Literal["minibench", "revisitop", "folders"]
    name: Name | None
    root: Path_ | None
    preset: Literal["default", "tiny"]  # == delg.data.minibench.PRESETS (tested)
    distractors: Path_ | None
    query_crop: bool
    check_images: bool


class VerifierRansac(Section):
    """A verifier's own ``<section>.ransac`` mapping (per-verifier RANSAC, issue #10): keys as the YAML gives them."""

    model: Literal["fundamental", "homography", "affine"]  # == loftr_tools.ransac.MODELS (tested)
    threshold: PosFloat
    confidence: OpenFraction
    max_iters: PosInt
    seed: NonNegInt
    min_inliers: NonNegInt
    evidence_low: NonNegFloat
    evidence_high: PosFloat


class DelgLocal(Section):
    distance_threshold: PosFloat
    mutual: bool
    max_keypoints: PosInt
    ransac: VerifierRansac


class Extract(Section):
    scales: Annotated[list[PosFloat], Field(min_length=1)]
    global_scales: Annotated[list[PosFloat], Field(min_length=1)]
    global_aggregation: Literal["l2_per_scale", "sum"]
    resize: Literal["antialias", "cv2_bilinear"]
    long_side: Annotated[int, Field(ge=16)] | None  # null = full size; a handful of pixels is never meant
    local: bool
    max_keypoints: PosInt
    attention_threshold: Float | None
    threshold_halve_until: NonNegInt
    nms_iou: Fraction
    float16: bool
    splits: Annotated[list[Literal["db", "query"]], Field(min_length=1)]
    distractor_dir: Path_ | None
    merge: bool


class LightGlue(Section):
    long_side: Annotated[int, Field(ge=16)]
    max_keypoints: PosInt
    filter_threshold: Fraction
    depth_confidence: LGConfidence
    width_confidence: LGConfidence
    mixed_precision: bool
    disk_weights: Name
    disk_nms_window: PosInt
    aliked_model: Literal["aliked-t16", "aliked-n16", "aliked-n16rot", "aliked-n32"]
    aliked_detection_threshold: Float
    aliked_nms_radius: NonNegInt
    ransac: VerifierRansac


class LoFTR(Section):
    weights: Path_
    temp_bug_fix: bool
    long_side: Annotated[int, Field(ge=16)]
    match_threshold: Fraction
    mixed_precision: bool
    batch_size: PosInt | None
    ransac: VerifierRansac


class Loss(Section):
    global_: Literal["ce", "supcon", "ce+supcon"] = Field(alias="global")  # == delg.train.losses.GLOBAL_LOSSES
    ce_weight: NonNegFloat
    supcon_weight: NonNegFloat
    supcon_temperature: PosFloat
    local: bool
    attention_weight: NonNegFloat
    reconstruction_weight: NonNegFloat


class Model(Section):
    backbone: Literal["resnet50", "resnet101", "efficientnet_lite0"]  # == delg.model.SUPPORTED_BACKBONES (tested)
    pretrained: bool
    global_dim: PosInt
    local_dim: PosInt
    attention_dim: PosInt
    gem_p: PosFloat
    num_classes: PosInt | None
    arcface_margin: NonNegFloat
    arcface_scale: PosFloat | None
    checkpoint: Path_ | None
    random_weights: bool


class Ranks(Section):
    depth: PosInt | Literal["all"] | None


class Report(Section):
    enabled: bool
    max_queries: NonNegInt
    top_n: PosInt
    thumb_side: PosInt
    draw_matches: NonNegInt


class Rerank(Section):
    methods: list[Method]
    top_k: PosInt
    junk_before_rerank: bool
    feature_cache_mb: NonNegFloat
    cache: bool
    oom_retry_factors: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)]
    global_ranks: Path_ | None
    query_store: Path_ | None
    db_store: Path_ | None
    order: Literal["inliers", "fused"]
    global_weight: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    qe_rounds: Annotated[int, Field(ge=0, le=10)]
    qe_top_k: PosInt
    propagate: bool
    propagation_weight: NonNegFloat
    propagation_hops: Annotated[int, Field(ge=1, le=4)]
    propagate_verify: NonNegInt
    db_pairs_k: NonNegInt
    graph_memory_mb: PosFloat


class Search(Section):
    index: Literal["flat", "ivfpq"]  # == delg.search.INDEX_KINDS (tested)
    gpu: bool | Literal["auto"]
    nlist: PosInt | None
    m: PosInt
    nbits: Annotated[int, Field(ge=1, le=16)]
    nprobe: PosInt
    refine: NonNegFloat | None
    train_size: PosInt
    chunk: PosInt
    query_chunk: PosInt
    save_index: bool
    qe_k: NonNegInt | None
    dba_k: NonNegInt | None
    alpha: NonNegFloat
    superglobal: bool
    sg_m: PosInt
    sg_k: NonNegInt
    sg_beta: NonNegFloat


class Sift(Section):
    long_side: Annotated[int, Field(ge=16)]
    max_keypoints: PosInt
    ratio: Annotated[float, Field(gt=0, le=1)]
    mutual: bool
    root_sift: bool
    ransac: VerifierRansac


class XFeat(Section):
    long_side: Annotated[int, Field(ge=32)]
    max_keypoints: PosInt
    detection_threshold: NonNegFloat
    filter_threshold: Fraction
    depth_confidence: LGConfidence
    width_confidence: LGConfidence
    mixed_precision: bool
    ransac: VerifierRansac


class Train(Section):
    data: Literal["minibench", "gldv2"]
    csv: Path_ | None
    images: Path_ | None
    min_images_per_class: PosInt
    max_classes: PosInt | None
    val_fraction: Annotated[float, Field(ge=0, lt=1)] | None
    epochs: PosInt
    batch_size: Annotated[int, Field(ge=2)]  # BatchNorm needs two samples; the sampler drops smaller batches
    images_per_class: PosInt
    image_size: PosInt
    min_scale: Annotated[float, Field(gt=0, le=1)]
    flip: bool
    color_jitter: NonNegFloat
    lr: PosFloat
    local_lr_mult: NonNegFloat | None
    momentum: Annotated[float, Field(ge=0, lt=1)]
    nesterov: bool
    weight_decay: NonNegFloat
    warmup_epochs: NonNegFloat
    freeze_bn: bool
    clip_grad_norm: PosFloat | None
    channels_last: bool
    resume: bool
    keep_epochs: bool
    max_steps_per_epoch: PosInt | None
    whiten_init: Literal["random", "pca"]
    whiten_power: NonNegFloat
    whiten_views: NonNegInt
    arcface_init: Literal["random", "imprint"]
    backbone_lr_mult: NonNegFloat | None


# section name (delg/conf/<name>.yaml) -> model; "" = base.yaml (top-level keys)
SECTIONS: dict[str, type[Section]] = {
    "": Base, "dataset": Dataset, "delg_local": DelgLocal, "extract": Extract, "lightglue": LightGlue,
    "loftr": LoFTR, "loss": Loss, "model": Model, "ranks": Ranks, "report": Report,
    "rerank": Rerank, "search": Search, "sift": Sift, "train": Train, "xfeat": XFeat,
}


# ------------------------------------------------------------------------------------------------ messages
def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, m1, m2]`` -> ``(T, [m1, m2])`` with FieldInfo metadata flattened."""
    meta: list[Any] = []
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        for m in extra:
            meta.extend(getattr(m, "metadata", None) or [m])
    return tp, meta


def _bounds(meta: list[Any]) -> str:
    words = []
    for m in meta:
        for cls, op, attr in ((at.Ge, ">=", "ge"), (at.Gt, ">", "gt"), (at.Le, "<=", "le"), (at.Lt, "<", "lt")):
            if isinstance(m, cls):
                words.append(f"{op} {getattr(m, attr):g}")
    return (" " + " and ".join(words)) if words else ""


def describe(tp: Any, meta: list[Any] | None = None) -> str:
    """What a type allows, in words: ``PosInt | None`` -> ``'an integer >= 1 or null'``."""
    tp, inner = _strip(tp)
    meta = [*(meta or []), *inner]
    for m in meta:
        if isinstance(m, Allowed):
            return m.text
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        parts = [describe(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else parts[0]
    if origin is Literal:
        vals = [str(v) for v in typing.get_args(tp)]
        return vals[0] if len(vals) == 1 else "one of " + ", ".join(vals)
    if origin is list:
        (item,) = typing.get_args(tp)
        nonempty = any(isinstance(m, at.MinLen) and m.min_length >= 1 for m in meta)
        return f"a {'non-empty ' if nonempty else ''}list whose items are each {describe(item)}"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + _bounds(meta)
    if tp is float:
        return "a finite number" + _bounds(meta)
    if tp is str:
        return "a string"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"a mapping with the keys {', '.join(_yaml_keys(tp))}"
    return str(tp)


def _yaml_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _field(model: type[BaseModel], key: str) -> Any:
    for name, f in model.model_fields.items():
        if (f.alias or name) == key:
            return f
    return None


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _message(err: Mapping[str, Any], model: type[BaseModel], data: Mapping[str, Any], prefix: str) -> str:
    """One line for one pydantic error: the dotted key (union branches and list indices dropped), its whole value
    as given, and what the field allows."""
    keys: list[str] = []
    cur: Any = model
    field = None
    value: Any = data
    for part in err["loc"]:
        f = _field(cur, part) if isinstance(part, str) and isinstance(cur, type) else None
        if f is None:
            break
        keys.append(part)
        field = f
        value = value.get(part) if isinstance(value, Mapping) else None
        sub, _ = _strip(f.annotation)
        subs = [a for a in typing.get_args(sub)] or [sub]
        cur = next((a for a in subs if isinstance(a, type) and issubclass(a, BaseModel)), None)
    key = prefix + ".".join(keys)
    if field is None:
        return f"{key or 'config'}: {err['msg']}"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    return f"{key}: {_show(value)} is not allowed: {describe(field.annotation, list(field.metadata))}"


def validate_section(name: str, data: Mapping[str, Any], error: type[Exception] = ConfigError) -> dict[str, Any]:
    """Check one section (``""`` = the top-level keys) and return it with validated types; raises ``error`` with
    one line naming the first bad key (in the order of the YAML file)."""
    model = SECTIONS[name]
    try:
        obj = model.model_validate(dict(data))
    except ValidationError as e:
        errs = e.errors()
        order = {k: i for i, k in enumerate(_yaml_keys(model))}
        errs.sort(key=lambda x: order.get(x["loc"][0] if x["loc"] else "", len(order)))
        raise error(_message(errs[0], model, data, f"{name}." if name else "")) from None
    return obj.model_dump(by_alias=True, exclude_unset=True)


def validate_config(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The merged config with every section checked and typed (see the module doc); raises ConfigError."""
    top = {k: v for k, v in conf.items() if k not in SECTIONS}
    out = validate_section("", top)
    for name in SECTIONS:
        if name and name in conf:  # a section the defaults lack is reported as an unknown key by load_config
            sec = conf[name]
            if not isinstance(sec, Mapping):
                raise ConfigError(f"{name}: {_show(sec)} is not allowed: a mapping of the keys of delg/conf/{name}.yaml")
            out[name] = validate_section(name, sec)
    return out


__all__ = ["SECTIONS", "Allowed", "describe", "validate_config", "validate_section"]
