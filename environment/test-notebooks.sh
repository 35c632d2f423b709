#!/usr/bin/env bash
# Every notebook executed headless in the evcxr Rust kernel (smoke profile), and the notebook
# runner's self-test on a deliberately broken notebook. Sets itself up
# (environment/setup-notebooks.sh is idempotent: venv, evcxr_jupyter, kernel spec).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
echo "== notebooks: setup (venv, evcxr_jupyter, kernel spec) =="
bash environment/setup-notebooks.sh
echo "== notebooks: the committed notebooks match notebooks/make_notebooks.py =="
python3 notebooks/make_notebooks.py --check
BUILD=${OVEROPT_EVCXR_BUILD:-notebooks/.evcxr-build}
slots_before=$(cd "$BUILD" 2>/dev/null && ls -d kernel-*/ 2>/dev/null || true)
echo "== notebooks: execute all (smoke profile) =="
environment/.venv/bin/python environment/run-notebooks.py
echo "== notebooks: kernel slots made by this run reuse another slot's build of the crate =="
# environment/evcxr-kernel.sh starts a new slot from a copy of another's target directory, so
# only one slot compiles the crate. A copy that cargo finds stale rebuilds the crate and much
# of its dependencies in the new slot (minutes, unseen: the kernel just starts slowly), and
# leaves a library of the crate that no other slot has (hard link or copy, same mtime).
SLOTS_BEFORE=$slots_before environment/.venv/bin/python - "$BUILD" <<'PY'
import os, sys
from pathlib import Path
build = Path(sys.argv[1])
before = {s.rstrip("/") for s in os.environ["SLOTS_BEFORE"].split()}
libs = {}
for slot in sorted(build.glob("kernel-*/")):
    found = sorted(slot.glob("target/*/debug/deps/liboveropt-*.rlib"),
                   key=lambda f: f.stat().st_mtime_ns)
    if found:
        libs[slot.name] = (found[-1].name, found[-1].stat().st_mtime_ns)
new = [s for s in libs if s not in before]
if len(libs) < 2:
    print(f"test-notebooks: {len(libs)} slot(s) with the crate built: nothing copied to check")
    sys.exit(0)
bad = [s for s in new if not any(o != s and libs[o] == libs[s] for o in libs)]
if bad:
    sys.exit(f"test-notebooks: kernel slot(s) {', '.join(bad)} compiled the crate again "
             f"instead of reusing another slot's build (liboveropt: {libs})")
print(f"test-notebooks: {len(new)} new slot(s), {len(libs)} in all; "
      f"each new slot's liboveropt is another slot's ({', '.join(new) or 'none new'})")
PY
echo "== notebooks: runner self-test (the broken fixture must be rejected) =="
environment/.venv/bin/python environment/run-notebooks.py --self-test
echo "== test-notebooks.sh: all passed in ${SECONDS} s =="
