//! x86_64 support: PVH boot, descriptor tables, traps, APIC, PIT, port I/O.

pub mod apic;
pub mod boot;
pub mod cpu;
pub mod gdt;
pub mod idt;
pub mod pit;
pub mod port;
pub mod trap;

use capsules_wire::exit::{DEBUG_EXIT_PORT, KernelExit};

/// Ends the VM through QEMU's `isa-debug-exit` device. If the device is absent
/// the CPU halts with interrupts off, which at least stops the guest.
pub fn exit_qemu(reason: KernelExit) -> ! {
    // SAFETY: writing to the debug-exit port has no effect on memory; without the
    // device the write is ignored.
    unsafe { port::outl(DEBUG_EXIT_PORT, reason.code()) };
    loop {
        // SAFETY: halting with interrupts disabled parks the CPU for good.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

pub fn disable_interrupts() {
    ::x86_64::instructions::interrupts::disable();
}

pub fn enable_interrupts() {
    ::x86_64::instructions::interrupts::enable();
}

pub fn interrupts_enabled() -> bool {
    ::x86_64::instructions::interrupts::are_enabled()
}

/// Runs `f` with interrupts disabled, restoring the previous state afterwards.
pub fn without_interrupts<R>(f: impl FnOnce() -> R) -> R {
    ::x86_64::instructions::interrupts::without_interrupts(f)
}

/// Enables interrupts and halts until the next one, atomically: an interrupt
/// that arrives between the check that led here and the halt still wakes us,
/// because `sti` takes effect only after the following instruction.
pub fn wait_for_interrupt() {
    // SAFETY: `sti; hlt` only changes the interrupt flag and waits.
    unsafe { core::arch::asm!("sti; hlt", options(nomem, nostack)) };
}
