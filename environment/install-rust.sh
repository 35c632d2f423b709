#!/usr/bin/env bash
# The Rust toolchain named by rust-toolchain.toml (the one place the version is written).
#
#   bash environment/install-rust.sh                  verify only (README commands, CI): the
#                                                     toolchain is installed and is what cargo,
#                                                     rustc and the listed components run in
#                                                     this repository; never downloads
#   bash environment/install-rust.sh --install        install it first when missing, with
#                                                     rustup (the Docker image: rustup comes
#                                                     from the distribution's `rustup` package),
#                                                     then verify
#   bash environment/install-rust.sh --print-version  print the version and exit
#
# The channel must be an exact version (x.y.z): `stable` or `1.95` would let two machines build
# with different compilers.
set -euo pipefail
cd "$(dirname "$0")/.."
TOML=rust-toolchain.toml

die() {
    echo "install-rust: $*" >&2
    exit 1
}

[ -f "$TOML" ] || die "$TOML not found in $PWD"
# `key = "value"` and `key = ["a", "b"]` on one line, in the [toolchain] table.
value() {
    sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*\(.*\)$/\1/p" "$TOML" | head -n 1 |
        sed 's/[[:space:]]*#.*$//'
}
VERSION=$(value channel | tr -d '"' | tr -d "'")
PROFILE=$(value profile | tr -d '"' | tr -d "'")
COMPONENTS=$(value components | tr -d '[]"' | tr -d "'" | tr ',' ' ' | xargs)
[ -n "$VERSION" ] || die "$TOML: no channel"
[[ "$VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] ||
    die "$TOML: channel \"$VERSION\" is not an exact version x.y.z"
PROFILE=${PROFILE:-minimal}

mode=verify
case "${1:-}" in
"") ;;
--install) mode=install ;;
--print-version)
    echo "$VERSION"
    exit 0
    ;;
*) die "unknown argument ${1} (expected --install or --print-version)" ;;
esac

if [ "$mode" = install ]; then
    command -v rustup >/dev/null ||
        die "rustup not found: install the distribution's rustup package first (apt-get install rustup)"
    if rustup toolchain list | grep -q "^$VERSION-"; then
        echo "install-rust: Rust $VERSION already installed"
    else
        args=(toolchain install "$VERSION" --profile "$PROFILE" --no-self-update)
        for c in $COMPONENTS; do args+=(--component "$c"); done
        echo "install-rust: rustup ${args[*]}"
        rustup "${args[@]}"
    fi
    rustup default "$VERSION"
    # rustup dispatches on the name it is called by. Distribution packages of rustup do not
    # always create these proxies; make sure cargo & co. exist in CARGO_HOME/bin (on PATH in
    # the image).
    bin=${CARGO_HOME:-$HOME/.cargo}/bin
    mkdir -p "$bin"
    for tool in cargo rustc rustdoc rustfmt cargo-fmt cargo-clippy clippy-driver; do
        command -v "$tool" >/dev/null || ln -sf "$(command -v rustup)" "$bin/$tool"
    done
fi

# Verify, inside the repository (so rust-toolchain.toml applies) and without downloading.
export RUSTUP_AUTO_INSTALL=0
rustc_v=$(rustc --version 2>&1) || die "rustc does not run: $rustc_v"
cargo_v=$(cargo --version 2>&1) || die "cargo does not run: $cargo_v"
[[ "$rustc_v" == "rustc $VERSION "* ]] ||
    die "rust-toolchain.toml asks for $VERSION, rustc is: $rustc_v (run with --install, or: rustup toolchain install $VERSION)"
[[ "$cargo_v" == "cargo $VERSION "* ]] || die "rust-toolchain.toml asks for $VERSION, cargo is: $cargo_v"
for c in $COMPONENTS; do
    case "$c" in
    rustfmt) out=$(rustfmt --version 2>&1) || die "component rustfmt missing: $out" ;;
    clippy) out=$(cargo clippy --version 2>&1) || die "component clippy missing: $out" ;;
    *) out=$(rustup component list --installed 2>/dev/null | grep "^$c") || die "component $c missing" ;;
    esac
done
echo "install-rust: ok: $rustc_v; $cargo_v; components: ${COMPONENTS:-none}"
