#!/usr/bin/env bash
# Fine-tune DELG (train_supcon: see configs/train_supcon.yaml). Extra arguments are config overrides or another --config:
#   bash train_supcon_delg.sh                                   # efficientnet_lite0 on the embedded benchmark, 3 epochs (CPU: minutes)
#   bash train_supcon_delg.sh train.epochs=10 output_dir=logs/x
#   bash train_supcon_delg.sh --config configs/paper/r50_gldv2_supcon.yaml     # paper setting on GLDv2-clean (GPU)
#   bash train_supcon_delg.sh --config configs/paper/seed_r50_delg_s512.yaml   # SupCon from logs/r50_delg_s512.pyth
#   torchrun --nproc_per_node 4 -m delg.train --config configs/train_supcon.yaml  # several GPUs (DDP)
# Resumes from <output_dir>/checkpoints/last.pth; use the result with model.checkpoint=<that file>.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m delg.train --config configs/train_supcon.yaml "$@"
