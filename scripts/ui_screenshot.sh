#!/usr/bin/env bash
# Screenshot of the Prefect UI showing a finished run of a SERVED deployment (task runs + artifacts).
#   bash scripts/ui_screenshot.sh [CONFIG] [OUT_PNG] [--set key=value ...]
# Starts a local Prefect server (127.0.0.1 only, temporary PREFECT_HOME), serves flows/measure.py as a
# deployment, runs it once through the server, waits for it to finish, and has headless Chromium
# (Debian package `chromium`) render the flow-run page. Everything it started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/demo.yaml}
OUT=${2:-ui_flow_run.png}
shift $(( $# > 2 ? 2 : $# )) || true
PY=${PYTHON:-.venv/bin/python}
PREFECT=$(dirname "$PY")/prefect
PORT=${PREFECT_UI_PORT:-4299}
export PREFECT_HOME=$(mktemp -d) PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done; sleep 1
            for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done; rm -rf "$PREFECT_HOME"; }
trap cleanup EXIT
"$PREFECT" server start --host 127.0.0.1 --port "$PORT" > "$PREFECT_HOME/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do curl -sf "$PREFECT_API_URL/health" >/dev/null && break; sleep 1; done
curl -sf "$PREFECT_API_URL/health" >/dev/null || { echo "prefect server did not start" >&2; exit 1; }
"$PY" flows/measure.py --config "$CONFIG" "$@" --serve --name ui-screenshot > "$PREFECT_HOME/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do "$PREFECT" deployment ls 2>/dev/null | grep -q ui-screenshot && break; sleep 1; done
"$PREFECT" deployment run entropy-measure/ui-screenshot --watch > "$PREFECT_HOME/run.log" 2>&1 || {
    cat "$PREFECT_HOME/run.log" "$PREFECT_HOME/serve.log" >&2; exit 1; }
RUN_ID=$("$PY" - <<'PY'
import json, os, urllib.request
req = urllib.request.Request(os.environ["PREFECT_API_URL"] + "/flow_runs/filter", method="POST",
                             data=json.dumps({"sort": "START_TIME_DESC", "limit": 1}).encode(),
                             headers={"Content-Type": "application/json"})
print(json.load(urllib.request.urlopen(req))[0]["id"])
PY
)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1500,1100 \
  --virtual-time-budget=20000 --screenshot="$OUT" "http://127.0.0.1:$PORT/runs/flow-run/$RUN_ID" 2>/dev/null
echo "flow run $RUN_ID -> $OUT"
