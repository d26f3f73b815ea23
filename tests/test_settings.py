"""Typed settings (delg/settings.py), output-folder checks and lock, `query=` result names, the exit-code rule.

Every bad value is one line naming the key, the value and what is allowed, raised when the config is resolved,
before any work; the CLIs print it as ``error: ...`` with exit status 2 and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from delg.config import Config, ConfigError, default_schema, load_config, lock_output_dir
from delg.settings import SECTIONS

REPO = Path(__file__).resolve().parent.parent

# Fields the schema accepts although no YAML default names them (none today: every key has its default in YAML).
PENDING: set[str] = set()


def test_schema_and_yaml_have_the_same_keys() -> None:
    """Defaults (YAML) and types (schema) name exactly the same keys, section by section: neither drifts."""
    defaults = default_schema()
    yaml_sections = {k for k, v in defaults.items() if isinstance(v, dict)}
    assert yaml_sections == {n for n in SECTIONS if n}
    for name, model in SECTIONS.items():
        yaml_keys = set(defaults[name]) if name else {k for k in defaults if k not in yaml_sections}
        required = {f.alias or k for k, f in model.model_fields.items() if f.is_required()}
        optional = {f.alias or k for k, f in model.model_fields.items() if not f.is_required()}
        assert required <= yaml_keys, (name, required - yaml_keys)
        assert yaml_keys <= required | optional, (name, yaml_keys - required - optional)
        prefix = f"{name}." if name else ""
        assert {prefix + k for k in optional - yaml_keys} <= PENDING, name
    # nested mappings too: every verifier's own `ransac:` names exactly the keys of its schema
    from delg.settings import VerifierRansac

    for name in ("delg_local", "lightglue", "loftr", "sift"):
        assert set(defaults[name]["ransac"]) == set(VerifierRansac.model_fields), name


def test_enums_match_the_code_that_uses_them() -> None:
    from delg.data.minibench import PRESETS
    from delg.extract import GLOBAL_AGGREGATIONS, RESIZES
    from delg.model import SUPPORTED_BACKBONES
    from delg.search import INDEX_KINDS
    from delg.settings import Method
    from delg.train.losses import GLOBAL_LOSSES
    from loftr_tools.ransac import MODELS
    from loftr_tools.registry import VERIFIERS

    def values(model: type, key: str) -> set:
        ann = model.model_fields[key].annotation
        return set(typing.get_args(ann))

    assert set(typing.get_args(Method)) == set(VERIFIERS)
    assert values(SECTIONS["model"], "backbone") == set(SUPPORTED_BACKBONES)
    assert values(SECTIONS["search"], "index") == set(INDEX_KINDS)
    assert values(SECTIONS["loss"], "global_") == set(GLOBAL_LOSSES)
    assert values(SECTIONS["dataset"], "preset") == set(PRESETS)
    from delg.settings import VerifierRansac

    assert values(VerifierRansac, "model") == set(MODELS)
    assert values(SECTIONS["extract"], "global_aggregation") == set(GLOBAL_AGGREGATIONS)
    assert values(SECTIONS["extract"], "resize") == set(RESIZES)


BAD = [
    # the silent wrong results
    ("rerank.top_k=-5", "rerank.top_k: -5 is not allowed: an integer >= 1"),
    ("rerank.top_k=0", "rerank.top_k: 0 is not allowed"),
    ("rerank.top_k=1.5", "rerank.top_k: 1.5 is not allowed"),
    ("extract.long_side=-1", "extract.long_side: -1 is not allowed: an integer >= 16 or null"),
    ("extract.long_side=4", "extract.long_side: 4 is not allowed"),
    # int
    ("rerank.top_k=abc", "rerank.top_k: 'abc' is not allowed: an integer"),
    ("ranks.depth=abc", "ranks.depth: 'abc' is not allowed: an integer >= 1, all or null"),
    ("seed=abc", "seed: 'abc' is not allowed: an integer"),
    ("num_workers=-1", "num_workers: -1 is not allowed: an integer >= 0"),
    ("extract.long_side=abc", "extract.long_side: 'abc' is not allowed"),
    ("search.nprobe=true", "search.nprobe: true is not allowed: an integer >= 1"),
    # float
    ("train.lr=0", "train.lr: 0 is not allowed: a finite number > 0"),
    ("train.lr=.nan", "train.lr: nan is not allowed"),
    ("sift.ransac.confidence=1", "sift.ransac.confidence: 1 is not allowed: a finite number > 0 and < 1"),
    ("sift.ratio=fast", "sift.ratio: 'fast' is not allowed"),
    # bool
    ("overwrite=maybe", "overwrite: 'maybe' is not allowed: true or false"),
    ("dataset.query_crop=1", "dataset.query_crop: 1 is not allowed: true or false"),
    # enum
    ("device=tpu", "device: 'tpu' is not allowed: auto, cpu, cuda or cuda:N"),
    ("device=cuda:x", "device: 'cuda:x' is not allowed"),
    ("search.index=hnsw", "search.index: 'hnsw' is not allowed: one of flat, ivfpq"),
    ("model.backbone=vgg16", "model.backbone: 'vgg16' is not allowed: one of resnet50"),
    # list
    ("extract.scales=abc", "extract.scales: 'abc' is not allowed: a non-empty list whose items are each"),
    ("extract.scales=[]", "extract.scales: [] is not allowed"),
    ("extract.scales=[1.0,-2]", "extract.scales: [1.0, -2] is not allowed"),
    ("rerank.methods=sift", "rerank.methods: 'sift' is not allowed: a list whose items are each one of lightglue"),
    ("rerank.methods=[sift,superglue]", "rerank.methods: ['sift', 'superglue'] is not allowed"),
    # optional path / name
    ("dataset.root=3", "dataset.root: 3 is not allowed: a path or null"),
    ("model.checkpoint=[a,b]", "model.checkpoint: ['a', 'b'] is not allowed: a path or null"),
    ("output_dir=null", "output_dir: null is not allowed: a path"),
    # optional numbers that were free-form (default null)
    ("model.num_classes=many", "model.num_classes: 'many' is not allowed: an integer >= 1 or null"),
    ("loftr.batch_size=0", "loftr.batch_size: 0 is not allowed"),
    ("shard=half", "shard: 'half' is not allowed: 'i/n'"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_one_line_naming_key_value_and_allowed(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    text = str(e.value)
    assert text.startswith(message) and "\n" not in text, text


def test_bad_value_in_a_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rerank:\n  top_k: -5\n")
    with pytest.raises(ConfigError, match=r"^rerank.top_k: -5 is not allowed"):
        load_config(cfg)


def test_good_values_are_typed() -> None:
    c = load_config(None, ["rerank.top_k=7", "ranks.depth=all", "device=cuda:1", "overwrite=yes",
                           "extract.scales=[1, 2]", "extract.global_scales=[1]", "extract.long_side=null"])
    assert c.rerank.top_k == 7 and c.ranks.depth == "all" and c.device == "cuda:1" and c.overwrite is True
    assert c.extract.scales == [1.0, 2.0] and all(isinstance(s, float) for s in c.extract.scales)
    assert c.extract.long_side is None and isinstance(c, Config) and c.loss["global"] == "ce"


# ---------------------------------------------------------------------------------------------- output folders
def _cli(args: list[str], cwd: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, sys.executable, "-m", "delg.retrieve", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_cli_bad_value_fails_before_config_yaml(tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = _one_error_line(_cli([f"output_dir={out}", "rerank.top_k=-5"], tmp_path))
    assert "rerank.top_k: -5 is not allowed" in line
    assert not out.exists()  # nothing written, config.yaml included


def test_cli_output_dir_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "results.txt"
    f.write_text("x")
    line = _one_error_line(_cli([f"output_dir={f}"], tmp_path))
    assert "output_dir" in line and "existing file" in line and f.read_text() == "x"


def test_cli_output_dir_read_only(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:  # root writes into a 0o555 folder: make it a read-only mount in a private namespace
        remount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
        prefix = ("unshare", "--mount", "sh", "-c", remount, str(ro))
        probe = subprocess.run([*prefix, "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip("running as root without mount namespaces: no read-only folder to test with")
    try:
        line = _one_error_line(_cli([f"output_dir={ro}"], tmp_path, prefix))
        assert "output_dir" in line and "cannot write" in line and not list(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_cli_second_run_on_a_locked_output_dir_names_the_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = ("import sys, time; from delg.config import load_config, lock_output_dir\n"
              f"lock_output_dir(load_config(None, ['output_dir={out}'])); print('locked', flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", holder, "first-run-marker"], stdout=subprocess.PIPE, text=True,
                         env=env)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        line = _one_error_line(_cli([f"output_dir={out}"], tmp_path))
        assert f"pid {p.pid}" in line and "first-run-marker" in line and "started" in line, line
        assert not (out / "config.yaml").exists()
    finally:
        p.kill()
        p.wait()


def test_lock_is_reentrant_in_process_and_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    from delg.locks import release

    out = tmp_path / "out"
    out.mkdir()
    # what a crashed run leaves: a lock file naming a dead process (the kernel dropped its flock)
    (out / ".run.lock").write_text(json.dumps({"pid": 999999, "host": "h", "started": time.time(), "command": "x"}))
    conf = load_config(None, [f"output_dir={out}"])
    lock, fd = lock_output_dir(conf)
    lock2, fd2 = lock_output_dir(conf)  # a stage calling another stage in-process
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release(lock2, fd2)
    release(lock, fd)


# ---------------------------------------------------------------------------------------------- query= names
def test_query_results_of_two_photos_with_one_name_do_not_collide(tmp_path: Path) -> None:
    from delg.retrieve import query_result_path

    conf = load_config(None, [f"output_dir={tmp_path}"])
    a, b = tmp_path / "a" / "IMG_0001.jpg", tmp_path / "b" / "IMG_0001.jpg"
    pa, pb = query_result_path(conf, a), query_result_path(conf, b)
    assert pa != pb and pa.name.startswith("IMG_0001-") and pa.parent == pb.parent == tmp_path / "query"
    assert query_result_path(conf, a) == pa  # the same photo keeps its file


# ---------------------------------------------------------------------------------------------- exit codes
def test_minibench_cli_expected_error_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "delg.minibench", "dataset.preset=huge"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert "dataset.preset: 'huge' is not allowed" in _one_error_line(r)
