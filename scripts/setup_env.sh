#!/usr/bin/env bash
# Creates .venv (Python >= 3.12) with hydragen-jax and its test tools, once; later calls reuse it.
# Sourced by scripts/demo.sh and scripts/test.sh. JAX is pinned to 0.11.2, the version the GPU kernels are
# tested with. On a CUDA machine, set HYDRAGEN_JAX_CUDA=1 to install jax[cuda13] instead of the CPU build.
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
