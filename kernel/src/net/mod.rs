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
use switch::{LocalDelivery, QueueFull, Switch};

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
    /// handed to `deliver` (which refuses them when the capsule's queue is
    /// full: counted here). Also sends frames that waited for room in the
    /// NIC's ring. Returns whether anything arrived or left.
    pub fn pump(
        &mut self,
        deliver: &mut dyn FnMut(LocalDelivery) -> Result<(), QueueFull>,
    ) -> bool {
        self.nic.service_interrupt();
        let now = crate::time::since_boot_ns();
        let Network { nic, switch, .. } = self;
        // The device has freed buffers since the last round, maybe.
        let mut any = switch.flush_outbox(nic);
        // Each frame is copied out first: the switch may transmit (ARP
        // replies) while handling it, which needs the NIC.
        while let Some(frame) = nic.receive(|f| alloc::vec::Vec::from(f)) {
            any = true;
            let (_, local) = switch.ingress(&frame, nic, now);
            if let Some(local) = local
                && deliver(local).is_err()
            {
                switch.counters.capsule_queue_drops += 1;
            }
        }
        switch.expire(nic, now);
        // Released holds whose capsule is here.
        while let Some(local) = switch.take_local() {
            any = true;
            if deliver(local).is_err() {
                switch.counters.capsule_queue_drops += 1;
            }
        }
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
        self.nic.has_work() || !self.switch.machine_rx.is_empty() || self.switch.has_local()
    }
}
