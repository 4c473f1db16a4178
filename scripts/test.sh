#!/usr/bin/env bash
# The full test suite, including the slow real-model tests (materialized once into ~/.cache/lafn_hf).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
