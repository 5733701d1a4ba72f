#!/usr/bin/env bash
# What a researcher sees, as PNGs: a tiny rank study on tiny-llama (CPU, a few minutes), then headless
# Chromium shots of the MLflow UI's experiment page (runs table and charts), a comparison of two runs,
# and the exported report.html. Usage: scripts/screenshots.sh OUT_DIR (outside the checkout).
# Before any shot it checks that the store and report.md hold what the shots are to show (the base model,
# the axes as the only params that differ, no nested runs, the space named): else exit 1.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
case "$OUT/" in "$ROOT"/*) echo "error: $OUT is inside the checkout; PNGs are not to be committed" >&2; exit 2;; esac
CHROME=$(command -v chromium || command -v chromium-browser || true)
[ -n "$CHROME" ] || { echo "error: no chromium; apt-get install chromium" >&2; exit 2; }
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
UI_PID=""
cleanup() { [ -n "$UI_PID" ] && kill "$UI_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

# three ranks x two seeds: enough for intervals, ties and a trend note, small enough for a shared CPU
cat > "$WORK/space.yaml" <<'YAML'
description: screenshot study, LoRA rank on q, v
fixed:
  lora.targets: [q, v]
  train.steps: 12
  train.batch_size: 4
  train.log_every: 2
  data.train_size: 64
  data.max_length: 64
  eval.size: 12
  eval.max_new_tokens: 6
axes:
  lora.r: {grid: [2, 8, 32]}
YAML
WS="$WORK/ws"
"$PY" -m lora_ablate study --space "$WORK/space.yaml" --study-name shots --seeds 2 --workspace "$WS" \
  model.name=tiny-llama 2>&1 | tee "$OUT/study.log" | grep -v -i warn || true
"$PY" -m lora_ablate export --study shots --workspace "$WS" --out "$WORK/export" --format md,html
"$PY" -m lora_ablate compare --study shots --workspace "$WS" --a r=2 --b r=32 | tee "$OUT/compare.txt"
cp "$WORK/export/report.md" "$OUT/report.md"
grep -q '^| base model |' "$OUT/report.md" || { echo "error: report.md has no base model row" >&2; exit 1; }
grep -q '^- space: space.yaml: screenshot study' "$OUT/report.md" \
  || { echo "error: report.md does not name the space's file and description" >&2; exit 1; }

"$PY" -m lora_ablate ui --workspace "$WS" > "$WORK/ui.log" 2>&1 &
UI_PID=$!
URL=""
for _ in $(seq 120); do
  URL=$(sed -n 's/^MLflow UI: \([^ ]*\).*/\1/p' "$WORK/ui.log")
  [ -n "$URL" ] && break
  sleep 1
done
[ -n "$URL" ] || { cat "$WORK/ui.log" >&2; echo "error: the UI did not start" >&2; exit 1; }
# the store the shots are taken of holds what they are to show (docs/tracking.md): else exit 1, no shots
IDS=$("$PY" - "$WS" <<'PY'
import json, sys, urllib.parse
from mlflow import MlflowClient
from lora_ablate.workspace import mlflow_uri
c = MlflowClient(tracking_uri=mlflow_uri(sys.argv[1]))
e = c.get_experiment_by_name("shots")
every = c.search_runs([e.experiment_id])
runs = [r for r in every if r.data.tags.get("lora_ablate.kind") == "trial"]
base = [r for r in every if r.data.tags.get("lora_ablate.kind") == "base"]
keys = set().union(*(r.data.params for r in runs))
differ = sorted(k for k in keys if len({r.data.params.get(k) for r in runs}) > 1)
problems = [f"the trials' params that differ are {differ}, not the axis and the seed (compare opens on "
            "the first three by name)"] if differ != ["r", "seed"] else []
if [r.info.run_name for r in base] != ["base model"] or "objective" not in base[0].data.metrics:
    problems.append("no 'base model' run with the objective (the charts' reference bar)")
if any("mlflow.parentRunId" in r.data.tags for r in every):
    problems.append("nested runs (the UI folds them under a collapsed parent)")
if problems:
    sys.exit("error: " + "; ".join(problems))
runs.sort(key=lambda r: int(r.data.params.get("r", 0)))
print(e.experiment_id, urllib.parse.quote(json.dumps([runs[0].info.run_id, runs[-1].info.run_id])))
PY
)
read -r EXP RUNS <<< "$IDS"

# a fresh browser profile per shot: what a new user sees, no chart or column settings kept from before
shot() {  # shot NAME URL [HEIGHT]: the page after its scripts settled (virtual time), never the network
  # 60 s of virtual time: the charts view loads its plotting code lazily and shows spinners before ~30 s
  "$CHROME" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --user-data-dir="$(mktemp -d -p "$WORK")" --hide-scrollbars \
    --virtual-time-budget=60000 --screenshot="$OUT/$1.png" --window-size="1600,${3:-1000}" "$2" \
    >/dev/null 2>&1 || echo "warning: chromium failed on $1" >&2
  [ -f "$OUT/$1.png" ] && echo "$OUT/$1.png"
}
shot experiment-runs "$URL/#/experiments/$EXP/runs"
shot experiment-charts "$URL/#/experiments/$EXP/runs?compareRunsMode=CHART"
shot compare-runs "$URL/#/compare-runs?runs=$RUNS&experiments=%5B%22$EXP%22%5D" 2000  # down to its params and metrics
shot report "file://$WORK/export/report.html" 3000
