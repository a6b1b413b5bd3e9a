//! A kernel fault must end the VM with a report that says what happened,
//! where, and what was running. This image touches an unmapped page on
//! purpose; the runner checks the exit status and the report's lines.

#![no_std]
#![no_main]

use capsules_kernel::boot::BootInfo;
use capsules_kernel::diag;
use capsules_kernel::testing::expect_exit;
use capsules_wire::exit::KernelExit;

const UNMAPPED: u64 = 0x0000_2000_dead_0000;

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    expect_exit(
        KernelExit::Exception,
        &[
            "*** KERNEL FAULT: page fault (#PF) (vector 14)",
            "running: faults::write_to_unmapped_page",
            "cr2 (fault address): 0x00002000dead0000 (write to an unmapped page, kernel mode)",
            "backtrace:",
        ],
    );
    diag::set_running("faults::write_to_unmapped_page");
    // SAFETY: deliberately unsound: the address is not mapped, so the write
    // faults and the exception handler ends the VM.
    unsafe { (UNMAPPED as *mut u64).write_volatile(1) };
    panic!("the write to an unmapped page did not fault");
}
