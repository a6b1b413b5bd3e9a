//! The Capsules kernel as a library: the real kernel (main.rs) and each
//! in-kernel test image (tests/*.rs) link it and provide `kernel_main`.

#![no_std]

extern crate alloc;

pub mod arch;
pub mod boot;
pub mod capsule;
pub mod control;
pub mod diag;
pub mod drivers;
pub mod kloop;
pub mod logger;
pub mod mm;
pub mod net;
pub mod programs;
pub mod random;
pub mod runtime;
pub mod sched;
pub mod testing;
pub mod time;

/// Prints to the serial console, without log decoration.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::drivers::serial::Console, $($arg)*);
    }};
}

unsafe extern "C" {
    static __build_id_note_start: u8;
    static __build_id_note_end: u8;
}

/// The GNU build id the linker computed over this image: equal for identical
/// builds, different otherwise. Clients compare it before trusting a VM with
/// state from another (migration needs the same build).
pub fn build_id() -> &'static [u8] {
    let start = &raw const __build_id_note_start;
    let end = &raw const __build_id_note_end;
    let len = end as usize - start as usize;
    // SAFETY: the linker script brackets the note section with these symbols;
    // it lies in the loaded read-only segment.
    let note = unsafe { core::slice::from_raw_parts(start, len) };
    // Note layout: namesz, descsz, type (u32 each), name "GNU\0", descriptor.
    if note.len() < 16 {
        return &[];
    }
    let descsz = u32::from_le_bytes([note[4], note[5], note[6], note[7]]) as usize;
    note.get(16..16 + descsz).unwrap_or(&[])
}

/// The build id as lowercase hex, for logs.
pub fn build_id_hex() -> BuildIdHex {
    BuildIdHex
}

pub struct BuildIdHex;

impl core::fmt::Display for BuildIdHex {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in build_id() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
