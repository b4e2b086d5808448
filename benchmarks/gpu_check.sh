#!/usr/bin/env bash
# One device call: kernel tests on CUDA (launchers vs references), then the decode benchmark.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
[ -n "$SKIP_TESTS" ] || python3 -m pytest -q tests/kernels tests/test_ops.py -p no:cacheprovider 2>&1 | tee "${OUT:-.}/tests.log" | tail -25
python3 benchmarks/bench_decode_attention.py --json "${OUT:-.}/bench.json" 2>&1 | tee "${OUT:-.}/bench.log"
