#!/usr/bin/env bash
# Set everything up, then run `ila identify` on the default model and the bundled data (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
ila identify --output "${ILA_OUTPUT:-runs/default}" --overwrite "$@"
