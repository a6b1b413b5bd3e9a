#!/usr/bin/env bash
# The main job in one command, from a fresh clone on a fresh Debian machine:
# installs the packages the demo needs, builds the kernel and capsulectl, and
# runs `capsulectl demo` (arguments are passed on, e.g. --moves 5 --plot x.svg).
# Needs root: the demo's lab uses a network namespace and taps.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/packages.sh demo
if [ "$(id -u)" -ne 0 ]; then
    echo "demo: run this as root (the lab uses a network namespace and taps)" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "demo: cargo not found: install the Rust toolchain named in rust-toolchain.toml" >&2
    exit 1
fi

echo "demo: building the kernel and capsulectl (release)" >&2
(cd kernel && cargo build --release --quiet)
cargo build --release --quiet -p capsulectl

exec target/release/capsulectl demo "$@" </dev/null
