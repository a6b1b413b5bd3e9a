//! A capsule's own network stack: a smoltcp interface (bare IP) with the
//! capsule's locator, and its sockets. Both live in the capsule's arena, so
//! every TCP control block — sequence numbers, windows, timers, queued data —
//! moves with the capsule. The stack runs on the capsule clock.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::net::Ipv4Addr;

use smoltcp::iface::{Config, Interface, PollResult, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use crate::net::device::CapsuleDevice;

pub struct CapsuleStack {
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    /// Next ephemeral port for outgoing connections.
    next_port: u16,
}

/// The capsule clock as smoltcp wants it.
pub fn instant(capsule_ns: u64) -> Instant {
    Instant::from_micros((capsule_ns / 1000) as i64)
}

impl CapsuleStack {
    /// Creates the stack (allocating in the current domain: the capsule's arena).
    pub fn new(locator: Ipv4Addr, now_ns: u64, seed: u64) -> Self {
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let mut rx = VecDeque::new();
        let mut drop_all = |_: &[u8]| {};
        let mut device = CapsuleDevice {
            rx: &mut rx,
            send: &mut drop_all,
        };
        let mut iface = Interface::new(config, &mut device, instant(now_ns));
        iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::new(IpAddress::Ipv4(locator), 32))
                .expect("room for one address");
        });
        // Everything not local leaves through the switch, which picks the
        // real next hop; the gateway named here is only a placeholder that a
        // bare-IP interface never resolves.
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Addr::new(0, 0, 0, 1))
            .expect("room for a route");
        let next_port = 49152 + (seed % 16384) as u16;
        Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            next_port,
        }
    }

    /// Processes inbound packets and timers; outbound packets go to `send`.
    pub fn poll(
        &mut self,
        now_ns: u64,
        rx: &mut VecDeque<Vec<u8>>,
        send: &mut dyn FnMut(&[u8]),
    ) -> bool {
        let mut device = CapsuleDevice { rx, send };
        self.iface
            .poll(instant(now_ns), &mut device, &mut self.sockets)
            == PollResult::SocketStateChanged
    }

    /// When the stack next needs polling for its timers (capsule clock, ns).
    pub fn poll_at_ns(&mut self, now_ns: u64) -> Option<u64> {
        self.iface
            .poll_at(instant(now_ns), &self.sockets)
            .map(|i| i.total_micros().max(0) as u64 * 1000)
    }

    pub fn ephemeral_port(&mut self) -> u16 {
        let port = self.next_port;
        self.next_port = if port == u16::MAX { 49152 } else { port + 1 };
        port
    }
}
