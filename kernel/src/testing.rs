//! A tiny harness for in-kernel tests. Each test image calls [`run`] from its
//! `kernel_main`; a failing assertion panics, and the panic handler ends QEMU
//! with a failure status that the runner (qemu/run-kernel-test.sh) reports.

use capsules_wire::exit::KernelExit;

pub struct Test {
    pub name: &'static str,
    pub run: fn(),
}

/// Runs every test in order, prints a summary and ends the VM.
pub fn run(suite: &'static str, tests: &'static [Test]) -> ! {
    log::info!("running {} in-kernel tests of '{suite}'", tests.len());
    for test in tests {
        crate::diag::set_running(test.name);
        let start = crate::time::since_boot_ns();
        (test.run)();
        let us = (crate::time::since_boot_ns() - start) / 1000;
        crate::println!("test {suite}::{} ... ok ({us} us)", test.name);
    }
    crate::println!("{} passed, 0 failed", tests.len());
    crate::arch::exit_qemu(KernelExit::Success)
}

/// Declares that this test image is meant to end with `reason` and print each
/// of `lines` (e.g. a fault report). The runner then passes the image only if
/// both happen, so fault handling itself is tested.
pub fn expect_exit(reason: KernelExit, lines: &[&str]) {
    crate::println!("KERNEL-TEST expect-exit={}", reason.qemu_status());
    for line in lines {
        crate::println!("KERNEL-TEST expect-output={line}");
    }
}
