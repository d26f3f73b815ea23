#!/usr/bin/env bash
# GPU timing check (no dataset, random weights): bash scripts/gpu_check.sh [--out FILE] [--tiny]
# Runs with the machine's own python when no .venv is there (needs torch, timm, kornia; faiss optional).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3; [[ -x .venv/bin/python ]] && PY=.venv/bin/python
exec "$PY" -m delg.gpu_check "$@"
