"""The HTTP layer: GET with timeouts, retries with exponential backoff, ``.part`` files and ``Range`` resume;
md5 helpers."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from tqdm import tqdm

from delg.download.errors import Cancelled, DownloadError

USER_AGENT = "landmark-retrieval-downloader/0.1 (+python-urllib)"
PERMANENT_HTTP = {400, 401, 403, 404, 410}  # retrying cannot help (S3 answers 403 for a missing key)
CHUNK = 1 << 20
_MD5 = re.compile(r"\b([0-9a-fA-F]{32})\b")


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


T = TypeVar("T")


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

    def _retrying(self, url: str, attempt_once: Callable[[], T]) -> T:
        """``attempt_once()`` until it returns, at most ``retries`` times: the one retry policy.

        Permanent HTTP errors stop at once; transient ones and :class:`_Corrupt` wait (backoff) and try again.
        Raises :class:`DownloadError` naming the URL and the last reason.
        """
        last = "no attempt"
        for attempt in range(1, self.retries + 1):
            try:
                return attempt_once()
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

    def read_text(self, url: str) -> str:
        """A small file (md5 sums, lists) as text."""

        def once() -> str:
            with urlopen(self._request(url), timeout=self.timeout) as resp:
                return resp.read().decode("utf-8", "replace")

        return self._retrying(url, once)

    def fetch(self, url: str, dest: Path, verify: Callable[[Path], str | None] | None = None) -> Path:
        """Download ``url`` to ``dest`` through ``dest.part``; ``verify(part)`` returns a problem or None.

        A ``.part`` left by an earlier run is resumed.  A file that fails ``verify`` is deleted and fetched again
        from scratch (never resumed).  Raises :class:`DownloadError` when all attempts fail.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = _part(dest)

        def once() -> Path:
            self._fetch_once(url, part, dest.name)
            problem = verify(part) if verify is not None else None
            if problem:
                part.unlink(missing_ok=True)
                raise _Corrupt(problem)
            os.replace(part, dest)  # not an atomic write of ours: the verified .part becomes the file
            return dest

        return self._retrying(url, once)

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
