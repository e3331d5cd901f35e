#!/usr/bin/env bash
# Set everything up, then lint, type-check and run the whole test suite (including the slow real-model test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The HTML report's browser test drives Chromium through playwright; playwright's own download is not reachable
# here, Debian's chromium is. Best effort: without it that one test skips and says why.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  timeout 600 bash -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium" \
    >/dev/null 2>&1 || echo "chromium could not be installed: the browser test will skip"
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy src
pytest -q "$@"
