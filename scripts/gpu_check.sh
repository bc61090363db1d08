#!/usr/bin/env bash
# Runs on the GPU machine (device tool): the compiled-kernel tests, then the quick benchmark.
# Usage: bash scripts/gpu_check.sh [pytest -k expression]
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
python3 -m pytest -q --maxfail=3 -p no:cacheprovider tests/test_attention.py tests/test_kernels.py -k "${1:-not interpret}" \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -40
python3 scripts/quick_bench.py 2>&1 | tee "$OUT/quick_bench.txt"
