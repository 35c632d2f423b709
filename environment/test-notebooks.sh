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
echo "== notebooks: execute all (smoke profile) =="
environment/.venv/bin/python environment/run-notebooks.py
echo "== notebooks: runner self-test (the broken fixture must be rejected) =="
environment/.venv/bin/python environment/run-notebooks.py --self-test
echo "== test-notebooks.sh: all passed in ${SECONDS} s =="
