#!/usr/bin/env bash
# Cargo runner for kernel images (kernel/.cargo/config.toml): boots the ELF in
# QEMU with the serial console on stdout, and maps the isa-debug-exit status
# to a process status cargo understands (0 = pass). A hanging kernel is ended
# after KERNEL_TEST_TIMEOUT seconds (default 120) and fails.
#
# An image may declare that it is meant to end otherwise (a fault report
# test) by printing "KERNEL-TEST expect-exit=N" and any number of
# "KERNEL-TEST expect-output=TEXT" lines: it then passes only if QEMU exits
# with N and every TEXT appears in the output that follows.
set -u
elf="$1"
shift
timeout_s="${KERNEL_TEST_TIMEOUT:-120}"
cmdline="${KERNEL_TEST_CMDLINE:-log=info}"
accel="${KERNEL_TEST_ACCEL:-tcg}"

if ! command -v qemu-system-x86_64 >/dev/null; then
    echo "run-kernel-test: qemu-system-x86_64 not found (apt-get install qemu-system-x86)" >&2
    exit 2
fi

serial_log=$(mktemp)
# A cluster key delivered the way labs deliver it: a root-only file handed to
# QEMU's fw_cfg as opt/capsules/key, never on the command line. Its bytes are
# fixed so that the fw_cfg test image can check what arrives.
key_file=$(mktemp)
trap 'rm -f "$serial_log" "$key_file"' EXIT
chmod 600 "$key_file"
printf '%s' 'capsules in-kernel test key 0001' >"$key_file"

# Two virtio-net devices joined by a QEMU-internal hub: the NIC tests send on
# one and receive on the other, with no host network involved.
timeout --foreground -k 5 "$timeout_s" qemu-system-x86_64 \
    -machine q35 -cpu max -m 256 -smp 1 -accel "$accel" \
    -nodefaults -no-user-config -display none -no-reboot \
    -kernel "$elf" -append "$cmdline" \
    -fw_cfg "name=opt/capsules/key,file=$key_file" \
    -serial stdio \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -netdev hubport,id=port0,hubid=0 -device virtio-net-pci,netdev=port0,mac=52:54:00:00:00:01 \
    -netdev hubport,id=port1,hubid=0 -device virtio-net-pci,netdev=port1,mac=52:54:00:00:00:02 \
    </dev/null 2> >(grep -v "is not connected to host network" >&2) | tee "$serial_log"
status=${PIPESTATUS[0]}

expected=$(sed -n 's/^KERNEL-TEST expect-exit=\([0-9]*\).*/\1/p' "$serial_log" | tr -d '\r' | head -n1)
if [ -n "$expected" ]; then
    if [ "$status" != "$expected" ]; then
        echo "run-kernel-test: FAILED: expected QEMU status $expected, got $status ($elf)" >&2
        exit 1
    fi
    missing=0
    while IFS= read -r line; do
        # Only the output after the declarations counts.
        if ! grep -v '^KERNEL-TEST ' "$serial_log" | tr -d '\r' | grep -qF -- "$line"; then
            echo "run-kernel-test: FAILED: expected output missing: $line" >&2
            missing=1
        fi
    done < <(sed -n 's/^KERNEL-TEST expect-output=//p' "$serial_log" | tr -d '\r')
    [ $missing = 0 ] && echo "run-kernel-test: ended as declared (status $status)" && exit 0
    exit 1
fi

case $status in
    33) exit 0 ;;
    35) echo "run-kernel-test: FAILED: a test failed ($elf)" >&2 ;;
    37) echo "run-kernel-test: FAILED: kernel panic ($elf)" >&2 ;;
    39) echo "run-kernel-test: FAILED: CPU exception ($elf)" >&2 ;;
    41) echo "run-kernel-test: FAILED: bad kernel command line ($elf)" >&2 ;;
    124|137) echo "run-kernel-test: FAILED: timed out after ${timeout_s}s ($elf)" >&2 ;;
    *) echo "run-kernel-test: FAILED: QEMU exited with status $status ($elf)" >&2 ;;
esac
exit 1
