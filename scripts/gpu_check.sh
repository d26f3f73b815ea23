#!/usr/bin/env bash
# GPU timing check (no dataset, random weights, synthetic images; well under 4 minutes on one GPU):
#   bash scripts/gpu_check.sh [output_dir=DIR | --out FILE] [tiny=true | --tiny] [device=cuda|cpu]
# Writes gpu_check.json (in the folder you run it in, or DIR/gpu_check.json) after every stage.
# Runs with the repo's .venv python, else the machine's python3 (torch, timm, opencv, pyyaml, tqdm, h5py, pillow).
# kornia (LoFTR, LightGlue stages): when the python lacks it, the wheels in .gpu_wheels/ (`make gpu-wheels`)
# are installed offline into ${TMPDIR:-/tmp}/gpu_check_site for this run; without them those stages are skipped.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

has_kornia() { "$PY" -c 'import kornia.feature' >/dev/null 2>&1; }

if ! has_kornia; then
  shopt -s nullglob
  wheels=("$REPO"/.gpu_wheels/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]})); then
    SITE="${TMPDIR:-/tmp}/gpu_check_site"
    if "$PY" -m pip --version >/dev/null 2>&1; then
      "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --upgrade \
        --target "$SITE" "${wheels[@]}" || true
    else  # no pip: these wheels are plain archives of their packages
      for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$SITE" || true; done
    fi
    export PYTHONPATH="$SITE:$PYTHONPATH"
  fi
  if ! has_kornia; then
    echo "gpu_check: kornia is not importable, so the LoFTR and LightGlue stages will be skipped" \
      "(fix: run 'make gpu-wheels' where PyPI is reachable, then carry .gpu_wheels)" >&2
  fi
fi
exec "$PY" -m delg.gpu_check "$@"
