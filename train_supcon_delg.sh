#!/usr/bin/env bash
# Fine-tune DELG with cross-entropy + SupCon (configs/train_supcon.yaml); the same trainer as train_delg.sh.
# Extra arguments are config overrides or another --config (the last --config wins):
#   bash train_supcon_delg.sh                                   # efficientnet_lite0 on the embedded benchmark, 3 epochs (CPU: minutes)
#   bash train_supcon_delg.sh train.epochs=10 output_dir=logs/x
#   bash train_supcon_delg.sh --config configs/paper/r50_gldv2_supcon.yaml     # paper setting on GLDv2-clean (GPU)
#   bash train_supcon_delg.sh --config configs/paper/seed_r50_delg_s512.yaml   # SupCon from logs/r50_delg_s512.pyth
#   torchrun --nproc_per_node 4 -m delg.train --config configs/train_supcon.yaml  # several GPUs (DDP)
# Resumes from <output_dir>/checkpoints/last.pth; use the result with model.checkpoint=<that file>.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/train_delg.sh" --config configs/train_supcon.yaml "$@"
