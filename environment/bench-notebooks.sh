#!/usr/bin/env bash
# Time the notebook machinery: kernel install, cold and warm first cell, every notebook.
#
#   bash environment/bench-notebooks.sh [--cold-install] [--deps-opt N] [--keep-build]
#
# --cold-install  uninstall evcxr_jupyter first and time `cargo install` (~10-20 min on 2
#                 cores); without it the install step is only timed when evcxr is missing.
# --deps-opt N    opt-level of the crate and its dependencies in the kernels' build (default
#                 1, as in the notebooks; 0 and 2 for comparison).
# --keep-build    keep the measurement's build directory (printed) instead of deleting it.
#
# The cold and warm measurements use a fresh build directory of their own (OVEROPT_EVCXR_BUILD),
# so the notebooks' own build (notebooks/.evcxr-build) is neither used nor disturbed. Cold:
# nothing of the crate is compiled for the kernel; warm: the same directory a second time.
# The notebooks then run in the smoke profile on the warm build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
cold_install=0
keep=0
deps_opt=1
while [ $# -gt 0 ]; do
    case "$1" in
        --cold-install) cold_install=1 ;;
        --keep-build) keep=1 ;;
        --deps-opt) deps_opt=$2; shift ;;
        *) echo "bench-notebooks: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

if [ "$cold_install" = 1 ]; then
    cargo uninstall evcxr_jupyter >/dev/null 2>&1 || true
fi
t=$(now)
bash environment/setup-notebooks.sh
setup_s=$(secs "$t" "$(now)")

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/overopt-evcxr-bench.XXXXXX")
[ "$keep" = 1 ] || trap 'rm -rf "$BUILD"' EXIT
export OVEROPT_EVCXR_BUILD=$BUILD/build OVEROPT_EVCXR_DEPS_OPT=$deps_opt
PY=environment/.venv/bin/python
OUT=$BUILD/report
echo "bench-notebooks: cold kernel (fresh build directory $OVEROPT_EVCXR_BUILD, deps opt-level $deps_opt)"
$PY environment/run-notebooks.py --warm-only --out "$OUT" --json "$OUT/cold.json"
echo "bench-notebooks: warm kernel (same directory)"
$PY environment/run-notebooks.py --warm-only --out "$OUT" --json "$OUT/warm.json"
echo "bench-notebooks: all notebooks, smoke profile"
$PY environment/run-notebooks.py --out "$OUT" --json "$OUT/notebooks.json" || true

$PY - "$OUT" "$setup_s" "$cold_install" <<'PY'
import json, sys
from pathlib import Path
out, setup_s, cold = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
cold_r = json.loads((out / "cold.json").read_text())
warm_r = json.loads((out / "warm.json").read_text())
nbs = json.loads((out / "notebooks.json").read_text())
print("\n== notebook timings ==")
what = "setup incl. cargo install evcxr_jupyter" if cold else "setup (evcxr already installed unless it was missing)"
print(f"{what}: {setup_s:.1f} s")
for label, r in (("cold", cold_r), ("warm", warm_r)):
    print(f"{label} kernel start: {r['kernel_start_s']:.1f} s (the crate is loaded here), "
          f"first cell: {r['first_cell_s']} s, total {r['total_s']:.1f} s")
for r in nbs["notebooks"]:
    state = "ok" if not r["problems"] else "FAILED"
    print(f"{r['name']}: {r['total_s']:.1f} s (kernel start {r['kernel_start_s']:.1f} s, "
          f"first cell {r['first_cell_s']} s) {state}")
print(f"all notebooks: {nbs['total_s']:.1f} s")
PY
