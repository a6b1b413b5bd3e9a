//! The legacy programmable interval timer, used once to calibrate the TSC.

use super::port::{inb, outb};

const PIT_HZ: u64 = 1_193_182;

/// Busy-waits `ms` milliseconds (at most 50) on PIT channel 2 and returns how
/// many TSC ticks passed.
pub fn measure_tsc_ticks(ms: u64) -> u64 {
    let count = (PIT_HZ * ms / 1000).min(0xffff) as u16;
    // SAFETY: ports 0x42/0x43/0x61 belong to the PIT and the speaker gate,
    // which nothing else in the kernel uses.
    unsafe {
        // Gate channel 2 on, speaker off.
        let gate = inb(0x61);
        outb(0x61, (gate & !0x02) | 0x01);
        // Channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count), binary.
        outb(0x43, 0b1011_0000);
        outb(0x42, count as u8);
        outb(0x42, (count >> 8) as u8);
        let start = super::cpu::rdtsc();
        // Bounded: without a PIT the status bit may never rise. 2^33 TSC
        // ticks is seconds on any CPU; the caller rejects the result.
        while inb(0x61) & 0x20 == 0 && super::cpu::rdtsc().wrapping_sub(start) < 1 << 33 {
            core::hint::spin_loop();
        }
        let end = super::cpu::rdtsc();
        outb(0x61, gate);
        end.wrapping_sub(start)
    }
}
