"""``python -m delg.train --config configs/train_ce.yaml [key=value ...]`` (also under torchrun)."""

from __future__ import annotations

import sys

from delg.config import ConfigError, load_config, split_cli


def cli(argv: list[str] | None = None) -> int:
    path, overrides = split_cli(sys.argv[1:] if argv is None else argv)
    if "-h" in overrides or "--help" in overrides:
        print(__doc__)
        print("Settings: delg/conf/train.yaml (train.*), delg/conf/loss.yaml (loss.*), delg/conf/model.yaml (model.*)")
        return 0
    try:
        conf = load_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from delg.data.gldv2 import GLDv2Error
    from delg.model import ModelError
    from delg.train.losses import LossConfigError
    from delg.train.trainer import TrainConfigError, main

    try:
        main(conf)
    except (ConfigError, ModelError, LossConfigError, TrainConfigError, GLDv2Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
