#!/usr/bin/env bash
# The main job: set up (once) and run the demo: SmolLM2-135M-Instruct answers several questions under one long
# shared system prompt, several samples each, then the decode throughput of Hydragen vs standard attention and
# the other modes. Extra arguments go to `python -m models` (e.g. --model default: the embedded byte model).
set -euo pipefail
CALLER=$PWD  # the arguments' paths (--model DIR) are the caller's
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HYDRAGEN_JAX_SETUP_DEMO=1 source "$ROOT/scripts/setup_env.sh"  # (it changes to the repository's folder)
cd "$CALLER"
# PYTHONSAFEPATH: the packages from the install, not from a same-named folder of the caller's
PYTHONSAFEPATH=1 exec "$ROOT/.venv/bin/python" -m models "$@"
