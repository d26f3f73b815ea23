"""Recipe: Google Landmarks v2 (train/index/test tars, md5-checked, + metadata CSVs); ``download_dataset.sh``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from delg.data.gldv2_layout import image_path, read_train_clean
from delg.download.archives import scan_archive
from delg.download.errors import DatasetFormatError
from delg.download.fetch import Fetcher, md5_of, parse_md5
from delg.download.jobs import RunReport, _log, _run_jobs, _write_marker

# --- official locations (cvdfoundation/google-landmark README, filipradenovic/revisitop python/download.py) ---
GLDV2_BASE_URL = "https://s3.amazonaws.com/google-landmark"
GLDV2_SPLITS = {"train": 500, "index": 100, "test": 20}  # number of tars of each split
# Metadata per split, as paths under the base URL.  The v2.1 solutions live under ground_truth/, not metadata/.
GLDV2_METADATA = {
    "train": [
        "metadata/train.csv",
        "metadata/train_clean.csv",
        "metadata/train_attribution.csv",
        "metadata/train_label_to_category.csv",
    ],
    "index": [
        "metadata/index.csv",
        "metadata/index_image_to_landmark.csv",
        "metadata/index_label_to_category.csv",
    ],
    "test": [
        "metadata/test.csv",
        "ground_truth/retrieval_solution_v2.1.csv",
        "ground_truth/recognition_solution_v2.1.csv",
    ],
}


def train_clean_report(root: Path) -> dict[str, Any]:
    """Which images of ``train_clean.csv`` are on disk; writes the missing ids to ``train_clean_missing.txt``."""
    ids = [i for i, _ in read_train_clean(root / "train_clean.csv")]
    missing = [i for i in ids if not image_path(root / "train", i).is_file()]
    listing = root / "train_clean_missing.txt"
    listing.write_text("".join(f"{i}\n" for i in missing))
    return {"listed": len(ids), "present": len(ids) - len(missing), "missing": len(missing),
            "missing_list": str(listing)}


def download_gldv2(
    out: Path,
    counts: dict[str, int],
    base_url: str = GLDV2_BASE_URL,
    jobs: int = 6,
    fetcher: Fetcher | None = None,
    keep_tars: bool = False,
    overwrite: bool = False,
) -> RunReport:
    """Download, verify (md5) and extract GLDv2 tars and the metadata CSVs of the requested splits.

    Args:
        out: dataset folder; receives ``<split>/a/b/c/<id>.jpg``, the CSVs, ``tars/<split>/`` (archives and
            markers) and ``download_report.json``.
        counts: number of tars per split, e.g. ``{'train': 500, 'index': 100, 'test': 20}`` (first ``n`` tars).
        base_url: server root laid out like ``https://s3.amazonaws.com/google-landmark``.
        jobs: parallel downloads.
        fetcher: HTTP settings (retries, timeout, backoff, progress).
        keep_tars: keep each tar after extraction (default: delete it; its ``.extracted`` marker remains).
        overwrite: fetch the metadata again and extract every tar again (a kept tar is md5-checked, not refetched).

    Returns:
        The run report (also written to ``out/download_report.json``); ``report.exit_code`` is 1 on failures.
    """
    fetcher = fetcher or Fetcher()
    base_url = base_url.rstrip("/")
    for split, n in counts.items():
        if split not in GLDV2_SPLITS or not 0 <= n <= GLDV2_SPLITS[split]:
            raise ValueError(f"GLDv2 split '{split}': number of tars must be in 0..{GLDV2_SPLITS.get(split)}, got {n}")
    out.mkdir(parents=True, exist_ok=True)
    report = RunReport("gldv2", out, settings={
        "counts": dict(counts), "base_url": base_url, "jobs": jobs, "keep_tars": keep_tars, "overwrite": overwrite,
        "retries": fetcher.retries, "timeout": fetcher.timeout})
    job_list: list[tuple[str, Callable[[], bool]]] = []

    def metadata_job(rel: str) -> Callable[[], bool]:
        def run() -> bool:
            dest = out / PurePosixPath(rel).name
            if dest.is_file() and not overwrite:
                return True
            dest.unlink(missing_ok=True)
            fetcher.fetch(f"{base_url}/{rel}", dest, verify=lambda p: None if p.stat().st_size else f"{rel}: empty")
            return False

        return run

    def tar_job(split: str, i: int) -> Callable[[], bool]:
        def run() -> bool:
            name = f"images_{i:03d}.tar"
            tdir = out / "tars" / split
            tar_path, verified, extracted = tdir / name, tdir / f"{name}.md5ok", tdir / f"{name}.extracted"
            if extracted.is_file() and not overwrite:
                return True
            md5_url = f"{base_url}/md5sum/{split}/md5.images_{i:03d}.txt"
            expected = parse_md5(fetcher.read_text(md5_url), md5_url)
            if tar_path.is_file() and not (verified.is_file() and verified.read_text().strip() == expected):
                # A tar without its marker (copied in by hand, or the marker was lost): check it before refetching.
                if md5_of(tar_path) != expected:
                    tar_path.unlink()
            if not tar_path.is_file():

                def check(p: Path) -> str | None:
                    got = md5_of(p)
                    return None if got == expected else f"md5 mismatch (expected {expected}, got {got})"

                fetcher.fetch(f"{base_url}/{split}/{name}", tar_path, verify=check)
            verified.write_text(expected + "\n")
            stats = scan_archive(tar_path, out / split)
            _write_marker(extracted, {"files": stats.files, "md5": expected, "skipped": stats.skipped[:20]})
            if not keep_tars:
                tar_path.unlink()
                verified.unlink(missing_ok=True)
            return False

        return run

    for split, n in counts.items():
        if n > 0:
            job_list += [(rel, metadata_job(rel)) for rel in GLDV2_METADATA[split]]
    for split, n in counts.items():
        job_list += [(f"{split}/images_{i:03d}.tar", tar_job(split, i)) for i in range(n)]

    _log(f"GLDv2: {', '.join(f'{n} {s} tar(s)' for s, n in counts.items())} from {base_url} into {out}")
    _run_jobs(job_list, jobs, report, fetcher)

    if counts.get("train", 0) > 0 and (out / "train_clean.csv").is_file():
        try:
            report.checks["train_clean.csv"] = train_clean_report(out)
        except DatasetFormatError as e:
            report.fail("train_clean.csv", str(e))
    report.write(out / "download_report.json")
    return report
