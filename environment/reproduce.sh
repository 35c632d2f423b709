#!/usr/bin/env bash
# Main job: the teach-scale reproduction on CPU, offline. Extra arguments go to
# `overopt reproduce` (e.g. --section toy-mdp, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin overopt
exec ./target/release/overopt reproduce "$@"
