//! Monotonic time from the TSC (calibrated against the PIT) and the periodic
//! LAPIC tick that wakes the idle loop.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::x86_64::{apic, boot, cpu, pit, trap};

/// Vector of the periodic timer interrupt.
pub const TIMER_VECTOR: u8 = trap::IRQ_BASE;
/// Tick period: wakes the idle loop often enough for TCP timers.
pub const TICK_NS: u64 = 10_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);

/// Nanoseconds since the kernel's first instruction (0 before calibration).
pub fn since_boot_ns() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return 0;
    }
    let ticks = cpu::rdtsc().wrapping_sub(boot::boot_tsc());
    (ticks as u128 * 1_000_000_000 / hz as u128) as u64
}

pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Timer interrupts taken so far.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

fn on_tick(_vector: u8) {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

/// Length of one PIT calibration window.
const CALIBRATION_MS: u64 = 4;
/// Below this the PIT reading is not believable (no PIT, as on `microvm`).
const MIN_PLAUSIBLE_HZ: u64 = 50_000_000;
/// Assumed when nothing can measure the TSC; logged as a warning.
const FALLBACK_HZ: u64 = 2_000_000_000;

fn calibrate_tsc() -> u64 {
    // Median of three short windows: one slow window (the host descheduling
    // the vCPU) must not skew the clock.
    let mut samples = [0u64; 3];
    for s in samples.iter_mut() {
        *s = pit::measure_tsc_ticks(CALIBRATION_MS) * (1000 / CALIBRATION_MS);
    }
    samples.sort_unstable();
    if samples[1] >= MIN_PLAUSIBLE_HZ {
        return samples[1];
    }
    match cpu::tsc_hz_from_cpuid() {
        Some(hz) => {
            log::warn!(
                "time: no usable PIT; TSC frequency {} MHz from CPUID",
                hz / 1_000_000
            );
            hz
        }
        None => {
            log::warn!(
                "time: no PIT and no CPUID frequency; assuming {} MHz",
                FALLBACK_HZ / 1_000_000
            );
            FALLBACK_HZ
        }
    }
}

pub fn init() {
    let hz = calibrate_tsc();
    TSC_HZ.store(hz, Ordering::Relaxed);
    trap::set_irq_handler(TIMER_VECTOR, on_tick);
    let apic_hz = apic::start_periodic_timer(TIMER_VECTOR, TICK_NS, hz);
    log::info!(
        "time: TSC {} MHz, APIC timer {} kHz (/16), tick {} ms",
        hz / 1_000_000,
        apic_hz / 1000,
        TICK_NS / 1_000_000
    );
}

/// Busy-waits (with interrupts on, halting between ticks) for `ns`.
pub fn sleep_ns(ns: u64) {
    let end = since_boot_ns().saturating_add(ns);
    while since_boot_ns() < end {
        crate::arch::wait_for_interrupt();
    }
}
