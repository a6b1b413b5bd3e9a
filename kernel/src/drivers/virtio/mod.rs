//! Glue between the virtio-drivers crate and this kernel's memory management.

pub mod net;

use core::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PhysAddr};
use x86_64::VirtAddr;

use crate::mm::{PAGE_SIZE, frame, paging};

pub struct KernelHal;

// SAFETY: DMA memory comes from contiguous, identity-mapped frames (so the
// device and the driver see the same bytes at the same address), and `share`
// returns the true physical address of a buffer after checking it is
// physically contiguous.
unsafe impl Hal for KernelHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let phys = frame::alloc_contiguous(pages).expect("out of memory for virtio DMA");
        let ptr = phys.as_u64() as *mut u8;
        // SAFETY: the frames are fresh and identity-mapped.
        unsafe { core::ptr::write_bytes(ptr, 0, pages * PAGE_SIZE as usize) };
        (
            phys.as_u64(),
            NonNull::new(ptr).expect("frame 0 is never allocated"),
        )
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: the caller returns what `dma_alloc` gave it.
        unsafe { frame::free(x86_64::PhysAddr::new(paddr), pages) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        paging::ensure_identity_mapped(paddr, size as u64);
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        let start = buffer.as_ptr() as *mut u8 as u64;
        let len = buffer.len() as u64;
        let phys = paging::translate(VirtAddr::new(start)).expect("virtio buffer is not mapped");
        // The device sees one physical range: every page must follow the first.
        let mut page = start & !(PAGE_SIZE - 1);
        while page + PAGE_SIZE < start + len {
            page += PAGE_SIZE;
            let expected = phys.as_u64() + (page - start);
            assert_eq!(
                paging::translate(VirtAddr::new(page)).map(|p| p.as_u64()),
                Some(expected),
                "virtio buffer at {start:#x} is not physically contiguous"
            );
        }
        phys.as_u64()
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// A physically contiguous, identity-mapped buffer for device I/O.
pub struct DmaRegion {
    phys: u64,
    pages: usize,
}

impl DmaRegion {
    pub fn new(bytes: usize) -> Self {
        let pages = bytes.div_ceil(PAGE_SIZE as usize);
        let (phys, _) = KernelHal::dma_alloc(pages, BufferDirection::Both);
        Self { phys, pages }
    }

    /// The `index`-th slot of `slot_len` bytes.
    pub fn slot(&mut self, index: usize, slot_len: usize) -> &mut [u8] {
        assert!((index + 1) * slot_len <= self.pages * PAGE_SIZE as usize);
        // SAFETY: the slot lies inside this region, which we own exclusively.
        unsafe {
            core::slice::from_raw_parts_mut(
                (self.phys as usize + index * slot_len) as *mut u8,
                slot_len,
            )
        }
    }
}
