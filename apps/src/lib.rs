//! Protocol logic of the capsule programs, free of any I/O.
//!
//! The kernel drives these state machines through its blocking socket API;
//! keeping them sans-I/O lets every protocol corner be tested on the host,
//! where a panic is a failing test instead of a dead capsule. Nothing here may
//! panic on untrusted input: malformed bytes become a protocol error reply.
//!
//! The crate is `no_std` + `alloc` so the kernel links it as-is and every
//! allocation lands in the running capsule's arena.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod args;
pub mod echo;
pub mod http;
pub mod kv;
pub mod ticker;

/// What the connection should do once the bytes a session produced are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep the connection open and read more.
    Continue,
    /// Send what is queued (including any pending streamed body), then close.
    Close,
}

/// How many sessions the never-panic tests run: `APPS_FUZZ_ROUNDS` raises it
/// for a longer soak than the default quick pass.
#[cfg(test)]
fn fuzz_rounds(default: usize) -> usize {
    std::env::var("APPS_FUZZ_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(default)
}
