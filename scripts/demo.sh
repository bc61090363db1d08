#!/usr/bin/env bash
# The main job: set up (once) and run the demo: 32 completions of a shared prompt with the default model,
# decode throughput of Hydragen vs standard attention. Extra arguments go to `python -m models`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
exec .venv/bin/python -m models "$@"
