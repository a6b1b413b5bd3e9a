#!/usr/bin/env bash
# Runs every test level of Capsules, in order; stops at the first failure.
#   1. build the kernel (release ELF that labs and system tests boot)
#   2. in-kernel tests, booted in QEMU by `cargo test` in kernel/
#   3. host tests (wire, apps, capsulectl, bench) and system tests (labs of VMs)
# Needs root; installs the Debian packages it lacks first (scripts/packages.sh).
# Ends with one line counting every test of every level: "total: N passed, 0 failed".
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

section() {
    printf '\n==== %s ====\n' "$1"
}

# Everything the test runners print is also kept here, to count at the end.
transcript=$(mktemp)
trap 'rm -f "$transcript"' EXIT

start=$SECONDS

section "0/3 packages: bash scripts/packages.sh test"
bash scripts/packages.sh test </dev/null

section "1/3 builds: the kernel and capsulectl (release)"
(cd kernel && cargo build --release)
# The release capsulectl is what the README's demo runs; its build directory
# also seeds the fresh clone that the main-command test builds.
cargo build --release -p capsulectl

section "2/3 in-kernel tests in QEMU: cargo test (kernel/)"
(cd kernel && cargo test) 2>&1 | tee -a "$transcript"

section "3/3 host and system tests: cargo test --workspace -- --test-threads=1"
# One test at a time: every TCG guest keeps a host core busy.
cargo test --workspace -- --test-threads=1 2>&1 | tee -a "$transcript"

# In-kernel images print "N passed, 0 failed" (a fault-report image ends
# "as declared" and counts as one); cargo prints "test result: ok. N passed; M failed".
total=$(tr -d '\r' < "$transcript" | awk '
    /^[0-9]+ passed, 0 failed$/ { n += $1 }
    /^run-kernel-test: ended as declared/ { n += 1 }
    /^test result: ok\. [0-9]+ passed/ { n += $4 }
    END { print n + 0 }')
section "all tests passed in $((SECONDS - start)) s"
echo "total: $total passed, 0 failed"
