#!/usr/bin/env bash
# The oldest transformers pyproject.toml allows, each in a venv of its own (CPU torch, lafn-hf editable, pytest):
# 1. .venv-oldest: the fast subset (runtime, packed forwards, bank format, bank files and the Hub) on the floors
#    of the dependencies' "transformers>=X" and "huggingface-hub>=Y";
# 2. .venv-oldest-serve: the serve tests on the floor of the serve extra's "transformers[serving]>=Y", unless
#    .venv (the full run, newest transformers) has that very version.
# About 2 minutes on 2 cores once the venvs exist (1 more to make each).
set -euo pipefail
cd "$(dirname "$0")/.."

floor() {  # floor GROUP PACKAGE: the lowest version of PACKAGE that the dependencies ("core") or the extra GROUP allow
  python3 - "$1" "$2" <<'PY'
import re
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
group, package = sys.argv[1], sys.argv[2]
specs = project["dependencies"] if group == "core" else project["optional-dependencies"][group]
floors = [m.group(1) for s in specs if (m := re.match(rf"{re.escape(package)}(?:\[[^]]*\])?\s*>=\s*([0-9][\w.]*)", s))]
if not floors:
    sys.exit(f"test_oldest: no '{package}>=' in pyproject.toml's {group} requirements")
print(floors[0])
PY
}
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
venv() {  # venv DIR REQUIREMENT...: DIR with CPU torch and the requirements (pip's output only when it fails)
  local dir="$1"
  shift
  [ -x "$dir/bin/python" ] || python3 -m venv "$dir"
  { "$dir/bin/pip" install -q --upgrade pip \
    && { "$dir/bin/python" -c "import torch" 2>/dev/null || "$dir/bin/pip" install -q torch==2.13.0; } \
    && "$dir/bin/pip" install -q "$@"; } >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
}

core="$(floor core transformers)"
hub="$(floor core huggingface-hub)"
venv .venv-oldest -e . pytest "transformers==$core" "huggingface-hub==$hub"
echo "test_oldest: transformers $core, huggingface-hub $hub (the dependencies' floors): runtime, packed forwards, banks"
.venv-oldest/bin/python -m pytest -q -p no:cacheprovider tests/test_runtime.py tests/test_packed.py \
  tests/test_bank_format.py tests/test_hub.py

serve="$(floor serve transformers)"
newest="$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')"
if .venv/bin/python -c 'import sys; from packaging.version import Version; sys.exit(Version(sys.argv[1]) != Version(sys.argv[2]))' \
    "$serve" "$newest"; then
  echo "test_oldest: the serve extra's floor, transformers $serve, is the newest: the full run tested it"
else
  venv .venv-oldest-serve -e ".[serve]" pytest "transformers[serving]==$serve"
  echo "test_oldest: transformers $serve (the serve extra's floor): serve"
  .venv-oldest-serve/bin/python -m pytest -q -p no:cacheprovider tests/test_serve.py
fi
