"""The one base class of the project's expected failures, and the one rule for printing them.

Every error raised for bad input or settings (a config key, a ground-truth file, a checkpoint, a store, a download)
derives from :class:`ProjectError` as well as from the builtin it specialises, and its message names the file and
the field.  Every command-line entry point (the stages through ``run_stage``, ``delg.evaluate``, ``delg.minibench``,
``delg.download``, ``delg.train``) prints such an error as one line ``error: <message>`` on stderr and exits with
status 2 (:func:`report_error`); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

EXIT_ERROR = 2  # the exit status of an expected failure, in every entry point


class ProjectError(Exception):
    """An expected failure caused by input or settings; the message says which file / key and what is wrong."""


class ConfigError(ProjectError, ValueError):
    """A config file, override or setting is invalid; the message names the key (and file) at fault."""


def report_error(e: BaseException | str) -> int:
    """Print an expected failure as one line ``error: ...`` on stderr; returns :data:`EXIT_ERROR`."""
    msg = " ".join(str(e).split("\n")).strip()  # one line, whatever the message holds
    if not msg.startswith("error: "):
        msg = f"error: {msg}"
    print(msg, file=sys.stderr)
    return EXIT_ERROR


__all__ = ["EXIT_ERROR", "ConfigError", "ProjectError", "report_error"]
