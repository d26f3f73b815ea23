"""The job pool and the run report: jobs run on a thread pool, expected failures are collected (never stop the
others) and written to ``download_report.json``; ``.extracted`` markers."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from delg.download.errors import BadArchiveError, Cancelled, DatasetFormatError, DownloadError, _one_line
from delg.download.fetch import Fetcher
from delg.io import atomic_write_json


@dataclass
class RunReport:
    """Outcome of one run: what was done, what was already there, and every failure with its reason."""

    dataset: str
    out: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already complete from an earlier run
    failures: list[dict[str, str]] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # what the run was asked to do (the resolved arguments)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fail(self, item: str, reason: str) -> None:
        with self._lock:
            self.failures.append({"item": item, "reason": reason})

    def ok(self, item: str, skipped: bool = False) -> None:
        with self._lock:
            (self.skipped if skipped else self.done).append(item)

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def write(self, path: Path) -> Path:
        data = {
            "dataset": self.dataset,
            "out": str(self.out),
            "settings": self.settings,
            "done": sorted(self.done),
            "skipped": sorted(self.skipped),
            "failures": sorted(self.failures, key=lambda f: f["item"]),
            "checks": self.checks,
        }
        return atomic_write_json(path, data, mkdir=True, newline=True, indent=2)

    def summary(self) -> str:
        lines = [
            f"{self.dataset}: {len(self.done)} file(s) fetched/extracted, {len(self.skipped)} already complete, "
            f"{len(self.failures)} failure(s); data in {self.out}"
        ]
        for name, check in self.checks.items():
            lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in check.items()))
        if self.failures:
            lines.append(f"FAILED ({len(self.failures)}) - rerun the same command to retry; finished files are kept:")
            lines.extend(f"  {f['item']}: {f['reason']}" for f in sorted(self.failures, key=lambda f: f["item"]))
        return "\n".join(lines)


def _log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def _run_jobs(jobs: list[tuple[str, Callable[[], bool]]], n_workers: int, report: RunReport, fetcher: Fetcher) -> None:
    """Run ``(item, job)`` pairs on a thread pool; ``job()`` returns True when it found the item already complete.

    Expected errors become report failures; Ctrl-C stops the workers (``.part`` files stay for resuming).
    """
    pool = ThreadPoolExecutor(max_workers=max(1, n_workers), thread_name_prefix="download")
    futures: dict[Future[bool], str] = {pool.submit(job): item for item, job in jobs}
    bar = tqdm(total=len(futures), desc=report.dataset, unit="file", disable=True if not fetcher.progress else None,
               file=sys.stderr)
    try:
        for fut in as_completed(futures):
            item = futures[fut]
            try:
                report.ok(item, skipped=fut.result())
            except (DownloadError, BadArchiveError, DatasetFormatError) as e:
                report.fail(item, str(e))
                _log(f"FAILED {item}: {e}")
            except Cancelled:
                report.fail(item, "interrupted")
            except Exception as e:  # disk full, permissions, or a bug: list the item, let the others finish
                report.fail(item, _one_line(e))
                _log(f"FAILED {item}: {_one_line(e)}")
            bar.update(1)
    except KeyboardInterrupt:
        fetcher.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        raise
    bar.close()
    pool.shutdown(wait=True)


def _write_marker(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data, newline=True)
