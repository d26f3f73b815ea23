#!/usr/bin/env bash
# Google Landmarks v2: download, md5-check and extract the first N train / index / test tars + the metadata CSVs.
#
#   bash download_dataset.sh 500 100 20            # everything (~1 TB of tars, extracted into datasets/data/landmark)
#   bash download_dataset.sh 5 1 1 -j 4            # a small slice; rerun the same command to resume or to retry failures
#   GLDV2_DIR=/big/disk/landmark bash download_dataset.sh 500 0 0 --keep-tars
#
# Env: GLDV2_BASE_URL (server root, default https://s3.amazonaws.com/google-landmark), GLDV2_DIR (output folder).
# All options: bash download_dataset.sh --help.  The logic is in delg/download/ (recipe: gldv2.py; python -m delg.download gldv2).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m delg.download gldv2 "$@"
