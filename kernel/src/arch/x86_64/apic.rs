//! Local APIC (timer, end of interrupt) and I/O APIC (device interrupts).
//! The legacy 8259 PICs are remapped out of the exception range and masked.

use core::sync::atomic::{AtomicU64, Ordering};

use super::{cpu, port::outb};

const IA32_APIC_BASE: u32 = 0x1b;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_EOI: usize = 0xb0;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_TIMER_INITIAL: usize = 0x380;
const LAPIC_TIMER_CURRENT: usize = 0x390;
const LAPIC_TIMER_DIVIDE: usize = 0x3e0;
const LAPIC_ID: usize = 0x20;

/// Standard I/O APIC address on PC-compatible machines (QEMU pc, q35).
const IOAPIC_BASE: usize = 0xfec0_0000;

static LAPIC_BASE: AtomicU64 = AtomicU64::new(0);

fn lapic_write(reg: usize, value: u32) {
    let base = LAPIC_BASE.load(Ordering::Relaxed) as usize;
    // SAFETY: the LAPIC page is identity-mapped (first 4 GiB) and `reg` is a
    // register offset inside it.
    unsafe { core::ptr::write_volatile((base + reg) as *mut u32, value) };
}

fn lapic_read(reg: usize) -> u32 {
    let base = LAPIC_BASE.load(Ordering::Relaxed) as usize;
    // SAFETY: as for `lapic_write`.
    unsafe { core::ptr::read_volatile((base + reg) as *const u32) }
}

fn disable_legacy_pic() {
    // SAFETY: standard 8259 initialisation sequence on its fixed ports: remap
    // to vectors 0x20-0x2f (away from CPU exceptions), then mask every line.
    unsafe {
        outb(0x20, 0x11);
        outb(0xa0, 0x11);
        outb(0x21, 0x20);
        outb(0xa1, 0x28);
        outb(0x21, 4);
        outb(0xa1, 2);
        outb(0x21, 1);
        outb(0xa1, 1);
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
    }
}

/// Enables the local APIC in xAPIC mode.
pub fn init() {
    disable_legacy_pic();
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU; we keep its base and
    // only set the global-enable bit.
    let msr = unsafe { cpu::rdmsr(IA32_APIC_BASE) };
    // SAFETY: see above.
    unsafe { cpu::wrmsr(IA32_APIC_BASE, msr | (1 << 11)) };
    LAPIC_BASE.store(msr & 0x000f_ffff_ffff_f000, Ordering::Relaxed);
    lapic_write(LAPIC_SVR, 0x100 | super::trap::SPURIOUS_VECTOR as u32);
}

pub fn lapic_id() -> u8 {
    (lapic_read(LAPIC_ID) >> 24) as u8
}

pub fn end_of_interrupt() {
    lapic_write(LAPIC_EOI, 0);
}

/// Measures how many APIC timer counts (divide by 16) pass per TSC tick pair
/// and starts a periodic timer of `period_ns` on `vector`.
pub fn start_periodic_timer(vector: u8, period_ns: u64, tsc_hz: u64) -> u64 {
    lapic_write(LAPIC_TIMER_DIVIDE, 0b0011); // divide by 16
    lapic_write(LAPIC_LVT_TIMER, 1 << 16); // masked, one-shot
    lapic_write(LAPIC_TIMER_INITIAL, u32::MAX);
    let start = cpu::rdtsc();
    let window = tsc_hz / 200; // 5 ms
    while cpu::rdtsc().wrapping_sub(start) < window {
        core::hint::spin_loop();
    }
    let elapsed = u32::MAX - lapic_read(LAPIC_TIMER_CURRENT);
    let counts_per_sec = elapsed as u64 * 200;
    let initial = (counts_per_sec * period_ns / 1_000_000_000).clamp(1, u32::MAX as u64);
    lapic_write(LAPIC_LVT_TIMER, vector as u32 | (1 << 17)); // periodic
    lapic_write(LAPIC_TIMER_INITIAL, initial as u32);
    counts_per_sec
}

fn ioapic_write(reg: u32, value: u32) {
    // SAFETY: the I/O APIC window is identity-mapped; IOREGSEL at +0, IOWIN at +0x10.
    unsafe {
        core::ptr::write_volatile(IOAPIC_BASE as *mut u32, reg);
        core::ptr::write_volatile((IOAPIC_BASE + 0x10) as *mut u32, value);
    }
}

fn ioapic_read(reg: u32) -> u32 {
    // SAFETY: as for `ioapic_write`.
    unsafe {
        core::ptr::write_volatile(IOAPIC_BASE as *mut u32, reg);
        core::ptr::read_volatile((IOAPIC_BASE + 0x10) as *const u32)
    }
}

/// Number of input pins of the I/O APIC.
pub fn ioapic_pins() -> u32 {
    ((ioapic_read(1) >> 16) & 0xff) + 1
}

/// Routes I/O APIC input `gsi` to `vector` on this CPU, level-triggered and
/// active-high (how QEMU drives PCI INTx lines routed to ISA IRQs), masked
/// or not.
pub fn route_level_irq(gsi: u32, vector: u8, masked: bool) {
    let low = vector as u32 | (1 << 15) | if masked { 1 << 16 } else { 0 };
    ioapic_write(0x11 + 2 * gsi, (lapic_id() as u32) << 24);
    ioapic_write(0x10 + 2 * gsi, low);
}

/// Masks or unmasks an I/O APIC input, keeping its routing.
pub fn set_irq_masked(gsi: u32, masked: bool) {
    let low = ioapic_read(0x10 + 2 * gsi);
    let low = if masked {
        low | (1 << 16)
    } else {
        low & !(1 << 16)
    };
    ioapic_write(0x10 + 2 * gsi, low);
}

/// Raw redirection entry, for diagnostics.
pub fn ioapic_entry(gsi: u32) -> u64 {
    (ioapic_read(0x11 + 2 * gsi) as u64) << 32 | ioapic_read(0x10 + 2 * gsi) as u64
}
