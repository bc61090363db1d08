#!/usr/bin/env bash
# One development round on the GPU machine (device tool): compiled kernel tests, then the kernel sweep, logs to $OUT.
# Usage: bash scripts/tuning/device_round.sh ["pytest arguments" | none] [sweep arguments...]
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TESTS=${1:-"-m gpu tests"}; shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
if [[ "$TESTS" != none ]]; then
  # shellcheck disable=SC2086
  timeout "${TEST_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider -n "${GPU_TEST_WORKERS:-8}" $TESTS 2>&1 \
    | tail -25 | tee "$OUT/gpu_tests.log"
fi
timeout "${SWEEP_LIMIT:-400}" python3 -m scripts.tuning.sweep_kernels --out "$OUT/sweep.jsonl" "$@" 2>&1 | tee "$OUT/sweep.log" \
  | grep -v "^  \[" | tail -40
if [[ -n "${PROBE:-}" ]]; then
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  timeout 240 "$NCU" --metrics sm__inst_executed_pipe_tensor_op_gmma.sum,sm__inst_executed_pipe_tensor_op_hmma.sum \
    python3 -m scripts.tuning.probe_mma 2>&1 | grep -v "^WARNING\|^I0000\|^E0000" > "$OUT/probe.log"
  grep -B2 -A6 "probe_mma\|tensor_op\|ERR" "$OUT/probe.log" | tail -60
fi
if [[ -n "${PROFILE:-}" ]]; then
  timeout 150 python3 -m scripts.tuning.profile_step --configs "$PROFILE" 2>&1 | grep -v "^WARNING\|^I0000\|^E0000" \
    | tee "$OUT/profile.log"
fi
