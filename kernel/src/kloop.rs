//! The kernel loop: the one context that drives devices, stacks and capsules.
//! It runs on the boot stack, is never preempted, and lets capsule tasks run
//! between its rounds.

use crate::control::ControlService;
use crate::net::Network;
use crate::{arch, capsule, sched};

/// One round: receive, poll the machine stack and the control service, serve
/// capsules (deliver, poll, wake, reap), then let one runnable task run a
/// slice. Returns whether anything happened.
pub fn step(net: &mut Network, control: Option<&mut ControlService>) -> bool {
    let mut busy = net.pump(&mut capsule::deliver);
    busy |= net.poll_machine();
    if let Some(control) = control {
        busy |= control.poll(net);
    }
    busy |= capsule::service(net);
    if capsule::any_runnable() {
        // We are back after the task's slice, or as soon as it blocks.
        sched::yield_now();
        busy = true;
    }
    busy
}

/// Sleeps until a packet or the next tick when there is nothing to do. The
/// interrupt flag is cleared first so that an interrupt arriving between the
/// check and the halt is not lost.
pub fn idle(net: &Network) {
    arch::disable_interrupts();
    if net.has_work() || capsule::any_runnable() {
        arch::enable_interrupts();
    } else {
        arch::wait_for_interrupt();
    }
}

/// Runs rounds for `ns` nanoseconds (tests, shutdown flushing).
pub fn run_for(net: &mut Network, mut control: Option<&mut ControlService>, ns: u64) {
    let end = crate::time::since_boot_ns() + ns;
    while crate::time::since_boot_ns() < end {
        if !step(net, control.as_deref_mut()) {
            idle(net);
        }
    }
}
