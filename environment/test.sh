#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (parity with HF fixtures included),
# then every notebook executed headless in the evcxr Rust kernel (smoke profile) and the
# notebook runner's self-test on a deliberately broken notebook.
# Self-contained: needs the machine's Rust toolchain, python3 and the package registries
# (crates.io, PyPI); environment/setup-notebooks.sh installs the rest (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
SECONDS=0
echo "== cargo test (all targets) =="
cargo test --locked --all-targets --no-run 2>&1 | tail -3
cargo test --locked 2>&1
echo "== cargo test: ${SECONDS} s =="

echo "== notebooks: setup (venv, evcxr_jupyter, kernel spec) =="
bash environment/setup-notebooks.sh
echo "== notebooks: the committed notebooks match notebooks/make_notebooks.py =="
python3 notebooks/make_notebooks.py --check
echo "== notebooks: execute all (smoke profile) =="
environment/.venv/bin/python environment/run-notebooks.py
echo "== notebooks: runner self-test (the broken fixture must be rejected) =="
environment/.venv/bin/python environment/run-notebooks.py --self-test
echo "== test.sh: all passed in ${SECONDS} s =="
