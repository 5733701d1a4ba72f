#!/usr/bin/env bash
# One folklore experiment end to end: its study (the same command again resumes it; finished trials are never
# trained again), then its export (tables, plots, report) into docs/results/folklore/<name>/.
#   bash experiments/folklore/run.sh NAME [key=value ...]
# NAME is a space file here (targets_budget, rank, lr_alpha, forgetting, init); key=value overrides go to the
# study (e.g. model.name=tiny-llama train.steps=4 for a smoke run). $WORKSPACE (default lora_ablate_runs/
# folklore) holds the stores; $EXPORT_OUT (default docs/results/folklore/NAME) receives the export.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
NAME=${1:?usage: bash experiments/folklore/run.sh NAME [key=value ...]}
shift
SPACE="$HERE/$NAME.yaml"
if [ "$NAME" = real_data ] || [ ! -f "$SPACE" ]; then
  names=$(cd "$HERE" && ls ./*.yaml | sed 's#./##; s#\.yaml##' | grep -vx real_data | paste -sd, -)
  echo "error: no folklore experiment '$NAME'; choose one of: $names" >&2
  exit 2
fi
PY=${PYTHON:-python}
WS=${WORKSPACE:-lora_ablate_runs/folklore}
OUT=${EXPORT_OUT:-$HERE/../../docs/results/folklore/$NAME}
"$PY" -m lora_ablate study --space "$SPACE" --config "$HERE/real_data.yaml" --study-name "folklore-$NAME" \
  --workspace "$WS" "$@"
rm -rf "$OUT.tmp" && "$PY" -m lora_ablate export --study "folklore-$NAME" --workspace "$WS" --out "$OUT.tmp" \
  --format md,csv,html
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "folklore-$NAME: $OUT/report.md"
