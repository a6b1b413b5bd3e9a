//! Trap entry and dispatch. Each of the 256 vectors has a 16-byte stub that
//! pushes a dummy error code (where the CPU pushes none) and the vector
//! number, then joins `trap_common`, which saves every general register and the
//! SSE state, calls [`trap_dispatch`], and returns with `iretq`.

use core::fmt::Write as _;
use core::sync::atomic::{AtomicUsize, Ordering};

use capsules_wire::exit::KernelExit;

use super::{apic, cpu};

/// The interrupted state, as laid out on the interrupt stack by the stubs.
/// A context switch replaces it (and the SSE area) with another task's.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

core::arch::global_asm!(
    r#"
    .section .text.trap_stubs, "ax"
    .balign 16
    .global trap_stubs
trap_stubs:
    .set vector, 0
    .rept 256
    .balign 16
    .if (vector == 8) || (vector == 10) || (vector == 11) || (vector == 12) || (vector == 13) || (vector == 14) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    push offset vector
    .else
    push 0
    push offset vector
    .endif
    jmp trap_common
    .set vector, vector + 1
    .endr

trap_common:
    push rax
    push rcx
    push rdx
    push rbx
    push rbp
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    mov rbx, rsp
    and rsp, -16
    sub rsp, 512
    fxsave64 [rsp]
    mov rsi, rsp
    cld
    call {dispatch}
    fxrstor64 [rsp]
    mov rsp, rbx
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rbp
    pop rbx
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq
"#,
    dispatch = sym trap_dispatch,
);

unsafe extern "C" {
    static trap_stubs: u8;
}

/// Entry address of the stub for `vector`.
pub fn stub_address(vector: u8) -> u64 {
    (&raw const trap_stubs) as u64 + 16 * vector as u64
}

/// First vector used for hardware interrupts.
pub const IRQ_BASE: u8 = 32;
/// Vector the APIC uses for spurious interrupts (needs no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Handlers for hardware-interrupt vectors, stored as function addresses.
static IRQ_HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

/// Installs `handler` for `vector`. The handler runs with interrupts off on the
/// IRQ stack and must not allocate or take locks the interrupted code may hold.
pub fn set_irq_handler(vector: u8, handler: fn(u8)) {
    assert!(vector >= IRQ_BASE, "vector {vector} is a CPU exception");
    IRQ_HANDLERS[vector as usize].store(handler as usize, Ordering::Release);
}

/// The SSE/x87 state saved by `fxsave64` next to the trap frame.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
pub struct FxArea(pub [u8; 512]);

impl FxArea {
    /// The state of a fresh task: default x87 control word and MXCSR, all
    /// exceptions masked, registers zero.
    pub fn initial() -> Self {
        let mut area = [0u8; 512];
        area[0..2].copy_from_slice(&0x037fu16.to_le_bytes()); // FCW
        area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
        area[28..32].copy_from_slice(&0xffffu32.to_le_bytes()); // MXCSR mask
        FxArea(area)
    }
}

/// Vector of the software interrupt a context uses to give up the CPU.
pub const YIELD_VECTOR: u8 = 0x81;

/// Called on every trap that may switch contexts (yield, timer, device
/// interrupts, and faults in capsule code). It may overwrite `frame` and `fx`
/// with another context's, which the stub then resumes.
pub type SwitchHook = fn(&mut TrapFrame, &mut FxArea, SwitchCause);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchCause {
    Yield,
    Timer,
    Device,
    /// A CPU exception; the hook returns only if it could contain it.
    Fault,
}

static SWITCH_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Installs the scheduler's switch hook.
pub fn set_switch_hook(hook: SwitchHook) {
    SWITCH_HOOK.store(hook as usize, Ordering::Release);
}

fn switch_hook() -> Option<SwitchHook> {
    let hook = SWITCH_HOOK.load(Ordering::Acquire);
    // SAFETY: only `set_switch_hook` stores into it, always a `SwitchHook`.
    (hook != 0).then(|| unsafe { core::mem::transmute::<usize, SwitchHook>(hook) })
}

/// Whether the last fault was contained by the switch hook (set by the hook).
static FAULT_CONTAINED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// The scheduler calls this when it has taken a faulting context off the CPU.
pub fn mark_fault_contained() {
    FAULT_CONTAINED.store(true, Ordering::Relaxed);
}

extern "C" fn trap_dispatch(frame: &mut TrapFrame, fx: &mut FxArea) {
    let vector = frame.vector as u8;
    if vector < IRQ_BASE {
        if let Some(hook) = switch_hook() {
            FAULT_CONTAINED.store(false, Ordering::Relaxed);
            hook(frame, fx, SwitchCause::Fault);
            if FAULT_CONTAINED.load(Ordering::Relaxed) {
                return;
            }
        }
        exception(frame);
    }
    if vector == SPURIOUS_VECTOR {
        return;
    }
    if vector == YIELD_VECTOR {
        if let Some(hook) = switch_hook() {
            hook(frame, fx, SwitchCause::Yield);
        }
        return;
    }
    let handler = IRQ_HANDLERS[vector as usize].load(Ordering::Acquire);
    if handler != 0 {
        // SAFETY: only `set_irq_handler` stores into the table, always a `fn(u8)`.
        let handler: fn(u8) = unsafe { core::mem::transmute(handler) };
        handler(vector);
    } else {
        log::warn!("unexpected interrupt on vector {vector}");
    }
    apic::end_of_interrupt();
    if let Some(hook) = switch_hook() {
        let cause = if vector == IRQ_BASE {
            SwitchCause::Timer
        } else {
            SwitchCause::Device
        };
        hook(frame, fx, cause);
    }
}

/// Prints the fault report for `frame` to `out` (used for kernel faults, and
/// by the scheduler for faults it contains in a capsule).
pub fn write_fault_report(out: &mut impl core::fmt::Write, frame: &TrapFrame, running: &str) {
    let vector = frame.vector as u8;
    let _ = writeln!(
        out,
        "{} (vector {vector}) while running: {running}",
        exception_name(vector)
    );
    let _ = writeln!(out, "    error code: {:#x}", frame.error_code);
    let _ = writeln!(
        out,
        "    rip: {:#018x}  rsp: {:#018x}  rflags: {:#x}",
        frame.rip, frame.rsp, frame.rflags
    );
    write_page_fault_line(out, frame);
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error (#DE)",
    "debug (#DB)",
    "non-maskable interrupt",
    "breakpoint (#BP)",
    "overflow (#OF)",
    "bound range exceeded (#BR)",
    "invalid opcode (#UD)",
    "device not available (#NM)",
    "double fault (#DF)",
    "coprocessor segment overrun",
    "invalid TSS (#TS)",
    "segment not present (#NP)",
    "stack-segment fault (#SS)",
    "general protection fault (#GP)",
    "page fault (#PF)",
    "reserved (15)",
    "x87 floating-point error (#MF)",
    "alignment check (#AC)",
    "machine check (#MC)",
    "SIMD floating-point error (#XM)",
    "virtualization exception (#VE)",
    "control protection (#CP)",
    "reserved (22)",
    "reserved (23)",
    "reserved (24)",
    "reserved (25)",
    "reserved (26)",
    "reserved (27)",
    "hypervisor injection (#HV)",
    "VMM communication (#VC)",
    "security exception (#SX)",
    "reserved (31)",
];

pub fn exception_name(vector: u8) -> &'static str {
    EXCEPTION_NAMES
        .get(vector as usize)
        .copied()
        .unwrap_or("not an exception")
}

/// For page faults: the faulting address and what the access was.
fn write_page_fault_line(out: &mut impl core::fmt::Write, frame: &TrapFrame) {
    if frame.vector != 14 {
        return;
    }
    let cr2 = cpu::read_cr2();
    let e = frame.error_code;
    let access = if e & 2 != 0 {
        "write to"
    } else if e & 16 != 0 {
        "instruction fetch from"
    } else {
        "read from"
    };
    let page = if e & 1 != 0 {
        "a protected"
    } else {
        "an unmapped"
    };
    let mode = if e & 4 != 0 { "user" } else { "kernel" };
    let reserved = if e & 8 != 0 { ", reserved bit set" } else { "" };
    let _ = writeln!(
        out,
        "    cr2 (fault address): {cr2:#018x} ({access} {page} page, {mode} mode{reserved})"
    );
}

/// Prints a report of a CPU exception in kernel code and ends the VM.
fn exception(frame: &TrapFrame) -> ! {
    let vector = frame.vector as u8;
    let mut out = crate::drivers::serial::emergency_writer();
    let _ = writeln!(
        out,
        "\n*** KERNEL FAULT: {} (vector {vector})",
        exception_name(vector)
    );
    let _ = writeln!(out, "    running: {}", crate::diag::running());
    let _ = writeln!(out, "    error code: {:#x}", frame.error_code);
    let _ = writeln!(
        out,
        "    rip: {:#018x}  cs: {:#x}  rflags: {:#x}",
        frame.rip, frame.cs, frame.rflags
    );
    let _ = writeln!(out, "    rsp: {:#018x}  ss: {:#x}", frame.rsp, frame.ss);
    write_page_fault_line(&mut out, frame);
    let _ = writeln!(
        out,
        "    rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x}\n    rsi {:#x} rdi {:#x} rbp {:#x}\n    r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x}\n    r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}",
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp,
        frame.r8,
        frame.r9,
        frame.r10,
        frame.r11,
        frame.r12,
        frame.r13,
        frame.r14,
        frame.r15
    );
    let _ = writeln!(out, "    cr3: {:#x}", cpu::read_cr3());
    crate::diag::print_backtrace(&mut out, frame.rbp);
    let _ = writeln!(
        out,
        "*** ending VM with status {}",
        KernelExit::Exception.qemu_status()
    );
    super::exit_qemu(KernelExit::Exception)
}
