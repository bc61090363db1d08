#!/usr/bin/env bash
# Runs on the GPU machine (device tool): every GPU test (the shared test base with the compiled pallas and mosaic backends,
# kernel tilings, the Hopper kernel, the models' bf16 check), then the quick benchmark. Compilation is CPU-bound, so the tests run
# in parallel processes sharing the GPU. Usage: bash scripts/gpu_check.sh [pytest -m expression]
# Exits with the tests' status where they fail (the benchmark runs anyway), else with the benchmark's.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # a relative OUT: from where the script was called
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider -n "${GPU_TEST_WORKERS:-6}" -m "${1:-gpu}" tests 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25
tests=$?
python3 scripts/quick_bench.py 2>&1 | tee "$OUT/quick_bench.txt"
bench=$?
exit $((tests ? tests : bench))
