//! PCI configuration space through the legacy port mechanism (0xcf8/0xcfc),
//! which both the `pc` and `q35` machines provide. The firmware has already
//! assigned BARs and interrupt lines; we read them.

use alloc::vec::Vec;

use virtio_drivers::transport::pci::bus::{
    Command, ConfigurationAccess, DeviceFunction, DeviceFunctionInfo, PciRoot,
};

use crate::arch::x86_64::port::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Configuration access through I/O ports.
pub struct PortIoCam;

fn address(df: DeviceFunction, offset: u8) -> u32 {
    0x8000_0000
        | (df.bus as u32) << 16
        | (df.device as u32) << 11
        | (df.function as u32) << 8
        | (offset as u32 & 0xfc)
}

impl ConfigurationAccess for PortIoCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        crate::arch::without_interrupts(|| {
            // SAFETY: the address/data port pair is the PCI configuration
            // mechanism #1; interrupts are off so the pair is not split.
            unsafe {
                outl(CONFIG_ADDRESS, address(df, offset));
                inl(CONFIG_DATA)
            }
        })
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        crate::arch::without_interrupts(|| {
            // SAFETY: as for `read_word`.
            unsafe {
                outl(CONFIG_ADDRESS, address(df, offset));
                outl(CONFIG_DATA, data);
            }
        })
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortIoCam
    }
}

/// One function found on the bus.
#[derive(Debug, Clone)]
pub struct PciFunction {
    pub location: DeviceFunction,
    pub info: DeviceFunctionInfo,
    pub interrupt_line: u8,
    pub interrupt_pin: u8,
}

pub fn root() -> PciRoot<PortIoCam> {
    PciRoot::new(PortIoCam)
}

/// Every function on bus 0 (QEMU's pc and q35 put all our devices there).
pub fn enumerate() -> Vec<PciFunction> {
    let root = root();
    root.enumerate_bus(0)
        .map(|(location, info)| {
            let irq = PortIoCam.read_word(location, 0x3c);
            PciFunction {
                location,
                info,
                interrupt_line: irq as u8,
                interrupt_pin: (irq >> 8) as u8,
            }
        })
        .collect()
}

/// Lets the device decode its BARs and master the bus (DMA).
pub fn enable_device(location: DeviceFunction) {
    let mut root = root();
    let (_, command) = root.get_status_command(location);
    root.set_command(
        location,
        command | Command::IO_SPACE | Command::MEMORY_SPACE | Command::BUS_MASTER,
    );
}
