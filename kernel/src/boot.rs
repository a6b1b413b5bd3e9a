//! Boot sequence: from the PVH start info to a running kernel, then the image's
//! `kernel_main` (the real kernel in main.rs, or an in-kernel test).

use capsules_wire::bootcfg::BootConfig;
use capsules_wire::exit::KernelExit;
use spin::Once;

use crate::arch::x86_64::{apic, boot as arch_boot, cpu, gdt, idt};
use crate::{diag, drivers, logger, mm, time};

const START_INFO_MAGIC: u32 = 0x336e_c578;
const MAX_REGIONS: usize = 64;
const MAX_CMDLINE: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    Ram,
    Reserved,
    Acpi,
    Other(u32),
}

#[derive(Debug, Clone, Copy)]
pub struct MemoryRegion {
    pub start: u64,
    pub len: u64,
    pub kind: MemoryKind,
}

/// What the loader told us, copied out of its memory before the frame
/// allocator may hand that memory out.
pub struct BootInfo {
    regions: [MemoryRegion; MAX_REGIONS],
    region_count: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    pub config: BootConfig,
}

impl BootInfo {
    pub fn memory_map(&self) -> &[MemoryRegion] {
        &self.regions[..self.region_count]
    }

    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }
}

#[repr(C)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

static BOOT_INFO: Once<BootInfo> = Once::new();

/// `CAPSULES_BUILD_TAG` at build time (shown after the build id when set).
const BUILD_TAG: &str = match option_env!("CAPSULES_BUILD_TAG") {
    Some(tag) if !tag.is_empty() => tag,
    _ => "",
};

/// The boot information, once `start` has read it.
pub fn info() -> &'static BootInfo {
    BOOT_INFO.get().expect("boot info read before boot")
}

fn read_start_info(paddr: u64) -> BootInfo {
    let mut info = BootInfo {
        regions: [MemoryRegion {
            start: 0,
            len: 0,
            kind: MemoryKind::Reserved,
        }; MAX_REGIONS],
        region_count: 0,
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
        config: BootConfig::default(),
    };
    // SAFETY: the PVH loader passes the physical address of a valid
    // hvm_start_info; the low 4 GiB are identity-mapped by the boot stub.
    let start = unsafe { &*(paddr as *const HvmStartInfo) };
    if start.magic != START_INFO_MAGIC {
        panic!(
            "not booted through PVH: start info magic {:#x}",
            start.magic
        );
    }
    if start.cmdline_paddr != 0 {
        let mut p = start.cmdline_paddr as *const u8;
        // SAFETY: the command line is a NUL-terminated string in loader memory.
        unsafe {
            while *p != 0 && info.cmdline_len < MAX_CMDLINE {
                info.cmdline[info.cmdline_len] = *p;
                info.cmdline_len += 1;
                p = p.add(1);
            }
        }
    }
    if start.version >= 1 && start.memmap_paddr != 0 {
        let count = (start.memmap_entries as usize).min(MAX_REGIONS);
        for i in 0..count {
            // SAFETY: the loader provides `memmap_entries` entries at `memmap_paddr`.
            let e = unsafe { &*((start.memmap_paddr as *const HvmMemmapEntry).add(i)) };
            info.regions[i] = MemoryRegion {
                start: e.addr,
                len: e.size,
                kind: match e.kind {
                    1 => MemoryKind::Ram,
                    2 => MemoryKind::Reserved,
                    3 => MemoryKind::Acpi,
                    other => MemoryKind::Other(other),
                },
            };
        }
        info.region_count = count;
    }
    info
}

unsafe extern "Rust" {
    /// Provided by the image: the kernel (main.rs) or an in-kernel test.
    fn kernel_main(info: &'static BootInfo) -> !;
}

/// Called by the boot stub on the boot stack, with interrupts off.
pub fn start(start_info: u64) -> ! {
    drivers::serial::init();
    diag::set_running("boot");
    let mut info = read_start_info(start_info);
    logger::init(capsules_wire::bootcfg::LogLevel::Info);
    gdt::init();
    idt::init();
    // The command line is parsed into heap-allocated values, so memory comes first.
    mm::init(&info);
    match BootConfig::parse(info.cmdline()) {
        Ok(config) => info.config = config,
        Err(e) => {
            log::error!(
                "kernel command line '{}' refused: {e}",
                Redacted(info.cmdline())
            );
            log::error!(
                "usage: ip=ADDR/PREFIX gw=ADDR ctl=PORT log=LEVEL name=NAME locators=ADDR/PREFIX probe"
            );
            crate::arch::exit_qemu(KernelExit::BadConfig);
        }
    }
    let info = BOOT_INFO.call_once(|| info);
    logger::init(info.config.log_level);
    log::info!(
        "capsules kernel {}{} starting, cpu {}, cmdline '{}'",
        crate::build_id_hex(),
        BUILD_TAG,
        core::str::from_utf8(&cpu::vendor()).unwrap_or("?"),
        Redacted(info.cmdline())
    );
    apic::init();
    time::init();
    log::info!(
        "boot: core services up after {} us",
        time::since_boot_ns() / 1000
    );
    // SAFETY: `kernel_main` is defined exactly once by the image being linked.
    unsafe { kernel_main(info) }
}

/// Shows a command line with any `key=` value hidden, for logs: the key
/// never belongs there (it comes through fw_cfg and `key=` is refused), but a
/// line that carries one by mistake must not spread it further.
pub struct Redacted<'a>(pub &'a str);

impl core::fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, word) in self.0.split_ascii_whitespace().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(if word.starts_with("key=") {
                "key=<redacted>"
            } else {
                word
            })?;
        }
        Ok(())
    }
}

/// Boot stack range, re-exported for diagnostics.
pub fn boot_stack() -> (u64, u64) {
    arch_boot::boot_stack_range()
}
