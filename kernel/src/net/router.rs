//! The forwarding core of the special router (`role=router`): one port per
//! NIC, each with its own address and subnet. It forwards IPv4 between its
//! ports (TTL decremented, header checksum updated incrementally), resolves
//! next hops by ARP per port (a bounded neighbour table, a bounded queue of
//! packets awaiting an answer), answers ARP only for its own addresses and
//! ICMP echo on them, and routes:
//!
//! - the capsule locator range through the translation table (locator →
//!   care-of address: the machine address of the VM that runs the capsule,
//!   with the capsule's epoch), fed by `capsulectl` with `UpdateTranslations`;
//!   a locator without an entry gets ICMP destination unreachable back;
//! - everything else to the connected subnets of its ports; other
//!   destinations get ICMP network unreachable.
//!
//! The core is pure: frames go in with the port they arrived on and come out
//! as (port, frame) pairs for the caller to transmit (`Network::pump`), which
//! lets in-kernel tests drive it without devices. Frames for the control
//! service (TCP to port 0's address, and ARP answers it asked for) are queued
//! for the machine stack.
//!
//! Later slices hook in here: IP-in-IP towards VMs of other subnets
//! (`Router::next_hop_for_locator` decides direct delivery today), and the
//! zero-window hold of TCP peers while a capsule moves (an entry that marks
//! the capsule as in transit, answered in `Router::forward`).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::net::Ipv4Addr;

use capsules_wire::bootcfg::Ipv4Cidr;
use capsules_wire::control::{MAX_TRANSLATIONS, SwitchStatus, Translation};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpProtocol, Ipv4Packet,
};

const ETHERNET_HEADER: usize = 14;
/// Neighbour entries per port; a new one beyond this evicts the least
/// recently used (counted).
pub const MAX_NEIGHBOURS: usize = 256;
const NEIGHBOUR_TTL_NS: u64 = 300_000_000_000;
/// Packets waiting for ARP, over all ports; beyond it packets are dropped
/// (counted).
pub const MAX_PENDING: usize = 256;
const ARP_TIMEOUT_NS: u64 = 3_000_000_000;
/// Frames waiting for the machine stack.
const MAX_MACHINE_QUEUE: usize = 256;
/// TTL of packets the router makes itself (echo replies, ICMP errors).
const OWN_TTL: u8 = 64;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Codes of destination unreachable.
const UNREACHABLE_NET: u8 = 0;
const UNREACHABLE_HOST: u8 = 1;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterCounters {
    pub forwarded: u64,
    pub malformed: u64,
    pub ttl_expired: u64,
    /// Packets answered with ICMP destination unreachable (no translation,
    /// no route).
    pub unreachable: u64,
    pub arp_answered: u64,
    /// ARP requests for addresses the router does not own (never answered).
    pub arp_not_ours: u64,
    pub echo_answered: u64,
    pub neighbour_evictions: u64,
    /// Packets beyond `MAX_PENDING` waiting for ARP.
    pub pending_drops: u64,
    pub arp_timeouts: u64,
    /// Frames for the machine stack beyond its queue, and frames the NICs
    /// had no room for (counted by the caller).
    pub tx_drops: u64,
    /// Translation updates older than the entry held (ignored), or beyond
    /// the table's bound.
    pub translations_ignored: u64,
    /// Packets to the router's own addresses it does not serve.
    pub not_served: u64,
}

struct Neighbour {
    mac: EthernetAddress,
    expires_ns: u64,
    used_ns: u64,
}

struct Port {
    mac: EthernetAddress,
    addr: Ipv4Cidr,
    neighbours: BTreeMap<Ipv4Addr, Neighbour>,
}

struct Pending {
    port: usize,
    next_hop: Ipv4Addr,
    packet: Vec<u8>,
    deadline_ns: u64,
}

/// A translation-table entry: where the capsule runs as of `epoch`; `None`
/// once it runs nowhere (the epoch is kept so an older update cannot bring
/// it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub care_of: Option<Ipv4Addr>,
    pub epoch: u64,
}

pub struct Router {
    ports: Vec<Port>,
    locators: Ipv4Cidr,
    table: BTreeMap<Ipv4Addr, Entry>,
    pending: Vec<Pending>,
    out: VecDeque<(usize, Vec<u8>)>,
    /// Frames for the machine stack on port 0 (the control service).
    pub machine_rx: VecDeque<Vec<u8>>,
    pub counters: RouterCounters,
    /// The time of the last frame or expiry: packets the router makes
    /// itself wait for ARP from then.
    last_now_ns: u64,
}

impl Router {
    /// A router with one port per (MAC, address) pair, in NIC order.
    pub fn new(ports: &[([u8; 6], Ipv4Cidr)], locators: Ipv4Cidr) -> Self {
        Self {
            ports: ports
                .iter()
                .map(|(mac, addr)| Port {
                    mac: EthernetAddress(*mac),
                    addr: *addr,
                    neighbours: BTreeMap::new(),
                })
                .collect(),
            locators,
            table: BTreeMap::new(),
            pending: Vec::new(),
            out: VecDeque::new(),
            machine_rx: VecDeque::new(),
            counters: RouterCounters::default(),
            last_now_ns: 0,
        }
    }

    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// The next frame to transmit and the port it leaves on.
    pub fn take_output(&mut self) -> Option<(usize, Vec<u8>)> {
        self.out.pop_front()
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    pub fn translation(&self, locator: Ipv4Addr) -> Option<Entry> {
        self.table.get(&locator).copied()
    }

    pub fn translations(&self) -> usize {
        self.table.len()
    }

    pub fn neighbour_count(&self) -> usize {
        self.ports.iter().map(|p| p.neighbours.len()).sum()
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// What the router's `Status` reports (in the switch's fields).
    pub fn status(&self) -> SwitchStatus {
        SwitchStatus {
            neighbours: self.neighbour_count() as u64,
            neighbour_evictions: self.counters.neighbour_evictions,
            capsule_queue_drops: self.counters.unreachable,
            held_drops: self.counters.pending_drops,
            tx_drops: self.counters.tx_drops,
            arp_conflicts: 0,
        }
    }

    /// Applies a translation update. An entry older than the one held for
    /// its locator is ignored; an equal epoch replaces it (a repeated push,
    /// or the stop of the copy at that epoch). With `replace`, locators the
    /// update does not name are dropped. Returns how many entries were
    /// ignored.
    pub fn update(&mut self, replace: bool, entries: &[Translation]) -> usize {
        if replace {
            self.table
                .retain(|locator, _| entries.iter().any(|e| e.locator == *locator));
        }
        let mut ignored = 0;
        for e in entries {
            let newer = self
                .table
                .get(&e.locator)
                .is_none_or(|held| e.epoch >= held.epoch);
            let room = self.table.contains_key(&e.locator) || self.table.len() < MAX_TRANSLATIONS;
            if newer && room && self.locators.contains(e.locator) {
                self.table.insert(
                    e.locator,
                    Entry {
                        care_of: e.care_of,
                        epoch: e.epoch,
                    },
                );
            } else {
                ignored += 1;
            }
        }
        self.counters.translations_ignored += ignored as u64;
        ignored
    }

    fn owns(&self, addr: Ipv4Addr) -> bool {
        self.ports.iter().any(|p| p.addr.addr == addr)
    }

    /// Handles one frame received on `port`.
    pub fn ingress(&mut self, port: usize, frame: &[u8], now_ns: u64) {
        self.last_now_ns = now_ns;
        if port >= self.ports.len() {
            return;
        }
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            self.counters.malformed += 1;
            return;
        };
        let dst = eth.dst_addr();
        if dst != self.ports[port].mac && !dst.is_broadcast() && !dst.is_multicast() {
            return;
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => self.ingress_arp(port, frame, now_ns),
            EthernetProtocol::Ipv4 if dst == self.ports[port].mac => {
                self.ingress_ipv4(port, frame, now_ns)
            }
            _ => {}
        }
    }

    fn ingress_arp(&mut self, port: usize, frame: &[u8], now_ns: u64) {
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
            return;
        };
        let me = self.ports[port].addr;
        let for_me = target_protocol_addr == me.addr;
        let awaited = self
            .pending
            .iter()
            .any(|p| p.port == port && p.next_hop == source_protocol_addr);
        // Learn only senders of this port's subnet that concern the router:
        // a host asking for it, or an answer it waits for. Others would let
        // anyone on a segment fill the table.
        if (for_me || awaited)
            && source_hardware_addr.is_unicast()
            && me.contains(source_protocol_addr)
            && source_protocol_addr != me.addr
        {
            self.learn(port, source_protocol_addr, source_hardware_addr, now_ns);
            self.flush_pending(port, source_protocol_addr);
        }
        if !for_me {
            if operation == ArpOperation::Request {
                // Announces nothing it does not own: not a locator, not
                // another subnet's host.
                self.counters.arp_not_ours += 1;
            }
            return;
        }
        match operation {
            ArpOperation::Request => {
                let reply = ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Reply,
                    source_hardware_addr: self.ports[port].mac,
                    source_protocol_addr: me.addr,
                    target_hardware_addr: source_hardware_addr,
                    target_protocol_addr: source_protocol_addr,
                };
                self.send_arp(port, source_hardware_addr, &reply);
                self.counters.arp_answered += 1;
            }
            _ if port == 0 => {
                // An answer to the machine stack's own question (the control
                // service resolving `capsulectl`'s address).
                self.queue_machine(frame);
            }
            _ => {}
        }
    }

    fn ingress_ipv4(&mut self, port: usize, frame: &[u8], now_ns: u64) {
        let payload = &frame[ETHERNET_HEADER..];
        let Ok(ip) = Ipv4Packet::new_checked(payload) else {
            self.counters.malformed += 1;
            return;
        };
        if !ip.verify_checksum() || ip.more_frags() || ip.frag_offset() != 0 {
            // Fragments are not reassembled or forwarded: nothing in a lab
            // sends them (every link carries the MTU its ends use).
            self.counters.malformed += 1;
            return;
        }
        let len = (ip.total_len() as usize).min(payload.len());
        let packet = &payload[..len];
        let dst = ip.dst_addr();
        if self.owns(dst) {
            self.local(port, frame, packet);
            return;
        }
        if dst.is_broadcast() || dst.is_multicast() || self.ports[port].addr.is_broadcast(dst) {
            return;
        }
        self.forward(port, packet.to_vec(), now_ns);
    }

    /// A packet for one of the router's addresses: ICMP echo is answered
    /// here; the rest for port 0's address (the control service) goes to the
    /// machine stack when it came in on port 0.
    fn local(&mut self, port: usize, frame: &[u8], packet: &[u8]) {
        let ip = Ipv4Packet::new_unchecked(packet);
        let body = &packet[ip.header_len() as usize..];
        if ip.next_header() == IpProtocol::Icmp && body.len() >= 8 && body[0] == ICMP_ECHO_REQUEST {
            if internet_checksum(body) != 0 {
                self.counters.malformed += 1;
                return;
            }
            let mut reply = body.to_vec();
            reply[0] = ICMP_ECHO_REPLY;
            reply[2..4].copy_from_slice(&[0, 0]);
            let sum = internet_checksum(&reply);
            reply[2..4].copy_from_slice(&sum.to_be_bytes());
            let packet = build_ipv4(ip.dst_addr(), ip.src_addr(), IpProtocol::Icmp, &reply);
            self.counters.echo_answered += 1;
            self.route_own(packet);
            return;
        }
        if port == 0 && ip.dst_addr() == self.ports[0].addr.addr {
            self.queue_machine(frame);
        } else {
            self.counters.not_served += 1;
        }
    }

    fn queue_machine(&mut self, frame: &[u8]) {
        if self.machine_rx.len() >= MAX_MACHINE_QUEUE {
            self.counters.tx_drops += 1;
        } else {
            self.machine_rx.push_back(frame.to_vec());
        }
    }

    /// Where a packet for `dst` goes: (port, next hop), or the ICMP
    /// unreachable code to answer with.
    fn route(&self, dst: Ipv4Addr) -> Result<(usize, Ipv4Addr), u8> {
        let hop = if self.locators.contains(dst) {
            self.next_hop_for_locator(dst)?
        } else {
            dst
        };
        self.ports
            .iter()
            .position(|p| p.addr.contains(hop))
            .map(|port| (port, hop))
            .ok_or(UNREACHABLE_NET)
    }

    /// The care-of address of a locator: the machine address of the VM that
    /// runs the capsule, reached directly on its segment. (IP-in-IP to a VM
    /// that no port of the router reaches directly is a later slice.)
    fn next_hop_for_locator(&self, locator: Ipv4Addr) -> Result<Ipv4Addr, u8> {
        self.table
            .get(&locator)
            .and_then(|e| e.care_of)
            .ok_or(UNREACHABLE_HOST)
    }

    /// Forwards a packet that arrived on `from`: TTL, route, ARP.
    fn forward(&mut self, from: usize, mut packet: Vec<u8>, now_ns: u64) {
        let (dst, ttl) = {
            let ip = Ipv4Packet::new_unchecked(&packet[..]);
            (ip.dst_addr(), ip.hop_limit())
        };
        if ttl <= 1 {
            self.counters.ttl_expired += 1;
            self.icmp_error(from, &packet, ICMP_TIME_EXCEEDED, 0);
            return;
        }
        let (port, hop) = match self.route(dst) {
            Ok(r) => r,
            Err(code) => {
                self.counters.unreachable += 1;
                self.icmp_error(from, &packet, ICMP_UNREACHABLE, code);
                return;
            }
        };
        decrement_ttl(&mut packet);
        self.counters.forwarded += 1;
        self.send_via(port, hop, packet, now_ns);
    }

    /// Routes a packet the router made itself (no TTL decrement).
    fn route_own(&mut self, packet: Vec<u8>) {
        let dst = Ipv4Packet::new_unchecked(&packet[..]).dst_addr();
        if let Ok((port, hop)) = self.route(dst) {
            // Own packets go out at once or wait for ARP like any other.
            self.send_via(port, hop, packet, self.now_hint());
        }
    }

    /// ICMP error about `offending` (which arrived on `from`) back to its
    /// sender, from the router's address on that port. Never about an ICMP
    /// error, a broadcast or a sender that is not a unicast host.
    fn icmp_error(&mut self, from: usize, offending: &[u8], kind: u8, code: u8) {
        let ip = Ipv4Packet::new_unchecked(offending);
        let src = ip.src_addr();
        if src.is_unspecified() || src.is_broadcast() || src.is_multicast() || self.owns(src) {
            return;
        }
        let header_len = ip.header_len() as usize;
        if ip.next_header() == IpProtocol::Icmp {
            let t = offending.get(header_len).copied().unwrap_or(0xff);
            if t != ICMP_ECHO_REQUEST && t != ICMP_ECHO_REPLY {
                return;
            }
        }
        let quoted = &offending[..(header_len + 8).min(offending.len())];
        let mut body = Vec::with_capacity(8 + quoted.len());
        body.extend_from_slice(&[kind, code, 0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(quoted);
        let sum = internet_checksum(&body);
        body[2..4].copy_from_slice(&sum.to_be_bytes());
        let packet = build_ipv4(self.ports[from].addr.addr, src, IpProtocol::Icmp, &body);
        self.route_own(packet);
    }

    fn send_via(&mut self, port: usize, hop: Ipv4Addr, packet: Vec<u8>, now_ns: u64) {
        self.last_now_ns = now_ns;
        if let Some(mac) = self.neighbour_mac(port, hop, now_ns) {
            self.emit_ip(port, mac, &packet);
            return;
        }
        let asked = self
            .pending
            .iter()
            .any(|p| p.port == port && p.next_hop == hop);
        if self.pending.len() >= MAX_PENDING {
            self.counters.pending_drops += 1;
        } else {
            self.pending.push(Pending {
                port,
                next_hop: hop,
                packet,
                deadline_ns: now_ns + ARP_TIMEOUT_NS,
            });
        }
        if !asked {
            let request = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: self.ports[port].mac,
                source_protocol_addr: self.ports[port].addr.addr,
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: hop,
            };
            self.send_arp(port, EthernetAddress::BROADCAST, &request);
        }
    }

    fn now_hint(&self) -> u64 {
        self.last_now_ns
    }

    fn learn(&mut self, port: usize, ip: Ipv4Addr, mac: EthernetAddress, now_ns: u64) {
        let counters = &mut self.counters;
        let table = &mut self.ports[port].neighbours;
        if !table.contains_key(&ip) && table.len() >= MAX_NEIGHBOURS {
            let victim = table
                .iter()
                .min_by_key(|(_, n)| (n.expires_ns > now_ns, n.used_ns))
                .map(|(ip, n)| (*ip, n.expires_ns > now_ns));
            if let Some((victim, live)) = victim {
                table.remove(&victim);
                counters.neighbour_evictions += u64::from(live);
            }
        }
        table.insert(
            ip,
            Neighbour {
                mac,
                expires_ns: now_ns + NEIGHBOUR_TTL_NS,
                used_ns: now_ns,
            },
        );
    }

    fn neighbour_mac(&mut self, port: usize, ip: Ipv4Addr, now_ns: u64) -> Option<EthernetAddress> {
        let n = self.ports[port].neighbours.get_mut(&ip)?;
        if n.expires_ns <= now_ns {
            return None;
        }
        n.used_ns = now_ns;
        Some(n.mac)
    }

    fn flush_pending(&mut self, port: usize, resolved: Ipv4Addr) {
        let Some(mac) = self.ports[port].neighbours.get(&resolved).map(|n| n.mac) else {
            return;
        };
        if !self
            .pending
            .iter()
            .any(|p| p.port == port && p.next_hop == resolved)
        {
            return;
        }
        // In the order they arrived.
        let (ready, waiting) = core::mem::take(&mut self.pending)
            .into_iter()
            .partition::<Vec<Pending>, _>(|p| p.port == port && p.next_hop == resolved);
        self.pending = waiting;
        for p in ready {
            self.emit_ip(port, mac, &p.packet);
        }
    }

    /// Drops packets whose next hop never answered (counted) and aged
    /// neighbour entries.
    pub fn expire(&mut self, now_ns: u64) {
        self.last_now_ns = now_ns;
        let before = self.pending.len();
        self.pending.retain(|p| p.deadline_ns > now_ns);
        self.counters.arp_timeouts += (before - self.pending.len()) as u64;
        for port in &mut self.ports {
            port.neighbours.retain(|_, n| n.expires_ns > now_ns);
        }
    }

    fn send_arp(&mut self, port: usize, dst: EthernetAddress, repr: &ArpRepr) {
        let mut frame = alloc::vec![0u8; ETHERNET_HEADER + repr.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        EthernetRepr {
            src_addr: self.ports[port].mac,
            dst_addr: dst,
            ethertype: EthernetProtocol::Arp,
        }
        .emit(&mut eth);
        repr.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
        self.out.push_back((port, frame));
    }

    fn emit_ip(&mut self, port: usize, dst: EthernetAddress, packet: &[u8]) {
        let mut frame = alloc::vec![0u8; ETHERNET_HEADER + packet.len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        EthernetRepr {
            src_addr: self.ports[port].mac,
            dst_addr: dst,
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut eth);
        eth.payload_mut().copy_from_slice(packet);
        self.out.push_back((port, frame));
    }
}

trait SubnetBroadcast {
    fn is_broadcast(&self, addr: Ipv4Addr) -> bool;
}

impl SubnetBroadcast for Ipv4Cidr {
    /// Whether `addr` is this subnet's directed broadcast address.
    fn is_broadcast(&self, addr: Ipv4Addr) -> bool {
        let host_bits = u32::MAX.checked_shr(self.prefix.into()).unwrap_or(0);
        self.contains(addr) && host_bits != 0 && u32::from(addr) & host_bits == host_bits
    }
}

/// Decrements the TTL and updates the header checksum incrementally
/// (RFC 1624: HC' = ~(~HC + ~m + m'), on the 16-bit word holding the TTL).
pub fn decrement_ttl(packet: &mut [u8]) {
    let old_word = u16::from_be_bytes([packet[8], packet[9]]);
    packet[8] -= 1;
    let new_word = u16::from_be_bytes([packet[8], packet[9]]);
    let old_sum = u16::from_be_bytes([packet[10], packet[11]]);
    let mut sum = u32::from(!old_sum) + u32::from(!old_word) + u32::from(new_word);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    packet[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// The Internet checksum (RFC 1071) of `data`: 0 over data that carries a
/// correct checksum.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet (20-byte header, DF clear, TTL `OWN_TTL`) around `body`.
pub fn build_ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, body: &[u8]) -> Vec<u8> {
    let mut packet = alloc::vec![0u8; 20 + body.len()];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&((20 + body.len()) as u16).to_be_bytes());
    packet[8] = OWN_TTL;
    packet[9] = proto.into();
    packet[12..16].copy_from_slice(&src.octets());
    packet[16..20].copy_from_slice(&dst.octets());
    let sum = internet_checksum(&packet[..20]);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
    packet[20..].copy_from_slice(body);
    packet
}
