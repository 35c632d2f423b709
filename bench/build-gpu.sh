#!/usr/bin/env bash
# Build the P3 GPU benchmark binary (overopt-gpu-bench with --features cuda) on a machine without
# a GPU, a driver or a system CUDA toolkit: CUDA 13.0 comes from PyPI wheels. From the repository
# root (any directory works):
#
#   bash bench/build-gpu.sh [extra cargo build arguments, e.g. --locked]
#   nice -n 10 bash bench/build-gpu.sh            (on a shared machine)
#
# Needs: the Rust toolchain (rust-toolchain.toml), python3 with the venv module, a C compiler
# (gcc: nvcc's host compiler and the linker), and access to PyPI and crates.io. Nothing else.
#
# Steps (every one is redone or reused on a second run, so re-running is cheap when nothing
# changed):
#   1. A virtual environment with the pinned NVIDIA packages of bench/cuda-requirements.txt
#      (reinstalled only when that file changes). nvcc, the headers and the libraries are in
#      <venv>/lib/python3.*/site-packages/nvidia/cu13.
#   2. <venv>/cuda-link/lib, what the linker needs and no driver provides: unversioned names
#      (libcublas.so, ...) linking to the wheels' versioned libraries, and a stub libcuda.so
#      (soname libcuda.so.1) that defines every driver API function as one returning
#      CUDA_ERROR_STUB_LIBRARY. Its function list is generated each time from the wheels' cuda.h
#      (preprocessed, so the _v2/_v3 names the header maps to are the ones listed) together with
#      the functions declared by the driver bindings of the cudarc crate in the build. The
#      stub is only for linking: on the GPU machine the driver's libcuda.so.1 is loaded.
#   3. cargo build --release --features cuda --bin overopt-gpu-bench with CUDA_COMPUTE_CAP, into
#      its own target directory. To save build time, dependencies that do no numeric work are
#      built at opt-level 0 (the crate itself, candle-core, candle-nn, cudarc, half and gemm stay
#      at 3); CUDA_DEPS_OPT=3 builds everything at 3.
#      The binary is copied to bench/bin/overopt-gpu-bench without its symbol table (the device
#      tool carries at most 64 MiB), and bench/curand_stub.c is built into
#      bench/bin/curand-stub/libcurand.so.10 (bench/gpu.sh uses it where the GPU machine's
#      Python CUDA libraries lack cuRAND).
#   4. A load check (the binary's --help, with every symbol bound at load time, against the
#      wheels' libraries and the stub driver, then with the cuRAND stub), the crate's own CUDA
#      kernels compiled by NVRTC (`--nvrtc-check`, no GPU needed), and a summary: the binary's
#      path, its size and ldd's lines for the CUDA libraries.
#
# Time: about 20 minutes from scratch on 2 cores (measured: 22.5 min on 2 shared cores under
# nice, of which 20 s for the wheels: about 740 MB to download, 1.2 GB installed). A second run
# with nothing changed takes a few seconds.
#
# Environment variables:
#   CUDA_VENV          virtual environment (default: bench/.cuda-venv, git-ignored)
#   CUDA_TARGET_DIR    cargo target directory (default: target/cuda)
#   CUDA_COMPUTE_CAP   GPU architecture to compile the kernels for (default: 90, H100/H200)
#   CUDA_DEPS_OPT      opt-level of the non-numeric dependencies (default: 0; 3 = plain release)
#   PYTHON             Python that creates the virtual environment (default: python3)
#   CC                 C compiler for the two stubs (default: gcc)
# Relative paths are taken from the repository root. Other variables that name a CUDA
# installation (CUDA_HOME, CUDA_PATH, CUDA_TOOLKIT_ROOT_DIR, NVCC, CUDARC_CUDA_VERSION, ...) are
# ignored, so that nothing from a system toolkit is mixed in.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
abs() { case $1 in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
VENV=$(abs "${CUDA_VENV:-bench/.cuda-venv}")
TARGET=$(abs "${CUDA_TARGET_DIR:-target/cuda}")
CAP=${CUDA_COMPUTE_CAP:-90}
DEPS_OPT=${CUDA_DEPS_OPT:-0}
PY=${PYTHON:-python3}
CC=${CC:-gcc}
REQ=bench/cuda-requirements.txt
BIN_NAME=overopt-gpu-bench
OUT_BIN=bench/bin/$BIN_NAME
CURAND_DIR=bench/bin/curand-stub
T0=$(date +%s)
step() { echo "== [$(($(date +%s) - T0))s] $*"; }
die() {
  echo "build-gpu.sh: error: $*" >&2
  exit 1
}

for tool in cargo "$CC" "$PY" ldd; do
  command -v "$tool" >/dev/null || die "'$tool' is not on PATH"
done

# 1. Virtual environment with the pinned CUDA wheels.
step "1/4 virtual environment $VENV ($REQ)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || die "'$PY -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
fi
REQ_SUM=$(sha256sum "$REQ" | cut -d' ' -f1)
STAMP=$VENV/.cuda-requirements.sha256
if [ "$(cat "$STAMP" 2>/dev/null)" != "$REQ_SUM" ]; then
  "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input \
    --only-binary=:all: -r "$REQ"
  echo "$REQ_SUM" >"$STAMP"
else
  echo "requirements unchanged since the last install: reusing the environment"
fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CU=$SITE/nvidia/cu13
for f in bin/nvcc include/cuda.h include/cuda_runtime.h lib/libcudart.so.13; do
  [ -e "$CU/$f" ] || die "$CU/$f is missing: is $REQ installed in $VENV?"
done
NVCC_RELEASE=$("$CU/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
echo "nvcc $NVCC_RELEASE: $CU/bin/nvcc"

# 2. What linking needs without a driver, in $LINK/lib.
LINK=$VENV/cuda-link
step "2/4 link directory $LINK/lib (unversioned library names, stub libcuda.so)"
rm -rf "$LINK"
mkdir -p "$LINK/lib" "$LINK/stub" "$LINK/run"
for f in "$CU"/lib/lib*.so.*; do
  name=$(basename "$f")
  # libcublas.so.13 -> libcublas.so; leaves out libnvrtc.alt.so.13, libnvrtc-builtins.so.13.0
  [[ $name =~ ^(lib[A-Za-z0-9_]+)\.so\.[0-9]+$ ]] || continue
  ln -s "$f" "$LINK/lib/${BASH_REMATCH[1]}.so"
done
# Driver API names from the header: after the preprocessor, each declaration carries the name
# the library exports (cuCtxCreate -> cuCtxCreate_v4, ...); only lowercase `cu` + uppercase
# names, so types (CUresult, ...) and callback typedefs are not taken.
"$CC" -E -P -x c -I"$CU/include" "$CU/include/cuda.h" |
  { grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' || true; } | sed -E 's/[[:space:]]*\($//' \
  >"$LINK/stub/names-cuda.h.txt"
# ... and those the cudarc crate of this build declares (all CUDA versions it supports: a
# superset of what its bindings for this toolkit can reference).
: >"$LINK/stub/names-cudarc.txt"
CUDARC_MANIFEST=$(cargo metadata --format-version 1 --features cuda \
  --filter-platform "$(rustc -vV | sed -n 's/^host: //p')" |
  "$VENV/bin/python" -c '
import json, sys
m = json.load(sys.stdin)
print(next((p["manifest_path"] for p in m["packages"] if p["name"] == "cudarc"), ""))') ||
  CUDARC_MANIFEST=""
CUDARC_SYS=${CUDARC_MANIFEST%Cargo.toml}src/driver/sys/mod.rs
if [ -n "$CUDARC_MANIFEST" ] && [ -f "$CUDARC_SYS" ]; then
  sed -nE 's/^pub unsafe fn (cu[A-Z][A-Za-z0-9_]*)\(.*/\1/p' "$CUDARC_SYS" >"$LINK/stub/names-cudarc.txt"
else
  echo "warning: cudarc's driver bindings not found (${CUDARC_SYS:-no cudarc in cargo metadata});" \
    "the stub lists only the names in cuda.h" >&2
fi
sort -u "$LINK/stub/names-cuda.h.txt" "$LINK/stub/names-cudarc.txt" >"$LINK/stub/names.txt"
[ "$(wc -l <"$LINK/stub/names-cuda.h.txt")" -gt 100 ] || die "too few driver functions found in cuda.h"
{
  echo "/* Generated by bench/build-gpu.sh: a link-time stand-in for the CUDA driver library."
  echo " * Every function returns CUDA_ERROR_STUB_LIBRARY (34). Never loaded on a GPU machine. */"
  while read -r name; do echo "int $name(void) { return 34; }"; done <"$LINK/stub/names.txt"
} >"$LINK/stub/libcuda_stub.c"
"$CC" -shared -fPIC -O1 -w -Wl,-soname,libcuda.so.1 -o "$LINK/lib/libcuda.so" "$LINK/stub/libcuda_stub.c"
ln -s ../lib/libcuda.so "$LINK/run/libcuda.so.1" # for the load check in step 4 only
echo "stub libcuda.so: $(wc -l <"$LINK/stub/names.txt") functions" \
  "($(wc -l <"$LINK/stub/names-cuda.h.txt") from cuda.h, $(sort -u "$LINK/stub/names-cudarc.txt" | wc -l) from cudarc)"
echo "$LINK/lib: $(cd "$LINK/lib" && echo *)"
echo

# 3. The build. Only this toolkit: its nvcc first on PATH (cudarc asks `nvcc --version` for the
# CUDA version; candle-kernels' build script compiles with it), its libraries via CUDA_ROOT (the
# link search path cudarc's build script adds) and LIBRARY_PATH (for -lcudart of candle-kernels).
step "3/4 cargo build --release --features cuda --bin $BIN_NAME (CUDA_COMPUTE_CAP=$CAP, target $TARGET)"
unset CUDA_HOME CUDA_PATH CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB NVCC CUDARC_CUDA_VERSION
export PATH="$CU/bin:$PATH"
export CUDA_ROOT=$LINK
export LIBRARY_PATH="$LINK/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=$CAP
export CARGO_TARGET_DIR=$TARGET
OPT_ARGS=()
if [ "$DEPS_OPT" != 3 ]; then
  OPT_ARGS+=(--config "profile.release.package.\"*\".opt-level=$DEPS_OPT")
  for p in candle-core candle-nn cudarc half gemm gemm-common gemm-f16 gemm-f32; do
    OPT_ARGS+=(--config "profile.release.package.$p.opt-level=3")
  done
fi
cargo build --release --features cuda --bin "$BIN_NAME" "${OPT_ARGS[@]}" "$@"
mkdir -p "$(dirname "$OUT_BIN")" "$CURAND_DIR"
cp "$TARGET/release/$BIN_NAME" "$OUT_BIN.tmp"
# The device tool carries at most 64 MiB in all, and the binary with its symbol table was 63.8
# MiB on 2026-12-02 (60.3 MB without): drop the symbol table from the copy. Panic messages keep
# their file and line; the unstripped binary stays in $TARGET/release (addr2line, perf).
if command -v strip >/dev/null; then
  strip "$OUT_BIN.tmp"
else
  echo "warning: no strip (binutils): $OUT_BIN keeps its symbol table" >&2
fi
mv -f "$OUT_BIN.tmp" "$OUT_BIN"
"$CC" -shared -fPIC -O2 -Wl,-soname,libcurand.so.10 -Wl,--version-script=bench/curand_stub.map \
  -o "$CURAND_DIR/libcurand.so.10" bench/curand_stub.c

# 4. Load check and summary. LD_BIND_NOW: every symbol the binary takes from the CUDA libraries
# must be found at start, not at first call. --help exits before any CUDA call.
step "4/4 load check and summary"
check_load() { # $1: label, $2: LD_LIBRARY_PATH
  if LD_BIND_NOW=1 LD_LIBRARY_PATH="$2" "$OUT_BIN" --help >/dev/null 2>"$LINK/load-check.err"; then
    echo "load check ($1): ok"
  else
    cat "$LINK/load-check.err" >&2
    die "load check ($1) failed: $OUT_BIN --help"
  fi
}
check_load "wheels' libraries, stub driver" "$CU/lib:$LINK/run"
check_load "cuRAND stub" "$ROOT/$CURAND_DIR:$CU/lib:$LINK/run"
# The crate's own kernels are CUDA C compiled at run time by NVRTC, which needs no GPU: compile
# them now, so that one that does not compile is found here and not on a lent GPU.
if ! LD_LIBRARY_PATH="$CU/lib:$LINK/run" "$OUT_BIN" --nvrtc-check >"$LINK/nvrtc-check.out" 2>&1; then
  cat "$LINK/nvrtc-check.out" >&2
  die "the crate's CUDA kernels did not compile with NVRTC ($OUT_BIN --nvrtc-check)"
fi
sed 's/^/nvrtc check: /' "$LINK/nvrtc-check.out"
SIZE=$(stat -c %s "$OUT_BIN")
echo "binary: $ROOT/$OUT_BIN ($SIZE bytes, $((SIZE / 1048576)) MiB), built in $(($(date +%s) - T0)) s"
CARRY=$(du -sb bench/bin | cut -f1)
if [ "$CARRY" -gt $((64 * 1048576)) ]; then
  echo "warning: bench/bin holds $CARRY bytes, more than the 64 MiB the device tool carries" >&2
fi
echo "curand stub: $ROOT/$CURAND_DIR/libcurand.so.10"
echo "ldd (CUDA libraries; LD_LIBRARY_PATH=$CU/lib, libcuda.so.1 is the GPU machine's driver):"
LD_LIBRARY_PATH="$CU/lib" ldd "$OUT_BIN" | grep -E 'not found|cuda|cublas|curand|nvrtc|cudart' | sed 's/^/   /'
