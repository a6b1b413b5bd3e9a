//! Memory management: physical frames, the kernel's page tables, the kernel heap.
//!
//! Physical memory is identity-mapped (virtual = physical) for the kernel image,
//! RAM and the first 4 GiB of device space; everything the kernel maps at a
//! chosen address (the heap now, capsule arenas later) lives in windows far
//! above that, backed page by page.

pub mod arena;
pub mod frame;
pub mod heap;
pub mod paging;

use crate::boot::BootInfo;

pub const PAGE_SIZE: u64 = 4096;

/// Brings up frames, page tables and heap, in that order.
pub fn init(info: &BootInfo) {
    frame::init(info);
    paging::init(frame::highest_ram_end());
    heap::init();
}

/// Memory figures for `status`.
#[derive(Debug, Clone, Copy)]
pub struct MemoryStats {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub heap_size_bytes: u64,
    pub heap_used_bytes: u64,
}

pub fn stats() -> MemoryStats {
    let (total, free) = frame::counts();
    let (heap_size, heap_used) = heap::usage();
    MemoryStats {
        total_bytes: total * PAGE_SIZE,
        used_bytes: (total - free) * PAGE_SIZE,
        heap_size_bytes: heap_size as u64,
        heap_used_bytes: heap_used as u64,
    }
}
