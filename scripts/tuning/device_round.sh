#!/usr/bin/env bash
# One development round on the GPU machine (device tool), the steps a session's kernel work usually chains, logs to
# $OUT (default /tmp/out):
#   1. the GPU tests, compiled, with -v: gpu_tests.log names every test that passed or failed, also when TEST_LIMIT
#      (default 300 s) stops the run before the end; where any failed, gpu_tests_full.log has their tracebacks;
#   2. SPILLS=<probe_hopper variants, comma-separated>: ptxas registers and spills of those Hopper settings at query
#      windows of 8 to 32 rows (`probe_spills`), spills.log;
#   3. sweep arguments given: `python -m scripts.tuning.sweep_device ARGS` (e.g. --fields hopper --budget-s 220),
#      its file sweep.json and log sweep.jsonl, output sweep.log (SWEEP_LIMIT, default 300 s);
#   4. PROBE=1: the MMA instruction counts under Nsight Compute (`probe_mma`); PROFILE=<configs>: `profile_step`.
# Usage: bash scripts/tuning/device_round.sh ["pytest arguments" | none] [sweep_device arguments...]
# e.g.   SPILLS=k128qlat,s128qt bash scripts/tuning/device_round.sh "-m gpu tests/test_hopper.py" --fields hopper
# Set HYDRAGEN_JAX_COMMIT to the commit the tree is (the device machine's copy has no .git): the sweep records it.
# Exit status: the first failing step's (tests, spills, sweep, probe, profile), once every step has run.
set -o pipefail
FAILED=0
step() { local status=$?; (( FAILED != 0 || status == 0 )) || FAILED=$status; }  # after each step: keep the first failure
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TESTS=${1:-"-m gpu tests"}; shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
if [[ "$TESTS" != none ]]; then
  # shellcheck disable=SC2086
  timeout "${TEST_LIMIT:-300}" python3 -m pytest -v -rfE --tb=short -p no:cacheprovider -n "${GPU_TEST_WORKERS:-8}" \
    $TESTS > "$OUT/gpu_tests_full.log" 2>&1; step
  grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|error" "$OUT/gpu_tests_full.log" > "$OUT/gpu_tests.log"
  grep -q -E "FAILED|ERROR" "$OUT/gpu_tests.log" || rm "$OUT/gpu_tests_full.log"  # kept for the failures' tracebacks
  echo "[device_round] tests: $(grep -c PASSED "$OUT/gpu_tests.log") passed, $(grep -c -E "FAILED|ERROR" \
    "$OUT/gpu_tests.log") failed"; grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -15
fi
if [[ -n "${SPILLS:-}" ]]; then
  MOSAIC_GPU_DUMP_PTXAS=1 timeout 150 python3 -m scripts.tuning.probe_spills --variants "$SPILLS" --rows 4,8,16,24,32 \
    2>&1 | grep -E "^==|spill|Used|not compiled" | tee "$OUT/spills.log"; step
fi
if [[ $# -gt 0 ]]; then
  timeout "${SWEEP_LIMIT:-300}" python3 -m scripts.tuning.sweep_device --out "$OUT/sweep.json" --log "$OUT/sweep.jsonl" \
    "$@" 2>&1 | tee "$OUT/sweep.log" | { grep -v "^  \[" || true; } | tail -20; step
fi
if [[ -n "${PROBE:-}" ]]; then
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  timeout 240 "$NCU" --metrics sm__inst_executed_pipe_tensor_op_gmma.sum,sm__inst_executed_pipe_tensor_op_hmma.sum \
    python3 -m scripts.tuning.probe_mma 2>&1 | { grep -v "^WARNING\|^I0000\|^E0000" || true; } > "$OUT/probe.log"; step
  grep -B2 -A6 "probe_mma\|tensor_op\|ERR" "$OUT/probe.log" | tail -60
fi
if [[ -n "${PROFILE:-}" ]]; then
  timeout 150 python3 -m scripts.tuning.profile_step --configs "$PROFILE" 2>&1 | { grep -v "^WARNING\|^I0000\|^E0000" \
    || true; } | tee "$OUT/profile.log"; step
fi
exit "$FAILED"
