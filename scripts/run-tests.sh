#!/usr/bin/env bash
# Set everything up, then lint, type-check and run the whole test suite (including the slow real-model test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy src
pytest -q "$@"
