//! The machine stack: a smoltcp interface with the VM's own address. It
//! answers ARP and ping and carries the control service's TCP sockets.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::net::Ipv4Addr;

use capsules_wire::bootcfg::Ipv4Cidr;
use smoltcp::iface::{Config, Interface, PollResult, SocketSet};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use super::device::MachineDevice;
use crate::drivers::virtio::net::VirtioNet;

pub struct MachineStack {
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
}

impl MachineStack {
    pub fn new(nic: &mut VirtioNet, ip: Ipv4Cidr, gateway: Option<Ipv4Addr>) -> Self {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(nic.mac())));
        config.random_seed =
            u64::from_le_bytes(crate::random::bytes32()[..8].try_into().expect("8 bytes"));
        let mut empty = VecDeque::new();
        let mut iface = Interface::new(
            config,
            &mut MachineDevice {
                nic,
                rx: &mut empty,
            },
            super::now(),
        );
        iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::new(IpAddress::Ipv4(ip.addr), ip.prefix))
                .expect("room for one address");
        });
        if let Some(gw) = gateway {
            iface
                .routes_mut()
                .add_default_ipv4_route(gw)
                .expect("room for a route");
        }
        Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
        }
    }

    /// Processes queued frames and socket timers; sends what is due.
    /// Returns whether any socket may have changed.
    pub fn poll(&mut self, nic: &mut VirtioNet, rx: &mut VecDeque<Vec<u8>>) -> bool {
        let mut device = MachineDevice { nic, rx };
        self.iface
            .poll(super::now(), &mut device, &mut self.sockets)
            == PollResult::SocketStateChanged
    }
}
