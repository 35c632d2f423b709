#!/usr/bin/env bash
# A fresh run of one teach-scale DAA run, compared with the committed expected results
# (artifact/expected/teach/results.parquet) by `overopt compare --subset`.
#
#   bash environment/check-teach.sh [RUN_ID]      (default: dpo-b0.3-small-s0)
#
# Runs only what that run needs, through the job-array entry point: the medium SFT model
# (whose samples become the preference pairs), the pairs, the run's own size's SFT, the DAA run
# and its four evaluations; then `overopt collect` and the comparison. A few minutes on 2
# cores. The teach table itself comes from `overopt reproduce` (environment/reproduce.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-dpo-b0.3-small-s0}
OUT=${OVEROPT_CHECK_OUT:-target/check-teach}
CFG=artifact/configs/teach/teach.toml
EXPECTED=artifact/expected/teach/results.parquet
[ -f "$EXPECTED" ] || { echo "check-teach: $EXPECTED is missing" >&2; exit 1; }
bin=$(PROFILE=dev bash environment/build.sh | tail -n 1)
SECONDS=0
rm -rf "$OUT"
"$bin" sweep --config "$CFG" --out "$OUT" --run "$RUN"
"$bin" collect --config "$CFG" --out "$OUT" >/dev/null
"$bin" compare --subset --expected "$EXPECTED" --actual "$OUT/results.parquet"
echo "check-teach: $RUN reproduced the committed rows in ${SECONDS} s"
