#!/usr/bin/env bash
# Global search, reranking with each configured verifier, evaluation and report in one go.
#   bash perform_retrieval.sh [--config configs/demo.yaml] [key=value ...]
#   bash perform_retrieval.sh query=path/to/photo.jpg        # search with a new photo
# Paths given on the command line (query=, output_dir=, dataset.root=) are read from the folder you run it in;
# paths written in a config file do not depend on it (see README, Configuration).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m delg.retrieve "$@"
