"""``python -m delg.train --config configs/train_ce.yaml [key=value ...]`` (also under torchrun)."""

from __future__ import annotations

import sys

from delg.config import run_stage


def cli(argv: list[str] | None = None) -> int:
    from delg.train.trainer import main

    doc = f"{__doc__}\nSettings: delg/conf/train.yaml (train.*), delg/conf/loss.yaml (loss.*), delg/conf/model.yaml (model.*)"
    return run_stage(main, sys.argv[1:] if argv is None else argv, doc)


if __name__ == "__main__":
    sys.exit(cli())
