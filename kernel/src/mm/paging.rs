//! The kernel's own 4-level page tables. After boot they replace the boot
//! stub's tables: RAM and the first 4 GiB (device space) are identity-mapped
//! with 2 MiB pages, and [`map`]/[`unmap`] place 4 KiB pages at chosen virtual
//! addresses elsewhere.

use spin::Mutex;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::mapper::{MapToError, TranslateResult, UnmapError};
use x86_64::structures::paging::{
    Mapper, OffsetPageTable, Page, PageSize, PageTable, PageTableFlags, PhysFrame, Size2MiB,
    Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

use super::frame::{self, GlobalFrames};

static KERNEL_TABLES: Mutex<Option<OffsetPageTable<'static>>> = Mutex::new(None);

/// Lowest virtual address handed to [`map`]: everything below is the identity map.
pub const MAPPED_WINDOWS_START: u64 = 0x0000_1000_0000_0000;

/// Why a mapping request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    OutOfFrames,
    AlreadyMapped,
    NotMapped,
    /// The address is inside the identity map, which is not changed page by page.
    ReservedRange,
}

fn identity_map_2m(
    tables: &mut OffsetPageTable<'static>,
    start: u64,
    end: u64,
    flags: PageTableFlags,
) {
    let mut addr = start;
    while addr < end {
        let page = Page::<Size2MiB>::containing_address(VirtAddr::new(addr));
        let frame = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(addr));
        // SAFETY: identity mapping of RAM or device space keeps every existing
        // pointer valid; nothing else is mapped at these addresses yet.
        let flush = unsafe { tables.map_to(page, frame, flags, &mut GlobalFrames) }
            .expect("identity map: out of frames for page tables");
        flush.ignore();
        addr += Size2MiB::SIZE;
    }
}

pub fn init(ram_end: u64) {
    let pml4_phys = frame::alloc().expect("no frame for the kernel PML4");
    let pml4 = pml4_phys.as_u64() as *mut PageTable;
    // SAFETY: the frame is fresh, identity-mapped, and becomes the kernel's
    // top-level table for the rest of its life.
    let mut tables = unsafe {
        pml4.write(PageTable::new());
        OffsetPageTable::new(&mut *pml4, VirtAddr::new(0))
    };
    let rw = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
    let end = ram_end.max(4 << 30).next_multiple_of(2 << 20);
    identity_map_2m(&mut tables, 0, end, rw);
    // SAFETY: the new tables map everything the old ones did (identity, first
    // 4 GiB, plus RAM above it), so execution continues unchanged.
    unsafe { Cr3::write(PhysFrame::containing_address(pml4_phys), Cr3Flags::empty()) };
    *KERNEL_TABLES.lock() = Some(tables);
    log::info!(
        "paging: identity map up to {:#x}, kernel tables at {:#x}",
        end,
        pml4_phys.as_u64()
    );
}

fn with_tables<R>(f: impl FnOnce(&mut OffsetPageTable<'static>) -> R) -> R {
    crate::arch::without_interrupts(|| {
        let mut guard = KERNEL_TABLES.lock();
        f(guard.as_mut().expect("paging not initialised"))
    })
}

/// Maps the 4 KiB page at `virt` to `phys`.
pub fn map(virt: VirtAddr, phys: PhysAddr, flags: PageTableFlags) -> Result<(), MapError> {
    if virt.as_u64() < MAPPED_WINDOWS_START {
        return Err(MapError::ReservedRange);
    }
    let page = Page::<Size4KiB>::containing_address(virt);
    let frame = PhysFrame::<Size4KiB>::containing_address(phys);
    with_tables(|tables| {
        // SAFETY: the page lies outside the identity map, so no existing
        // reference aliases it; callers own the frame they map.
        match unsafe {
            tables.map_to(
                page,
                frame,
                flags | PageTableFlags::PRESENT,
                &mut GlobalFrames,
            )
        } {
            Ok(flush) => {
                flush.flush();
                Ok(())
            }
            Err(MapToError::FrameAllocationFailed) => Err(MapError::OutOfFrames),
            Err(_) => Err(MapError::AlreadyMapped),
        }
    })
}

/// Maps a fresh zeroed frame at `virt`.
pub fn map_new(virt: VirtAddr, flags: PageTableFlags) -> Result<PhysAddr, MapError> {
    let phys = frame::alloc().ok_or(MapError::OutOfFrames)?;
    // SAFETY: the frame is fresh and identity-mapped.
    unsafe { core::ptr::write_bytes(phys.as_u64() as *mut u8, 0, super::PAGE_SIZE as usize) };
    map(virt, phys, flags).inspect_err(|_| {
        // SAFETY: the frame was never mapped anywhere.
        unsafe { frame::free(phys, 1) }
    })?;
    Ok(phys)
}

/// Removes the 4 KiB mapping at `virt` and returns the frame it pointed to.
pub fn unmap(virt: VirtAddr) -> Result<PhysAddr, MapError> {
    if virt.as_u64() < MAPPED_WINDOWS_START {
        return Err(MapError::ReservedRange);
    }
    let page = Page::<Size4KiB>::containing_address(virt);
    with_tables(|tables| match tables.unmap(page) {
        Ok((frame, flush)) => {
            flush.flush();
            Ok(frame.start_address())
        }
        Err(UnmapError::PageNotMapped) => Err(MapError::NotMapped),
        Err(_) => Err(MapError::NotMapped),
    })
}

/// The physical address `virt` maps to, if any.
pub fn translate(virt: VirtAddr) -> Option<PhysAddr> {
    with_tables(|tables| match tables.translate(virt) {
        TranslateResult::Mapped { frame, offset, .. } => Some(frame.start_address() + offset),
        _ => None,
    })
}

/// Offsets (from `start`) of the pages in `[start, start + len)` that were
/// written since the last call, clearing their dirty bits as it goes (and the
/// TLB entries, so the CPU marks the next write again). Pre-copy migration
/// sends the whole arena while the capsule runs, then only these pages.
pub fn take_dirty(start: VirtAddr, len: u64) -> alloc::vec::Vec<u64> {
    with_tables(|tables| {
        let mut dirty = alloc::vec::Vec::new();
        let mut offset = 0;
        while offset < len {
            let virt = start + offset;
            if let TranslateResult::Mapped { flags, .. } = tables.translate(virt)
                && flags.contains(PageTableFlags::DIRTY)
            {
                dirty.push(offset);
                let page = Page::<Size4KiB>::containing_address(virt);
                // SAFETY: only the dirty bit changes; the mapping stays.
                if let Ok(flush) =
                    unsafe { tables.update_flags(page, flags - PageTableFlags::DIRTY) }
                {
                    flush.flush();
                }
            }
            offset += Size4KiB::SIZE;
        }
        dirty
    })
}

/// Makes sure device memory at `phys` is reachable (identity-mapped). Memory
/// below 4 GiB always is; higher BARs get 2 MiB identity pages on demand.
pub fn ensure_identity_mapped(phys: u64, len: u64) {
    let start = phys & !((2 << 20) - 1);
    let end = (phys + len).next_multiple_of(2 << 20);
    if end <= 4 << 30 {
        return;
    }
    with_tables(|tables| {
        let mut addr = start;
        while addr < end {
            if tables.translate_addr(VirtAddr::new(addr)).is_none() {
                let flags = PageTableFlags::PRESENT
                    | PageTableFlags::WRITABLE
                    | PageTableFlags::NO_CACHE
                    | PageTableFlags::WRITE_THROUGH;
                identity_map_2m(tables, addr, addr + (2 << 20), flags);
                x86_64::instructions::tlb::flush(VirtAddr::new(addr));
            }
            addr += 2 << 20;
        }
    });
}
