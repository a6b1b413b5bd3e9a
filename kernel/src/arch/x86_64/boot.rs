//! PVH entry: QEMU (and Firecracker, Cloud Hypervisor) jump to `pvh_start32`
//! in 32-bit protected mode with paging off and `ebx` pointing at an
//! `hvm_start_info`. The stub zeroes .bss, records the first TSC reading,
//! identity-maps the first 4 GiB with 2 MiB pages, enters long mode, enables
//! SSE (the precompiled `core` uses it) and calls [`boot_entry`].

use core::sync::atomic::{AtomicU64, Ordering};

/// Size of the stack the kernel's main flow runs on.
pub const BOOT_STACK_SIZE: usize = 512 * 1024;

#[repr(C, align(4096))]
pub struct PageTable(pub [u64; 512]);

#[repr(C, align(16))]
pub struct Stack<const N: usize>(pub [u8; N]);

// The boot stub writes these before any Rust code runs.
#[unsafe(no_mangle)]
static mut BOOT_PML4: PageTable = PageTable([0; 512]);
#[unsafe(no_mangle)]
static mut BOOT_PDPT: PageTable = PageTable([0; 512]);
#[unsafe(no_mangle)]
static mut BOOT_PD: [PageTable; 4] = [const { PageTable([0; 512]) }; 4];
#[unsafe(no_mangle)]
static mut BOOT_STACK: Stack<BOOT_STACK_SIZE> = Stack([0; BOOT_STACK_SIZE]);
/// TSC at the kernel's first instruction.
#[unsafe(no_mangle)]
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a"
    .balign 4
    .long 4                      /* name size: "Xen\0" */
    .long 4                      /* descriptor size */
    .long 18                     /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32

    .section .rodata.boot_gdt, "a"
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff     /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff     /* 0x10: data */
boot_gdt_end:
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .boot.text, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov esi, ebx                 /* hvm_start_info, kept in esi */

    /* Zero .bss (stack, page tables, statics). */
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb

    rdtsc
    mov dword ptr [BOOT_TSC], eax
    mov dword ptr [BOOT_TSC + 4], edx

    /* PML4[0] -> PDPT; PDPT[0..4] -> PD[0..4]; PD: 2048 x 2 MiB identity pages. */
    mov eax, offset BOOT_PDPT
    or eax, 3
    mov dword ptr [BOOT_PML4], eax
    xor ecx, ecx
1:
    mov eax, ecx
    shl eax, 12
    add eax, offset BOOT_PD
    or eax, 3
    mov dword ptr [BOOT_PDPT + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jb 1b
    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83                 /* present, writable, 2 MiB page */
    mov dword ptr [BOOT_PD + ecx * 8], eax
    mov edx, ecx
    shr edx, 11
    mov dword ptr [BOOT_PD + ecx * 8 + 4], edx
    inc ecx
    cmp ecx, 2048
    jb 2b

    mov eax, cr4
    or eax, 1 << 5               /* PAE */
    mov cr4, eax
    mov eax, offset BOOT_PML4
    mov cr3, eax
    mov ecx, 0xc0000080          /* EFER */
    rdmsr
    or eax, (1 << 8) | (1 << 11) /* LME, NXE */
    wrmsr
    mov eax, cr0
    or eax, 0x80000001           /* PG, PE */
    mov cr0, eax
    lgdt [boot_gdtr]
    /* Far jump to 64-bit code: ljmp 0x08:long_mode_entry */
    .byte 0xea
    .long long_mode_entry
    .word 0x08

    .code64
long_mode_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, offset BOOT_STACK
    add rsp, {stack_size}

    /* SSE: clear CR0.EM, set CR0.MP; set CR4.OSFXSR and CR4.OSXMMEXCPT. */
    mov rax, cr0
    and rax, ~(1 << 2)
    or rax, 1 << 1
    mov cr0, rax
    mov rax, cr4
    or rax, (1 << 9) | (1 << 10)
    mov cr4, rax

    mov edi, esi
    xor ebp, ebp
    call {entry}
3:
    cli
    hlt
    jmp 3b
"#,
    stack_size = const BOOT_STACK_SIZE,
    entry = sym boot_entry,
);

/// First Rust code: runs on the boot stack with the boot page tables.
extern "C" fn boot_entry(start_info: u32) -> ! {
    crate::boot::start(start_info as u64)
}

/// TSC value at the first instruction of the kernel.
pub fn boot_tsc() -> u64 {
    BOOT_TSC.load(Ordering::Relaxed)
}

/// Top of the boot stack, for the fault report's "which stack" line.
pub fn boot_stack_range() -> (u64, u64) {
    let base = &raw const BOOT_STACK as u64;
    (base, base + BOOT_STACK_SIZE as u64)
}
