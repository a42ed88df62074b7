#!/usr/bin/env bash
# Whole-process times of the README demo (issue 6): 3 cold runs, then 3 runs that each change only
# estimator.eta_list (one new η each). JSON to benchmarks/results/demo-timings-<host>-<time>.json.
#
# Cold = a fresh output dir (runs/demo), a fresh PREFECT_HOME (no task cache) and the demo checkpoint
# rebuilt ($ENTROPY_CORE_CACHE/demo, default ~/.cache/entropy_core/demo, is DELETED); the SmolLM2
# safetensors conversion stays cached.
# Usage: bash benchmarks/demo_timings.sh        (≈ 10 minutes on 2 CPU cores)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
logs=$(mktemp -d); export PREFECT_HOME=$logs/prefect
rows=()
run() {   # name, then the arguments of flows/measure.py
  local name=$1; shift
  local s e rc
  s=$(date +%s.%N); "$PY" flows/measure.py "$@" > "$logs/$name.log" 2>&1; rc=$?; e=$(date +%s.%N)
  rows+=("{\"run\": \"$name\", \"args\": \"$*\", \"rc\": $rc, \"seconds\": $(echo "$e - $s" | bc)}")
  echo "$name rc=$rc $(echo "$e - $s" | bc) s" >&2
}
for i in 1 2 3; do
  rm -rf runs/demo "${ENTROPY_CORE_CACHE:-$HOME/.cache/entropy_core}/demo" "$PREFECT_HOME"
  run "cold$i"
done
i=0
for grid in "[1e-5,4e-5]" "[1e-5,3e-5]" "[2e-5,6e-5]"; do
  i=$((i + 1)); run "eta_only$i" --set "estimator.eta_list=$grid"
done
out=benchmarks/results/demo-timings-$(hostname)-$(date +%Y%m%d-%H%M%S).json
printf '{"host": "%s", "cores": %s, "runs": [%s]}\n' "$(hostname)" "$(nproc)" "$(IFS=,; echo "${rows[*]}")" \
  | "$PY" -c "import json,sys,statistics as st; d=json.load(sys.stdin)
for kind in ('cold','eta_only'):
    d['median_'+kind+'_seconds']=st.median(r['seconds'] for r in d['runs'] if r['run'].startswith(kind))
print(json.dumps(d, indent=1))" > "$out"
cat "$out"; echo "logs: $logs" >&2
