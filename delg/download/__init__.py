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

Modules: :mod:`.fetch` (HTTP: retries, resume), :mod:`.archives` (checks, safe extraction), :mod:`.jobs` (the job
pool and the report), the recipes :mod:`.gldv2` and :mod:`.revisitop`, :mod:`.cli` (``python -m delg.download``).
GLDv2's image layout and ``train_clean.csv`` come from :mod:`delg.data.gldv2_layout`.  The names below stay
importable from ``delg.download``.
"""

from delg.data.gldv2_layout import read_train_clean
from delg.download.archives import ArchiveStats, scan_archive
from delg.download.cli import build_parser, main, overrides_to_flags
from delg.download.errors import BadArchiveError, Cancelled, DatasetFormatError, DownloadError
from delg.download.fetch import Fetcher, IncompleteDownload, _content_range, md5_of, parse_md5
from delg.download.gldv2 import (
    GLDV2_BASE_URL,
    GLDV2_METADATA,
    GLDV2_SPLITS,
    download_gldv2,
    train_clean_report,
)
from delg.download.jobs import RunReport
from delg.download.revisitop import (
    REVISITOP1M_PARTS,
    REVISITOP1M_URL,
    REVISITOP_GND_URL,
    REVISITOP_IMAGES,
    download_revisitop,
    revisitop_url,
)

__all__ = [
    "GLDV2_BASE_URL", "GLDV2_METADATA", "GLDV2_SPLITS", "REVISITOP1M_PARTS", "REVISITOP1M_URL", "REVISITOP_GND_URL",
    "REVISITOP_IMAGES", "ArchiveStats", "BadArchiveError", "Cancelled", "DatasetFormatError", "DownloadError",
    "Fetcher", "IncompleteDownload", "RunReport", "_content_range", "build_parser", "download_gldv2",
    "download_revisitop", "main", "md5_of", "overrides_to_flags", "parse_md5", "read_train_clean",
    "revisitop_url", "scan_archive", "train_clean_report",
]
