//! The architecture boundary. Everything that touches x86_64 registers,
//! descriptor tables or interrupt controllers lives below `arch::x86_64`; the
//! rest of the kernel uses the small interface re-exported here.

pub mod x86_64;

pub use self::x86_64::{
    cpu, disable_interrupts, enable_interrupts, exit_qemu, interrupts_enabled, wait_for_interrupt,
    without_interrupts,
};
