//! The scheduler: which context runs on the CPU. Contexts are the kernel
//! loop (the boot stack) and capsule tasks. Every switch goes through a trap:
//! a task or the kernel loop gives up the CPU with `int 0x81`, the timer
//! preempts a task at the end of its slice, and a device interrupt preempts a
//! task so that the kernel loop handles the device at once. The trap frame and
//! SSE area on the interrupt stack are saved into the outgoing context and
//! replaced by the incoming one's, which the trap stub then resumes.
//!
//! Policy: the kernel loop runs between any two task slices (it polls the NIC
//! and every capsule's network stack, and wakes tasks); when it yields, the next
//! runnable task is chosen round-robin over capsules, then over that capsule's
//! tasks, so capsules share the CPU fairly whatever their task counts.
//!
//! Capsule tasks call kernel services with preemption disabled
//! ([`PreemptGuard`]), so a task is only ever switched out at a *safe point*:
//! in its own code, or parked at a wait point. The kernel loop itself is never
//! preempted. Together these mean that capsule state is never touched by two
//! contexts at once, without locks, and that a capsule can be frozen whenever
//! the kernel loop runs.

pub mod task;

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use spin::Mutex;

use crate::arch::x86_64::trap::{self, FxArea, SwitchCause, TrapFrame, YIELD_VECTOR};
use crate::mm::arena;
pub use task::{Task, TaskState};

/// A saved CPU context.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Context {
    pub frame: TrapFrame,
    pub fx: FxArea,
    /// The allocation domain in force when the context was switched out.
    pub domain: Option<u32>,
}

impl Context {
    pub const fn empty() -> Self {
        Self {
            frame: TrapFrame {
                r15: 0,
                r14: 0,
                r13: 0,
                r12: 0,
                r11: 0,
                r10: 0,
                r9: 0,
                r8: 0,
                rdi: 0,
                rsi: 0,
                rbp: 0,
                rbx: 0,
                rdx: 0,
                rcx: 0,
                rax: 0,
                vector: 0,
                error_code: 0,
                rip: 0,
                cs: 0,
                rflags: 0,
                rsp: 0,
                ss: 0,
            },
            fx: FxArea([0; 512]),
            domain: None,
        }
    }
}

/// What the CPU runs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Running {
    Kernel,
    Task { slot: u32, task: *mut Task },
}

// SAFETY: a `*mut Task` is only dereferenced with interrupts off on the one CPU.
unsafe impl Send for Running {}

static RUNNING: Mutex<Running> = Mutex::new(Running::Kernel);
static KERNEL_CONTEXT: Mutex<Context> = Mutex::new(Context::empty());
static PREEMPT_DISABLED: AtomicU32 = AtomicU32::new(0);
static NEED_RESCHED: AtomicBool = AtomicBool::new(false);
static SLICE_START: AtomicU64 = AtomicU64::new(0);
static SWITCHES: AtomicU64 = AtomicU64::new(0);
/// Timer ticks a task may run before it is preempted.
pub const SLICE_TICKS: u64 = 1;

/// Chooses the next runnable task (implemented by the capsule registry).
pub type PickNext = fn() -> Option<(u32, *mut Task)>;
/// Called when a task's code faults; returns after the capsule is marked
/// dead (true), or false when the fault cannot be contained to the capsule.
pub type OnTaskFault = fn(slot: u32, frame: &TrapFrame) -> bool;

static PICK_NEXT: Mutex<Option<PickNext>> = Mutex::new(None);
static ON_FAULT: Mutex<Option<OnTaskFault>> = Mutex::new(None);

pub fn init(pick_next: PickNext, on_fault: OnTaskFault) {
    *PICK_NEXT.lock() = Some(pick_next);
    *ON_FAULT.lock() = Some(on_fault);
    trap::set_switch_hook(on_trap);
}

pub fn running() -> Running {
    crate::arch::without_interrupts(|| *RUNNING.lock())
}

/// The slot of the capsule whose task runs now.
pub fn current_slot() -> Option<u32> {
    match running() {
        Running::Task { slot, .. } => Some(slot),
        Running::Kernel => None,
    }
}

/// The task running now, if a task runs.
pub fn current_task() -> Option<*mut Task> {
    match running() {
        Running::Task { task, .. } => Some(task),
        Running::Kernel => None,
    }
}

pub fn switch_count() -> u64 {
    SWITCHES.load(Ordering::Relaxed)
}

/// Gives up the CPU: a task lets the kernel loop run; the kernel loop lets
/// the next runnable task run (or continues if there is none).
pub fn yield_now() {
    debug_assert_eq!(
        PREEMPT_DISABLED.load(Ordering::Relaxed),
        0,
        "yield inside a preemption-free section"
    );
    // SAFETY: vector 0x81 is the scheduler's yield gate; the trap returns here
    // once this context is chosen again.
    unsafe { core::arch::asm!("int {v}", v = const YIELD_VECTOR) };
}

/// Parks the running task in `state` until the kernel loop wakes it.
pub fn block(state: TaskState) {
    let Some(task) = current_task() else { return };
    crate::arch::without_interrupts(|| {
        // SAFETY: the running task's control block is live while it runs.
        unsafe { (*task).state = state };
    });
    yield_now();
}

/// Keeps the running task on the CPU while kernel state is borrowed.
pub struct PreemptGuard {
    _private: (),
}

pub fn preempt_disable() -> PreemptGuard {
    PREEMPT_DISABLED.fetch_add(1, Ordering::Acquire);
    PreemptGuard { _private: () }
}

impl Drop for PreemptGuard {
    fn drop(&mut self) {
        if PREEMPT_DISABLED.fetch_sub(1, Ordering::Release) == 1
            && NEED_RESCHED.swap(false, Ordering::AcqRel)
            && current_task().is_some()
        {
            yield_now();
        }
    }
}

/// Resets preemption state when a task dies inside a preemption-free section.
pub fn reset_after_task_death() {
    PREEMPT_DISABLED.store(0, Ordering::Release);
    NEED_RESCHED.store(false, Ordering::Release);
}

fn on_trap(frame: &mut TrapFrame, fx: &mut FxArea, cause: SwitchCause) {
    let running = *RUNNING.lock();
    match (cause, running) {
        (SwitchCause::Fault, Running::Task { slot, .. }) => {
            let on_fault = *ON_FAULT.lock();
            if !on_fault.is_some_and(|f| f(slot, frame)) {
                // Not contained: the trap code reports it and ends the VM.
                return;
            }
            reset_after_task_death();
            // The faulting context is discarded, not saved.
            load(frame, fx, Running::Kernel);
            trap::mark_fault_contained();
        }
        (SwitchCause::Fault, Running::Kernel) => {}
        (SwitchCause::Yield, _) => switch(frame, fx, running),
        (SwitchCause::Timer, Running::Task { .. }) => {
            let elapsed = crate::time::ticks().wrapping_sub(SLICE_START.load(Ordering::Relaxed));
            if elapsed >= SLICE_TICKS {
                preempt(frame, fx, running);
            }
        }
        (SwitchCause::Device, Running::Task { .. }) => preempt(frame, fx, running),
        (SwitchCause::Timer | SwitchCause::Device, Running::Kernel) => {}
    }
}

fn preempt(frame: &mut TrapFrame, fx: &mut FxArea, running: Running) {
    if PREEMPT_DISABLED.load(Ordering::Acquire) > 0 {
        NEED_RESCHED.store(true, Ordering::Release);
    } else {
        switch(frame, fx, running);
    }
}

fn save(frame: &TrapFrame, fx: &FxArea, running: Running) {
    let ctx = Context {
        frame: *frame,
        fx: *fx,
        domain: arena::domain(),
    };
    match running {
        Running::Kernel => *KERNEL_CONTEXT.lock() = ctx,
        // SAFETY: the running task is live; only this CPU touches it, with
        // interrupts off.
        Running::Task { task, .. } => unsafe { (*task).context = ctx },
    }
}

fn load(frame: &mut TrapFrame, fx: &mut FxArea, next: Running) {
    let ctx = match next {
        Running::Kernel => *KERNEL_CONTEXT.lock(),
        // SAFETY: tasks chosen by the registry are live until the kernel loop
        // reaps them, which cannot happen while they are chosen.
        Running::Task { task, .. } => unsafe { (*task).context },
    };
    *frame = ctx.frame;
    *fx = ctx.fx;
    // A task always allocates in its own capsule's arena.
    let domain = match next {
        Running::Kernel => ctx.domain,
        Running::Task { slot, .. } => Some(slot),
    };
    arena::set_domain(domain);
    *RUNNING.lock() = next;
    SLICE_START.store(crate::time::ticks(), Ordering::Relaxed);
    SWITCHES.fetch_add(1, Ordering::Relaxed);
}

fn switch(frame: &mut TrapFrame, fx: &mut FxArea, running: Running) {
    let next = match running {
        Running::Task { .. } => Running::Kernel,
        Running::Kernel => {
            let pick = *PICK_NEXT.lock();
            match pick.and_then(|p| p()) {
                Some((slot, task)) => Running::Task { slot, task },
                None => return,
            }
        }
    };
    save(frame, fx, running);
    load(frame, fx, next);
}
