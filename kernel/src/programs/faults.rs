//! Test-only programs that fail on purpose, to show that a failing capsule
//! ends alone while the kernel and its neighbours go on.

use alloc::string::String;

use crate::capsule::api;

fn delay(args: &[String]) -> Result<(), String> {
    let ms: u64 = match args.first() {
        Some(ms) => ms.parse().map_err(|_| alloc::format!("bad delay '{ms}'"))?,
        None => 0,
    };
    api::sleep_ms(ms);
    Ok(())
}

pub fn panic_after(args: &[String]) -> Result<(), String> {
    delay(args)?;
    panic!("crash-panic: deliberate panic");
}

pub fn divide_by_zero_after(args: &[String]) -> Result<(), String> {
    delay(args)?;
    let zero = core::hint::black_box(0u64);
    // SAFETY: deliberately divides by zero in the CPU (not Rust's checked
    // division, which would panic instead of faulting).
    unsafe {
        core::arch::asm!("xor edx, edx", "div {z}", z = in(reg) zero, inout("rax") 1u64 => _, out("rdx") _)
    };
    Ok(())
}

pub fn touch_unmapped_after(args: &[String]) -> Result<(), String> {
    delay(args)?;
    let address = core::hint::black_box(0x0000_7fff_dead_0000u64);
    // SAFETY: deliberately unsound: the address is never mapped, so the read
    // faults and the capsule is ended.
    let value = unsafe { (address as *const u64).read_volatile() };
    core::hint::black_box(value);
    Ok(())
}
