#!/usr/bin/env bash
# The main job on its embedded default: a real LAFN edit of Gemma-3-270M in en, zh and de.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lafn demo "$@"
