//! The capsule switch: sits between the NIC and the stacks of one VM. It
//! answers ARP for the locators of resident capsules, delivers inbound IPv4 by
//! destination to a capsule or to the machine stack, frames capsules' outbound
//! IP packets for the wire with its own neighbour table (resolving unknown
//! next hops by ARP while the packet waits), short-cuts traffic between
//! capsules of the same VM, announces capsules with gratuitous ARP, and drops
//! (and counts) malformed frames.
//!
//! Who answers ARP for a locator: the VM where its capsule runs. A frozen
//! capsule's locator is marked (`freeze`); its VM keeps answering for it
//! until another MAC claims it (the destination's gratuitous ARP at the
//! commit), then cedes it: no more answers, no announcements. Thaw reclaims
//! it with a gratuitous ARP; detaching clears the mark. A running capsule's
//! locator claimed by another MAC is counted (`arp_conflicts`): two copies.
//!
//! Everything it keeps is bounded, since ARP and IP from the LAN are
//! unauthenticated: the neighbour table (learned only from ARP that concerns
//! this VM, aged, least recently used evicted first), the packets waiting for
//! ARP, those held for a moving locator, and the frames waiting for room in
//! the NIC's transmit ring. Whatever a bound turns away is counted and shows
//! in the VM's `Status`.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;
use core::net::Ipv4Addr;

use capsules_wire::bootcfg::Ipv4Cidr;
use capsules_wire::control::SwitchStatus;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Ipv4Packet,
};

use crate::drivers::virtio::net::{MAX_FRAME, VirtioNet};

const ETHERNET_HEADER: usize = 14;
/// Frames queued for one stack before new ones are dropped.
pub const MAX_QUEUED: usize = 256;
/// Packets waiting for ARP, in total: a released hold and a moved capsule's
/// whole queue (each at most `MAX_QUEUED`) may wait for one resolution.
const MAX_PENDING: usize = 2 * MAX_QUEUED;
const ARP_TIMEOUT_NS: u64 = 3_000_000_000;
const NEIGHBOUR_TTL_NS: u64 = 300_000_000_000;
/// Neighbour entries kept. A VM talks to a few hosts of its LAN and the VMs
/// of its cluster; every entry beyond this evicts the least recently used.
pub const MAX_NEIGHBOURS: usize = 256;
/// How often aged neighbour entries are swept out.
const NEIGHBOUR_SWEEP_NS: u64 = 1_000_000_000;
/// Frames waiting for room in the NIC's transmit ring (which holds
/// `QUEUE_SIZE` = 64): a released burst drains through here at the pace the
/// device takes it.
pub const MAX_OUTBOX: usize = 2 * MAX_QUEUED;

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
    /// Live neighbour entries evicted to keep the table within bounds.
    pub neighbour_evictions: u64,
    /// Packets for a capsule whose inbound queue was full (a frozen one's
    /// fills up first); counted by whoever delivers (`Network::pump`,
    /// capsule service).
    pub capsule_queue_drops: u64,
    /// Packets to a held locator beyond `MAX_QUEUED`.
    pub held_drops: u64,
    /// Frames for which neither the NIC ring nor the outbox had room, or
    /// packets beyond `MAX_PENDING` waiting for ARP.
    pub tx_drops: u64,
    /// ARP from another MAC claiming the locator of a running capsule here
    /// (a sign that two copies run).
    pub arp_conflicts: u64,
}

/// A capsule's inbound queue was full: the packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

struct Neighbour {
    mac: EthernetAddress,
    expires_ns: u64,
    /// Last learned or used: the entry least recently used goes first.
    used_ns: u64,
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
    /// Locators of resident capsules that are frozen: their VM gives them up
    /// to the first other MAC that claims them.
    frozen: BTreeSet<Ipv4Addr>,
    /// Frozen locators another MAC claimed: not answered, not announced.
    ceded: BTreeSet<Ipv4Addr>,
    /// Forwarding entries of capsules that moved away: locator → (new VM's
    /// machine address, until when). Packets still arriving here go there.
    forwarding: BTreeMap<Ipv4Addr, (Ipv4Addr, u64)>,
    /// Locators of capsules elsewhere that are moving: what local capsules
    /// send to them waits here (until when, packets) rather than going to a
    /// VM that is about to stop answering.
    holding: BTreeMap<Ipv4Addr, (u64, Vec<Vec<u8>>)>,
    neighbours: BTreeMap<Ipv4Addr, Neighbour>,
    next_sweep_ns: u64,
    pending: Vec<Pending>,
    /// Whole Ethernet frames waiting for room in the NIC's transmit ring,
    /// oldest first; while any wait, new frames queue behind them (order).
    outbox: VecDeque<Vec<u8>>,
    /// Packets for resident capsules that did not come from `ingress` or
    /// `egress` (a hold released once its locator arrived here); the kernel
    /// loop delivers them (`Network::pump`).
    local: VecDeque<LocalDelivery>,
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
            frozen: BTreeSet::new(),
            ceded: BTreeSet::new(),
            forwarding: BTreeMap::new(),
            holding: BTreeMap::new(),
            neighbours: BTreeMap::new(),
            next_sweep_ns: 0,
            pending: Vec::new(),
            outbox: VecDeque::new(),
            local: VecDeque::new(),
            machine_rx: VecDeque::new(),
            counters: SwitchCounters::default(),
        }
    }

    pub fn attach(&mut self, locator: Ipv4Addr, slot: u32) {
        // A capsule that comes back supersedes its forwarding entry.
        self.forwarding.remove(&locator);
        self.locators.insert(locator, slot);
        // It arrived on a VM that was holding what local capsules sent it:
        // those packets are for it, here, and come before anything sent
        // from now on (which the hairpin delivers directly).
        if let Some((_, held)) = self.holding.remove(&locator) {
            self.local.extend(
                held.into_iter()
                    .map(|packet| LocalDelivery { slot, packet }),
            );
        }
    }

    /// The capsule at `locator` is frozen: from now on this VM stops
    /// answering ARP for it as soon as another MAC claims it (the commit of
    /// its move announces it from the destination).
    pub fn mark_frozen(&mut self, locator: Ipv4Addr) {
        if self.locators.contains_key(&locator) {
            self.frozen.insert(locator);
        }
    }

    /// The frozen capsule at `locator` runs here again (thaw): it is
    /// answered for again and announced, taking the locator back from
    /// whoever claimed it meanwhile.
    pub fn reclaim(&mut self, nic: &mut VirtioNet, locator: Ipv4Addr) {
        self.frozen.remove(&locator);
        self.ceded.remove(&locator);
        if self.locators.contains_key(&locator) {
            self.announce(nic, locator);
        }
    }

    /// Whether this VM gave up answering ARP for `locator` (its frozen
    /// capsule's locator was claimed by another MAC).
    pub fn has_ceded(&self, locator: Ipv4Addr) -> bool {
        self.ceded.contains(&locator)
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
    /// it answers now: to the capsule itself if it arrived on this VM, else
    /// on the wire (its old neighbour entry is forgotten, so ARP finds the
    /// new VM; the frames leave at the pace the NIC takes them). Returns how
    /// many packets went.
    pub fn release_held(&mut self, locator: Ipv4Addr, nic: &mut VirtioNet, now_ns: u64) -> usize {
        let Some((_, packets)) = self.holding.remove(&locator) else {
            return 0;
        };
        let count = packets.len();
        if let Some(slot) = self.resident(locator) {
            self.local.extend(
                packets
                    .into_iter()
                    .map(|packet| LocalDelivery { slot, packet }),
            );
            return count;
        }
        self.neighbours.remove(&locator);
        for packet in packets {
            if let Some(src) = ipv4_src(&packet) {
                let hop = self.next_hop(locator).unwrap_or(locator);
                self.send_via(&packet, hop, src, nic, now_ns);
            }
        }
        count
    }

    /// The next packet for a resident capsule that the switch produced by
    /// itself (see `local`).
    pub fn take_local(&mut self) -> Option<LocalDelivery> {
        self.local.pop_front()
    }

    pub fn has_local(&self) -> bool {
        !self.local.is_empty()
    }

    pub fn neighbour_count(&self) -> usize {
        self.neighbours.len()
    }

    /// Frames waiting for room in the NIC's transmit ring.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// What the VM's `Status` reports about the switch.
    pub fn status(&self) -> SwitchStatus {
        SwitchStatus {
            neighbours: self.neighbours.len() as u64,
            neighbour_evictions: self.counters.neighbour_evictions,
            capsule_queue_drops: self.counters.capsule_queue_drops,
            held_drops: self.counters.held_drops,
            tx_drops: self.counters.tx_drops,
            arp_conflicts: self.counters.arp_conflicts,
        }
    }

    pub fn held_packets(&self) -> usize {
        self.holding.values().map(|(_, p)| p.len()).sum()
    }

    pub fn forwarding_entries(&self) -> usize {
        self.forwarding.len()
    }

    pub fn detach(&mut self, locator: Ipv4Addr) {
        self.locators.remove(&locator);
        self.frozen.remove(&locator);
        self.ceded.remove(&locator);
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
                    // A new VM on another subnet is reached through the
                    // gateway (the router, whose translation table already
                    // names it: capsulectl updates it at the commit).
                    let hop = self.next_hop(via).unwrap_or(via);
                    self.send_via(&packet, hop, me, nic, now_ns);
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
        // Learn the sender only where this VM has a use for it: an answer to
        // its own question, a host asking for one of its addresses (it is
        // about to talk to us), or news about a neighbour it already knows
        // (a capsule announced on another VM). ARP between strangers is not
        // worth an entry, and would let anyone on the LAN fill the table.
        let concerns_us = self
            .pending
            .iter()
            .any(|p| p.next_hop == source_protocol_addr)
            || self.locators.contains_key(&target_protocol_addr)
            || target_protocol_addr == self.machine.addr
            || self.neighbours.contains_key(&source_protocol_addr);
        if concerns_us
            && source_hardware_addr.is_unicast()
            && !source_protocol_addr.is_unspecified()
        {
            self.learn(source_protocol_addr, source_hardware_addr, now_ns);
            self.flush_pending(source_protocol_addr, nic);
        }
        // Another MAC says it has a resident locator (a gratuitous ARP, an
        // answer): a frozen capsule's locator goes to it (its move
        // committed there); a running one's is a conflict.
        if source_hardware_addr != self.mac && self.locators.contains_key(&source_protocol_addr) {
            if self.frozen.contains(&source_protocol_addr) {
                if self.ceded.insert(source_protocol_addr) {
                    ::log::info!(
                        "switch: {source_protocol_addr} claimed by {source_hardware_addr}: \
                         no longer answering ARP for the frozen capsule"
                    );
                }
            } else {
                self.counters.arp_conflicts += 1;
                // Logged at 1, 2, 4, 8…: a flood must not flood the log.
                if self.counters.arp_conflicts.is_power_of_two() {
                    ::log::warn!(
                        "switch: {source_hardware_addr} claims {source_protocol_addr}, \
                         which a running capsule here holds ({} such claims)",
                        self.counters.arp_conflicts
                    );
                }
            }
        }
        if operation == ArpOperation::Request
            && self.locators.contains_key(&target_protocol_addr)
            && !self.ceded.contains(&target_protocol_addr)
        {
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
        if self.ceded.contains(&target_protocol_addr) {
            return Delivery::Ignored;
        }
        // Everything else about ARP concerns the machine stack (its own
        // address, its own resolutions); it ignores the rest.
        self.queue_machine(frame)
    }

    /// Records (or refreshes) `ip` at `mac`. When the table is full, an aged
    /// entry or else the least recently used one makes room.
    fn learn(&mut self, ip: Ipv4Addr, mac: EthernetAddress, now_ns: u64) {
        if !self.neighbours.contains_key(&ip) && self.neighbours.len() >= MAX_NEIGHBOURS {
            let victim = self
                .neighbours
                .iter()
                .min_by_key(|(_, n)| (n.expires_ns > now_ns, n.used_ns))
                .map(|(ip, n)| (*ip, n.expires_ns > now_ns));
            if let Some((victim, live)) = victim {
                self.neighbours.remove(&victim);
                self.counters.neighbour_evictions += u64::from(live);
            }
        }
        self.neighbours.insert(
            ip,
            Neighbour {
                mac,
                expires_ns: now_ns + NEIGHBOUR_TTL_NS,
                used_ns: now_ns,
            },
        );
    }

    /// The MAC of a live neighbour entry, marking it used.
    fn neighbour_mac(&mut self, ip: Ipv4Addr, now_ns: u64) -> Option<EthernetAddress> {
        let n = self.neighbours.get_mut(&ip)?;
        if n.expires_ns <= now_ns {
            return None;
        }
        n.used_ns = now_ns;
        Some(n.mac)
    }

    fn send_arp(&mut self, nic: &mut VirtioNet, dst: EthernetAddress, repr: &ArpRepr) {
        let len = ETHERNET_HEADER + repr.buffer_len();
        let eth = EthernetRepr {
            src_addr: self.mac,
            dst_addr: dst,
            ethertype: EthernetProtocol::Arp,
        };
        self.emit_frame(nic, len, |buf| {
            let mut frame = EthernetFrame::new_unchecked(buf);
            eth.emit(&mut frame);
            repr.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
        });
    }

    /// Sends a frame of `len` bytes that `write` builds: straight into the
    /// NIC's ring when it has room and nothing older waits, else into the
    /// outbox, which `flush_outbox` drains as the device frees buffers. A
    /// burst (a released hold, a moved capsule's queue, packets waiting for
    /// one ARP answer) thus leaves whole, at the pace the NIC takes it,
    /// instead of overflowing its 64 buffers.
    fn emit_frame(&mut self, nic: &mut VirtioNet, len: usize, write: impl FnOnce(&mut [u8])) {
        let mut write = Some(write);
        if self.outbox.is_empty() && nic.can_transmit() {
            let sent = nic.transmit(len, |buf| {
                if let Some(write) = write.take() {
                    write(buf)
                }
            });
            if sent.is_some() {
                return;
            }
        }
        // `write` is gone only if the device took the buffer and then
        // refused it: that frame is lost.
        let Some(write) = write.take() else {
            self.counters.tx_drops += 1;
            return;
        };
        if self.outbox.len() >= MAX_OUTBOX {
            self.counters.tx_drops += 1;
            return;
        }
        let mut frame = alloc::vec![0u8; len];
        write(&mut frame);
        self.outbox.push_back(frame);
    }

    /// Moves waiting frames into the NIC's ring while it has room. Returns
    /// whether any went.
    pub fn flush_outbox(&mut self, nic: &mut VirtioNet) -> bool {
        let mut any = false;
        while let Some(frame) = self.outbox.front() {
            if !nic.can_transmit() {
                break;
            }
            if nic
                .transmit(frame.len(), |buf| buf.copy_from_slice(frame))
                .is_none()
            {
                // Room, yet refused: the device is broken for this frame;
                // retrying it would only block the ones behind.
                self.counters.tx_drops += 1;
            }
            self.outbox.pop_front();
            any = true;
        }
        any
    }

    /// Announces that `locator` is now reached through this VM.
    pub fn announce(&mut self, nic: &mut VirtioNet, locator: Ipv4Addr) {
        if self.ceded.contains(&locator) {
            return;
        }
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
                self.counters.held_drops += 1;
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
        // Through the gateway when the new VM is on another subnet.
        let hop = self.next_hop(via).unwrap_or(via);
        self.send_via(packet, hop, me, nic, now_ns);
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
            self.neighbour_mac(hop, now_ns)
        };
        match mac {
            Some(mac) => self.transmit_ip(nic, mac, packet),
            None => {
                let already_asked = self.pending.iter().any(|p| p.next_hop == hop);
                if self.pending.len() >= MAX_PENDING {
                    self.counters.tx_drops += 1;
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
        self.emit_frame(nic, ETHERNET_HEADER + packet.len(), |buf| {
            let mut frame = EthernetFrame::new_unchecked(buf);
            eth.emit(&mut frame);
            frame.payload_mut().copy_from_slice(packet);
        });
    }

    fn flush_pending(&mut self, resolved: Ipv4Addr, nic: &mut VirtioNet) {
        let Some(mac) = self.neighbours.get(&resolved).map(|n| n.mac) else {
            return;
        };
        if !self.pending.iter().any(|p| p.next_hop == resolved) {
            return;
        }
        // In the order they were sent: a released burst of one TCP
        // connection must not arrive reversed.
        let (ready, waiting) = core::mem::take(&mut self.pending)
            .into_iter()
            .partition::<Vec<Pending>, _>(|p| p.next_hop == resolved);
        self.pending = waiting;
        for p in ready {
            self.transmit_ip(nic, mac, &p.packet);
        }
    }

    /// Drops packets whose next hop never answered, forwarding entries and
    /// holds that ran out, and aged neighbour entries.
    pub fn expire(&mut self, nic: &mut VirtioNet, now_ns: u64) {
        self.forwarding.retain(|_, (_, until)| *until > now_ns);
        if now_ns >= self.next_sweep_ns {
            self.neighbours.retain(|_, n| n.expires_ns > now_ns);
            self.next_sweep_ns = now_ns + NEIGHBOUR_SWEEP_NS;
        }
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
