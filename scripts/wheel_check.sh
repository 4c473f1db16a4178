#!/usr/bin/env bash
# Build the wheel from the checkout's files, install it (no deps) into a fresh venv that borrows .venv's
# dependencies (torch, transformers... through a .pth file, so nothing is downloaded), then, from outside the
# repository (so the editable source cannot be imported), run `lafn demo --model tiny-bilingual` and check that
# the default demo's asset ships in the wheel. Offline; about a minute.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Build from a copy of the tracked and untracked-but-not-ignored files: the checkout gets no build/ or egg-info.
mkdir "$work/src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
  | xargs -0 -I{} sh -c '[ -e "{}" ] && printf "%s\0" "{}"' | tar -c --null -T - -f -) | tar -x -C "$work/src"
"$repo/.venv/bin/pip" wheel -q --no-deps --no-build-isolation --wheel-dir "$work/dist" "$work/src" \
  >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
wheel="$(ls "$work"/dist/lafn_hf-*.whl)"
# Every module and asset of the source tree must be in the wheel (modeling/ ships as lafn_hf/modeling/).
"$repo/.venv/bin/python" - "$wheel" "$work/src" <<'PY'
import sys
import zipfile
from pathlib import Path

wheel, src = sys.argv[1], Path(sys.argv[2])
shipped = set(zipfile.ZipFile(wheel).namelist())
wanted = {p.relative_to(src).as_posix() for p in (src / "lafn_hf").rglob("*") if p.is_file()}
wanted |= {"lafn_hf/modeling/" + p.relative_to(src / "modeling").as_posix() for p in (src / "modeling").rglob("*.py")}
missing = sorted(wanted - shipped)
if missing:
    sys.exit(f"wheel_check: the wheel lacks {missing}")
PY

# A fresh venv; .venv's site-packages come after its own (the wheel's lafn_hf wins; the editable one is not
# on the path: its finder is only activated by .venv's own .pth files, which a path entry does not run).
"$repo/.venv/bin/python" -m venv --without-pip "$work/venv"
site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$repo/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/lafn_deps.pth"
"$repo/.venv/bin/pip" --python "$work/venv/bin/python" install -q --no-deps --no-index "$wheel" >/dev/null

cd "$work"
"$work/venv/bin/python" - "$work/venv" <<'EOF'
import sys
from importlib import resources
from pathlib import Path

import lafn_hf

venv = Path(sys.argv[1]).resolve()
assert venv in Path(lafn_hf.__file__).resolve().parents, f"imported {lafn_hf.__file__}, not the wheel"
asset = resources.files("lafn_hf") / "assets" / "demo_eiffel.json"
assert asset.is_file(), f"the default demo's asset is missing: {asset}"
print(f"wheel_check: lafn_hf from {Path(lafn_hf.__file__).parent}; default demo asset found")
EOF
"$work/venv/bin/lafn" --version
"$work/venv/bin/lafn" demo --model tiny-bilingual --out "$work/bank" >"$work/demo.txt" 2>"$work/demo.err" \
  && grep -q "generations identical = True" "$work/demo.txt" \
  || { cat "$work/demo.txt" "$work/demo.err"; echo "wheel_check: the demo from the wheel failed" >&2; exit 1; }
echo "wheel_check: lafn demo --model tiny-bilingual from the installed wheel: ok"
