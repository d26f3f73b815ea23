"""scripts/gpu_check.sh's module runs on the CPU with tiny sizes and writes every figure it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from delg import gpu_check


@pytest.mark.slow
def test_gpu_check_tiny_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    res = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res))
    assert data["extraction_images_per_s"]["amp_off"] > 0
    assert data["loftr"]["ours_pairs_per_s"] > 0 and data["loftr"]["plain_pairs_per_s"] > 0
    assert data["lightglue_pairs_per_s"] > 0
    assert data["search"]["queries_per_s"] > 0 and data["search"]["n_db"] == 5000

