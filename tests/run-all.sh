#!/usr/bin/env bash
# Runs every test level of Capsules, in order; stops at the first failure.
#   1. build the kernel (release ELF that labs and system tests boot)
#   2. in-kernel tests, booted in QEMU by `cargo test` in kernel/
#   3. host tests (wire, capsulectl, bench) and system tests (labs of VMs)
# Needs root, qemu-system-x86_64, iproute2 and ping (.ci/run installs them).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

section() {
    printf '\n==== %s ====\n' "$1"
}

start=$SECONDS

section "1/3 kernel: cargo build --release (kernel/)"
(cd kernel && cargo build --release)

section "2/3 in-kernel tests in QEMU: cargo test (kernel/)"
(cd kernel && cargo test)

section "3/3 host and system tests: cargo test --workspace -- --test-threads=1"
# One test at a time: every TCG guest keeps a host core busy.
cargo test --workspace -- --test-threads=1

section "all tests passed in $((SECONDS - start)) s"
