//! Fault injection for the system tests, compiled in only with the cargo
//! feature `fault-injection` (the system tests build capsulectl with it; the
//! release binary users run has none of it: every function here is then an
//! empty inline that the optimiser removes).
//!
//! `CAPSULES_FAULT=PHASE:ACTION` picks one point of a move, suspend or resume
//! and what happens there:
//!
//! - `exit` — the process ends on the spot, as if killed with SIGKILL (no
//!   destructor, no cleanup, the directory lock released by the kernel);
//! - `pause-MS` — it sleeps MS milliseconds there, and writes the phase's
//!   name to `$CAPSULES_FAULT_MARK` first, so a test can kill a VM or take a
//!   link down at exactly that point;
//! - `drop-answer` — the request made at this point is sent and carried out,
//!   but its answer is lost (read and thrown away; the connection is not
//!   used again), at every phase of a move: `precopy` → `PrecopyCapsule`,
//!   `freeze` → `FreezeDelta`, `transfer` → the delta's first `ReadImage`,
//!   `restore` → the delta's last `RestoreChunk`, `commit-sent` →
//!   `RestoreCommit` (sent, its answer never read), `commit-answered` and
//!   `release` → `ReleaseCapsule` (the first request after the commit), and
//!   `directory` → the final directory write fails once. The move then
//!   settles from what the VMs hold (docs/architecture.md, "The stages of a
//!   move").
//!
//! Phases, in the order a move passes them: `precopy`, `freeze`, `transfer`,
//! `restore`, `commit-sent`, `commit-answered`, `release`, `directory`.
//! `CAPSULES_FAULT_CHUNK_DELAY_MS` slows the image and page streams.

/// What to do at a phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Exit,
    Pause(u64),
    DropAnswer,
}

/// The action configured for `phase`, if any.
#[cfg(feature = "fault-injection")]
pub fn action(phase: &str) -> Option<Action> {
    let spec = std::env::var("CAPSULES_FAULT").ok()?;
    let (at, what) = spec.split_once(':')?;
    if at != phase {
        return None;
    }
    match what {
        "exit" => Some(Action::Exit),
        "drop-answer" => Some(Action::DropAnswer),
        other => other
            .strip_prefix("pause-")
            .and_then(|ms| ms.parse().ok())
            .map(Action::Pause),
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn action(_phase: &str) -> Option<Action> {
    None
}

/// Passes point `phase`: exits or pauses there when so configured. A
/// `drop-answer` is for the caller to carry out.
#[cfg(feature = "fault-injection")]
pub fn point(phase: &str) {
    match action(phase) {
        Some(Action::Exit) => {
            eprintln!("capsulectl: fault injection: exiting at {phase}");
            // SAFETY: _exit ends the process at once, like a SIGKILL would
            // (no destructors, no buffered output flushed); nothing follows.
            unsafe { libc::_exit(137) }
        }
        Some(Action::Pause(ms)) => {
            if let Some(mark) = std::env::var_os("CAPSULES_FAULT_MARK") {
                let _ = std::fs::write(mark, phase);
            }
            eprintln!("capsulectl: fault injection: pausing {ms} ms at {phase}");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        _ => {}
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_phase: &str) {}

/// Pause between image chunks and page batches, so that a test can act
/// while the capsule is in flight.
#[cfg(feature = "fault-injection")]
pub fn chunk_delay() -> Option<std::time::Duration> {
    std::env::var("CAPSULES_FAULT_CHUNK_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_millis)
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn chunk_delay() -> Option<std::time::Duration> {
    None
}
