//! One definition of everything the Capsules kernel and host tools exchange.
//!
//! The crate is `no_std` + `alloc` so the kernel links it as-is; the host tools
//! use the same types, so both sides agree by construction. Every decoder
//! rejects malformed input with a [`codec::DecodeError`] instead of panicking.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod auth;
pub mod bootcfg;
pub mod codec;
pub mod control;
pub mod exit;
pub mod image;
