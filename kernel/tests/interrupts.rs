//! In-kernel tests of the clock, the LAPIC timer and interrupt dispatch.

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use capsules_kernel::arch::x86_64::{gdt, trap};
use capsules_kernel::boot::BootInfo;
use capsules_kernel::testing::{Test, run};
use capsules_kernel::{arch, time};

fn tsc_frequency_is_plausible() {
    let hz = time::tsc_hz();
    assert!((100_000_000..20_000_000_000).contains(&hz), "TSC {hz} Hz");
}

fn clock_is_monotonic() {
    let mut last = time::since_boot_ns();
    for _ in 0..10_000 {
        let now = time::since_boot_ns();
        assert!(now >= last, "clock went back: {last} -> {now}");
        last = now;
    }
}

fn timer_ticks_while_halted() {
    arch::enable_interrupts();
    let (ticks0, t0) = (time::ticks(), time::since_boot_ns());
    time::sleep_ns(100_000_000);
    let (ticks1, t1) = (time::ticks(), time::since_boot_ns());
    let elapsed = t1 - t0;
    assert!(elapsed >= 100_000_000, "slept only {elapsed} ns");
    // 10 ms ticks: about 10 in 100 ms; allow for a slow emulator.
    let ticks = ticks1 - ticks0;
    assert!((5..=40).contains(&ticks), "{ticks} ticks in {elapsed} ns");
}

static SOFT_IRQS: AtomicU64 = AtomicU64::new(0);
static SOFT_IRQ_STACK: AtomicU64 = AtomicU64::new(0);

fn count_soft_irq(vector: u8) {
    assert_eq!(vector, 0x70);
    let rsp: u64;
    // SAFETY: reads the stack pointer only.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) rsp) };
    SOFT_IRQ_STACK.store(rsp, Ordering::Relaxed);
    SOFT_IRQS.fetch_add(1, Ordering::Relaxed);
}

fn interrupt_dispatch_runs_on_the_irq_stack() {
    trap::set_irq_handler(0x70, count_soft_irq);
    for _ in 0..3 {
        // SAFETY: vector 0x70 has a handler installed just above.
        unsafe { core::arch::asm!("int 0x70") };
    }
    assert_eq!(SOFT_IRQS.load(Ordering::Relaxed), 3);
    let (lo, hi) = gdt::ist_stack_range(gdt::IST_IRQ);
    let rsp = SOFT_IRQ_STACK.load(Ordering::Relaxed);
    assert!(
        (lo..hi).contains(&rsp),
        "handler ran on {rsp:#x}, IRQ stack is {lo:#x}-{hi:#x}"
    );
}

/// Floating-point work whose every step goes through the XMM registers:
/// a product chain (rounded at each step, so any clobbered register changes
/// the bits of the result) and a sum of integers (exact in an f64).
fn float_work(steps: u64) -> (f64, f64) {
    let mut x = 1.0f64;
    let mut sum = 0.0f64;
    for i in 0..steps {
        x = core::hint::black_box(x * 1.000001);
        sum += core::hint::black_box(i as f64);
    }
    (x, sum)
}

fn sse_state_survives_interrupts() {
    arch::enable_interrupts();
    // As many steps as take about five timer ticks here.
    let start = time::ticks();
    let mut steps = 0u64;
    while time::ticks() < start + 5 {
        core::hint::black_box(float_work(1000));
        steps += 1000;
    }
    // The exact result: the same work with interrupts off.
    arch::disable_interrupts();
    let expected = float_work(steps);
    arch::enable_interrupts();
    // Now across timer interrupts: a handler that clobbered XMM registers
    // would change the bits.
    let before = time::ticks();
    let got = float_work(steps);
    let ticks = time::ticks() - before;
    assert!(
        ticks >= 2,
        "only {ticks} timer interrupts during the work; it proves nothing"
    );
    assert_eq!(
        (got.0.to_bits(), got.1.to_bits()),
        (expected.0.to_bits(), expected.1.to_bits()),
        "{steps} steps across {ticks} interrupts gave {got:?}, with interrupts off {expected:?}"
    );
    // The sum of 0..steps is exact in an f64 (well below 2^53).
    assert_eq!(got.1, (steps * (steps - 1) / 2) as f64);
    let a = core::hint::black_box(1.5f64);
    let b = core::hint::black_box(2.25f64);
    // SAFETY: int 0x70 has a handler (installed by the previous test).
    unsafe { core::arch::asm!("int 0x70") };
    assert_eq!(a * b, 3.375);
}

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    run(
        "interrupts",
        &[
            Test {
                name: "tsc_frequency_is_plausible",
                run: tsc_frequency_is_plausible,
            },
            Test {
                name: "clock_is_monotonic",
                run: clock_is_monotonic,
            },
            Test {
                name: "timer_ticks_while_halted",
                run: timer_ticks_while_halted,
            },
            Test {
                name: "interrupt_dispatch_runs_on_the_irq_stack",
                run: interrupt_dispatch_runs_on_the_irq_stack,
            },
            Test {
                name: "sse_state_survives_interrupts",
                run: sse_state_survives_interrupts,
            },
        ],
    )
}
