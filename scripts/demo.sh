#!/usr/bin/env bash
# The main job on the embedded default: set up, then `sae-sweep demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sae-sweep demo "$@"
