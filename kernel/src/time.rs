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

pub fn init() {
    // Take the median of three 10 ms windows: one slow window (the host
    // descheduling the vCPU) must not skew the clock.
    let mut samples = [0u64; 3];
    for s in samples.iter_mut() {
        *s = pit::measure_tsc_ticks(10) * 100;
    }
    samples.sort_unstable();
    TSC_HZ.store(samples[1], Ordering::Relaxed);
    trap::set_irq_handler(TIMER_VECTOR, on_tick);
    let apic_hz = apic::start_periodic_timer(TIMER_VECTOR, TICK_NS, samples[1]);
    log::info!(
        "time: TSC {} MHz, APIC timer {} kHz (/16), tick {} ms",
        samples[1] / 1_000_000,
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
