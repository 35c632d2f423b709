#!/usr/bin/env bash
# Main job: the teach-scale reproduction on CPU, offline. Extra arguments go to
# `overopt reproduce` (e.g. --section toy-mdp, --out DIR). Uses the same (dev) build as the
# test suite, whose dependencies are compiled with full optimization (Cargo.toml profiles),
# so a machine that ran the tests compiles nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --bin overopt
exec ./target/debug/overopt reproduce "$@"
