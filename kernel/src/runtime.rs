//! What the precompiled `core` expects from a freestanding image: the memory
//! intrinsics (no libc here), an unwinding personality (never used: panics
//! abort), and the panic handler.

use core::arch::asm;
use core::fmt::Write;

use capsules_wire::exit::KernelExit;

/// # Safety
/// Standard `memcpy` contract: `n` bytes readable at `src`, writable at `dest`, no overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: forwarded to the caller; `rep movsb` copies forwards (DF is clear).
    unsafe {
        asm!("rep movsb", inout("rdi") dest => _, inout("rsi") src => _, inout("rcx") n => _,
            options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// Standard `memmove` contract: the regions may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dest does not start inside src.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: copy backwards with the direction flag set, then clear it again
    // (the ABI requires DF clear).
    unsafe {
        asm!("std", "rep movsb", "cld",
            inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _, inout("rcx") n => _,
            options(nostack))
    };
    dest
}

/// # Safety
/// Standard `memset` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("rep stosb", inout("rdi") dest => _, inout("rcx") n => _, in("al") value as u8,
            options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// Standard `memcmp` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n`, both regions are `n` bytes long (caller contract).
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard `bcmp` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Never called: the kernel is built with `panic = "abort"`, but the
/// precompiled `core` still refers to the symbol.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Never called for the same reason: the precompiled `alloc` refers to it
/// from landing pads that `panic = "abort"` never reaches.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    panic!("_Unwind_Resume called: unwinding is not supported");
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // A panic in a capsule's task ends that capsule only.
    if let Some(slot) = crate::sched::current_slot() {
        let mut text = crate::diag::FixedText::<512>::new();
        let _ = write!(text, "{}", info.message());
        if let Some(loc) = info.location() {
            let _ = write!(text, " (at {}:{})", loc.file(), loc.line());
        }
        crate::capsule::on_task_panic(slot, text.as_str());
    }
    crate::arch::without_interrupts(|| {
        let mut out = crate::drivers::serial::emergency_writer();
        let _ = writeln!(
            out,
            "\n*** KERNEL PANIC while running: {}",
            crate::diag::running()
        );
        if let Some(loc) = info.location() {
            let _ = writeln!(out, "    at {}:{}:{}", loc.file(), loc.line(), loc.column());
        }
        let _ = writeln!(out, "    {}", info.message());
        let rbp: u64;
        // SAFETY: reading the frame pointer register has no side effects.
        unsafe { asm!("mov {}, rbp", out(reg) rbp, options(nomem, nostack, preserves_flags)) };
        crate::diag::print_backtrace(&mut out, rbp);
        let _ = writeln!(
            out,
            "*** ending VM with status {}",
            KernelExit::Panic.qemu_status()
        );
        crate::arch::exit_qemu(KernelExit::Panic)
    })
}
