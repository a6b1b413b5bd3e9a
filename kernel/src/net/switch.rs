//! The capsule switch: sits between the NIC and the stacks of one VM. It
//! answers ARP for the locators of resident capsules, delivers inbound IPv4 by
//! destination to a capsule or to the machine stack, frames capsules' outbound
//! IP packets for the wire with its own neighbour table (resolving unknown
//! next hops by ARP while the packet waits), short-cuts traffic between
//! capsules of the same VM, announces capsules with gratuitous ARP, and drops
//! (and counts) malformed frames.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::net::Ipv4Addr;

use capsules_wire::bootcfg::Ipv4Cidr;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Ipv4Packet,
};

use crate::drivers::virtio::net::{MAX_FRAME, VirtioNet};

const ETHERNET_HEADER: usize = 14;
/// Packets waiting for ARP, in total.
const MAX_PENDING: usize = 128;
const ARP_TIMEOUT_NS: u64 = 3_000_000_000;
const NEIGHBOUR_TTL_NS: u64 = 300_000_000_000;
/// Frames queued for one stack before new ones are dropped.
pub const MAX_QUEUED: usize = 256;

/// Where an inbound frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// To the machine stack's queue (the VM's own address, broadcasts, ARP).
    Machine,
    /// To the inbound queue of the capsule in this slot (an IPv4 packet).
    Capsule(u32),
    /// Answered by the switch itself (ARP for a resident locator).
    Answered,
    /// Not for this VM.
    Ignored,
    /// Malformed, truncated, or a queue was full.
    Dropped,
    /// For a capsule that moved away: sent on to its new VM.
    Forwarded,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SwitchCounters {
    pub to_machine: u64,
    pub to_capsules: u64,
    pub hairpinned: u64,
    pub arp_answered: u64,
    pub malformed: u64,
    pub queue_full: u64,
    pub unroutable: u64,
    pub arp_timeouts: u64,
    pub forwarded: u64,
}

struct Pending {
    next_hop: Ipv4Addr,
    packet: Vec<u8>,
    deadline_ns: u64,
}

pub struct Switch {
    mac: EthernetAddress,
    machine: Ipv4Cidr,
    gateway: Option<Ipv4Addr>,
    /// Addresses reached directly on the LAN besides the machine subnet: the
    /// capsule locator range (capsules on other VMs answer ARP themselves).
    on_link: Ipv4Cidr,
    locators: BTreeMap<Ipv4Addr, u32>,
    /// Forwarding entries of capsules that moved away: locator → (new VM's
    /// machine address, until when). Packets still arriving here go there.
    forwarding: BTreeMap<Ipv4Addr, (Ipv4Addr, u64)>,
    /// Locators of capsules elsewhere that are moving: what local capsules
    /// send to them waits here (until when, packets) rather than going to a
    /// VM that is about to stop answering.
    holding: BTreeMap<Ipv4Addr, (u64, Vec<Vec<u8>>)>,
    neighbours: BTreeMap<Ipv4Addr, (EthernetAddress, u64)>,
    pending: Vec<Pending>,
    pub machine_rx: VecDeque<Vec<u8>>,
    pub counters: SwitchCounters,
}

/// A packet the switch hands to a local capsule.
pub struct LocalDelivery {
    pub slot: u32,
    pub packet: Vec<u8>,
}

impl Switch {
    pub fn new(
        mac: [u8; 6],
        machine: Ipv4Cidr,
        gateway: Option<Ipv4Addr>,
        on_link: Ipv4Cidr,
    ) -> Self {
        Self {
            mac: EthernetAddress(mac),
            machine,
            gateway,
            on_link,
            locators: BTreeMap::new(),
            forwarding: BTreeMap::new(),
            holding: BTreeMap::new(),
            neighbours: BTreeMap::new(),
            pending: Vec::new(),
            machine_rx: VecDeque::new(),
            counters: SwitchCounters::default(),
        }
    }

    pub fn attach(&mut self, locator: Ipv4Addr, slot: u32) {
        // A capsule that comes back supersedes its forwarding entry.
        self.forwarding.remove(&locator);
        self.locators.insert(locator, slot);
    }

    /// Sends packets for `locator` on to `via` until `until_ns` (kernel time).
    pub fn forward_locator(&mut self, locator: Ipv4Addr, via: Ipv4Addr, until_ns: u64) {
        self.forwarding.insert(locator, (via, until_ns));
    }

    /// Holds traffic from local capsules to `locator` until released or
    /// until `until_ns` (then it is sent anyway: a dead orchestrator must not
    /// strand packets).
    pub fn hold(&mut self, locator: Ipv4Addr, until_ns: u64) {
        self.holding
            .entry(locator)
            .or_insert_with(|| (until_ns, Vec::new()))
            .0 = until_ns;
    }

    /// Stops holding traffic to `locator` and sends what was held to wherever
    /// it answers now (its old neighbour entry is forgotten, so ARP finds the
    /// new VM). Returns how many packets went.
    pub fn release_held(&mut self, locator: Ipv4Addr, nic: &mut VirtioNet, now_ns: u64) -> usize {
        let Some((_, packets)) = self.holding.remove(&locator) else {
            return 0;
        };
        self.neighbours.remove(&locator);
        let count = packets.len();
        for packet in packets {
            if let Some(src) = ipv4_src(&packet) {
                let hop = self.next_hop(locator).unwrap_or(locator);
                self.send_via(&packet, hop, src, nic, now_ns);
            }
        }
        count
    }

    pub fn held_packets(&self) -> usize {
        self.holding.values().map(|(_, p)| p.len()).sum()
    }

    pub fn forwarding_entries(&self) -> usize {
        self.forwarding.len()
    }

    pub fn detach(&mut self, locator: Ipv4Addr) {
        self.locators.remove(&locator);
        self.pending
            .retain(|p| ipv4_src(&p.packet) != Some(locator));
    }

    pub fn resident(&self, locator: Ipv4Addr) -> Option<u32> {
        self.locators.get(&locator).copied()
    }

    /// Sorts one received Ethernet frame. Capsule packets are returned for the
    /// caller to queue at the capsule; machine frames are queued here.
    pub fn ingress(
        &mut self,
        frame: &[u8],
        nic: &mut VirtioNet,
        now_ns: u64,
    ) -> (Delivery, Option<LocalDelivery>) {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            self.counters.malformed += 1;
            return (Delivery::Dropped, None);
        };
        let for_us = eth.dst_addr() == self.mac
            || eth.dst_addr().is_broadcast()
            || eth.dst_addr().is_multicast();
        if !for_us {
            return (Delivery::Ignored, None);
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => (self.ingress_arp(frame, nic, now_ns), None),
            EthernetProtocol::Ipv4 => {
                let payload = &frame[ETHERNET_HEADER..];
                let Ok(ip) = Ipv4Packet::new_checked(payload) else {
                    self.counters.malformed += 1;
                    return (Delivery::Dropped, None);
                };
                if !ip.verify_checksum() {
                    self.counters.malformed += 1;
                    return (Delivery::Dropped, None);
                }
                let dst = ip.dst_addr();
                // Trim Ethernet padding: the IP header says how long the packet is.
                let len = (ip.total_len() as usize).min(payload.len());
                if let Some(slot) = self.locators.get(&dst).copied() {
                    self.counters.to_capsules += 1;
                    return (
                        Delivery::Capsule(slot),
                        Some(LocalDelivery {
                            slot,
                            packet: payload[..len].to_vec(),
                        }),
                    );
                }
                if let Some((via, until)) = self.forwarding.get(&dst).copied()
                    && until > now_ns
                {
                    let packet = payload[..len].to_vec();
                    let me = self.machine.addr;
                    self.send_via(&packet, via, me, nic, now_ns);
                    self.counters.forwarded += 1;
                    return (Delivery::Forwarded, None);
                }
                if dst == self.machine.addr || dst.is_broadcast() || dst.is_multicast() {
                    return (self.queue_machine(frame), None);
                }
                (Delivery::Ignored, None)
            }
            _ => (Delivery::Ignored, None),
        }
    }

    fn queue_machine(&mut self, frame: &[u8]) -> Delivery {
        if self.machine_rx.len() >= MAX_QUEUED {
            self.counters.queue_full += 1;
            return Delivery::Dropped;
        }
        self.machine_rx.push_back(frame.to_vec());
        self.counters.to_machine += 1;
        Delivery::Machine
    }

    fn ingress_arp(&mut self, frame: &[u8], nic: &mut VirtioNet, now_ns: u64) -> Delivery {
        let parsed =
            ArpPacket::new_checked(&frame[ETHERNET_HEADER..]).and_then(|p| ArpRepr::parse(&p));
        let Ok(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = parsed
        else {
            self.counters.malformed += 1;
            return Delivery::Dropped;
        };
        if source_hardware_addr.is_unicast() && !source_protocol_addr.is_unspecified() {
            self.neighbours.insert(
                source_protocol_addr,
                (source_hardware_addr, now_ns + NEIGHBOUR_TTL_NS),
            );
            self.flush_pending(source_protocol_addr, nic);
        }
        if operation == ArpOperation::Request && self.locators.contains_key(&target_protocol_addr) {
            let reply = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: self.mac,
                source_protocol_addr: target_protocol_addr,
                target_hardware_addr: source_hardware_addr,
                target_protocol_addr: source_protocol_addr,
            };
            self.send_arp(nic, source_hardware_addr, &reply);
            self.counters.arp_answered += 1;
            return Delivery::Answered;
        }
        // Everything else about ARP concerns the machine stack (its own
        // address, its own resolutions); it ignores the rest.
        self.queue_machine(frame)
    }

    fn send_arp(&mut self, nic: &mut VirtioNet, dst: EthernetAddress, repr: &ArpRepr) {
        let len = ETHERNET_HEADER + repr.buffer_len();
        let eth = EthernetRepr {
            src_addr: self.mac,
            dst_addr: dst,
            ethertype: EthernetProtocol::Arp,
        };
        nic.transmit(len, |buf| {
            let mut frame = EthernetFrame::new_unchecked(buf);
            eth.emit(&mut frame);
            repr.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
        });
    }

    /// Announces that `locator` is now reached through this VM.
    pub fn announce(&mut self, nic: &mut VirtioNet, locator: Ipv4Addr) {
        let garp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: self.mac,
            source_protocol_addr: locator,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: locator,
        };
        self.send_arp(nic, EthernetAddress::BROADCAST, &garp);
    }

    fn next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        if self.machine.contains(dst) || self.on_link.contains(dst) || dst.is_broadcast() {
            Some(dst)
        } else {
            self.gateway
        }
    }

    /// Sends an IPv4 packet from a resident capsule. Packets to another
    /// resident capsule come back as a local delivery instead of leaving.
    pub fn egress(
        &mut self,
        packet: &[u8],
        nic: &mut VirtioNet,
        now_ns: u64,
    ) -> Option<LocalDelivery> {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            self.counters.malformed += 1;
            return None;
        };
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        if !self.locators.contains_key(&src) {
            // A capsule may only send from its own locator.
            self.counters.unroutable += 1;
            return None;
        }
        if let Some(slot) = self.locators.get(&dst).copied() {
            self.counters.hairpinned += 1;
            return Some(LocalDelivery {
                slot,
                packet: packet.to_vec(),
            });
        }
        if let Some((_, held)) = self.holding.get_mut(&dst) {
            if held.len() < MAX_QUEUED {
                held.push(packet.to_vec());
            } else {
                self.counters.queue_full += 1;
            }
            return None;
        }
        let Some(hop) = self.next_hop(dst) else {
            self.counters.unroutable += 1;
            return None;
        };
        self.send_via(packet, hop, src, nic, now_ns);
        None
    }

    /// Sends a packet a moved capsule left behind (held while it was frozen)
    /// to its new VM.
    pub fn forward(&mut self, packet: &[u8], via: Ipv4Addr, nic: &mut VirtioNet, now_ns: u64) {
        let Some(dst) = Ipv4Packet::new_checked(packet).ok().map(|p| p.dst_addr()) else {
            self.counters.malformed += 1;
            return;
        };
        // Asked as the machine: the new VM's machine stack only answers
        // ARP from its own subnet.
        let _ = dst;
        let me = self.machine.addr;
        self.send_via(packet, via, me, nic, now_ns);
        self.counters.forwarded += 1;
    }

    /// Frames `packet` for next hop `hop`, resolving it by ARP (asking as
    /// `src`) while the packet waits when the hop is unknown.
    fn send_via(
        &mut self,
        packet: &[u8],
        hop: Ipv4Addr,
        src: Ipv4Addr,
        nic: &mut VirtioNet,
        now_ns: u64,
    ) {
        let dst = Ipv4Packet::new_checked(packet)
            .map(|p| p.dst_addr())
            .unwrap_or(hop);
        let mac = if dst.is_broadcast() {
            Some(EthernetAddress::BROADCAST)
        } else {
            self.neighbours
                .get(&hop)
                .filter(|(_, expires)| *expires > now_ns)
                .map(|(mac, _)| *mac)
        };
        match mac {
            Some(mac) => self.transmit_ip(nic, mac, packet),
            None => {
                let already_asked = self.pending.iter().any(|p| p.next_hop == hop);
                if self.pending.len() >= MAX_PENDING {
                    self.counters.queue_full += 1;
                } else {
                    let packet = packet.to_vec();
                    self.pending.push(Pending {
                        next_hop: hop,
                        packet,
                        deadline_ns: now_ns + ARP_TIMEOUT_NS,
                    });
                }
                if !already_asked {
                    let request = ArpRepr::EthernetIpv4 {
                        operation: ArpOperation::Request,
                        source_hardware_addr: self.mac,
                        source_protocol_addr: src,
                        target_hardware_addr: EthernetAddress([0; 6]),
                        target_protocol_addr: hop,
                    };
                    self.send_arp(nic, EthernetAddress::BROADCAST, &request);
                }
            }
        }
    }

    fn transmit_ip(&mut self, nic: &mut VirtioNet, dst: EthernetAddress, packet: &[u8]) {
        if packet.len() + ETHERNET_HEADER > MAX_FRAME {
            self.counters.malformed += 1;
            return;
        }
        let eth = EthernetRepr {
            src_addr: self.mac,
            dst_addr: dst,
            ethertype: EthernetProtocol::Ipv4,
        };
        let sent = nic.transmit(ETHERNET_HEADER + packet.len(), |buf| {
            let mut frame = EthernetFrame::new_unchecked(buf);
            eth.emit(&mut frame);
            frame.payload_mut().copy_from_slice(packet);
        });
        if sent.is_none() {
            // The NIC ring is full; TCP will retransmit.
            self.counters.queue_full += 1;
        }
    }

    fn flush_pending(&mut self, resolved: Ipv4Addr, nic: &mut VirtioNet) {
        let Some((mac, _)) = self.neighbours.get(&resolved).copied() else {
            return;
        };
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].next_hop == resolved {
                let p = self.pending.swap_remove(i);
                self.transmit_ip(nic, mac, &p.packet);
            } else {
                i += 1;
            }
        }
    }

    /// Drops packets whose next hop never answered.
    pub fn expire(&mut self, nic: &mut VirtioNet, now_ns: u64) {
        self.forwarding.retain(|_, (_, until)| *until > now_ns);
        let overdue: Vec<Ipv4Addr> = self
            .holding
            .iter()
            .filter(|(_, (until, _))| *until <= now_ns)
            .map(|(l, _)| *l)
            .collect();
        for locator in overdue {
            self.release_held(locator, nic, now_ns);
        }
        let before = self.pending.len();
        self.pending.retain(|p| p.deadline_ns > now_ns);
        self.counters.arp_timeouts += (before - self.pending.len()) as u64;
    }

    pub fn machine_addr(&self) -> Ipv4Addr {
        self.machine.addr
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac.0
    }
}

fn ipv4_src(packet: &[u8]) -> Option<Ipv4Addr> {
    Ipv4Packet::new_checked(packet).ok().map(|p| p.src_addr())
}
