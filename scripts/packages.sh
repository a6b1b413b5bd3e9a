#!/usr/bin/env bash
# The one list of Debian packages Capsules needs, and the step that installs
# what is missing. Used by scripts/demo.sh (the README's main command) and by
# .ci/run (the test command's CI entry point).
#
#   bash scripts/packages.sh demo    # what the demo needs
#   bash scripts/packages.sh test    # what every test level needs
#
# As root it installs what is missing with apt-get (no questions, no stdin).
# As another user it prints the exact apt-get command and exits 1.
# Everything it prints goes to stderr: stdout stays the caller's (the demo's
# --json report, for one).
set -euo pipefail
exec 1>&2

# program -> Debian package that provides it
declare -A demo_programs=(
    [qemu-system-x86_64]=qemu-system-x86
    [ip]=iproute2
)
declare -A test_programs=(
    [qemu-system-x86_64]=qemu-system-x86
    [ip]=iproute2
    [ss]=iproute2
    [ping]=iputils-ping
    [arping]=iputils-arping
    [socat]=socat
    [nc]=netcat-openbsd
    [curl]=curl
    [dig]=dnsutils
    [redis-cli]=redis-tools
    [redis-benchmark]=redis-tools
    [git]=git
)

usage() {
    echo "usage: $0 demo|test" >&2
    exit 2
}

[ "$#" -eq 1 ] || usage
case "$1" in
    demo) declare -n wanted=demo_programs ;;
    test) declare -n wanted=test_programs ;;
    *) usage ;;
esac

missing=()
for program in "${!wanted[@]}"; do
    if ! command -v "$program" >/dev/null 2>&1; then
        package="${wanted[$program]}"
        case " ${missing[*]-} " in
            *" $package "*) ;;
            *) missing+=("$package") ;;
        esac
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "packages: everything needed is present"
else
    # Sorted, so the message is the same on every run.
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort)
    if [ "$(id -u)" -ne 0 ]; then
        echo "packages: missing ${missing[*]}; install them as root with:" >&2
        echo "    apt-get install -y --no-install-recommends ${missing[*]}" >&2
        echo "(Capsules also needs root to run: labs use network namespaces and taps)" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "packages: missing ${missing[*]} and this machine has no apt-get; install them by hand" >&2
        exit 1
    fi
    echo "packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update </dev/null
    apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
fi
