#!/usr/bin/env bash
# Sets everything up and runs the demo on the embedded SmolLM2-135M-Instruct (no network, no hub).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
pmkvq demo "$@"
