"""Build the embedded benchmark (see :mod:`delg.data.minibench`).

    python -m delg.minibench --out datasets/minibench/default
    python -m delg.minibench --out /tmp/mb --preset tiny --force
    python -m delg.minibench dataset.preset=tiny          # into conf.dataset.root or datasets/minibench/<preset>
    python -m delg.minibench output_dir=/tmp/mb           # the same as --out /tmp/mb
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from delg.config import Config, ConfigError, load_config, split_cli
from delg.data.minibench import PRESETS, MinibenchError, build, ensure_built
from delg.errors import report_error


def main(conf: Config) -> Path:
    """Build (if missing) the benchmark of ``conf.dataset`` and return its root."""
    return ensure_built(conf)


def cli(argv: list[str] | None = None) -> Path:
    """``--out DIR [--preset P] [--force]`` builds into DIR; without ``--out`` the config decides the folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m delg.minibench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="target folder (default: conf.dataset.root or datasets/minibench/<preset>)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="size preset (default: conf.dataset.preset)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (and --config FILE)")
    config_path, rest = split_cli(argv)
    args = parser.parse_intermixed_args(rest)
    conf = load_config(config_path, args.overrides)
    if args.preset:
        conf.dataset.preset = args.preset
    if conf.get("overwrite"):  # overwrite=true, as every script takes it: the same as --force
        args.force = True
    # output_dir=DIR (the project-wide override) is the same as --out DIR here: where the benchmark is built
    given = next((Path(a.split("=", 1)[1]) for a in args.overrides if a.startswith("output_dir=")), None)
    if args.out is None and given is not None:
        args.out = given
    if args.out is not None or args.force:
        out = args.out or (Path(conf.dataset.root) if conf.dataset.root else None)
        if out is None:
            from delg.data.minibench import default_root

            out = default_root(conf.dataset.preset)
        root = build(out, preset=conf.dataset.preset, force=args.force, progress=bool(conf.progress))
    else:
        root = main(conf)
    print(root)
    return root


if __name__ == "__main__":
    try:
        cli()
    except (ConfigError, MinibenchError) as e:
        sys.exit(report_error(e))  # one line "error: ...", exit 2, as every entry point
