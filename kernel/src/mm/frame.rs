//! Physical frame allocator: a bitmap over the RAM the PVH memory map reports,
//! minus the first MiB and the kernel image. Supports physically contiguous
//! runs, which virtio queues and DMA buffers need.

use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;
use x86_64::PhysAddr;
use x86_64::structures::paging::{FrameAllocator, PhysFrame, Size4KiB};

use super::PAGE_SIZE;
use crate::boot::{BootInfo, MemoryKind};

/// Physical memory above this is ignored (and reported): 16 GiB.
const MAX_PHYS: u64 = 16 << 30;
const FRAMES: usize = (MAX_PHYS / PAGE_SIZE) as usize;
const WORDS: usize = FRAMES / 64;

struct Bitmap {
    /// Bit set = frame free.
    free: [u64; WORDS],
    total: u64,
    free_count: u64,
    /// Word index where the next search starts (next fit).
    hint: usize,
    ram_end: u64,
}

static FRAMES_STATE: Mutex<Bitmap> = Mutex::new(Bitmap {
    free: [0; WORDS],
    total: 0,
    free_count: 0,
    hint: 0,
    ram_end: 0,
});

unsafe extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

pub fn kernel_image_range() -> (u64, u64) {
    (
        (&raw const __kernel_start) as u64,
        (&raw const __kernel_end) as u64,
    )
}

impl Bitmap {
    fn set_free(&mut self, frame: usize, free: bool) {
        let (word, bit) = (frame / 64, frame % 64);
        let was_free = self.free[word] & (1 << bit) != 0;
        if free && !was_free {
            self.free[word] |= 1 << bit;
            self.free_count += 1;
        } else if !free && was_free {
            self.free[word] &= !(1 << bit);
            self.free_count -= 1;
        }
    }

    fn is_free(&self, frame: usize) -> bool {
        self.free[frame / 64] & (1 << (frame % 64)) != 0
    }

    fn alloc_one(&mut self) -> Option<usize> {
        for i in 0..WORDS {
            let word = (self.hint + i) % WORDS;
            let bits = self.free[word];
            if bits != 0 {
                let frame = word * 64 + bits.trailing_zeros() as usize;
                self.set_free(frame, false);
                self.hint = word;
                return Some(frame);
            }
        }
        None
    }

    fn alloc_run(&mut self, count: usize) -> Option<usize> {
        let limit = (self.ram_end / PAGE_SIZE) as usize;
        let mut start = 0;
        while start + count <= limit {
            match (start..start + count).find(|f| !self.is_free(*f)) {
                None => {
                    for f in start..start + count {
                        self.set_free(f, false);
                    }
                    return Some(start);
                }
                Some(busy) => start = busy + 1,
            }
        }
        None
    }
}

pub fn init(info: &BootInfo) {
    let (image_start, image_end) = kernel_image_range();
    let mut bitmap = FRAMES_STATE.lock();
    let mut ignored = 0;
    for region in info
        .memory_map()
        .iter()
        .filter(|r| r.kind == MemoryKind::Ram)
    {
        let start = region.start.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let end = (region.start + region.len) / PAGE_SIZE * PAGE_SIZE;
        let mut addr = start;
        while addr < end {
            let usable = addr >= 0x10_0000 && !(image_start..image_end).contains(&addr);
            if addr >= MAX_PHYS {
                ignored += end - addr;
                break;
            }
            if usable {
                bitmap.set_free((addr / PAGE_SIZE) as usize, true);
                bitmap.total += 1;
                bitmap.ram_end = bitmap.ram_end.max(addr + PAGE_SIZE);
            }
            addr += PAGE_SIZE;
        }
    }
    if ignored > 0 {
        log::warn!(
            "ignoring {} MiB of RAM above {} GiB",
            ignored >> 20,
            MAX_PHYS >> 30
        );
    }
    log::info!(
        "frames: {} MiB usable, kernel image {:#x}-{:#x}",
        (bitmap.total * PAGE_SIZE) >> 20,
        image_start,
        image_end
    );
}

/// One free frame, or `None` when memory is exhausted.
pub fn alloc() -> Option<PhysAddr> {
    crate::arch::without_interrupts(|| FRAMES_STATE.lock().alloc_one())
        .map(|f| PhysAddr::new(f as u64 * PAGE_SIZE))
}

/// `count` physically contiguous frames.
pub fn alloc_contiguous(count: usize) -> Option<PhysAddr> {
    crate::arch::without_interrupts(|| FRAMES_STATE.lock().alloc_run(count))
        .map(|f| PhysAddr::new(f as u64 * PAGE_SIZE))
}

/// Returns frames to the allocator.
///
/// # Safety
/// The frames must have come from this allocator and must no longer be used.
pub unsafe fn free(addr: PhysAddr, count: usize) {
    let first = (addr.as_u64() / PAGE_SIZE) as usize;
    crate::arch::without_interrupts(|| {
        let mut bitmap = FRAMES_STATE.lock();
        for f in first..first + count {
            assert!(
                !bitmap.is_free(f),
                "double free of frame {:#x}",
                f as u64 * PAGE_SIZE
            );
            bitmap.set_free(f, true);
        }
    });
}

/// (usable frames, free frames).
pub fn counts() -> (u64, u64) {
    crate::arch::without_interrupts(|| {
        let b = FRAMES_STATE.lock();
        (b.total, b.free_count)
    })
}

/// Frames promised to admitted work that has not mapped them yet: the
/// arenas of images being received. Allocation does not enforce them;
/// admission checks do ([`reserve`], and restores through [`available`]), so
/// two admissions are never both granted the same free frames.
static RESERVED: AtomicU64 = AtomicU64::new(0);

/// Free frames not promised to anyone ([`reserve`]).
pub fn available() -> u64 {
    counts().1.saturating_sub(RESERVED.load(Ordering::Acquire))
}

/// Frames set aside by [`reserve`] until dropped.
#[derive(Debug)]
pub struct Reservation {
    frames: u64,
}

impl Reservation {
    pub fn frames(&self) -> u64 {
        self.frames
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        RESERVED.fetch_sub(self.frames, Ordering::AcqRel);
    }
}

/// Sets `frames` aside if that many stay [`available`] with `headroom` more
/// to spare. Kernel loop only (the check and the update are not one step).
pub fn reserve(frames: u64, headroom: u64) -> Option<Reservation> {
    if available() < frames.checked_add(headroom)? {
        return None;
    }
    RESERVED.fetch_add(frames, Ordering::AcqRel);
    Some(Reservation { frames })
}

/// End of the highest usable RAM frame.
pub fn highest_ram_end() -> u64 {
    FRAMES_STATE.lock().ram_end
}

/// Adapter for the `x86_64` crate's page-table code.
pub struct GlobalFrames;

// SAFETY: `alloc` hands out each frame once until it is freed.
unsafe impl FrameAllocator<Size4KiB> for GlobalFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let addr = alloc()?;
        // Page tables must start zeroed; RAM is identity-mapped.
        // SAFETY: the frame was just allocated and is identity-mapped.
        unsafe { core::ptr::write_bytes(addr.as_u64() as *mut u8, 0, PAGE_SIZE as usize) };
        Some(PhysFrame::containing_address(addr))
    }
}
