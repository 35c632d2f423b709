#!/usr/bin/env bash
# Build the `overopt` binary. The README's commands, CI and the Docker image all build through
# this script; only the settings differ:
#
#   FEATURES=                 cargo features: empty (CPU, the default) or `cuda`
#   PROFILE=release           cargo profile: `release` (the image) or `dev` (what the test suite
#                             builds, so environment/reproduce.sh and CI compile nothing new)
#   CUDA_COMPUTE_CAP=90       required with `cuda`: the GPU's compute capability, for which
#                             candle-kernels compiles its kernels with nvcc (90 H100/H200,
#                             80 A100, 86 A40/RTX A6000, 89 L40S/RTX 4090)
#   OVEROPT_INSTALL_DIR=DIR   optional: copy the binary to DIR/${OVEROPT_BIN_NAME:-overopt}
#
# Prints the path of the built binary as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURES=${FEATURES:-}
PROFILE=${PROFILE:-release}

die() {
    echo "build: $*" >&2
    exit 1
}

args=(build --locked --bin overopt --profile "$PROFILE")
case "$PROFILE" in
release) subdir=release ;;
dev) subdir=debug ;;
*) die "PROFILE=$PROFILE: expected release or dev" ;;
esac
if [ -n "$FEATURES" ]; then
    args+=(--features "$FEATURES")
fi
cuda=0
if [[ " ${FEATURES//,/ } " == *" cuda "* ]]; then
    cuda=1
    command -v nvcc >/dev/null ||
        die "FEATURES=cuda needs nvcc on PATH (a CUDA 11.4-13.x toolkit: the nvidia/cuda *-devel images have it in /usr/local/cuda/bin)"
    [ -n "${CUDA_COMPUTE_CAP:-}" ] ||
        die "FEATURES=cuda needs CUDA_COMPUTE_CAP (e.g. 90 for H100/H200, 80 for A100, 86 for A40); nvidia-smi is not asked at build time"
    [[ "$CUDA_COMPUTE_CAP" =~ ^[0-9]{2,3}a?$ ]] ||
        die "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP: expected digits like 80, 86, 90 (or 90a)"
    export CUDA_COMPUTE_CAP
    echo >&2 "build: CUDA $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability $CUDA_COMPUTE_CAP"
fi

echo >&2 "build: cargo ${args[*]}"
cargo "${args[@]}"
bin="${CARGO_TARGET_DIR:-target}/$subdir/overopt"
[ -x "$bin" ] || die "cargo succeeded but $bin is missing"
if [ -n "${OVEROPT_INSTALL_DIR:-}" ]; then
    mkdir -p "$OVEROPT_INSTALL_DIR"
    install -m 0755 "$bin" "$OVEROPT_INSTALL_DIR/${OVEROPT_BIN_NAME:-overopt}"
    bin="$OVEROPT_INSTALL_DIR/${OVEROPT_BIN_NAME:-overopt}"
fi
missing=$(ldd "$bin" | awk '/not found/ { print $1 }' | tr '\n' ' ')
if [ -z "$missing" ]; then
    "$bin" --version >/dev/null || die "$bin does not run"
elif [ "$cuda" = 1 ] && [ "$missing" = "libcuda.so.1 " ]; then
    # No driver on this machine (a docker build): the binary links the driver library
    # libcuda.so.1, which `docker run --gpus all` brings at run time; nothing else is missing.
    echo >&2 "build: no CUDA driver here: $bin not run (only libcuda.so.1 is missing, as expected)"
else
    die "$bin: shared libraries not found: $missing"
fi
echo "$bin"
