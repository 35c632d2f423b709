#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (parity with HF fixtures included),
# then one fresh teach-scale DAA run compared with artifact/expected/teach (check-teach.sh),
# the environment scripts the Docker image runs (here with CPU features), the
# Dockerfile checks (tests/test_dockerfile.py), the GPU benchmark script's summary against
# stand-in programs (tests/test_gpu_script.py), and every notebook executed headless in the
# evcxr Rust kernel with the notebook runner's self-test (environment/test-notebooks.sh).
# Self-contained: needs only the machine's Rust toolchain, python3 and the package registries
# (crates.io, PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
SECONDS=0
# Disk is the resource that ran out on CI (the notebooks' kernels), so say what is free.
disk() { df -h . | awk 'NR==2 {print "disk: " $4 " free of " $2}'; }
disk
echo "== cargo test (all targets) =="
cargo test --locked --all-targets --no-run 2>&1 | tail -3
cargo test --locked 2>&1
echo "== cargo test: ${SECONDS} s =="

echo "== a fresh teach-scale run against the committed expected results (environment/check-teach.sh) =="
bash environment/check-teach.sh

echo "== environment scripts of the Docker image (CPU) =="
bash environment/install-rust.sh
PROFILE=dev bash environment/build.sh

echo "== Dockerfile checks =="
VENV=environment/.venv-tests
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r environment/requirements-tests.txt
"$VENV/bin/python" tests/test_dockerfile.py
echo "== bench/gpu.sh against stand-ins (tests/test_gpu_script.py) =="
"$VENV/bin/python" tests/test_gpu_script.py

echo "== notebooks (environment/test-notebooks.sh) at ${SECONDS} s =="
disk
bash environment/test-notebooks.sh
disk
echo "== test.sh: all passed in ${SECONDS} s =="
