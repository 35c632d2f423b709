#!/usr/bin/env bash
# Set up everything the notebooks need; idempotent (a second run only checks).
#   1. a Python venv at environment/.venv with environment/requirements-notebooks.txt;
#   2. the evcxr Jupyter kernel (cargo install evcxr_jupyter, pinned, ~10 min cold);
#   3. the kernel spec `overopt-rust` (evcxr_jupyter behind environment/evcxr-kernel.sh), in
#      the venv's Jupyter data dir (the user's Jupyter dirs are left alone);
#   4. cargo fetch, since the kernels build offline.
# Prints the time of each step. Needs python3 (with venv), cargo, and the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EVCXR_VERSION=0.22.0
VENV=$ROOT/environment/.venv
PY=${PYTHON:-python3}
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin

now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

t=$(now)
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# pip only touches the network when a pin is missing or different.
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
        -r environment/requirements-notebooks.txt; then
    echo "setup-notebooks: pip install failed" >&2
    exit 1
fi
echo "setup-notebooks: venv ($VENV) ready in $(took "$t")"

t=$(now)
installed=""
if [ -x "$CARGO_BIN/evcxr_jupyter" ]; then
    installed=$(cargo install --list | awk '/^evcxr_jupyter v/ { sub(":", "", $2); print $2 }')
fi
if [ "$installed" = "v$EVCXR_VERSION" ]; then
    echo "setup-notebooks: evcxr_jupyter $EVCXR_VERSION already installed ($(took "$t"))"
else
    echo "setup-notebooks: cargo install evcxr_jupyter $EVCXR_VERSION (about 10 minutes on 2 cores)"
    # Its own target dir: sharing CARGO_TARGET_DIR with the crate would not help (different
    # dependency versions and profile) and would let the two builds block each other.
    CARGO_TARGET_DIR="$ROOT/target/evcxr-install" \
        cargo install evcxr_jupyter --version "$EVCXR_VERSION" --locked
    rm -rf "$ROOT/target/evcxr-install"
    echo "setup-notebooks: evcxr_jupyter installed in $(took "$t")"
fi

t=$(now)
# evcxr's own kernel spec (logos, kernel.js) goes to a directory of its own in the venv
# (JUPYTER_PATH makes evcxr write <dir>/kernels/rust there and nowhere else); the kernel the
# notebooks use, `overopt-rust`, is that spec with environment/evcxr-kernel.sh as the launcher.
EVCXR_SPEC=$VENV/share/evcxr
JUPYTER_PATH=$EVCXR_SPEC "$CARGO_BIN/evcxr_jupyter" --install >/dev/null
SPEC=$VENV/share/jupyter/kernels/overopt-rust
mkdir -p "$SPEC"
cp "$EVCXR_SPEC"/kernels/rust/* "$SPEC"/
"$VENV/bin/python" - "$SPEC/kernel.json" "$ROOT/environment/evcxr-kernel.sh" <<'PY'
import json, sys
spec = {
    "argv": [sys.argv[2], "--control_file", "{connection_file}"],
    "display_name": "Rust (overopt)",
    "language": "rust",
    "interrupt_mode": "message",
}
with open(sys.argv[1], "w") as f:
    json.dump(spec, f, indent=2)
PY
"$VENV/bin/jupyter" kernelspec list | grep -q "^ *overopt-rust " || {
    echo "setup-notebooks: the overopt-rust kernel spec is not visible to $VENV/bin/jupyter" >&2
    exit 1
}
echo "setup-notebooks: kernel spec overopt-rust in $SPEC ($(took "$t"))"

t=$(now)
# The kernels build offline (notebooks/evcxr.toml): make sure every crate is downloaded.
cargo fetch --locked --quiet
echo "setup-notebooks: crates fetched ($(took "$t"))"
