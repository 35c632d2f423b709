#!/usr/bin/env bash
# Main job: the teach-scale reproduction on CPU, offline. Extra arguments go to
# `overopt reproduce` (e.g. --section toy-mdp, --out DIR). Builds through environment/build.sh
# (as CI and the Docker image do) with the same (dev) profile as the test suite, whose
# dependencies are compiled with full optimization (Cargo.toml profiles), so a machine that
# ran the tests compiles nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(PROFILE=dev bash environment/build.sh | tail -n 1)
exec "$bin" reproduce "$@"
