"""Robust dataset downloads: GLDv2 (train/index/test tars + metadata) and Revisited Oxford/Paris (+ 1M distractors).

Two subcommands, each behind a thin shell script::

    bash download_dataset.sh 500 100 20 -j 6          # python -m delg.download gldv2 500 100 20 -j 6
    bash scripts/download_revisitop.sh --distractors  # python -m delg.download revisitop --distractors

What makes them robust:

* every request has a timeout; transient errors (timeouts, resets, 5xx) are retried with exponential backoff,
  permanent ones (404/403/410) are not;
* a file is written to ``<name>.part`` and renamed only once it is complete and verified, so a file without
  ``.part`` is always whole; an interrupted ``.part`` is resumed with an HTTP ``Range`` request when the server
  honours it, and fetched again from the start when it does not;
* GLDv2 tars are checked against the official md5 files; revisitop publishes no checksums, so its archives are
  read completely (gzip CRC + every tar member) before extraction and the extracted images are checked against
  the lists of the ground truth (``gnd_<name>.pkl``) / ``revisitop1m.txt``;
* extraction refuses members that would land outside the target folder and writes an ``.extracted`` marker per
  archive, so a rerun skips finished archives without touching the network;
* every failure is collected and listed at the end; the exit status is 1 when any remains (2: bad arguments,
  130: interrupted).  A JSON report is written next to the data.

Only the standard library (urllib, hashlib, tarfile, concurrent.futures) and tqdm are used.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from tqdm import tqdm

from delg.errors import ProjectError

REPO_ROOT = Path(__file__).resolve().parent.parent

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
REVISITOP_GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets"  # <url>/<name>/gnd_<name>.pkl
REVISITOP_IMAGES = {  # images are hosted by the original Oxford VGG pages (face-blurred "-v1" archives)
    "roxford5k": ("https://www.robots.ox.ac.uk/~vgg/data/oxbuildings", ["oxbuild_images-v1.tgz"]),
    "rparis6k": ("https://www.robots.ox.ac.uk/~vgg/data/parisbuildings", ["paris_1-v1.tgz", "paris_2-v1.tgz"]),
}
REVISITOP1M_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"  # jpg/revisitop1m.<k>.tar.gz, revisitop1m.txt
REVISITOP1M_PARTS = 100

USER_AGENT = "landmark-retrieval-downloader/0.1 (+python-urllib)"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
PERMANENT_HTTP = {400, 401, 403, 404, 410}  # retrying cannot help (S3 answers 403 for a missing key)
CHUNK = 1 << 20
_GLDV2_ID = re.compile(r"[0-9A-Za-z]{3,64}")
_MD5 = re.compile(r"\b([0-9a-fA-F]{32})\b")


class DownloadError(ProjectError, RuntimeError):
    """A file could not be fetched or verified; the message names the URL (or file) and the reason."""


class BadArchiveError(ProjectError, RuntimeError):
    """An archive is damaged, truncated or unsafe (a member escapes the target folder); names the file."""


class DatasetFormatError(ProjectError, ValueError):
    """A downloaded metadata file is malformed; the message names the file, the line and the field."""


class Cancelled(Exception):
    """The run was interrupted (Ctrl-C); workers stop at the next chunk and keep their ``.part`` files."""


class _Corrupt(Exception):
    """A complete download failed verification (md5 mismatch, unreadable archive); fetch it again from scratch."""


class IncompleteDownload(OSError):
    """The connection ended before Content-Length bytes arrived (retried, resumed from the ``.part``)."""


TRANSIENT = (OSError, http.client.HTTPException)  # URLError, timeouts, resets, IncompleteRead, ...


def _describe(e: BaseException) -> str:
    if isinstance(e, HTTPError):
        return f"HTTP {e.code} {e.reason}"
    reason = getattr(e, "reason", None)
    return f"{type(e).__name__}: {reason if reason is not None else e}"


def _one_line(e: BaseException) -> str:
    """``Type: message`` on one line (tarfile's open error spans several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """``'bytes 100-199/200'`` -> ``(100, 200)``; ``'bytes */200'`` -> ``(None, 200)``; unknown parts -> None."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", header or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def md5_of(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def parse_md5(text: str, source: str) -> str:
    """The first 32-hex-digit token of an md5 file (``md5sum`` output: ``<md5>  <file name>``)."""
    m = _MD5.search(text)
    if m is None:
        raise DownloadError(f"{source}: no md5 checksum in the file (got {text[:60]!r})")
    return m.group(1).lower()


@dataclass
class Fetcher:
    """HTTP GET with timeouts, retries with exponential backoff, ``.part`` files and ``Range`` resume.

    ``retries`` is the number of attempts per file (>= 1); the wait before attempt ``k + 1`` is
    ``backoff * 2 ** (k - 1)`` seconds (capped at 60).
    """

    retries: int = 3
    timeout: float = 60.0
    backoff: float = 2.0
    progress: bool = True
    stop: threading.Event = field(default_factory=threading.Event)

    def _request(self, url: str, offset: int = 0) -> Request:
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        return Request(url, headers=headers)

    def _wait(self, attempt: int) -> None:
        if attempt < self.retries and self.backoff > 0:
            # Event.wait instead of sleep so that Ctrl-C does not wait for the backoff to end.
            self.stop.wait(min(self.backoff * 2 ** (attempt - 1), 60.0))
        if self.stop.is_set():
            raise Cancelled

    def read_text(self, url: str) -> str:
        """A small file (md5 sums, lists) as text."""
        last = "no attempt"
        for attempt in range(1, self.retries + 1):
            try:
                with urlopen(self._request(url), timeout=self.timeout) as resp:
                    return resp.read().decode("utf-8", "replace")
            except HTTPError as e:
                if e.code in PERMANENT_HTTP:
                    raise DownloadError(f"{url}: {_describe(e)}") from None
                last = _describe(e)
            except TRANSIENT as e:
                last = _describe(e)
            self._wait(attempt)
        raise DownloadError(f"{url}: {last} (after {self.retries} attempts)")

    def fetch(self, url: str, dest: Path, verify: Callable[[Path], str | None] | None = None) -> Path:
        """Download ``url`` to ``dest`` through ``dest.part``; ``verify(part)`` returns a problem or None.

        A ``.part`` left by an earlier run is resumed.  A file that fails ``verify`` is deleted and fetched again
        from scratch (never resumed).  Raises :class:`DownloadError` when all attempts fail.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = _part(dest)
        last = "no attempt"
        for attempt in range(1, self.retries + 1):
            try:
                self._fetch_once(url, part, dest.name)
                problem = verify(part) if verify is not None else None
                if problem:
                    part.unlink(missing_ok=True)
                    raise _Corrupt(problem)
                os.replace(part, dest)
                return dest
            except HTTPError as e:
                if e.code in PERMANENT_HTTP:
                    raise DownloadError(f"{url}: {_describe(e)}") from None
                last = _describe(e)
            except _Corrupt as e:
                last = str(e)
            except TRANSIENT as e:
                last = _describe(e)
            self._wait(attempt)
        raise DownloadError(f"{url}: {last} (after {self.retries} attempts)")

    def _fetch_once(self, url: str, part: Path, label: str) -> None:
        offset = part.stat().st_size if part.exists() else 0
        try:
            resp = urlopen(self._request(url, offset), timeout=self.timeout)
        except HTTPError as e:
            if e.code == 416 and offset:
                _, total = _content_range(e.headers.get("Content-Range"))
                e.close()
                if total == offset:
                    return  # the .part is already whole; verification decides
                part.unlink()  # longer than the file (it changed upstream?): start over
                return self._fetch_once(url, part, label)
            raise
        with resp:
            if offset and resp.status == 206:
                start, _ = _content_range(resp.headers.get("Content-Range"))
                if start != offset:
                    resp.close()
                    part.unlink()
                    return self._fetch_once(url, part, label)
                mode = "ab"
            else:
                offset, mode = 0, "wb"  # the server ignored Range (200): fetch the whole file again
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            bar = tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                leave=False, disable=True if not self.progress else None, file=sys.stderr,
            )
            # read1 returns what has arrived (up to CHUNK): smooth progress and a prompt reaction to Ctrl-C.
            read = getattr(resp, "read1", resp.read)
            with part.open(mode) as f, bar:
                while True:
                    if self.stop.is_set():
                        raise Cancelled
                    buf = read(CHUNK)
                    if not buf:
                        break
                    f.write(buf)
                    bar.update(len(buf))
        size = part.stat().st_size
        if total is not None and size != total:
            raise IncompleteDownload(f"connection closed after {size} of {total} bytes")


# ------------------------------------------------------------------------------------------------ archives


@dataclass
class ArchiveStats:
    """What :func:`scan_archive` read (and wrote): regular files, images among them, and members left out."""

    files: int = 0
    images: int = 0
    skipped: list[str] = field(default_factory=list)  # links, devices, non-images when only images are kept


def _member_path(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The member's path relative to the target folder; refuses absolute paths and ``..`` (path traversal)."""
    name = member.name.replace("\\", "/")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", name):
        raise BadArchiveError(f"{archive}: member '{member.name}' would be written outside the target folder")
    return PurePosixPath(*[x for x in p.parts if x not in ("", ".")])


def scan_archive(path: Path, dest: Path | None = None, flatten: bool = False, only_images: bool = False) -> ArchiveStats:
    """Read a tar / tar.gz completely; with ``dest``, write its regular files under ``dest``.

    Args:
        path: the archive (compression detected from the content).
        dest: target folder, or None to only check that the archive reads completely.
        flatten: write ``dest/<basename>`` instead of keeping the member's folders (Oxford/Paris ``jpg/``).
        only_images: skip members that are not images (counted in ``skipped``).

    Symlinks, hard links and devices are never written (counted in ``skipped``).  The stream is read to its end
    so that gzip checks its CRC and length trailer: a truncated or corrupted ``.tar.gz`` raises here.

    Raises:
        BadArchiveError: damaged / truncated archive, or a member escaping ``dest`` (nothing more is written).
    """
    stats = ArchiveStats()
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise BadArchiveError(f"{path}: not a readable tar archive ({_one_line(e)})") from None
    with tar:
        try:
            for member in tar:
                rel = _member_path(member, path)
                if member.isdir() or not rel.parts:
                    continue
                if not member.isfile():
                    stats.skipped.append(member.name)
                    continue
                is_image = rel.suffix.lower() in IMAGE_SUFFIXES
                if only_images and not is_image:
                    stats.skipped.append(member.name)
                    continue
                src = tar.extractfile(member)
                if src is None:  # cannot happen for a regular file; keeps the type checker honest
                    raise BadArchiveError(f"{path}: member '{member.name}' has no data")
                if dest is None:
                    while src.read(CHUNK):
                        pass
                else:
                    target = dest / (rel.name if flatten else Path(*rel.parts))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with target.open("wb") as f:
                        shutil.copyfileobj(src, f, CHUNK)
                stats.files += 1
                stats.images += is_image
            while tar.fileobj is not None and tar.fileobj.read(CHUNK):
                pass
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise BadArchiveError(f"{path}: damaged or truncated archive ({_one_line(e)})") from None
    return stats


def _archive_problem(path: Path) -> str | None:
    """Verification of archives that have no published checksum: they must read completely and hold images."""
    try:
        stats = scan_archive(path)
    except BadArchiveError as e:
        return str(e)
    if stats.images == 0:
        return f"{path}: archive holds no images"
    return None


# ------------------------------------------------------------------------------------------------ reporting


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
        return path

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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ GLDv2


def gldv2_image_path(root: Path, split: str, image_id: str) -> Path:
    """``<root>/<split>/a/b/c/<id>.jpg``, the layout of the GLDv2 tars (a, b, c: first letters of the id)."""
    return root / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def read_train_clean(path: Path) -> list[str]:
    """Image ids of ``train_clean.csv`` (``landmark_id,images``; images separated by spaces), in file order."""
    ids: list[str] = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["landmark_id", "images"]:
            raise DatasetFormatError(f"{path}: line 1: header must be 'landmark_id,images', got {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 2:
                raise DatasetFormatError(f"{path}: line {lineno}: field 'images' is missing")
            for image_id in row[1].split():
                if not _GLDV2_ID.fullmatch(image_id):
                    raise DatasetFormatError(f"{path}: line {lineno}: field 'images': bad image id {image_id!r}")
                ids.append(image_id)
    return ids


def train_clean_report(root: Path) -> dict[str, Any]:
    """Which images of ``train_clean.csv`` are on disk; writes the missing ids to ``train_clean_missing.txt``."""
    ids = read_train_clean(root / "train_clean.csv")
    missing = [i for i in ids if not gldv2_image_path(root, "train", i).is_file()]
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


# ------------------------------------------------------------------------------------------------ revisitop


def revisitop_url(kind: str, name: str, file: str, base_url: str | None = None) -> str:
    """URL of a revisitop file.  ``kind``: 'gnd' | 'images' | 'r1m' (distractor tars) | 'r1m_list'.

    With ``base_url`` (a mirror, or a test server) every file comes from one tree:
    ``<base>/<name>/gnd_<name>.pkl``, ``<base>/<name>/jpg/<archive>``, ``<base>/revisitop1m/jpg/<tar>``,
    ``<base>/revisitop1m/revisitop1m.txt``.  Without it, the official hosts are used.
    """
    if base_url:
        b = base_url.rstrip("/")
        return {"gnd": f"{b}/{name}/{file}", "images": f"{b}/{name}/jpg/{file}",
                "r1m": f"{b}/revisitop1m/jpg/{file}", "r1m_list": f"{b}/revisitop1m/{file}"}[kind]
    if kind == "gnd":
        return f"{REVISITOP_GND_URL}/{name}/{file}"
    if kind == "images":
        return f"{REVISITOP_IMAGES[name][0]}/{file}"
    if kind == "r1m":
        return f"{REVISITOP1M_URL}/jpg/{file}"
    if kind == "r1m_list":
        return f"{REVISITOP1M_URL}/{file}"
    raise ValueError(f"unknown revisitop file kind '{kind}'")


def _gnd_names(path: Path) -> list[str]:
    """Database + query image names of a ground-truth file (read with the project's safe reader)."""
    from delg.data.revisitop import read_gnd  # numpy import is only paid when a gnd file is checked

    gnd = read_gnd(path)
    return [*gnd.imlist, *gnd.qimlist]


def _gnd_problem(path: Path, name: str) -> str | None:
    """Check a downloaded ``gnd_<name>.pkl`` (possibly still called ``.part``) with the project's reader."""
    try:
        if path.name != name:
            # read_gnd dispatches on the file name: check a copy under the final name (the file is small).
            with tempfile.TemporaryDirectory(prefix="gnd_check_") as tmp:
                shutil.copyfile(path, Path(tmp) / name)
                names = _gnd_names(Path(tmp) / name)
        else:
            names = _gnd_names(path)
    except (ValueError, OSError) as e:  # GroundTruthError is a ValueError
        return f"unreadable ground truth ({e})"
    return None if names else f"{path}: ground truth lists no images"


def _extract_archive_job(
    fetcher: Fetcher, url: str, archive: Path, dest: Path, flatten: bool, keep: bool, overwrite: bool = False
) -> Callable[[], bool]:
    """Download (checked with :func:`_archive_problem`) and extract one revisitop archive; resumable."""

    def run() -> bool:
        marker = archive.with_name(archive.name + ".extracted")
        if marker.is_file() and not overwrite:
            return True
        if not archive.is_file():
            fetcher.fetch(url, archive, verify=_archive_problem)
        try:
            stats = scan_archive(archive, dest, flatten=flatten, only_images=flatten)
        except BadArchiveError:
            archive.unlink()  # fetched again on the next run
            raise
        _write_marker(marker, {"files": stats.files, "images": stats.images, "skipped": stats.skipped[:20]})
        if not keep:
            archive.unlink()
        return False

    return run


def _present(root: Path, rel: str) -> bool:
    p = root / rel
    return p.is_file() or (not PurePosixPath(rel).suffix and p.with_name(p.name + ".jpg").is_file())


def download_revisitop(
    out: Path,
    names: Sequence[str] = ("roxford5k", "rparis6k"),
    distractor_parts: int = 0,
    base_url: str | None = None,
    jobs: int = 4,
    fetcher: Fetcher | None = None,
    keep_archives: bool = False,
    overwrite: bool = False,
) -> RunReport:
    """Download Revisited Oxford/Paris (images + ``gnd_<name>.pkl``) and optionally the 1M distractors.

    Args:
        out: receives ``<name>/jpg/*.jpg`` (flat), ``<name>/gnd_<name>.pkl``, ``<name>/archives/`` (markers),
            ``revisitop1m/jpg/...`` + ``revisitop1m/revisitop1m.txt`` and ``download_report.json``.
        names: datasets among ``roxford5k``, ``rparis6k``.
        distractor_parts: number of ``revisitop1m.<k>.tar.gz`` parts (0: none, 100: all ~1M images).
        base_url: one-tree mirror (see :func:`revisitop_url`); None: the official hosts.
        jobs: parallel downloads.
        fetcher: HTTP settings.
        keep_archives: keep archives after extraction (default: delete; the ``.extracted`` marker remains).
        overwrite: fetch the small files again and extract every archive again (a kept archive is not refetched).

    Returns:
        The run report (also ``out/download_report.json``): every image listed in a ground truth must be in
        ``<name>/jpg/``; with all 100 distractor parts every line of ``revisitop1m.txt`` must be present.
    """
    fetcher = fetcher or Fetcher()
    for name in names:
        if name not in REVISITOP_IMAGES:
            raise ValueError(f"unknown revisitop dataset '{name}' (choose from {', '.join(REVISITOP_IMAGES)})")
    if not 0 <= distractor_parts <= REVISITOP1M_PARTS:
        raise ValueError(f"distractor parts must be in 0..{REVISITOP1M_PARTS}, got {distractor_parts}")
    out.mkdir(parents=True, exist_ok=True)
    report = RunReport("revisitop", out, settings={
        "datasets": list(names), "distractor_parts": distractor_parts, "base_url": base_url or "official hosts",
        "jobs": jobs, "keep_archives": keep_archives, "overwrite": overwrite, "retries": fetcher.retries,
        "timeout": fetcher.timeout})
    job_list: list[tuple[str, Callable[[], bool]]] = []

    def small_file_job(url: str, dest: Path, verify: Callable[[Path], str | None] | None) -> Callable[[], bool]:
        def run() -> bool:
            if dest.is_file() and not overwrite and (verify is None or verify(dest) is None):
                return True
            dest.unlink(missing_ok=True)
            fetcher.fetch(url, dest, verify=verify)
            return False

        return run

    for name in names:
        gnd_file = f"gnd_{name}.pkl"
        job_list.append((f"{name}/{gnd_file}", small_file_job(
            revisitop_url("gnd", name, gnd_file, base_url), out / name / gnd_file,
            lambda p, f=gnd_file: _gnd_problem(p, f))))
        for arc in REVISITOP_IMAGES[name][1]:
            job = _extract_archive_job(fetcher, revisitop_url("images", name, arc, base_url),
                                       out / name / "archives" / arc, out / name / "jpg", True, keep_archives,
                                       overwrite)
            job_list.append((f"{name}/{arc}", job))
    r1m = out / "revisitop1m"
    if distractor_parts:
        job_list.append(("revisitop1m/revisitop1m.txt", small_file_job(
            revisitop_url("r1m_list", "revisitop1m", "revisitop1m.txt", base_url), r1m / "revisitop1m.txt", None)))
        for k in range(1, distractor_parts + 1):
            tar_name = f"revisitop1m.{k}.tar.gz"
            job = _extract_archive_job(fetcher, revisitop_url("r1m", "revisitop1m", tar_name, base_url),
                                       r1m / "archives" / tar_name, r1m / "jpg", False, keep_archives,
                                       overwrite)
            job_list.append((f"revisitop1m/{tar_name}", job))

    _log(f"revisitop: {', '.join(names)}{f' + {distractor_parts} distractor part(s)' if distractor_parts else ''}"
         f" from {base_url or 'the official hosts'} into {out}")
    _run_jobs(job_list, jobs, report, fetcher)

    failed = {f["item"] for f in report.failures}
    for name in names:
        gnd_path = out / name / f"gnd_{name}.pkl"
        if not gnd_path.is_file():
            continue
        try:
            listed = _gnd_names(gnd_path)
        except (ValueError, OSError) as e:
            report.fail(f"{name}/gnd_{name}.pkl", f"unreadable ground truth ({e})")
            continue
        missing = [n for n in listed if not (out / name / "jpg" / f"{n}.jpg").is_file()]
        listing = out / name / "missing.txt"
        listing.write_text("".join(f"{n}\n" for n in missing))
        report.checks[name] = {"listed": len(listed), "present": len(listed) - len(missing),
                               "missing": len(missing), "missing_list": str(listing)}
        if missing and not any(item.startswith(f"{name}/") for item in failed):
            report.fail(f"{name}/jpg", f"{len(missing)} of {len(listed)} images listed in gnd_{name}.pkl are not in "
                                       f"{out / name / 'jpg'} (see {listing})")
    if distractor_parts:
        markers = sorted((r1m / "archives").glob("revisitop1m.*.tar.gz.extracted"))
        extracted = sum(json.loads(m.read_text()).get("images", 0) for m in markers)
        check: dict[str, Any] = {"parts_requested": distractor_parts, "parts_extracted": len(markers),
                                 "images_extracted": extracted}
        list_path = r1m / "revisitop1m.txt"
        if list_path.is_file():
            listed_r1m = [ln.strip() for ln in list_path.read_text().splitlines() if ln.strip()]
            missing_r1m = [n for n in listed_r1m if not _present(r1m / "jpg", n)]
            listing = r1m / "missing.txt"
            listing.write_text("".join(f"{n}\n" for n in missing_r1m))
            check.update(listed=len(listed_r1m), present=len(listed_r1m) - len(missing_r1m),
                         missing=len(missing_r1m), missing_list=str(listing))
            # With only some parts requested most of the list is legitimately absent: report, do not fail.
            if missing_r1m and distractor_parts == REVISITOP1M_PARTS and not any(
                    item.startswith("revisitop1m/") for item in failed):
                report.fail("revisitop1m/jpg", f"{len(missing_r1m)} of {len(listed_r1m)} images listed in "
                                               f"revisitop1m.txt are missing (see {listing})")
        report.checks["revisitop1m"] = check
    report.write(out / "download_report.json")
    return report


# ------------------------------------------------------------------------------------------------ CLI


def _common_args(p: argparse.ArgumentParser, default_jobs: int) -> None:
    p.add_argument("-j", "--jobs", type=int, default=default_jobs, help="parallel downloads (default %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="output folder (overrides the environment variable)")
    p.add_argument("--base-url", default=None, help="server root (overrides the environment variable)")
    p.add_argument("--retries", type=int, default=3, help="attempts per file (default %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a request fails")
    p.add_argument("--backoff", type=float, default=2.0, help="first wait between attempts, doubled each time (s)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--overwrite", action="store_true", help="fetch small files and extract archives again")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m delg.download", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gldv2", help="Google Landmarks v2 (download_dataset.sh)",
                       description="GLDv2 tars (md5-checked) + metadata. Env: GLDV2_BASE_URL, GLDV2_DIR.")
    for split, n in GLDV2_SPLITS.items():
        g.add_argument(f"n_{split}", type=int, nargs="?", default=n,
                       help=f"number of {split} tars, 0..{n} (default {n})")
    g.add_argument("--keep-tars", action="store_true", help="keep tars after extraction")
    _common_args(g, 6)
    r = sub.add_parser("revisitop", help="Revisited Oxford/Paris + 1M distractors (scripts/download_revisitop.sh)",
                       description="roxford5k/rparis6k images + gnd, optional R1M. Env: REVISITOP_BASE_URL, "
                                   "REVISITOP_DIR.")
    r.add_argument("--datasets", nargs="*", default=["roxford5k", "rparis6k"], choices=sorted(REVISITOP_IMAGES),
                   help="default: both; '--datasets' with no name: distractors only")
    r.add_argument("--distractors", type=int, nargs="?", const=REVISITOP1M_PARTS, default=0, metavar="PARTS",
                   help=f"also the 1M distractors: the first PARTS of {REVISITOP1M_PARTS} tars (default: all)")
    r.add_argument("--keep-archives", action="store_true", help="keep archives after extraction")
    _common_args(r, 4)
    return parser


# ``key=value`` arguments (the project's override style, as every other script takes) -> this CLI's flags.
OVERRIDE_FLAGS = {
    "output_dir": "--out", "jobs": "--jobs", "base_url": "--base-url", "retries": "--retries",
    "timeout": "--timeout", "backoff": "--backoff", "progress": "--no-progress", "overwrite": "--overwrite",
    "keep_tars": "--keep-tars", "keep_archives": "--keep-archives", "datasets": "--datasets",
    "distractors": "--distractors",
}
_NEGATED = {"progress"}  # progress=false -> --no-progress


def overrides_to_flags(argv: Sequence[str]) -> list[str]:
    """``['output_dir=D', 'overwrite=true', '-j', '4']`` -> ``['--out', 'D', '--overwrite', '-j', '4']``.

    Raises:
        ConfigError: an unknown key (naming the nearest valid one) or a flag key given a non-boolean value.
    """
    import difflib

    from delg.config import ConfigError, parse_override

    out: list[str] = []
    for a in argv:
        if a.startswith("-") or "=" not in a:
            out.append(a)
            continue
        key, value = parse_override(a)
        if key not in OVERRIDE_FLAGS:
            near = difflib.get_close_matches(key, OVERRIDE_FLAGS, n=1, cutoff=0) or ["output_dir"]
            raise ConfigError(f"unknown setting '{key}' (nearest valid key: '{near[0]}'; valid: "
                              f"{', '.join(OVERRIDE_FLAGS)})")
        flag = OVERRIDE_FLAGS[key]
        if key in _NEGATED or key in ("overwrite", "keep_tars", "keep_archives"):
            if not isinstance(value, bool):
                raise ConfigError(f"{key}: expected true or false, got {value!r}")
            if value != (key in _NEGATED):
                out.append(flag)
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 failures remain, 2 bad arguments, 130 interrupted).

    Takes flags (``--out DIR``) or the project's overrides (``output_dir=DIR overwrite=true jobs=4``)."""
    from delg.config import ConfigError

    parser = build_parser()
    try:
        argv = overrides_to_flags(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        parser.error(str(e))
    args = parser.parse_args(argv)
    if args.retries < 1 or args.jobs < 1 or args.timeout <= 0 or args.backoff < 0:
        parser.error("--retries and -j must be >= 1, --timeout > 0, --backoff >= 0")
    fetcher = Fetcher(retries=args.retries, timeout=args.timeout, backoff=args.backoff, progress=not args.no_progress)
    try:
        if args.command == "gldv2":
            out = args.out or Path(os.environ.get("GLDV2_DIR") or REPO_ROOT / "datasets" / "data" / "landmark")
            base = args.base_url or os.environ.get("GLDV2_BASE_URL") or GLDV2_BASE_URL
            counts = {"train": args.n_train, "index": args.n_index, "test": args.n_test}
            report = download_gldv2(out, counts, base, args.jobs, fetcher, args.keep_tars, args.overwrite)
        else:
            out = args.out or Path(os.environ.get("REVISITOP_DIR") or REPO_ROOT / "datasets" / "revisitop")
            base = args.base_url or os.environ.get("REVISITOP_BASE_URL") or None
            report = download_revisitop(out, args.datasets, args.distractors, base, args.jobs, fetcher,
                                        args.keep_archives, args.overwrite)
    except ValueError as e:  # bad input found while running: one line "error: ...", exit 2, as every entry point
        from delg.errors import report_error

        return report_error(e)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (.part files and finished archives are kept)",
              file=sys.stderr)
        return 130
    print(report.summary())
    print(f"report: {report.out / 'download_report.json'}")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
