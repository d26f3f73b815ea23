#!/usr/bin/env bash
# Fine-tune DELG (train_ce: see configs/train_ce.yaml). Extra arguments are config overrides or another --config:
#   bash train_delg.sh                                   # efficientnet_lite0 on the embedded benchmark, 3 epochs (CPU: minutes)
#   bash train_delg.sh train.epochs=10 output_dir=logs/x
#   bash train_delg.sh --config configs/paper/r50_gldv2_ce.yaml     # paper setting on GLDv2-clean (GPU)
#   torchrun --nproc_per_node 4 -m delg.train --config configs/train_ce.yaml  # several GPUs (DDP)
# Resumes from <output_dir>/checkpoints/last.pth; use the result with model.checkpoint=<that file>.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m delg.train --config configs/train_ce.yaml "$@"
