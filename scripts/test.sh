#!/usr/bin/env bash
# Sets everything up and runs the test suite (Triton kernels run under the interpreter on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check . && ruff format --check .
TRITON_INTERPRET=1 python -m pytest -q "$@"
