#!/usr/bin/env bash
# Jupyter kernel launcher of the `overopt-rust` kernel (environment/setup-notebooks.sh writes
# its kernel.json): evcxr_jupyter with a build directory of its own, so that several notebooks
# can run at once, without compiling the crate once per kernel.
#
# evcxr compiles every cell as a crate in its tmpdir and allows ONE kernel per tmpdir (two
# kernels would overwrite each other's src/lib.rs). evcxr.toml's `tmpdir` would give every
# kernel the same one (and it wins over EVCXR_TMPDIR), so evcxr.toml leaves it out and this
# script picks the first free slot notebooks/.evcxr-build/kernel-N (a lock held for the
# kernel's lifetime) and passes it as EVCXR_TMPDIR.
#
# evcxr always builds in <tmpdir>/target, and the names it gives each cell's library
# (libctx.so, renamed to libcode_<n>.so with n counting from 1 in every kernel) are the same in
# every kernel: two kernels sharing one target directory load each other's cells (measured:
# "dlsym failed", a dead kernel). So every slot has a target directory of its own. A new slot
# starts from a copy of another slot's (the crate and its dependencies, without any cell
# libraries; the compiled libraries hard-linked, see below), taken while holding that
# directory's cargo locks, so only the first slot ever compiles the crate; cargo's fingerprints
# are relative to the target directory and stay valid.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${OVEROPT_EVCXR_BUILD:-$ROOT/notebooks/.evcxr-build}
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
export PATH="$CARGO_BIN:$PATH"

mkdir -p "$BUILD/.cargo"
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
# A slot made by an older version of this script linked its target to a shared one.
[ -L "$slot/target" ] && rm "$slot/target"
if [ ! -d "$slot/target" ]; then
    src=""
    for d in "$BUILD"/kernel-*/target; do
        if [ "$d" != "$slot/target" ] && [ -d "$d" ] && [ ! -L "$d" ] && [ -d "$d/debug" ]; then
            src=$d
            break
        fi
    done
    if [ -n "$src" ]; then
        # Hold the source's cargo locks (flock, as cargo takes them) so that no build changes
        # it while it is copied; a kernel building there makes this wait.
        fds=()
        while IFS= read -r f; do
            exec {fd}<"$f"
            flock -w 1800 "$fd" || { echo "evcxr-kernel: $f stays locked" >&2; exit 1; }
            fds+=("$fd")
        done < <(find "$src" -maxdepth 3 -name .cargo-lock)
        rm -rf "$slot/target.tmp"
        mkdir -p "$slot/target.tmp"
        # The compiled libraries (rlib, rmeta, so, a: about 2 GB of the 2.7 GB) become hard
        # links, not copies: a full copy per slot filled CI's disk with four notebooks at
        # once. rustc and the linker write a rebuilt library to a new file that replaces the
        # old name, so a rebuild in one slot never changes another slot's files. Everything
        # else (cargo's fingerprints, dep-info, build-script outputs, which cargo may rewrite
        # in place) is copied, but for rustc's incremental caches, which only speed up a rebuild
        # of the crate after an edit. Without hard links (another file system) it falls back to
        # a copy. The copy keeps mtimes to the nanosecond (tar's POSIX format; its default
        # format keeps whole seconds): cargo compares a unit's fingerprint file with its
        # dependencies' outputs, and a fingerprint cut to the second looked older than the
        # hard-linked library of a dependency built in the same second (autocfg), which
        # rebuilt num-traits and everything above it, the crate too (measured: a new slot's
        # kernel started in 120-225 s instead of about 20 s).
        skip=(-name 'libcode_*' -o -name 'libctx*' -o -path '*/ctx-*' -o -path '*/incremental/*'
            -o -name '.cargo-lock')
        lib=(-name '*.rlib' -o -name '*.rmeta' -o -name '*.so' -o -name '*.a')
        libs() {  # $1: -l (hard links) or -p (copies)
            (cd "$src" && find . -type f ! \( "${skip[@]}" \) \( "${lib[@]}" \) -print0 |
                xargs -0 -r cp "$1" --parents -t "$slot/target.tmp")
        }
        if ! libs -l 2>/dev/null; then
            rm -rf "$slot/target.tmp" && mkdir -p "$slot/target.tmp"
            libs -p
        fi
        tar -C "$src" --format=posix --exclude='libcode_*' --exclude='libctx*' --exclude='ctx-*' \
            --exclude='incremental' --exclude='.cargo-lock' --exclude='*.rlib' --exclude='*.rmeta' \
            --exclude='*.so' --exclude='*.a' -cf - . | tar -C "$slot/target.tmp" -xf -
        mv "$slot/target.tmp" "$slot/target"
        for fd in "${fds[@]}"; do exec {fd}<&-; done
    fi
fi
# Resolve the crate's dependencies exactly as the crate's own lock file does.
[ -f "$slot/Cargo.lock" ] || cp "$ROOT/Cargo.lock" "$slot/Cargo.lock"

export EVCXR_TMPDIR=$slot
# evcxr_jupyter rewrites the kernel spec it finds under $JUPYTER_PATH/kernels/rust (or the
# user's Jupyter dir) when its version differs; point it at its own copy in the venv so it
# never touches the user's kernels.
export JUPYTER_PATH=$ROOT/environment/.venv/share/evcxr
# The lock stays held by the inherited descriptor until the kernel exits.
exec "$CARGO_BIN/evcxr_jupyter" "$@"
