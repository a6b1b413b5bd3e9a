//! smoltcp `Device` over the virtio-net driver. A received frame is copied
//! into the receive token (on the stack, no allocation), which frees the
//! driver buffer at once and keeps the token independent of the driver.

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::drivers::virtio::net::{MAX_FRAME, VirtioNet};

pub struct NicDevice<'a> {
    pub nic: &'a mut VirtioNet,
}

pub struct RxToken {
    frame: [u8; MAX_FRAME],
    len: usize,
}

pub struct TxToken<'a> {
    nic: &'a mut VirtioNet,
}

impl phy::Device for NicDevice<'_> {
    type RxToken<'b>
        = RxToken
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let mut token = RxToken {
            frame: [0; MAX_FRAME],
            len: 0,
        };
        self.nic.receive(|frame| {
            token.frame[..frame.len()].copy_from_slice(frame);
            token.len = frame.len();
        })?;
        Some((token, TxToken { nic: self.nic }))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.nic.can_transmit().then_some(TxToken { nic: self.nic })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = Some(16);
        caps
    }
}

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.frame[..self.len])
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut f = Some(f);
        if let Some(r) = self
            .nic
            .transmit(len, |buf| (f.take().expect("called once"))(buf))
        {
            return r;
        }
        // No room (checked just before, so only under a race): build the
        // frame in scratch space and drop it; TCP retransmits.
        let mut scratch = [0u8; MAX_FRAME];
        let len = len.min(MAX_FRAME);
        (f.take().expect("called once"))(&mut scratch[..len])
    }
}
