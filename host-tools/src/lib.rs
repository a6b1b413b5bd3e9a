//! capsulectl: the host side of Capsules — labs of VMs in network namespaces,
//! their QEMU processes, and the authenticated control client.
//!
//! `main.rs` is a thin shell over [`cli`]; everything else is usable as a
//! library (the benchmarks and system tests do).

pub mod capsules;
pub mod cli;
pub mod control;
pub mod demo;
pub mod directory;
pub mod elf;
pub mod fault;
pub mod journal;
pub mod lab;
pub mod migrate;
pub mod netns;
pub mod plot;
pub mod progress;
pub mod qemu;
pub mod recover;
pub mod render;
pub mod routed;
pub mod state;
pub mod vm;
