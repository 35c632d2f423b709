#!/usr/bin/env bash
# Open JupyterLab on notebooks/ with the Rust kernel (evcxr, `overopt-rust`).
# Sets the notebooks up first when needed (environment/setup-notebooks.sh: a venv, evcxr, the
# kernel spec), and builds the crate for the kernels once, headless, so that the first notebook
# does not sit in "kernel starting" while the crate compiles. Extra arguments go to
# `jupyter lab` (e.g. --port 8889, --no-browser, --ip 0.0.0.0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash environment/setup-notebooks.sh
echo "lab: warming the kernels' build (the first time: the crate and its dependencies, minutes)"
environment/.venv/bin/python environment/run-notebooks.py --warm-only
exec environment/.venv/bin/jupyter lab --notebook-dir=notebooks "$@"
