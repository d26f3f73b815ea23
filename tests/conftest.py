"""Shared fixtures. Real data from ../shared/data is optional: tests that need it skip with the reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))

# Two cores here: keep torch from oversubscribing when tests run next to DataLoader workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset of the embedded benchmark, built once per test session."""
    from delg.data.minibench import build

    return build(tmp_path_factory.mktemp("minibench") / "tiny", preset="tiny")
