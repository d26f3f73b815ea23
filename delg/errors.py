"""The one base class of the project's expected failures.

Every error raised for bad input or settings (a config key, a ground-truth file, a checkpoint, a store, a download)
derives from :class:`ProjectError` as well as from the builtin it specialises, and its message names the file and
the field.  The command-line entry points print such an error as one line on stderr and exit with status 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ProjectError(Exception):
    """An expected failure caused by input or settings; the message says which file / key and what is wrong."""


__all__ = ["ProjectError"]
