//! The kernel heap: a linked-list allocator over a virtual window that grows
//! by mapping fresh frames at its end when an allocation does not fit.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;

use linked_list_allocator::Heap;
use spin::Mutex;
use x86_64::VirtAddr;
use x86_64::structures::paging::PageTableFlags;

use super::{PAGE_SIZE, paging};

/// Where the heap window starts; it never moves, so pointers stay valid as it grows.
pub const HEAP_START: u64 = paging::MAPPED_WINDOWS_START;
/// Largest the heap may grow.
pub const HEAP_MAX: u64 = 1 << 30;
const INITIAL_SIZE: u64 = 1 << 20;
/// Smallest growth step, so small allocations do not map a page each.
const GROWTH_STEP: u64 = 1 << 20;

struct HeapState {
    heap: Heap,
    mapped: u64,
}

impl HeapState {
    /// Maps at least `bytes` more at the end of the heap window.
    fn grow(&mut self, bytes: u64) -> bool {
        let step = bytes.max(GROWTH_STEP).next_multiple_of(PAGE_SIZE);
        if self.mapped + step > HEAP_MAX {
            return false;
        }
        let flags = PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
        let mut added = 0;
        while added < step {
            let virt = VirtAddr::new(HEAP_START + self.mapped + added);
            if paging::map_new(virt, flags).is_err() {
                break;
            }
            added += PAGE_SIZE;
        }
        if added == 0 {
            return false;
        }
        if self.mapped == 0 {
            // SAFETY: the window was just mapped and is used by nothing else.
            unsafe { self.heap.init(HEAP_START as *mut u8, added as usize) };
        } else {
            // SAFETY: the added pages directly follow the heap's current end.
            unsafe { self.heap.extend(added as usize) };
        }
        self.mapped += added;
        true
    }
}

pub struct KernelHeap {
    state: Mutex<HeapState>,
}

#[global_allocator]
static KERNEL_HEAP: KernelHeap = KernelHeap {
    state: Mutex::new(HeapState {
        heap: Heap::empty(),
        mapped: 0,
    }),
};

// SAFETY: every allocation is carved from mapped heap memory under the lock,
// with interrupts off so an interrupt handler can never find the lock held.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        crate::arch::without_interrupts(|| {
            if let Some(slot) = super::arena::domain() {
                return super::arena::alloc(slot, layout);
            }
            let mut state = self.state.lock();
            loop {
                if let Ok(ptr) = state.heap.allocate_first_fit(layout) {
                    return ptr.as_ptr();
                }
                let need = (layout.size() + layout.align()) as u64 + 64;
                if !state.grow(need) {
                    return core::ptr::null_mut();
                }
            }
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        crate::arch::without_interrupts(|| {
            // Memory goes back to whichever arena contains it, whatever the
            // current domain: objects may be freed by other code than their
            // allocator's (e.g. the kernel dropping a capsule's packet).
            if let Some(slot) = super::arena::slot_of(ptr as u64) {
                // SAFETY: addresses in arena windows come from `arena::alloc`.
                return unsafe { super::arena::dealloc(slot, ptr, layout) };
            }
            // SAFETY: `ptr` came from `alloc` with this layout (GlobalAlloc contract).
            unsafe {
                self.state
                    .lock()
                    .heap
                    .deallocate(NonNull::new_unchecked(ptr), layout)
            }
        })
    }
}

pub fn init() {
    let ok = crate::arch::without_interrupts(|| KERNEL_HEAP.state.lock().grow(INITIAL_SIZE));
    assert!(ok, "cannot map the initial kernel heap");
}

/// (bytes mapped, bytes in use).
pub fn usage() -> (usize, usize) {
    crate::arch::without_interrupts(|| {
        let state = KERNEL_HEAP.state.lock();
        (state.mapped as usize, state.heap.used())
    })
}

/// Whether the kernel heap's lock is held. Outside an allocation it can be
/// held only by a context that died inside one (the lock is taken with
/// interrupts off and no context switch happens inside): the heap is then in
/// an unknown state, and such a death cannot be contained to a capsule.
pub fn lock_held() -> bool {
    KERNEL_HEAP.state.is_locked()
}
