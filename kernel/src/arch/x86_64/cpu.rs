//! CPU features, time stamp counter and random numbers.

use core::arch::x86_64::{__cpuid, _rdtsc};

/// Reads the time stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is available on every x86_64 CPU and has no side effects.
    unsafe { _rdtsc() }
}

fn has_rdrand() -> bool {
    let leaf1 = __cpuid(1);
    leaf1.ecx & (1 << 30) != 0
}

#[target_feature(enable = "rdrand")]
fn rdrand64() -> Option<u64> {
    let mut value = 0u64;
    for _ in 0..10 {
        if core::arch::x86_64::_rdrand64_step(&mut value) == 1 {
            return Some(value);
        }
    }
    None
}

/// 64 bits of hardware randomness when the CPU has RDRAND; `None` otherwise.
pub fn hardware_random() -> Option<u64> {
    if has_rdrand() {
        // SAFETY: the feature was checked just above.
        unsafe { rdrand64() }
    } else {
        None
    }
}

/// The TSC frequency the CPU reports (leaf 0x15, else the base frequency of
/// leaf 0x16), if it reports one.
pub fn tsc_hz_from_cpuid() -> Option<u64> {
    let max_leaf = __cpuid(0).eax;
    if max_leaf >= 0x15 {
        let l = __cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return Some(l.ecx as u64 * l.ebx as u64 / l.eax as u64);
        }
    }
    if max_leaf >= 0x16 {
        let mhz = __cpuid(0x16).eax & 0xffff;
        if mhz != 0 {
            return Some(mhz as u64 * 1_000_000);
        }
    }
    None
}

/// A short description of the CPU for the boot log.
pub fn vendor() -> [u8; 12] {
    let leaf0 = __cpuid(0);
    let mut out = [0u8; 12];
    out[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    out[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    out[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    out
}

pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags))
    };
    value
}

pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// # Safety
/// `value` must be a valid MSR value for `msr`.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags))
    };
}

/// # Safety
/// `msr` must exist on this CPU.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: forwarded to the caller.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (hi as u64) << 32 | lo as u64
}
