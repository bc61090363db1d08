#!/usr/bin/env bash
# Set up (once) and run the test suite on CPU: Pallas kernels interpreted, GPU-only tests skipped with their reason.
# Without --all the slow tier (`-m slow`: the kernel tests' shapes, dtypes and settings beyond CI's covering subset,
# the tensor-parallel matrix on 4 host devices, SmolLM2's demo, logits and modes, the long-document and tree smoke runs,
# tuning tools' plumbing) is left out: that is what CI runs. Usage: bash scripts/test.sh [--all]
# [pytest args] (e.g. -k attention; an -m of your own replaces the default "not slow").
set -euo pipefail
CALLER=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
# pytest runs in the repository's folder (its config, `tests`): a path argument of the caller's (a file, a folder, a
# test id FILE::NAME, also --deselect's) relative to where it was called, made relative to the repository's folder
# (node ids are); the value of an option that takes one (-k EXPR, -m MARKS, -o, -n, ...) is left as it is.
ARGS=()
takes_value=""
for arg in "$@"; do
  path=${arg%%::*}
  if [[ -z "$takes_value" && "$arg" != -* && "$path" != /* && -n "$path" && -e "$CALLER/$path" \
        && "$CALLER" != "$PWD" ]] || [[ "$takes_value" == --deselect && -e "$CALLER/$path" && "$path" != /* ]]; then
    arg=$(.venv/bin/python -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$CALLER/$path" \
      "$PWD")${arg:${#path}}
  fi
  ARGS+=("$arg")
  case "$arg" in  # pytest's options whose value is the next argument
    -k|-m|-o|-p|-n|-c|-W|-r|--deselect|--ignore|--rootdir|--basetemp|--junitxml|--junit-xml|--maxfail|--durations|\
    --dist|--tb|--log-file|--confcutdir|--override-ini|--numprocesses) takes_value=$arg ;;
    *) takes_value="" ;;
  esac
done
set -- ${ARGS[@]+"${ARGS[@]}"}
# Without a GPU every test compiles for XLA's CPU backend, mostly tiny models and interpreted kernels whose compile
# time dominates: LLVM's optimisations off take ~10-35 % off those tests. Only where `nvidia-smi` is missing (the
# CPU machines): the flag would apply to XLA's GPU backend too.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0"
fi
# --dist loadgroup: tests that share an expensive session fixture (the smoke bench, SmolLM2) carry an xdist_group
# mark and run on one worker, so that the fixture runs once, not once a worker (pytest < 9.2: see pyproject.toml).
MARK=(-m "not slow")
if [[ "${1:-}" == --all ]]; then shift; MARK=(); fi
for arg in "$@"; do [[ "$arg" == -m* ]] && MARK=(); done
# Many tests compile the same functions again (each xdist worker, and tests that clear jit's caches to watch a trace):
# JAX's persistent compilation cache, in a folder of this run's own (unless one is set), compiles each once (~10 %).
if [[ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
  CACHE=$(mktemp -d "${TMPDIR:-/tmp}/hydragen-jax-tests.XXXXXX")
  trap 'rm -rf "$CACHE"' EXIT
  export JAX_COMPILATION_CACHE_DIR=$CACHE JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
fi
.venv/bin/python -m pytest -n 2 --dist loadgroup -q -p no:cacheprovider ${MARK[@]+"${MARK[@]}"} "$@"
