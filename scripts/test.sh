#!/usr/bin/env bash
# Set up (once) and run the whole test suite on CPU: Pallas kernels interpreted, GPU-only tests skipped with
# their reason. Extra arguments go to pytest (e.g. -k attention, -m "not slow").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
exec .venv/bin/python -m pytest -n 2 -q -p no:cacheprovider "$@"
