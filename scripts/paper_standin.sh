#!/usr/bin/env bash
# Every configs/paper/*.yaml end to end on this machine at stand-in scale (random weights, small generated images
# under the real revisitop names and ground truth of ../shared/data, a +1M stand-in, a GLDv2 stand-in):
#   bash scripts/paper_standin.sh --out DIR                      # all configs (< 20 min on 2 CPU cores)
#   bash scripts/paper_standin.sh --out DIR --quick              # the CI subset (a few minutes)
#   bash scripts/paper_standin.sh --out DIR configs=roxford5k_seed_r50,rparis6k_r1m_r101 db_per_query=all
#   bash scripts/paper_standin.sh --out DIR --quick device=cuda  # CUDA paths (autocast extraction, GPU FAISS)
# Writes DIR/<config>/results.json per config and DIR/standin.json; prints one line per config; exits 1 when any
# config failed.  Other dotted key=value settings are passed to every config.  Logic: delg/paper_standin.py.
# Real ground truth: $SHARED_DATA/revisitop/gnd_{roxford5k,rparis6k}.pkl (default: ../shared/data beside the repo).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m delg.paper_standin "$@"
