//! The machine stack: a smoltcp interface with the VM's own address. It
//! answers ARP and ping and carries the control service's TCP sockets.

use capsules_wire::bootcfg::Ipv4Cidr;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use super::device::NicDevice;
use crate::drivers::virtio::net::VirtioNet;

pub struct MachineStack {
    pub nic: VirtioNet,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
}

impl MachineStack {
    pub fn new(mut nic: VirtioNet, ip: Ipv4Cidr, gateway: Option<core::net::Ipv4Addr>) -> Self {
        let mac = EthernetAddress(nic.mac());
        let mut config = Config::new(HardwareAddress::Ethernet(mac));
        config.random_seed =
            u64::from_le_bytes(crate::random::bytes32()[..8].try_into().expect("8 bytes"));
        let mut iface = Interface::new(config, &mut NicDevice { nic: &mut nic }, super::now());
        iface.update_ip_addrs(|addrs| {
            let addr = IpAddress::Ipv4(ip.addr);
            addrs
                .push(IpCidr::new(addr, ip.prefix))
                .expect("room for one address");
        });
        if let Some(gw) = gateway {
            iface
                .routes_mut()
                .add_default_ipv4_route(gw)
                .expect("room for a route");
        }
        log::info!(
            "machine stack: {ip} on {}",
            crate::drivers::virtio::net::MacDisplay(nic.mac())
        );
        Self {
            nic,
            iface,
            sockets: SocketSet::new(alloc::vec::Vec::new()),
        }
    }

    /// Processes received frames and socket timers; sends what is due.
    /// Returns whether any socket may have changed.
    pub fn poll(&mut self) -> bool {
        self.nic.service_interrupt();
        let mut device = NicDevice { nic: &mut self.nic };
        let result = self
            .iface
            .poll(super::now(), &mut device, &mut self.sockets);
        result == smoltcp::iface::PollResult::SocketStateChanged
    }
}
