"""scripts/gpu_check.sh's module: runs on the CPU with tiny sizes and writes every figure it promises; without
kornia it still writes extraction and search; a failing stage costs only its own figure; JSON after every stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from delg import gpu_check

REPO = Path(__file__).resolve().parent.parent


def _no_errors(data: dict[str, Any]) -> None:
    for name in ("extraction_amp_off", "extraction_amp_on", "search", "loftr", "lightglue", "loftr_vs_kornia",
                 "paper_standin"):
        assert "error" not in data[name], (name, data[name])


@pytest.mark.slow
def test_gpu_check_tiny_cpu(tmp_path: Path) -> None:
    """The script itself, as a user runs it: from another folder, with the project's key=value style."""
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "tiny=true", "device=cpu", "output_dir=out"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert data["finished"] is True and data["running"] is None and data["tiny"] is True
    _no_errors(data)
    env = data["env"]
    assert env["python"] and env["torch"] and env["device"] == "cpu" and env["cuda_device"] is None
    assert env["kornia"] is not None and "faiss" in env
    assert data["extraction_amp_off"]["images_per_s"] > 0
    assert "skipped" in data["extraction_amp_on"]  # mixed precision needs CUDA
    assert data["loftr"]["ours_pairs_per_s"] > 0 and data["loftr"]["plain_pairs_per_s"] > 0
    assert data["lightglue"]["pairs_per_s"] > 0
    assert data["search"]["queries_per_s"] > 0 and data["search"]["n_db"] == 5000
    # our cached LoFTR path against kornia's own forward: in fp32 the same matches; fp16 needs CUDA
    cmp32 = data["loftr_vs_kornia"]["fp32"]
    assert cmp32["same_count"] and min(cmp32["matches_ours"]) > 0 and cmp32["max_diff_px"] < 1e-3, cmp32
    assert cmp32["agree_1px"] == 1.0 and "skipped" in data["loftr_vs_kornia"]["fp16"]
    assert "tiny" in data["paper_standin"]["skipped"]
    assert not list(tmp_path.glob("*.tmp"))


# The lent GPU machine has no kornia: `sys.modules['kornia'] = None` makes every `import kornia...` fail there too.
_WITHOUT_KORNIA = (
    "import runpy, sys\n"
    "sys.modules['kornia'] = None\n"
    "sys.argv = ['gpu_check'] + sys.argv[1:]\n"
    "runpy.run_module('delg.gpu_check', run_name='__main__', alter_sys=True)\n"
)


@pytest.mark.slow
def test_gpu_check_without_kornia_keeps_the_other_stages(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        [sys.executable, "-c", _WITHOUT_KORNIA, "tiny=true", "device=cpu", f"output_dir={tmp_path / 'out'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert data["finished"] is True and data["tiny"] is True
    assert data["env"]["kornia"] is None and data["env"]["kornia_error"]
    for name in ("loftr", "lightglue", "loftr_vs_kornia"):
        assert set(data[name]) == {"skipped"} and "gpu-wheels" in data[name]["skipped"], data[name]
    assert data["extraction_amp_off"]["images_per_s"] > 0
    assert data["search"]["queries_per_s"] > 0 and data["search"]["n_db"] == 5000
    assert "error" not in data["extraction_amp_off"] and "error" not in data["search"]


def test_failed_stage_is_recorded_and_json_is_written_after_each_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o" / "gpu_check.json"
    seen: dict[str, Any] = {}
    monkeypatch.setattr(gpu_check, "environment", lambda device: {"device": str(device), "kornia": "x", "faiss": None})

    def broken_extraction(*args: Any) -> float:
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    def search(*args: Any) -> dict[str, Any]:
        seen["during_search"] = json.loads(out.read_text())  # what a timeout here would leave
        return {"engine": "fake", "queries_per_s": 7.0, "n_db": 5000}

    def lightglue(*args: Any) -> float:
        raise KeyboardInterrupt  # not an Exception: must stop the run, not be recorded as a stage error

    monkeypatch.setattr(gpu_check, "bench_extraction", broken_extraction)
    monkeypatch.setattr(gpu_check, "bench_search", search)
    monkeypatch.setattr(gpu_check, "bench_loftr", lambda *a: {"ours_pairs_per_s": 3.0, "plain_pairs_per_s": 1.0})
    monkeypatch.setattr(gpu_check, "bench_lightglue", lightglue)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["tiny=true", "device=cpu", f"output_dir={out.parent}"])
    mid = seen["during_search"]
    assert mid["finished"] is False and mid["running"] == "search"
    assert mid["extraction_amp_off"]["error"] == "RuntimeError: CUDA out of memory."
    assert "search" not in mid
    last = json.loads(out.read_text())  # interrupted in lightglue: every finished stage is on disk
    assert last["finished"] is False and last["running"] == "lightglue"
    assert last["search"]["queries_per_s"] == 7.0 and last["loftr"]["ours_pairs_per_s"] == 3.0
    assert "lightglue" not in last
    assert [p.name for p in out.parent.iterdir()] == ["gpu_check.json"]  # no temporary file left behind


def test_kornia_stages_skipped_when_environment_lacks_kornia(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "environment", lambda device: {
        "device": str(device), "kornia": None, "kornia_error": "ModuleNotFoundError: No module named 'kornia'"})
    monkeypatch.setattr(gpu_check, "bench_extraction", lambda *a: 2.0)
    monkeypatch.setattr(gpu_check, "bench_search", lambda *a: {"queries_per_s": 5.0})

    def must_not_run(*args: Any) -> Any:
        raise AssertionError("a kornia stage ran without kornia")

    monkeypatch.setattr(gpu_check, "bench_loftr", must_not_run)
    monkeypatch.setattr(gpu_check, "bench_lightglue", must_not_run)
    res = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(tmp_path / "g.json")])
    assert res["finished"] is True
    assert res["extraction_amp_off"]["images_per_s"] == 2.0 and res["search"]["queries_per_s"] == 5.0
    assert "No module named 'kornia'" in res["loftr"]["skipped"] and "skipped" in res["lightglue"]


@pytest.mark.parametrize(
    ("argv", "out", "tiny", "device"),
    [
        ([], "gpu_check.json", False, "auto"),
        (["--tiny", "--out", "a/b.json"], "a/b.json", True, "auto"),
        (["output_dir=runs/x", "tiny=true"], str(Path("runs/x") / "gpu_check.json"), True, "auto"),
        (["tiny=false", "device=cpu", "--out", "k=v.json"], "k=v.json", False, "cpu"),
        (["--output_dir", "d", "--device", "cuda"], str(Path("d") / "gpu_check.json"), False, "cuda"),
        (["overwrite=true", "progress=false"], "gpu_check.json", False, "auto"),  # accepted as everywhere
    ],
)
def test_parse_args_flags_and_key_value(argv: list[str], out: str, tiny: bool, device: str) -> None:
    args = gpu_check.parse_args(argv)
    assert (args.out, args.tiny, args.device) == (out, tiny, device)


@pytest.mark.parametrize("argv", [["colour=red"], ["tiny=maybe"], ["device=tpu"], ["stray"], ["--bogus"],
                                  ["--out", "a.json", "output_dir=d"], ["overwrite=maybe"]])
def test_parse_args_rejects(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)


def test_one_line() -> None:
    assert gpu_check.one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert gpu_check.one_line(KeyError()) == "KeyError"
    assert len(gpu_check.one_line(ValueError("x" * 1000))) == 300


def test_paper_standin_stage_records_each_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage runs the stand-in's quick subset on the check's device and keeps one entry per config."""
    from delg import paper_standin

    seen: dict[str, Any] = {}

    def fake_main(out: Path, configs: Any = None, quick: bool = False, sizes: Any = None, overrides: Any = (),
                  log: Any = print) -> int:
        seen.update(out=out, quick=quick, device=sizes.device)
        Path(out).mkdir(parents=True)
        recs = [{"name": "a", "status": "ok", "seconds": 1.0, "maps": {"global": 10.0}, "traceback": "x"},
                {"name": "b", "status": "FAILED", "seconds": 2.0, "error": "E: boom"}]
        (Path(out) / "standin.json").write_text(json.dumps({"configs": recs, "failed": ["b"]}))
        log("a ok")
        return 1

    monkeypatch.setattr(paper_standin, "main", fake_main)
    res = gpu_check.run_paper_standin(gpu_check.torch.device("cpu"), tmp_path / "ps")
    assert seen == {"out": tmp_path / "ps", "quick": True, "device": "cpu"}
    assert res["exit_status"] == 1 and res["failed"] == ["b"] and res["lines"] == ["a ok"]
    assert res["configs"]["a"] == {"status": "ok", "seconds": 1.0, "maps": {"global": 10.0}}
    assert res["configs"]["b"]["error"] == "E: boom"
