#!/usr/bin/env bash
# Runs on the GPU machine (device tool): every GPU test (the shared test base with the compiled pallas and mosaic backends,
# kernel tilings, the Hopper kernel, the models' bf16 check), then the quick benchmark. Compilation is CPU-bound, so the tests run
# in parallel processes sharing the GPU. Usage: bash scripts/gpu_check.sh [pytest -m expression]
# Exits with the tests' status where they fail (the benchmark runs anyway), else with the benchmark's.
# Logs go to $OUT (the device tool's; default gpu_check_out/ in the repository, git-ignored). The interpreter: GPU_PYTHON,
# else the set-up's .venv where it imports jax (bash scripts/setup_env.sh with HYDRAGEN_JAX_CUDA=1), else python3 (the
# device machine's, JAX preinstalled).
set -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit
OUT=${OUT:-$ROOT/gpu_check_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # a relative OUT: from where it was called
cd "$ROOT" || exit
PY=${GPU_PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import jax' 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt" \
  || { echo "gpu_check: $PY cannot import jax (set GPU_PYTHON to one that can)" >&2; exit 2; }
"$PY" -m pytest -q -p no:cacheprovider -n "${GPU_TEST_WORKERS:-6}" -m "${1:-gpu}" tests 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25
tests=$?
"$PY" -m scripts.quick_bench 2>&1 | tee "$OUT/quick_bench.txt"
bench=$?
exit $((tests ? tests : bench))
