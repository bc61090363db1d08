#!/usr/bin/env bash
# The main job: set up (once) and run the demo: SmolLM2-135M-Instruct answers several questions under one long
# shared system prompt, several samples each, then the decode throughput of Hydragen vs standard attention and
# the other modes. Extra arguments go to `python -m models` (e.g. --model default: the embedded byte model).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
exec .venv/bin/python -m models "$@"
