#!/usr/bin/env bash
# mypy over the package as installed: modeling/ is shipped as lafn_hf.modeling, which mypy cannot map
# from the source tree, so check a staged copy with that layout (paths in messages are mapped back).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp -r "$repo/lafn_hf" "$stage/lafn_hf"
cp -r "$repo/modeling" "$stage/lafn_hf/modeling"
find "$stage" -name __pycache__ -prune -exec rm -rf {} +
cd "$stage"
"$repo/.venv/bin/mypy" --config-file "$repo/pyproject.toml" --cache-dir "$stage/.mypy_cache" lafn_hf \
  | sed "s#lafn_hf/modeling/#modeling/#"
