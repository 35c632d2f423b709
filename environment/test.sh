#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (parity with HF fixtures included).
# Self-contained: needs only the machine's Rust toolchain and the crates.io registry.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
echo "== cargo test (all targets) =="
cargo test --locked --all-targets --no-run 2>&1 | tail -3
cargo test --locked 2>&1
