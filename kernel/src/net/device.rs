//! smoltcp devices over the switch's queues. Received frames or packets are
//! owned buffers popped from a queue; transmitted ones go to the NIC (machine
//! stack, Ethernet) or to a callback that hands them to the switch (capsule
//! stacks, bare IP). Tokens own their data, so they never borrow the driver.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::drivers::virtio::net::{MAX_FRAME, VirtioNet};

/// Segments a peer may have in flight towards one socket (smoltcp caps the
/// advertised window at this many segments). The NIC keeps 64 receive
/// buffers posted, so bursts of this size fit with room to spare; a smaller
/// cap (smoltcp's examples use a handful) makes every 64 KiB control frame
/// wait for window updates.
const MAX_BURST: usize = 48;

/// Largest IP packet a capsule stack sends: the standard Ethernet payload,
/// so that any host on the LAN can talk to a capsule whatever its own MTU.
pub const IP_MTU: usize = 1500;

pub struct RxToken {
    data: Vec<u8>,
}

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.data)
    }
}

/// The machine stack's device: Ethernet frames queued by the switch in,
/// frames straight to the NIC out.
pub struct MachineDevice<'a> {
    pub nic: &'a mut VirtioNet,
    pub rx: &'a mut VecDeque<Vec<u8>>,
}

pub struct NicTxToken<'a> {
    nic: &'a mut VirtioNet,
}

impl phy::Device for MachineDevice<'_> {
    type RxToken<'b>
        = RxToken
    where
        Self: 'b;
    type TxToken<'b>
        = NicTxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let data = self.rx.pop_front()?;
        Some((RxToken { data }, NicTxToken { nic: self.nic }))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.nic
            .can_transmit()
            .then_some(NicTxToken { nic: self.nic })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = Some(MAX_BURST);
        caps
    }
}

impl phy::TxToken for NicTxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut f = Some(f);
        if let Some(r) = self
            .nic
            .transmit(len, |buf| (f.take().expect("called once"))(buf))
        {
            return r;
        }
        // No room after all: build the frame in scratch space and drop it;
        // TCP retransmits.
        let mut scratch = [0u8; MAX_FRAME];
        (f.take().expect("called once"))(&mut scratch[..len.min(MAX_FRAME)])
    }
}

/// A capsule stack's device: IP packets from the capsule's inbound queue in,
/// IP packets to `send` (the switch) out.
pub struct CapsuleDevice<'a> {
    pub rx: &'a mut VecDeque<Vec<u8>>,
    pub send: &'a mut dyn FnMut(&[u8]),
}

pub struct CapsuleTxToken<'a> {
    send: &'a mut dyn FnMut(&[u8]),
}

impl phy::Device for CapsuleDevice<'_> {
    type RxToken<'b>
        = RxToken
    where
        Self: 'b;
    type TxToken<'b>
        = CapsuleTxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let data = self.rx.pop_front()?;
        Some((RxToken { data }, CapsuleTxToken { send: self.send }))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        Some(CapsuleTxToken { send: self.send })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = IP_MTU;
        caps.max_burst_size = Some(MAX_BURST);
        caps
    }
}

impl phy::TxToken for CapsuleTxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // Built on the stack: no allocation on the transmit path.
        let mut packet = [0u8; IP_MTU];
        let len = len.min(IP_MTU);
        let r = f(&mut packet[..len]);
        (self.send)(&packet[..len]);
        r
    }
}
