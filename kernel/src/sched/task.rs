//! Tasks: stackful, preemptible contexts of a capsule. A task's control block
//! and stack live in its capsule's arena, so they move with the capsule.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;

use super::Context;
use crate::arch::x86_64::trap::{FxArea, TrapFrame};

/// Why a task is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Runnable,
    /// Until the capsule clock passes this many nanoseconds of kernel time.
    Sleeping {
        until_ns: u64,
    },
    /// Until the capsule's network is ready for it. The capsule layer
    /// decides: readiness of the one socket the task waits on, or else any
    /// network news after `seen` (its network event stamp when the task
    /// last looked, so news between looking and parking is not lost).
    WaitingNet {
        seen: u64,
    },
    /// Until the task with this id has exited.
    Joining {
        task: u32,
    },
    Exited,
}

pub type TaskEntry = Box<dyn FnOnce() + Send>;

pub struct Task {
    pub id: u32,
    pub name: String,
    pub state: TaskState,
    pub context: Context,
    stack: Box<[u8]>,
    entry: Option<TaskEntry>,
}

pub const DEFAULT_STACK_SIZE: usize = 64 * 1024;

/// The RFLAGS a task starts with: interrupts enabled (bit 9), bit 1 reserved.
const INITIAL_RFLAGS: u64 = 0x202;

impl Task {
    /// A task that will run `entry` on a fresh stack of `stack_size` bytes.
    /// Allocates in the current allocation domain (the capsule's arena).
    pub fn new(id: u32, name: String, stack_size: usize, entry: TaskEntry) -> Box<Task> {
        let stack = vec![0u8; stack_size].into_boxed_slice();
        let mut task = Box::new(Task {
            id,
            name,
            state: TaskState::Runnable,
            context: Context::empty(),
            stack,
            entry: Some(entry),
        });
        let top = (task.stack.as_ptr() as u64 + stack_size as u64) & !0xf;
        let arg = &mut *task as *mut Task as u64;
        task.context.frame = TrapFrame {
            rip: task_trampoline as *const () as u64,
            cs: 0x08,
            rflags: INITIAL_RFLAGS,
            // As if `call`ed: the return address slot keeps rsp+8 16-aligned.
            rsp: top - 8,
            ss: 0x10,
            rdi: arg,
            ..TrapFrame::default()
        };
        task.context.fx = FxArea::initial();
        task
    }

    pub fn stack_range(&self) -> (u64, u64) {
        let base = self.stack.as_ptr() as u64;
        (base, base + self.stack.len() as u64)
    }
}

extern "C" fn task_trampoline(task: *mut Task) -> ! {
    // SAFETY: the scheduler starts a task only with its own control block.
    let entry = unsafe { (*task).entry.take() };
    if let Some(entry) = entry {
        entry();
    }
    exit_current()
}

/// Ends the running task; it is reaped by the kernel loop.
pub fn exit_current() -> ! {
    super::block(TaskState::Exited);
    unreachable!("an exited task was scheduled again");
}
