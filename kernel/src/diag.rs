//! Diagnostics for fault reports: what the CPU was doing, and a frame-pointer
//! backtrace (the kernel is built with frame pointers).

use core::fmt::Write;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

static RUNNING_PTR: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());
static RUNNING_LEN: AtomicUsize = AtomicUsize::new(0);

/// Records what the kernel is doing now, for fault reports.
pub fn set_running(what: &'static str) {
    RUNNING_LEN.store(0, Ordering::Relaxed);
    RUNNING_PTR.store(what.as_ptr() as *mut u8, Ordering::Relaxed);
    RUNNING_LEN.store(what.len(), Ordering::Relaxed);
}

pub fn running() -> &'static str {
    let ptr = RUNNING_PTR.load(Ordering::Relaxed);
    let len = RUNNING_LEN.load(Ordering::Relaxed);
    if ptr.is_null() {
        return "early boot";
    }
    // SAFETY: the pointer and length always come from a `&'static str`
    // (the length is cleared while the pair changes).
    unsafe { core::str::from_utf8_unchecked(core::slice::from_raw_parts(ptr, len)) }
}

/// Walks saved frame pointers starting at `rbp`, printing return addresses.
pub fn print_backtrace(out: &mut impl Write, mut rbp: u64) {
    let _ = write!(out, "    backtrace:");
    let (image_start, image_end) = crate::mm::frame::kernel_image_range();
    let in_stack = |addr: u64| {
        let (lo, hi) = crate::boot::boot_stack();
        (lo..hi).contains(&addr)
    };
    for _ in 0..16 {
        if rbp == 0 || !rbp.is_multiple_of(8) || !in_stack(rbp) {
            break;
        }
        // SAFETY: `rbp` lies inside the boot stack (checked above) and is aligned.
        let (next, ret) = unsafe { (*(rbp as *const u64), *((rbp + 8) as *const u64)) };
        if !(image_start..image_end).contains(&ret) {
            break;
        }
        let _ = write!(out, " {ret:#x}");
        rbp = next;
    }
    let _ = writeln!(out, "  (resolve with addr2line -e <kernel elf>)");
}
