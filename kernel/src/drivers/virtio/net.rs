//! virtio-net over PCI: a pool of receive buffers kept posted to the device,
//! a pool of transmit buffers, interrupt-driven receive. Frames go in and
//! out as Ethernet frames; the network stack lives elsewhere.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use capsules_wire::control::NicCounters;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::DeviceType;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::virtio_device_type;

use super::{DmaRegion, KernelHal};
use crate::arch::x86_64::{apic, trap};
use crate::drivers::pci::{self, PciFunction};

pub const QUEUE_SIZE: usize = 64;
/// Room for the virtio header and a full jumbo frame.
const BUF_LEN: usize = 9216;
/// Largest Ethernet frame (without FCS) we send or accept: a 9000-byte MTU.
/// The lab's links carry jumbo frames, so the machine address (control
/// traffic, capsule images) moves 6× fewer frames; capsule stacks keep the
/// standard 1500 (`net::device::IP_MTU`), and TCP's MSS keeps each peer
/// within what its own link takes.
pub const MAX_FRAME: usize = 9014;

/// Vector NIC interrupts arrive on.
pub const NIC_VECTOR: u8 = trap::IRQ_BASE + 16;

/// NICs that can take interrupts (the router has one per subnet); the
/// `nth` device beyond these is polled.
pub const MAX_IRQ_NICS: usize = 8;

static IRQ_PENDING: [AtomicBool; MAX_IRQ_NICS] = [const { AtomicBool::new(false) }; MAX_IRQ_NICS];
static IRQ_COUNT: AtomicU64 = AtomicU64::new(0);
static IRQ_GSI: [AtomicU64; MAX_IRQ_NICS] = [const { AtomicU64::new(u64::MAX) }; MAX_IRQ_NICS];

fn on_interrupt(_vector: u8) {
    // Keep the level-triggered lines quiet until the main loop has read the
    // devices' interrupt status (which lowers a line); touching a device
    // here would need its lock, which the interrupted code may hold. Every
    // NIC shares the vector (and maybe a line), so each is told to look.
    for (gsi, pending) in IRQ_GSI.iter().zip(IRQ_PENDING.iter()) {
        let gsi = gsi.load(Ordering::Relaxed);
        if gsi != u64::MAX {
            apic::set_irq_masked(gsi as u32, true);
            pending.store(true, Ordering::Release);
        }
    }
    IRQ_COUNT.fetch_add(1, Ordering::Relaxed);
}

pub struct VirtioNet {
    raw: VirtIONetRaw<KernelHal, PciTransport, QUEUE_SIZE>,
    rx: DmaRegion,
    tx: DmaRegion,
    /// Receive buffer posted under each descriptor token.
    rx_by_token: [Option<u16>; QUEUE_SIZE],
    /// (buffer, length) in flight under each transmit token.
    tx_by_token: [Option<(u16, u16)>; QUEUE_SIZE],
    tx_free: [bool; QUEUE_SIZE],
    counters: NicCounters,
    gsi: Option<u32>,
    /// Index of this device's interrupt flag (its `nth`), if it has one.
    irq_slot: Option<usize>,
}

#[derive(Debug)]
pub enum NetInitError {
    NotFound,
    Transport,
    Device,
}

/// Finds the `nth` virtio-net function on the PCI bus.
pub fn find(nth: usize) -> Option<PciFunction> {
    pci::enumerate()
        .into_iter()
        .filter(|f| virtio_device_type(&f.info) == Some(DeviceType::Network))
        .nth(nth)
}

impl VirtioNet {
    /// Brings up the `nth` virtio-net device. With `interrupts`, its PCI
    /// interrupt line is routed through the I/O APIC.
    pub fn init(nth: usize, interrupts: bool) -> Result<Self, NetInitError> {
        let function = find(nth).ok_or(NetInitError::NotFound)?;
        pci::enable_device(function.location);
        let mut root = pci::root();
        let transport =
            PciTransport::new::<KernelHal, _>(&mut root, function.location).map_err(|e| {
                log::error!("virtio-net transport: {e:?}");
                NetInitError::Transport
            })?;
        let raw = VirtIONetRaw::new(transport).map_err(|e| {
            log::error!("virtio-net init: {e:?}");
            NetInitError::Device
        })?;
        let mut dev = Self {
            raw,
            rx: DmaRegion::new(QUEUE_SIZE * BUF_LEN),
            tx: DmaRegion::new(QUEUE_SIZE * BUF_LEN),
            rx_by_token: [None; QUEUE_SIZE],
            tx_by_token: [None; QUEUE_SIZE],
            tx_free: [true; QUEUE_SIZE],
            counters: NicCounters::default(),
            gsi: None,
            irq_slot: None,
        };
        for index in 0..QUEUE_SIZE as u16 {
            dev.post_rx(index);
        }
        if interrupts {
            let gsi = function.interrupt_line as u32;
            if function.interrupt_pin == 0 || gsi == 0xff || gsi >= apic::ioapic_pins() {
                log::warn!("virtio-net has no usable interrupt line ({gsi}); receive is polled");
            } else if nth >= MAX_IRQ_NICS {
                log::warn!("virtio-net #{nth}: beyond {MAX_IRQ_NICS} NICs; receive is polled");
            } else {
                trap::set_irq_handler(NIC_VECTOR, on_interrupt);
                IRQ_GSI[nth].store(gsi as u64, Ordering::Relaxed);
                apic::route_level_irq(gsi, NIC_VECTOR, false);
                dev.gsi = Some(gsi);
                dev.irq_slot = Some(nth);
            }
        }
        // A frame that arrived before the line was routed raised it while the
        // I/O APIC input was masked, which latches nothing: the line would
        // stay high with no interrupt, and no later frame could make a new
        // edge. Reading the interrupt status lowers it; anything already
        // received is picked up by the first poll.
        dev.raw.ack_interrupt();
        log::info!(
            "virtio-net {:02x}:{:02x}.{} mac {} irq {:?}",
            function.location.bus,
            function.location.device,
            function.location.function,
            MacDisplay(dev.mac()),
            dev.gsi
        );
        Ok(dev)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.raw.mac_address()
    }

    fn post_rx(&mut self, index: u16) {
        let buf = self.rx.slot(index as usize, BUF_LEN);
        // SAFETY: the buffer belongs to this driver and is not touched until
        // the device returns it through `poll_receive`/`receive_complete`.
        match unsafe { self.raw.receive_begin(buf) } {
            Ok(token) => self.rx_by_token[token as usize] = Some(index),
            Err(e) => log::error!("virtio-net: cannot post receive buffer {index}: {e:?}"),
        }
    }

    /// Acknowledges a pending interrupt (lowering the line) and unmasks it.
    /// Returns whether one was pending.
    pub fn service_interrupt(&mut self) -> bool {
        let Some(slot) = self.irq_slot else {
            return false;
        };
        if !IRQ_PENDING[slot].swap(false, Ordering::Acquire) {
            return false;
        }
        self.raw.ack_interrupt();
        if let Some(gsi) = self.gsi {
            apic::set_irq_masked(gsi, false);
        }
        true
    }

    /// Hands the next received frame to `f`, then reposts its buffer.
    /// Frames too short for Ethernet or too long are dropped and counted.
    pub fn receive<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        loop {
            let token = self.raw.poll_receive()?;
            let index = self.rx_by_token[token as usize]
                .take()
                .expect("device returned an unknown token");
            let buf = self.rx.slot(index as usize, BUF_LEN);
            // SAFETY: `buf` is the buffer posted under `token`.
            let result = unsafe { self.raw.receive_complete(token, buf) };
            let frame = match result {
                Ok((header, len)) if (14..=MAX_FRAME).contains(&len) => Some((header, len)),
                _ => None,
            };
            match frame {
                Some((header, len)) => {
                    self.counters.rx_packets += 1;
                    self.counters.rx_bytes += len as u64;
                    let buf = self.rx.slot(index as usize, BUF_LEN);
                    let r = f(&buf[header..header + len]);
                    self.post_rx(index);
                    return Some(r);
                }
                None => {
                    self.counters.rx_dropped += 1;
                    self.post_rx(index);
                }
            }
        }
    }

    /// Frees transmit buffers the device has finished with.
    fn reclaim_tx(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let Some((index, len)) = self.tx_by_token[token as usize].take() else {
                log::error!("virtio-net: unknown transmit token {token}");
                return;
            };
            let buf = self.tx.slot(index as usize, BUF_LEN);
            // SAFETY: the same buffer and length that were given to `transmit_begin`.
            let _ = unsafe { self.raw.transmit_complete(token, &buf[..len as usize]) };
            self.tx_free[index as usize] = true;
        }
    }

    /// Whether a frame can be sent now.
    pub fn can_transmit(&mut self) -> bool {
        self.reclaim_tx();
        self.tx_free.contains(&true) && self.raw.can_send()
    }

    /// Sends one frame of `len` bytes that `f` writes. Returns `None` (and
    /// does not call `f`) when no transmit buffer is free or `len` is not an
    /// Ethernet frame's: QEMU stops the device for good when handed an empty
    /// frame ("virtio-net nothing to send"; found by fuzzing, docs/fuzzing.md).
    pub fn transmit<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        if !(14..=MAX_FRAME).contains(&len) || !self.can_transmit() {
            return None;
        }
        let index = self.tx_free.iter().position(|free| *free)?;
        let header = {
            let buf = self.tx.slot(index, BUF_LEN);
            // A fresh header every time: the device must see no offload flags.
            self.raw.fill_buffer_header(buf).ok()?
        };
        let buf = self.tx.slot(index, BUF_LEN);
        let r = f(&mut buf[header..header + len]);
        let total = header + len;
        // SAFETY: the buffer is not touched again until `reclaim_tx` sees the
        // device return it under this token.
        match unsafe { self.raw.transmit_begin(&buf[..total]) } {
            Ok(token) => {
                self.tx_free[index] = false;
                self.tx_by_token[token as usize] = Some((index as u16, total as u16));
                self.counters.tx_packets += 1;
                self.counters.tx_bytes += len as u64;
                Some(r)
            }
            Err(e) => {
                log::warn!("virtio-net: transmit failed: {e:?}");
                None
            }
        }
    }

    pub fn counters(&self) -> NicCounters {
        NicCounters {
            interrupts: IRQ_COUNT.load(Ordering::Relaxed),
            ..self.counters
        }
    }

    /// Counts a frame the stack above refused as malformed.
    pub fn count_dropped(&mut self) {
        self.counters.rx_dropped += 1;
    }

    /// Whether an interrupt or a received frame waits to be handled.
    pub fn has_work(&self) -> bool {
        self.irq_slot
            .is_some_and(|slot| IRQ_PENDING[slot].load(Ordering::Acquire))
            || self.raw.poll_receive().is_some()
    }

    pub fn uses_interrupts(&self) -> bool {
        self.gsi.is_some()
    }
}

/// Interrupts taken by any NIC so far.
pub fn interrupt_count() -> u64 {
    IRQ_COUNT.load(Ordering::Relaxed)
}

pub struct MacDisplay(pub [u8; 6]);

impl core::fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}
