//! A capsule's own network stack: a smoltcp interface (bare IP) with the
//! capsule's locator, and its sockets. Both live in the capsule's arena, so
//! every TCP control block — sequence numbers, windows, timers, queued data —
//! moves with the capsule. The stack runs on the capsule clock.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::net::Ipv4Addr;

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::Socket;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    Tcp,
    Udp,
    Other,
}

/// The handles of a socket set and what each names, for the kernel loop.
/// Handles the kernel loop reads from a capsule's arena (its closing streams,
/// what its parked tasks wait on) are the capsule's own memory, which a buggy
/// capsule can damage; `SocketSet::get` panics on a handle that names no
/// socket or one of another kind, and a panic in the kernel loop would end
/// the VM. Looked up here first, a bad handle ends only its capsule.
pub struct SocketIndex {
    by_handle: Vec<(SocketHandle, SocketKind)>,
}

impl SocketIndex {
    pub fn new(sockets: &SocketSet<'static>) -> Self {
        let mut by_handle: Vec<(SocketHandle, SocketKind)> = sockets
            .iter()
            .map(|(handle, socket)| {
                let kind = match socket {
                    Socket::Tcp(_) => SocketKind::Tcp,
                    Socket::Udp(_) => SocketKind::Udp,
                    #[allow(unreachable_patterns)]
                    _ => SocketKind::Other,
                };
                (handle, kind)
            })
            .collect();
        by_handle.sort_unstable_by_key(|(handle, _)| *handle);
        Self { by_handle }
    }

    /// What `handle` names, if it names a socket of the set.
    pub fn kind(&self, handle: SocketHandle) -> Option<SocketKind> {
        self.by_handle
            .binary_search_by_key(&handle, |(h, _)| *h)
            .ok()
            .map(|i| self.by_handle[i].1)
    }
}
