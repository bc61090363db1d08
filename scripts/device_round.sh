#!/usr/bin/env bash
# One development round on the GPU machine (device tool): compiled kernel tests, then the kernel sweep, logs to $OUT.
# Usage: bash scripts/device_round.sh ["pytest arguments" | none] [sweep arguments...]
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
timeout "${SWEEP_LIMIT:-400}" python3 scripts/sweep_kernels.py --out "$OUT/sweep.jsonl" "$@" 2>&1 | tee "$OUT/sweep.log" \
  | grep -v "^  \[" | tail -40
if [[ -n "${PROBE:-}" ]]; then
  rm -rf /tmp/dump; XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_gpu_dump_llvmir=true" timeout 120 python3 scripts/probe_mma.py /tmp/dump 2>&1 \
    | tail -20 | tee "$OUT/probe.log"
fi
if [[ -n "${PROFILE:-}" ]]; then
  timeout 150 python3 scripts/profile_step.py --configs "$PROFILE" 2>&1 | grep -v "^WARNING\|^I0000\|^E0000" \
    | tee "$OUT/profile.log"
fi
