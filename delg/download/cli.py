"""Robust dataset downloads: GLDv2 (train/index/test tars + metadata) and Revisited Oxford/Paris (+ 1M distractors).

The command line of :mod:`delg.download` (``python -m delg.download {gldv2,revisitop}``): flags or the project's
``key=value`` overrides, translated into a recipe call; the first paragraph above is its ``--help`` description."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from delg.download.fetch import Fetcher
from delg.download.gldv2 import GLDV2_BASE_URL, GLDV2_SPLITS, download_gldv2
from delg.download.revisitop import REVISITOP1M_PARTS, REVISITOP_IMAGES, download_revisitop

REPO_ROOT = Path(__file__).resolve().parents[2]


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
