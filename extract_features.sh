#!/usr/bin/env bash
# Extract DELG global + local features of a dataset into the HDF5 feature stores (resumable; see delg/extract.py).
#   ./extract_features.sh --config configs/demo.yaml [shard=0/4] [overwrite=true] [extract.long_side=512]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$here/.venv/bin/python"
[ -x "$py" ] || py="$(command -v python3 || command -v python)"
if [ -f "$here/configs/demo.yaml" ] && [[ " $* " != *" --config"* ]]; then
  set -- --config "$here/configs/demo.yaml" "$@"   # default config
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m delg.extract "$@"
