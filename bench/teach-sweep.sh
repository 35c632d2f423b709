#!/usr/bin/env bash
# Benchmark: the wall time of everything `overopt reproduce` runs at teach scale (the goal of
# issue #4: at most 20 minutes on 2 cores), from scratch, in a fresh output directory.
#
#   bash bench/teach-sweep.sh [--config FILE] [--keep]
#
# Prints the machine, the time of each stage (from the sweep's own lines) and, last,
# `teach-sweep wall_s=N goal_s=1200 ratio=R` (goal over wall: >= 1 meets the goal).
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=artifact/configs/teach/teach.toml
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --config) CFG=$2; shift ;;
        --keep) KEEP=1 ;;
        *) echo "teach-sweep: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
bin=$(PROFILE=dev bash environment/build.sh | tail -n 1)
OUT=$(mktemp -d "${TMPDIR:-/tmp}/teach-sweep.XXXXXX")
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(getconf _NPROCESSORS_ONLN) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "config: $CFG; output: $OUT"
start=$(date +%s.%N)
"$bin" reproduce --config "$CFG" --out "$OUT" 2>&1 | grep -E '^(sft [a-z]+: done|pairs|[a-z]+-b[0-9.]+.*\([0-9]+ s\)|reproduce: done)' || true
wall=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
[ -f "$OUT/results.parquet" ] || { echo "teach-sweep: no results table in $OUT" >&2; exit 1; }
[ "$KEEP" = 1 ] && echo "kept: $OUT" || rm -rf "$OUT"
awk -v w="$wall" 'BEGIN { printf "teach-sweep wall_s=%d goal_s=1200 ratio=%.2f\n", w, 1200 / (w > 0 ? w : 1) }'
