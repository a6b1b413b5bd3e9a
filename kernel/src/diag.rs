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

/// Formats into a fixed buffer, for paths that must not allocate (panics).
pub struct FixedText<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> FixedText<N> {
    pub fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }

    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 characters are ever copied in (see write_str).
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl<const N: usize> Default for FixedText<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Write for FixedText<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for c in s.chars() {
            let mut utf8 = [0u8; 4];
            let bytes = c.encode_utf8(&mut utf8).as_bytes();
            if self.len + bytes.len() > N {
                return Ok(()); // truncated, not failed
            }
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }
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
