//! The interrupt descriptor table. Every vector has an assembly stub (see
//! `trap.rs`) that saves the interrupted state and calls the Rust dispatcher.

use core::mem::size_of;

use super::gdt::{IST_DOUBLE_FAULT, IST_EXCEPTION, IST_IRQ, IST_NMI_MCE};

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    fn interrupt(handler: u64, ist: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: 0x08,
            ist,
            // Present, DPL 0, 64-bit interrupt gate (interrupts stay off in handlers).
            type_attr: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static mut IDT: Idt = Idt([Gate::MISSING; 256]);

#[repr(C, packed)]
struct Idtr {
    limit: u16,
    base: u64,
}

pub fn init() {
    // SAFETY: runs once during single-threaded boot before interrupts are
    // enabled; the stubs are code emitted by the assembler.
    unsafe {
        let idt = &raw mut IDT;
        for vector in 0..256 {
            let ist = match vector {
                8 => IST_DOUBLE_FAULT,
                2 | 18 => IST_NMI_MCE,
                0..=31 => IST_EXCEPTION,
                _ => IST_IRQ,
            };
            (*idt).0[vector] = Gate::interrupt(super::trap::stub_address(vector as u8), ist);
        }
        let idtr = Idtr {
            limit: (size_of::<Idt>() - 1) as u16,
            base: &raw const IDT as u64,
        };
        core::arch::asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags));
    }
}
