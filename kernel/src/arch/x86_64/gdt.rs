//! The kernel's GDT and TSS. The TSS carries the interrupt stacks (IST): every
//! interrupt and exception switches to one, because kernel code (and the
//! precompiled `core`) uses the red zone below its stack pointer, which an
//! interrupt frame pushed on the same stack would overwrite.

use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::SegmentSelector;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;

use super::boot::Stack;

/// IST slots (1-based in the IDT, 0-based in the TSS array).
pub const IST_IRQ: u8 = 1;
pub const IST_DOUBLE_FAULT: u8 = 2;
pub const IST_NMI_MCE: u8 = 3;
pub const IST_EXCEPTION: u8 = 4;

const IST_STACK_SIZE: usize = 64 * 1024;

static mut IST_STACKS: [Stack<IST_STACK_SIZE>; 4] = [const { Stack([0; IST_STACK_SIZE]) }; 4];

struct Tables {
    gdt: GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<Tables> = Once::new();

/// The address range of IST stack `slot`, for fault reports.
pub fn ist_stack_range(slot: u8) -> (u64, u64) {
    let base = (&raw const IST_STACKS) as u64 + (slot as u64 - 1) * IST_STACK_SIZE as u64;
    (base, base + IST_STACK_SIZE as u64)
}

pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        for slot in [IST_IRQ, IST_DOUBLE_FAULT, IST_NMI_MCE, IST_EXCEPTION] {
            // Stacks grow down: the IST entry is the end of the area.
            let (_, top) = ist_stack_range(slot);
            tss.interrupt_stack_table[slot as usize - 1] = VirtAddr::new(top);
        }
        tss
    });
    let tables = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        Tables {
            gdt,
            code,
            data,
            tss,
        }
    });
    tables.gdt.load();
    // SAFETY: the selectors come from the GDT just loaded, which lives in a
    // static for the rest of the kernel's life.
    unsafe {
        CS::set_reg(tables.code);
        DS::set_reg(tables.data);
        ES::set_reg(tables.data);
        SS::set_reg(tables.data);
        load_tss(tables.tss);
    }
}
