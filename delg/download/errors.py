"""What can go wrong in a download run: the errors every part of :mod:`delg.download` raises or reports."""

from __future__ import annotations

from delg.data.gldv2_layout import GLDv2Error
from delg.errors import ProjectError

# A downloaded label file is malformed: the GLDv2 layout's own error (names the file, the line and the field).
DatasetFormatError = GLDv2Error


class DownloadError(ProjectError, RuntimeError):
    """A file could not be fetched or verified; the message names the URL (or file) and the reason."""


class BadArchiveError(ProjectError, RuntimeError):
    """An archive is damaged, truncated or unsafe (a member escapes the target folder); names the file."""



class Cancelled(Exception):
    """The run was interrupted (Ctrl-C); workers stop at the next chunk and keep their ``.part`` files."""



def _one_line(e: BaseException) -> str:
    """``Type: message`` on one line (tarfile's open error spans several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
