#!/usr/bin/env bash
# Jupyter kernel launcher of the `overopt-rust` kernel (environment/setup-notebooks.sh writes
# its kernel.json): evcxr_jupyter with a build directory of its own, so that several notebooks
# can run at once, and a dependency build shared by all of them.
#
# evcxr compiles every cell as a crate in its tmpdir and allows ONE kernel per tmpdir (two
# kernels would overwrite each other's src/lib.rs). evcxr.toml's `tmpdir` would give every
# kernel the same one (and it wins over EVCXR_TMPDIR), so evcxr.toml leaves it out and this
# script picks the first free slot notebooks/.evcxr-build/kernel-N (a lock held for the
# kernel's lifetime) and passes it as EVCXR_TMPDIR. evcxr always builds in <tmpdir>/target;
# every slot's `target` is a link to one shared target directory, so the crate and its
# dependencies compile once for all kernels (cargo's lock on the build directory serializes
# two kernels that build at the same moment).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${OVEROPT_EVCXR_BUILD:-$ROOT/notebooks/.evcxr-build}
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
export PATH="$CARGO_BIN:$PATH"

mkdir -p "$BUILD/target" "$BUILD/.cargo"
# Profile overrides for the kernels' builds, read by cargo from this parent directory of every
# slot (evcxr's generated Cargo.toml sets `[profile.dev] opt-level` from evcxr.toml, which then
# applies to the cell crate only). Compile time matters more than speed for most dependencies
# (polars alone is a large part of the build, and the notebooks' tables are small): opt-level
# 0. The crates that run the training and sampling get opt-level 1, which compiles much faster
# than 2-3 and runs the tiny models many times faster than 0. No debug info or assertions.
# OVEROPT_EVCXR_DEPS_OPT / OVEROPT_EVCXR_REST_OPT change the two levels (a change rebuilds).
hot=${OVEROPT_EVCXR_DEPS_OPT:-1}
{
    echo "# Written by environment/evcxr-kernel.sh; applies to the notebook kernels' builds only."
    echo '[profile.dev.package."*"]'
    echo "opt-level = ${OVEROPT_EVCXR_REST_OPT:-0}"
    echo "debug = false"
    echo "debug-assertions = false"
    echo "overflow-checks = false"
    for p in overopt candle-core candle-nn gemm gemm-common gemm-f16 gemm-f32 gemm-f64 \
        gemm-c32 gemm-c64 pulp half rayon rayon-core rand rand_core rand_chacha rand_distr; do
        echo
        echo "[profile.dev.package.$p]"
        echo "opt-level = $hot"
    done
} > "$BUILD/.cargo/config.toml.$$"
# Replace it only when it changed (a change rebuilds), atomically (kernels may start together).
if cmp -s "$BUILD/.cargo/config.toml.$$" "$BUILD/.cargo/config.toml"; then
    rm "$BUILD/.cargo/config.toml.$$"
else
    mv "$BUILD/.cargo/config.toml.$$" "$BUILD/.cargo/config.toml"
fi

slot=""
for i in $(seq 0 31); do
    dir=$BUILD/kernel-$i
    exec {lock}>"$dir.lock"
    if flock -n "$lock"; then
        slot=$dir
        break
    fi
    exec {lock}>&-
done
if [ -z "$slot" ]; then
    echo "evcxr-kernel: 32 kernels are running already (locks in $BUILD)" >&2
    exit 1
fi
mkdir -p "$slot"
[ -L "$slot/target" ] || { rm -rf "$slot/target"; ln -s ../target "$slot/target"; }
# Resolve the crate's dependencies exactly as the crate's own lock file does.
[ -f "$slot/Cargo.lock" ] || cp "$ROOT/Cargo.lock" "$slot/Cargo.lock"

export EVCXR_TMPDIR=$slot
# evcxr_jupyter rewrites the kernel spec it finds under $JUPYTER_PATH/kernels/rust (or the
# user's Jupyter dir) when its version differs; point it at its own copy in the venv so it
# never touches the user's kernels.
export JUPYTER_PATH=$ROOT/environment/.venv/share/evcxr
# The lock stays held by the inherited descriptor until the kernel exits.
exec "$CARGO_BIN/evcxr_jupyter" "$@"
