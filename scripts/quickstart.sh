#!/usr/bin/env bash
# The main job: install everything, then run the quickstart on the embedded base.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python examples/quickstart.py
python examples/quickstart_bedside.py   # part two: DPO on top of the triage pocket book
