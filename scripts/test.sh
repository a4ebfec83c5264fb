#!/usr/bin/env bash
# Install everything, then lint (ruff), type-check (mypy) and run the whole test suite
# (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
ruff check .
mypy
python -m pytest "$@"
