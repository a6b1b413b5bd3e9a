//! Capsule arenas: each capsule owns a 1 GiB virtual window ("slot") at a
//! fixed address, the same on every VM of a cluster, so that a byte-for-byte
//! copy of its mapped pages is valid on another VM. The window begins with a
//! header page that holds the arena's allocator state, so the allocator moves
//! with the bytes it manages; the rest is the capsule's heap (its objects,
//! task stacks, smoltcp sockets), mapped on demand up to a per-capsule limit.
//!
//! While a capsule's code runs, the global allocator serves it from its arena
//! (the *allocation domain*); memory is always returned to the arena that
//! contains its address.

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use linked_list_allocator::Heap;
use spin::Mutex;
use x86_64::VirtAddr;
use x86_64::structures::paging::PageTableFlags;

use super::{PAGE_SIZE, frame, paging};

pub const ARENA_BASE: u64 = 0x0000_4000_0000_0000;
pub const SLOT_SIZE: u64 = 1 << 30;
pub const MAX_SLOTS: u32 = 4096;
/// The header page at the start of each window.
pub const HEADER_SIZE: u64 = PAGE_SIZE;
const MAGIC: u64 = u64::from_le_bytes(*b"CPSARENA");
/// Smallest growth step of an arena heap.
const GROWTH_STEP: u64 = 64 * 1024;
const KERNEL_DOMAIN: u32 = u32::MAX;

/// Lives at the start of the window; moves with the arena.
#[repr(C)]
pub struct ArenaHeader {
    magic: u64,
    slot: u32,
    state: Mutex<ArenaHeap>,
    /// The capsule's root object, set once by its owner.
    root: core::sync::atomic::AtomicUsize,
}

struct ArenaHeap {
    heap: Heap,
    /// Bytes of the window that are mapped, header included.
    mapped: u64,
    limit: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArenaError {
    SlotOutOfRange,
    SlotInUse,
    OutOfMemory,
    LimitTooSmall,
}

static ACTIVE: [AtomicBool; MAX_SLOTS as usize] =
    [const { AtomicBool::new(false) }; MAX_SLOTS as usize];
/// Bytes mapped at the start of each window, as the kernel counts them: of
/// an active arena, or of one that is still arriving (pre-copy: its pages
/// come one batch at a time and its header may not be there yet, so it is
/// not active — no allocation, no header reads — until [`adopt`]). 0 = none.
/// Teardown unmaps this much and never asks the header inside the window:
/// the capsule can overwrite its header, and a task that died inside the
/// allocator leaves the header's lock held.
static MAPPED: [AtomicU64; MAX_SLOTS as usize] = [const { AtomicU64::new(0) }; MAX_SLOTS as usize];
/// Arenas whose capsule died by a fault or panic, perhaps inside its
/// allocator: their free list may be half-updated and their lock held by the
/// dead task, so nothing allocates, frees or waits there any more.
static ABANDONED: [AtomicBool; MAX_SLOTS as usize] =
    [const { AtomicBool::new(false) }; MAX_SLOTS as usize];
static DOMAIN: AtomicU32 = AtomicU32::new(KERNEL_DOMAIN);

pub fn window_base(slot: u32) -> u64 {
    ARENA_BASE + slot as u64 * SLOT_SIZE
}

/// The slot whose window contains `addr`.
pub fn slot_of(addr: u64) -> Option<u32> {
    if !(ARENA_BASE..ARENA_BASE + MAX_SLOTS as u64 * SLOT_SIZE).contains(&addr) {
        return None;
    }
    Some(((addr - ARENA_BASE) / SLOT_SIZE) as u32)
}

fn header(slot: u32) -> Option<&'static ArenaHeader> {
    if slot >= MAX_SLOTS || !ACTIVE[slot as usize].load(Ordering::Acquire) {
        return None;
    }
    // SAFETY: an active slot has its header page mapped and initialised, and
    // it stays so until `destroy`, which only the owner calls.
    Some(unsafe { &*(window_base(slot) as *const ArenaHeader) })
}

fn map_range(start: u64, len: u64) -> Result<(), ArenaError> {
    let flags = PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
    let mut offset = 0;
    while offset < len {
        if paging::map_new(VirtAddr::new(start + offset), flags).is_err() {
            unmap_range(start, offset);
            return Err(ArenaError::OutOfMemory);
        }
        offset += PAGE_SIZE;
    }
    Ok(())
}

fn unmap_range(start: u64, len: u64) {
    let mut offset = 0;
    while offset < len {
        if let Ok(phys) = paging::unmap(VirtAddr::new(start + offset)) {
            // SAFETY: the frame was mapped only here and is now unmapped.
            unsafe { frame::free(phys, 1) };
        }
        offset += PAGE_SIZE;
    }
}

impl ArenaHeap {
    fn grow(&mut self, slot: u32, need: u64) -> bool {
        let step = need.max(GROWTH_STEP).next_multiple_of(PAGE_SIZE);
        // The header lives in the window and the capsule can write to it:
        // whatever it says, growth stays inside the window.
        let Some(end) = self.mapped.checked_add(step) else {
            return false;
        };
        if end > self.limit.min(SLOT_SIZE) {
            return false;
        }
        if map_range(window_base(slot) + self.mapped, step).is_err() {
            return false;
        }
        MAPPED[slot as usize].fetch_max(end, Ordering::AcqRel);
        // SAFETY: the new pages directly follow the heap's end.
        unsafe { self.heap.extend(step as usize) };
        self.mapped = end;
        true
    }
}

/// Creates the arena of `slot` with room for `limit` bytes (header included).
pub fn create(slot: u32, limit: u64) -> Result<(), ArenaError> {
    if slot >= MAX_SLOTS {
        return Err(ArenaError::SlotOutOfRange);
    }
    let limit = limit.min(SLOT_SIZE);
    let initial = HEADER_SIZE + GROWTH_STEP;
    if limit < initial {
        return Err(ArenaError::LimitTooSmall);
    }
    if MAPPED[slot as usize].load(Ordering::Acquire) != 0
        || ACTIVE[slot as usize].swap(true, Ordering::AcqRel)
    {
        return Err(ArenaError::SlotInUse);
    }
    let base = window_base(slot);
    if let Err(e) = map_range(base, initial) {
        ACTIVE[slot as usize].store(false, Ordering::Release);
        return Err(e);
    }
    MAPPED[slot as usize].store(initial, Ordering::Release);
    ABANDONED[slot as usize].store(false, Ordering::Release);
    let heap_start = (base + HEADER_SIZE) as *mut u8;
    // SAFETY: the header page was just mapped; the heap area after it too.
    unsafe {
        (base as *mut ArenaHeader).write(ArenaHeader {
            magic: MAGIC,
            slot,
            state: Mutex::new(ArenaHeap {
                heap: Heap::new(heap_start, GROWTH_STEP as usize),
                mapped: initial,
                limit,
            }),
            root: core::sync::atomic::AtomicUsize::new(0),
        });
    }
    Ok(())
}

/// Maps `len` bytes of `slot`'s window and fills them from `segments`
/// (offset, bytes); pages not covered stay zero. Used to revive a capsule
/// from its image. The header page must be among the segments and must name
/// this slot, else nothing stays mapped.
pub fn restore(slot: u32, len: u64, segments: &[(u64, &[u8])]) -> Result<(), ArenaError> {
    reserve(slot, len)?;
    for (offset, data) in segments {
        if !write_reserved(slot, *offset, data) {
            discard(slot);
            return Err(ArenaError::LimitTooSmall);
        }
    }
    adopt(slot).inspect_err(|_| discard(slot))
}

/// Maps `len` bytes of `slot`'s window, all zero, for an arena that will
/// arrive page by page ([`write_reserved`]) and then be [`adopt`]ed.
pub fn reserve(slot: u32, len: u64) -> Result<(), ArenaError> {
    if slot >= MAX_SLOTS {
        return Err(ArenaError::SlotOutOfRange);
    }
    if !(HEADER_SIZE..=SLOT_SIZE).contains(&len) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(ArenaError::LimitTooSmall);
    }
    if ACTIVE[slot as usize].load(Ordering::Acquire)
        || MAPPED[slot as usize].load(Ordering::Acquire) != 0
    {
        return Err(ArenaError::SlotInUse);
    }
    map_range(window_base(slot), len)?;
    MAPPED[slot as usize].store(len, Ordering::Release);
    Ok(())
}

/// Bytes mapped for a reservation of `slot` (not yet adopted); 0 if none.
fn reserved_len(slot: u32) -> u64 {
    if slot >= MAX_SLOTS || ACTIVE[slot as usize].load(Ordering::Acquire) {
        return 0;
    }
    MAPPED[slot as usize].load(Ordering::Acquire)
}

/// Copies `data` to `offset` of a reserved window; false (and nothing
/// written) when the slot is not reserved or the bytes would not fit.
pub fn write_reserved(slot: u32, offset: u64, data: &[u8]) -> bool {
    let len = reserved_len(slot);
    if len == 0
        || offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > len)
    {
        return false;
    }
    // SAFETY: `[offset, offset + data.len())` lies in the mapped reservation,
    // which nothing else uses before it is adopted.
    unsafe {
        core::ptr::copy_nonoverlapping(
            data.as_ptr(),
            (window_base(slot) + offset) as *mut u8,
            data.len(),
        )
    };
    true
}

/// Grows a reserved window to `len` bytes (fresh zero pages).
pub fn extend_reserved(slot: u32, len: u64) -> Result<(), ArenaError> {
    let have = reserved_len(slot);
    if have == 0 {
        return Err(ArenaError::SlotOutOfRange);
    }
    if len > SLOT_SIZE || !len.is_multiple_of(PAGE_SIZE) {
        return Err(ArenaError::LimitTooSmall);
    }
    if len > have {
        map_range(window_base(slot) + have, len - have)?;
        MAPPED[slot as usize].store(len, Ordering::Release);
    }
    Ok(())
}

/// Makes a reserved window an active arena once every page is in: its header
/// must name this slot. On failure the reservation stays (see [`discard`]).
pub fn adopt(slot: u32) -> Result<(), ArenaError> {
    if reserved_len(slot) == 0 {
        return Err(ArenaError::SlotOutOfRange);
    }
    // SAFETY: the header page is mapped (every reservation has it); it is
    // only read here.
    let header = unsafe { &*(window_base(slot) as *const ArenaHeader) };
    if header.magic != MAGIC || header.slot != slot {
        return Err(ArenaError::SlotOutOfRange);
    }
    ABANDONED[slot as usize].store(false, Ordering::Release);
    ACTIVE[slot as usize].store(true, Ordering::Release);
    Ok(())
}

/// Unmaps a reservation that will not become an arena.
pub fn discard(slot: u32) {
    if reserved_len(slot) == 0 {
        return;
    }
    let len = MAPPED[slot as usize].swap(0, Ordering::AcqRel);
    unmap_range(window_base(slot), len);
}

/// Bytes mapped for the active arena of `slot`.
fn mapped_len(slot: u32) -> Option<u64> {
    header(slot)?;
    Some(MAPPED[slot as usize].load(Ordering::Acquire))
}

/// The mapped bytes of an arena, to copy into an image. The capsule must be
/// frozen: nothing may change them while the slice is alive.
///
/// # Safety
/// No task of the capsule may run while the returned slice is used.
pub unsafe fn mapped_bytes(slot: u32) -> Option<&'static [u8]> {
    let mapped = mapped_len(slot)?;
    // SAFETY: the range is mapped while the slot is active; the caller
    // guarantees nobody writes to it meanwhile.
    Some(unsafe { core::slice::from_raw_parts(window_base(slot) as *const u8, mapped as usize) })
}

/// Maps `[from, to)` of `slot`'s window (fresh zero pages) while a capsule is
/// revived: its arena grew after the base of a pre-copy was taken.
pub fn map_more(slot: u32, from: u64, to: u64) -> Result<(), ArenaError> {
    if header(slot).is_none() || to > SLOT_SIZE || from > to {
        return Err(ArenaError::SlotOutOfRange);
    }
    map_range(window_base(slot) + from, to - from)?;
    MAPPED[slot as usize].fetch_max(to, Ordering::AcqRel);
    Ok(())
}

/// Offsets of the arena's pages written since the last call (see
/// [`paging::take_dirty`]). The first call after creation reports every
/// page that was ever written.
pub fn take_dirty(slot: u32) -> Option<alloc::vec::Vec<u64>> {
    let mapped = mapped_len(slot)?;
    Some(paging::take_dirty(VirtAddr::new(window_base(slot)), mapped))
}

/// Unmaps the whole arena and returns its frames. Every object in it is gone.
/// Reads nothing inside the window (see [`MAPPED`]), so it is safe for the
/// arena of a capsule that died anywhere, inside its allocator included.
pub fn destroy(slot: u32) {
    if header(slot).is_none() {
        return;
    }
    ACTIVE[slot as usize].store(false, Ordering::Release);
    let mapped = MAPPED[slot as usize].swap(0, Ordering::AcqRel);
    ABANDONED[slot as usize].store(false, Ordering::Release);
    unmap_range(window_base(slot), mapped);
}

/// The capsule of `slot` died (fault or panic), perhaps inside its allocator
/// with the arena's lock held and its free list half-updated: from now on
/// nothing is allocated or freed in its arena, and the allocation domain is
/// the kernel's, so that reporting the death allocates in the kernel heap.
/// The lock is never taken again ([`usage`] only tries, [`destroy`] does
/// not need it), so whatever the dead task held cannot stall the kernel.
pub fn abandon(slot: u32) {
    if slot >= MAX_SLOTS {
        return;
    }
    ABANDONED[slot as usize].store(true, Ordering::Release);
    if domain() == Some(slot) {
        set_domain(None);
    }
}

fn abandoned(slot: u32) -> bool {
    ABANDONED
        .get(slot as usize)
        .is_some_and(|a| a.load(Ordering::Acquire))
}

pub fn set_root(slot: u32, root: usize) {
    if let Some(h) = header(slot) {
        h.root.store(root, Ordering::Release);
    }
}

pub fn root(slot: u32) -> Option<usize> {
    header(slot)
        .map(|h| h.root.load(Ordering::Acquire))
        .filter(|r| *r != 0)
}

/// (bytes mapped including the header, bytes allocated, limit). The last
/// two read 0 for an arena whose lock a dead task holds: nothing ever waits
/// for it (the allocator holds it only with interrupts off and never
/// switches context inside, so outside a task's allocation it is held only
/// if the task died there).
pub fn usage(slot: u32) -> Option<(u64, u64, u64)> {
    let h = header(slot)?;
    let mapped = MAPPED[slot as usize].load(Ordering::Acquire);
    Some(crate::arch::without_interrupts(|| {
        match h.state.try_lock() {
            Some(s) if !abandoned(slot) => (mapped, s.heap.used() as u64, s.limit),
            _ => (mapped, 0, 0),
        }
    }))
}

/// Whether the header at `slot` is intact (used to check arenas received from elsewhere).
pub fn is_valid(slot: u32) -> bool {
    header(slot).is_some_and(|h| h.magic == MAGIC && h.slot == slot)
}

pub fn alloc(slot: u32, layout: Layout) -> *mut u8 {
    let Some(h) = header(slot).filter(|_| !abandoned(slot)) else {
        return core::ptr::null_mut();
    };
    let mut state = h.state.lock();
    loop {
        if let Ok(ptr) = state.heap.allocate_first_fit(layout) {
            return ptr.as_ptr();
        }
        let need = (layout.size() + layout.align()) as u64 + 64;
        if !state.grow(slot, need) {
            return core::ptr::null_mut();
        }
    }
}

/// # Safety
/// `ptr` must come from [`alloc`] on the same slot with this layout.
pub unsafe fn dealloc(slot: u32, ptr: *mut u8, layout: Layout) {
    let Some(h) = header(slot) else {
        // The arena is gone (capsule ended): its memory went with it.
        return;
    };
    if abandoned(slot) {
        // Its capsule is dead and the arena goes as a whole; its free list
        // may be damaged.
        return;
    }
    // Large blocks are cleared when freed: a capsule image leaves out pages
    // that are all zero, so freed buffers (a 16 MiB request that was parsed
    // and dropped) do not travel with every move.
    if layout.size() >= 2 * PAGE_SIZE as usize {
        // SAFETY: the block is owned by the caller and about to be freed.
        unsafe { core::ptr::write_bytes(ptr, 0, layout.size()) };
    }
    // SAFETY: forwarded to the caller.
    unsafe {
        h.state
            .lock()
            .heap
            .deallocate(NonNull::new_unchecked(ptr), layout)
    };
}

/// The slot whose arena serves allocations now, or `None` for the kernel heap.
pub fn domain() -> Option<u32> {
    let d = DOMAIN.load(Ordering::Relaxed);
    (d != KERNEL_DOMAIN).then_some(d)
}

/// Switches the allocation domain; returns the previous one.
pub fn set_domain(slot: Option<u32>) -> Option<u32> {
    let prev = DOMAIN.swap(slot.unwrap_or(KERNEL_DOMAIN), Ordering::Relaxed);
    (prev != KERNEL_DOMAIN).then_some(prev)
}

/// Runs `f` with allocations going to `slot`'s arena.
pub fn with_domain<R>(slot: u32, f: impl FnOnce() -> R) -> R {
    let prev = set_domain(Some(slot));
    let r = f();
    set_domain(prev);
    r
}
