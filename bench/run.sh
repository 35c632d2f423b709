#!/usr/bin/env bash
# overopt (candle, CPU) vs PyTorch + transformers on the same machine, shapes and thread count.
#
#   bench/run.sh
#
# Environment:
#   BENCH_THREADS   threads on both sides (default: number of CPUs); RAYON_NUM_THREADS for
#                   candle, torch.set_num_threads for torch
#   BENCH_VENV      an existing virtual environment with the pinned torch / transformers
#                   (default: bench/.venv, created from bench/requirements.txt when missing)
#   BENCH_P1_STEPS, BENCH_P1_WARMUP, BENCH_P2_REPS, BENCH_P2_NEW_TOKENS   workload knobs
#
# Prints the machine, one table per goal and, last, the ratio lines (overopt over torch):
# P1[size] / P1 (minimum over sizes), P2, P6[p1|p2] / P6 (minimum; reference peak RSS over
# overopt's).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=bench/out
mkdir -p "$OUT"
THREADS=${BENCH_THREADS:-$(getconf _NPROCESSORS_ONLN)}
export RAYON_NUM_THREADS=$THREADS BENCH_THREADS=$THREADS
# No BLAS/OpenMP oversubscription on the torch side beyond the chosen count.
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

VENV=${BENCH_VENV:-bench/.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV from bench/requirements.txt" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --disable-pip-version-check -q -r bench/requirements.txt
fi
PY=$VENV/bin/python

echo "building the overopt bench (dev profile: dependencies at opt-level 3)" >&2
cargo bench --profile dev --bench perf --no-run -q 2>&1 | grep -v "^ *Executable" >&2 || true
BIN=$(cargo bench --profile dev --bench perf --no-run --message-format=json -q 2>/dev/null |
    "$PY" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "perf" and m.get("executable"):
        print(m["executable"])')
[ -x "$BIN" ] || { echo "bench binary not found" >&2; exit 1; }

RES=$OUT/results.jsonl
RSS=$OUT/rss.jsonl
: > "$RES"
: > "$RSS"
"$BIN" data --out "$OUT/data.json"

echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(getconf _NPROCESSORS_ONLN) cpus online"
echo "threads used on both sides: $THREADS"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "overopt: candle $(grep -A1 'name = "candle-core"' Cargo.lock | sed -n 's/version = "\(.*\)"/\1/p'), $(rustc --version)"
echo "reference: $("$PY" bench/torch_ref.py versions)"
echo

run() { # label, command...
    local label=$1
    shift
    echo "running $label" >&2
    "$PY" bench/report.py measure "$RSS" "$label" -- "$@"
}
run overopt-p1 "$BIN" p1 --data "$OUT/data.json" --out "$RES"
run torch-p1 "$PY" bench/torch_ref.py p1 --data "$OUT/data.json" --out "$RES"
run overopt-p2 "$BIN" p2 --data "$OUT/data.json" --out "$RES"
run torch-p2 "$PY" bench/torch_ref.py p2 --data "$OUT/data.json" --out "$RES"
run overopt-gemm "$BIN" gemm --data "$OUT/data.json" --out "$RES"
run torch-gemm "$PY" bench/torch_ref.py gemm --data "$OUT/data.json" --out "$RES"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

"$PY" bench/report.py summary "$RES" "$RSS"
