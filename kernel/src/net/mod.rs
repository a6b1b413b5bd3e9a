//! Networking above the NIC driver: the capsule switch, the smoltcp device
//! adapters, and the machine stack (the VM's own address: ARP, ping, control
//! port). Capsule stacks live in their capsules (see `capsule::net`).

pub mod device;
pub mod machine;
pub mod router;
pub mod switch;

use core::net::Ipv4Addr;

use capsules_wire::bootcfg::Ipv4Cidr;

use crate::drivers::virtio::net::VirtioNet;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use machine::MachineStack;
use router::Router;
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
    /// In the router role: the forwarding core and the NICs of ports 1…
    /// (port 0 is `nic`, whose address also carries the machine stack and
    /// the control service). `None` on a capsule VM.
    pub router: Option<RouterPlane>,
}

/// Frames waiting for room in one port's transmit ring.
const MAX_PORT_OUTBOX: usize = 512;

/// The router role's part of the network (`role=router`).
pub struct RouterPlane {
    pub core: Router,
    /// NICs of ports 1, 2, … in PCI order.
    pub nics: Vec<VirtioNet>,
    outboxes: Vec<VecDeque<Vec<u8>>>,
    next_expiry_ns: u64,
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
            router: None,
        }
    }

    /// The network of the router role: one port per NIC, `addrs` in NIC
    /// order. The machine stack (control service) lives on port 0's address;
    /// frames reach it through the router core, never through the switch.
    pub fn new_router(mut nics: Vec<VirtioNet>, addrs: &[Ipv4Cidr], locators: Ipv4Cidr) -> Self {
        assert!(
            !nics.is_empty() && nics.len() == addrs.len(),
            "one address per router NIC"
        );
        let mut nic = nics.remove(0);
        let ports: Vec<([u8; 6], Ipv4Cidr)> = core::iter::once((nic.mac(), addrs[0]))
            .chain(nics.iter().zip(&addrs[1..]).map(|(n, a)| (n.mac(), *a)))
            .collect();
        let machine = MachineStack::new(&mut nic, addrs[0], None);
        let switch = Switch::new(nic.mac(), addrs[0], None, locators);
        for (i, (mac, addr)) in ports.iter().enumerate() {
            log::info!(
                "router: port {i} {addr} on {}",
                crate::drivers::virtio::net::MacDisplay(*mac)
            );
        }
        log::info!("router: capsule locators {locators} through the translation table");
        let outboxes = (0..ports.len()).map(|_| VecDeque::new()).collect();
        Self {
            nic,
            switch,
            machine,
            router: Some(RouterPlane {
                core: Router::new(&ports, locators),
                nics,
                outboxes,
                next_expiry_ns: 0,
            }),
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
        if self.router.is_some() {
            return self.pump_router();
        }
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

    /// The router role's round: every port's frames through the core, its
    /// output onto the ports (paced by each NIC's ring), and what is for
    /// the control service to the machine stack's queue.
    fn pump_router(&mut self) -> bool {
        let Network {
            nic,
            switch,
            router,
            ..
        } = self;
        let Some(plane) = router.as_mut() else {
            return false;
        };
        let now = crate::time::since_boot_ns();
        let mut any = false;
        for port in 0..plane.core.port_count() {
            let dev = if port == 0 {
                &mut *nic
            } else {
                &mut plane.nics[port - 1]
            };
            dev.service_interrupt();
            // A bounded batch per port and round, so one busy port cannot
            // starve the others.
            for _ in 0..64 {
                let Some(frame) = dev.receive(|f| Vec::from(f)) else {
                    break;
                };
                any = true;
                plane.core.ingress(port, &frame, now);
            }
        }
        if now >= plane.next_expiry_ns {
            plane.core.expire(now);
            plane.next_expiry_ns = now + 100_000_000;
        }
        while let Some(frame) = plane.core.machine_rx.pop_front() {
            if switch.machine_rx.len() < switch::MAX_QUEUED {
                switch.machine_rx.push_back(frame);
            } else {
                plane.core.counters.tx_drops += 1;
            }
        }
        while let Some((port, frame)) = plane.core.take_output() {
            let outbox = &mut plane.outboxes[port];
            if outbox.len() < MAX_PORT_OUTBOX {
                outbox.push_back(frame);
            } else {
                plane.core.counters.tx_drops += 1;
            }
        }
        for (port, outbox) in plane.outboxes.iter_mut().enumerate() {
            let dev = if port == 0 {
                &mut *nic
            } else {
                &mut plane.nics[port - 1]
            };
            while let Some(frame) = outbox.front() {
                if !dev.can_transmit() {
                    break;
                }
                if dev
                    .transmit(frame.len(), |buf| buf.copy_from_slice(frame))
                    .is_none()
                {
                    plane.core.counters.tx_drops += 1;
                }
                outbox.pop_front();
                any = true;
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
            ..
        } = self;
        machine.poll(nic, &mut switch.machine_rx)
    }

    pub fn machine_addr(&self) -> Ipv4Addr {
        self.switch.machine_addr()
    }

    /// Whether the NIC has something for the kernel loop.
    pub fn has_work(&self) -> bool {
        let router_work = self.router.as_ref().is_some_and(|plane| {
            plane.nics.iter().any(VirtioNet::has_work)
                || plane.outboxes.iter().any(|o| !o.is_empty())
                || plane.core.has_output()
        });
        router_work
            || self.nic.has_work()
            || !self.switch.machine_rx.is_empty()
            || self.switch.has_local()
    }
}
