#!/usr/bin/env bash
# Create .venv and install the project with its test tools. Safe to run again (it only adds what is missing).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch and torchvision first, as a matching pair (CPU wheels on a machine without CUDA).
.venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/pip install -q -e ".[dev]"
