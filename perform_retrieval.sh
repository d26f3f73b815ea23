#!/usr/bin/env bash
# Global search, reranking with each configured verifier, evaluation and report in one go.
#   bash perform_retrieval.sh [--config configs/demo.yaml] [key=value ...]
#   bash perform_retrieval.sh query=path/to/photo.jpg        # search with a new photo
set -euo pipefail
cd "$(dirname "$0")"
PY=python3; [[ -x .venv/bin/python ]] && PY=.venv/bin/python
exec "$PY" -m delg.retrieve "$@"
