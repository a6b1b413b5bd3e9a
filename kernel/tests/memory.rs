//! In-kernel tests of the frame allocator, page mapping and heap growth.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use capsules_kernel::boot::BootInfo;
use capsules_kernel::mm::{self, PAGE_SIZE, frame, heap, paging};
use capsules_kernel::testing::{Test, run};
use x86_64::structures::paging::PageTableFlags;
use x86_64::{PhysAddr, VirtAddr};

fn frames_are_unique_and_returned() {
    let (_, free_before) = frame::counts();
    let frames: Vec<PhysAddr> = (0..256).map(|_| frame::alloc().expect("frame")).collect();
    let mut sorted: Vec<u64> = frames.iter().map(|f| f.as_u64()).collect();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 256, "a frame was handed out twice");
    let (kernel_start, kernel_end) = frame::kernel_image_range();
    for f in &sorted {
        assert_eq!(f % PAGE_SIZE, 0);
        assert!(*f >= 0x10_0000, "frame in the first MiB");
        assert!(
            !(kernel_start..kernel_end).contains(f),
            "frame inside the kernel image"
        );
    }
    assert_eq!(frame::counts().1, free_before - 256);
    for f in frames {
        // SAFETY: allocated above, never used.
        unsafe { frame::free(f, 1) };
    }
    assert_eq!(frame::counts().1, free_before);
}

fn contiguous_runs() {
    let run = frame::alloc_contiguous(64).expect("64 contiguous frames");
    let other = frame::alloc_contiguous(64).expect("another run");
    let (a, b) = (run.as_u64(), other.as_u64());
    assert!(
        a + 64 * PAGE_SIZE <= b || b + 64 * PAGE_SIZE <= a,
        "runs overlap"
    );
    // SAFETY: both runs were allocated above and are unused.
    unsafe {
        frame::free(run, 64);
        frame::free(other, 64);
    }
}

fn map_translate_unmap_at_chosen_address() {
    let virt = VirtAddr::new(0x0000_2000_0000_0000 + 0x1234_5000);
    let flags = PageTableFlags::WRITABLE;
    let phys = paging::map_new(virt, flags).expect("map");
    assert_eq!(paging::translate(virt), Some(phys));
    assert_eq!(paging::translate(virt + 0x10u64), Some(phys + 0x10u64));
    // SAFETY: the page was just mapped writable.
    unsafe {
        let p = virt.as_mut_ptr::<u64>();
        assert_eq!(p.read_volatile(), 0, "new pages are zeroed");
        p.write_volatile(0xfeed_f00d);
        // The same frame seen through the identity map holds the value.
        assert_eq!((phys.as_u64() as *const u64).read_volatile(), 0xfeed_f00d);
    }
    assert_eq!(
        paging::map(virt, phys, flags),
        Err(paging::MapError::AlreadyMapped)
    );
    assert_eq!(paging::unmap(virt), Ok(phys));
    assert_eq!(paging::translate(virt), None);
    assert_eq!(paging::unmap(virt), Err(paging::MapError::NotMapped));
    // The identity map is not changed page by page.
    assert_eq!(
        paging::unmap(VirtAddr::new(0x20_0000)),
        Err(paging::MapError::ReservedRange)
    );
    // Map the same frame again at a second address: both views agree.
    let second = VirtAddr::new(0x0000_3000_0000_0000);
    paging::map(virt, phys, flags).expect("remap");
    paging::map(second, phys, flags).expect("alias");
    // SAFETY: both pages map the same frame, writable.
    unsafe {
        virt.as_mut_ptr::<u32>().write_volatile(77);
        assert_eq!(second.as_ptr::<u32>().read_volatile(), 77);
    }
    paging::unmap(second).expect("unmap alias");
    let frame = paging::unmap(virt).expect("unmap");
    // SAFETY: no longer mapped anywhere.
    unsafe { frame::free(frame, 1) };
}

fn heap_grows_on_demand() {
    let (size_before, _) = heap::usage();
    let big: Vec<u8> = alloc::vec![0xa5; 8 << 20];
    let (size_after, used_after) = heap::usage();
    assert!(
        size_after >= size_before + (8 << 20),
        "heap did not grow: {size_before} -> {size_after}"
    );
    assert!(used_after >= 8 << 20);
    assert!(big.iter().all(|b| *b == 0xa5));
    let addr = big.as_ptr() as u64;
    assert!((heap::HEAP_START..heap::HEAP_START + heap::HEAP_MAX).contains(&addr));
    drop(big);
    assert!(heap::usage().1 < used_after - (8 << 20) + 4096);
}

fn many_small_allocations_are_reused() {
    for round in 0..4 {
        let boxes: Vec<alloc::boxed::Box<[u64; 16]>> =
            (0..2000).map(|i| alloc::boxed::Box::new([i; 16])).collect();
        for (i, b) in boxes.iter().enumerate() {
            assert_eq!(b[15], i as u64, "round {round}");
        }
    }
    let stats = mm::stats();
    assert!(stats.used_bytes < stats.total_bytes);
    assert!(stats.heap_used_bytes <= stats.heap_size_bytes);
}

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    run(
        "memory",
        &[
            Test {
                name: "frames_are_unique_and_returned",
                run: frames_are_unique_and_returned,
            },
            Test {
                name: "contiguous_runs",
                run: contiguous_runs,
            },
            Test {
                name: "map_translate_unmap_at_chosen_address",
                run: map_translate_unmap_at_chosen_address,
            },
            Test {
                name: "heap_grows_on_demand",
                run: heap_grows_on_demand,
            },
            Test {
                name: "many_small_allocations_are_reused",
                run: many_small_allocations_are_reused,
            },
        ],
    )
}
