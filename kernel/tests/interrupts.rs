#![no_std]
#![no_main]

use capsules_kernel::boot::BootInfo;
use capsules_kernel::testing::{Test, run};

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    run("interrupts", &[])
}
