//! Networking above the NIC driver: the capsule switch, the smoltcp device
//! adapters, and the machine stack (the VM's own address: ARP, ping, control
//! port). Capsule stacks live in their capsules (see `capsule::net`).

pub mod device;
pub mod machine;
pub mod switch;

use core::net::Ipv4Addr;

use capsules_wire::bootcfg::Ipv4Cidr;

use crate::drivers::virtio::net::VirtioNet;
use machine::MachineStack;
use switch::{LocalDelivery, Switch};

/// Current time for the machine stack.
pub fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros((crate::time::since_boot_ns() / 1000) as i64)
}

/// The VM's network: NIC, switch and machine stack.
pub struct Network {
    pub nic: VirtioNet,
    pub switch: Switch,
    pub machine: MachineStack,
}

impl Network {
    pub fn new(
        mut nic: VirtioNet,
        ip: Ipv4Cidr,
        gateway: Option<Ipv4Addr>,
        locators: Ipv4Cidr,
    ) -> Self {
        let machine = MachineStack::new(&mut nic, ip, gateway);
        let switch = Switch::new(nic.mac(), ip, gateway, locators);
        log::info!(
            "network: machine {ip} on {}, capsule locators {locators} on-link",
            crate::drivers::virtio::net::MacDisplay(nic.mac())
        );
        Self {
            nic,
            switch,
            machine,
        }
    }

    /// Moves every received frame through the switch. Packets for capsules are
    /// handed to `deliver`. Returns whether any frame arrived.
    pub fn pump(&mut self, deliver: &mut dyn FnMut(LocalDelivery)) -> bool {
        self.nic.service_interrupt();
        let now = crate::time::since_boot_ns();
        let mut any = false;
        let Network { nic, switch, .. } = self;
        // Each frame is copied out first: the switch may transmit (ARP
        // replies) while handling it, which needs the NIC.
        while let Some(frame) = nic.receive(|f| alloc::vec::Vec::from(f)) {
            any = true;
            let (_, local) = switch.ingress(&frame, nic, now);
            if let Some(local) = local {
                deliver(local);
            }
        }
        switch.expire(nic, now);
        any
    }

    /// Polls the machine stack. Returns whether a socket may have changed.
    pub fn poll_machine(&mut self) -> bool {
        let Network {
            nic,
            switch,
            machine,
        } = self;
        machine.poll(nic, &mut switch.machine_rx)
    }

    pub fn machine_addr(&self) -> Ipv4Addr {
        self.switch.machine_addr()
    }

    /// Whether the NIC has something for the kernel loop.
    pub fn has_work(&self) -> bool {
        self.nic.has_work() || !self.switch.machine_rx.is_empty()
    }
}
