#!/usr/bin/env bash
# Revisited Oxford / Paris: images (extracted flat into datasets/revisitop/<name>/jpg/) and gnd_<name>.pkl,
# optionally the 1M distractors (datasets/revisitop/revisitop1m/jpg/).
#
#   bash scripts/download_revisitop.sh                          # roxford5k + rparis6k (~4.5 GB)
#   bash scripts/download_revisitop.sh --datasets roxford5k     # one of them
#   bash scripts/download_revisitop.sh --distractors            # + all 100 distractor tars (~400 GB)
#   bash scripts/download_revisitop.sh --distractors 10         # + the first 10 distractor tars
#
# Env: REVISITOP_BASE_URL (a mirror laid out as <base>/<name>/gnd_<name>.pkl, <base>/<name>/jpg/<archive>,
# <base>/revisitop1m/jpg/revisitop1m.<k>.tar.gz; default: the official hosts), REVISITOP_DIR (output folder).
# Rerun the same command to resume or to retry failures.  All options: --help.  Logic: delg/download/ (recipe: revisitop.py).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m delg.download revisitop "$@"
