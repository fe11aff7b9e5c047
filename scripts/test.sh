#!/usr/bin/env bash
# Set up with the dev extras, then run the test suite (slow tests excluded; add `-m slow` for them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -q "$@"
