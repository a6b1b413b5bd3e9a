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

# Tests per level, counted from what the runners printed: in-kernel images
# print "N passed, 0 failed" (a fault-report image ends "as declared" and
# counts as one); cargo prints "test result: ok. N passed; M failed" after
# each test binary it announced with "Running ... (target/.../deps/NAME-HASH)":
# binaries named after a file of tests/tests/ are system tests, the rest host.
system_tests=$(cd tests/tests && ls -- *.rs | sed 's/\.rs$//' | tr '\n' ' ')
counts=$(tr -d '\r' < "$transcript" | awk -v systems="$system_tests" '
    BEGIN { split(systems, names, " "); for (i in names) is_system[names[i]] = 1 }
    /^ *Running / {
        bin = $NF; gsub(/[()]/, "", bin); sub(/.*\//, "", bin); sub(/-[0-9a-f]+$/, "", bin)
        next
    }
    /^ *Doc-tests / { bin = ""; next }
    /^[0-9]+ passed, 0 failed$/ { kernel += $1 }
    /^run-kernel-test: ended as declared/ { kernel += 1 }
    /^test result: ok\. [0-9]+ passed/ { if (bin in is_system) sys += $4; else host += $4 }
    END { printf "kernel %d\nhost %d\nsystem %d\n", kernel, host, sys }')
# A level that runs fewer tests than tests/min-test-counts says fails the run,
# so a deleted (or no longer built, or silently skipped) test is noticed.
short=0
total=0
while read -r level ran; do
    min=$(awk -v l="$level" '$1 == l { print $2 }' tests/min-test-counts)
    total=$((total + ran))
    if [ -z "$min" ]; then
        echo "FAILED: tests/min-test-counts has no line for the $level level" >&2
        short=1
    elif [ "$ran" -lt "$min" ]; then
        echo "FAILED: the $level level ran $ran tests, fewer than the $min in tests/min-test-counts:" \
            "a test was deleted or no longer runs (lower the number only if that was meant)" >&2
        short=1
    else
        echo "$level tests: $ran (at least $min)"
        if [ "$ran" -gt "$min" ]; then
            echo "  note: raise '$level $min' to '$level $ran' in tests/min-test-counts, so that losing one is noticed"
        fi
    fi
done <<<"$counts"
[ "$short" = 0 ] || exit 1
section "all tests passed in $((SECONDS - start)) s"
echo "total: $total passed, 0 failed"
