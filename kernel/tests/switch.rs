//! In-kernel tests of the capsule switch around moves and under load: held
//! packets reach a capsule that arrives on the VM that held them, a frozen
//! capsule's full queue counts what it drops, released bursts leave whole at
//! the pace the NIC takes them, and the neighbour table stays bounded under
//! an ARP flood. NIC 0 carries the capsules; NIC 1 plays a host (and "the
//! other VM") on the same LAN, answering ARP and counting what arrives.
//! Who answers ARP for a locator: a frozen capsule's VM gives it up to the
//! first other MAC that claims it, thaw claims it back, and a running
//! capsule's locator claimed elsewhere is counted as a conflict.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use core::sync::atomic::{AtomicU64, Ordering};

use capsules_kernel::boot::BootInfo;
use capsules_kernel::capsule::api::UdpSocket;
use capsules_kernel::capsule::migrate;
use capsules_kernel::capsule::{self, CapsuleConfig, Program, api};
use capsules_kernel::drivers::virtio::net::VirtioNet;
use capsules_kernel::net::Network;
use capsules_kernel::net::switch::{MAX_NEIGHBOURS, MAX_QUEUED};
use capsules_kernel::testing::{Test, run};
use capsules_kernel::{arch, kloop, mm, time};
use capsules_wire::bootcfg::Ipv4Cidr;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};
use spin::Mutex;

const KEY: &[u8] = &[0x33; 32];
const MACHINE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// NIC 1's address as a host on the LAN.
const PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const PORT: u16 = 5000;

fn locator(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, last)
}

/// Datagrams each capsule received, by the last octet of its locator.
static RECEIVED: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];

/// Counts the datagrams that reach its port.
fn udp_count(_: &[String]) -> Result<(), String> {
    let me = api::locator().octets()[3] as usize % RECEIVED.len();
    let socket = UdpSocket::bind(PORT).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    loop {
        socket.recv_from(&mut buf).map_err(|e| e.to_string())?;
        RECEIVED[me].fetch_add(1, Ordering::Relaxed);
    }
}

fn received(last: u8) -> u64 {
    RECEIVED[last as usize % RECEIVED.len()].load(Ordering::Relaxed)
}

static PROGRAMS: &[Program] = &[Program {
    name: "udp-count",
    description: "",
    main: udp_count,
}];

struct Lab {
    net: Network,
    peer: VirtioNet,
}

static LAB: Mutex<Option<Lab>> = Mutex::new(None);

fn with_lab<R>(f: impl FnOnce(&mut Lab) -> R) -> R {
    f(LAB.lock().as_mut().expect("lab set up"))
}

fn setup() {
    arch::enable_interrupts();
    let nic = VirtioNet::init(0, true).expect("NIC 0");
    let peer = VirtioNet::init(1, false).expect("NIC 1");
    let net = Network::new(
        nic,
        Ipv4Cidr {
            addr: MACHINE,
            prefix: 24,
        },
        None,
        Ipv4Cidr {
            addr: Ipv4Addr::new(198, 18, 0, 0),
            prefix: 16,
        },
    );
    capsule::init(PROGRAMS, "test-vm");
    *LAB.lock() = Some(Lab { net, peer });
}

fn start(lab: &mut Lab, name: &str, last: u8) {
    capsule::start(
        CapsuleConfig {
            name: name.to_string(),
            program: "udp-count".to_string(),
            args: Vec::new(),
            locator: locator(last),
            slot: u32::from(last),
            memory_limit: 16 << 20,
            epoch: 1,
        },
        &mut lab.net,
    )
    .unwrap_or_else(|e| panic!("start {name}: {e}"));
}

/// A bare IPv4/UDP packet (as a capsule's stack hands it to the switch)
/// whose payload is `seq`.
fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, seq: u32) -> Vec<u8> {
    let payload = seq.to_be_bytes();
    let udp = UdpRepr {
        src_port: 4000,
        dst_port: PORT,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    let mut packet = vec![0u8; ip.buffer_len() + udp.header_len() + payload.len()];
    let mut ipp = Ipv4Packet::new_unchecked(&mut packet);
    ip.emit(&mut ipp, &ChecksumCapabilities::default());
    udp.emit(
        &mut UdpPacket::new_unchecked(ipp.payload_mut()),
        &src.into(),
        &dst.into(),
        payload.len(),
        |buf| buf.copy_from_slice(&payload),
        &ChecksumCapabilities::default(),
    );
    packet
}

fn ethernet(src: [u8; 6], dst: [u8; 6], ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + payload.len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame);
    EthernetRepr {
        src_addr: EthernetAddress(src),
        dst_addr: EthernetAddress(dst),
        ethertype,
    }
    .emit(&mut eth);
    eth.payload_mut().copy_from_slice(payload);
    frame
}

fn arp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], repr: &ArpRepr) -> Vec<u8> {
    let mut arp = vec![0u8; repr.buffer_len()];
    repr.emit(&mut ArpPacket::new_unchecked(&mut arp));
    ethernet(src_mac, dst_mac, EthernetProtocol::Arp, &arp)
}

/// Sends a frame from the peer, letting the VM run while the peer's ring is
/// full.
fn peer_send(lab: &mut Lab, frame: &[u8]) {
    let end = time::since_boot_ns() + 2_000_000_000;
    while lab
        .peer
        .transmit(frame.len(), |buf| buf.copy_from_slice(frame))
        .is_none()
    {
        assert!(time::since_boot_ns() < end, "the peer could not send");
        kloop::step(&mut lab.net, None);
    }
}

/// UDP datagrams the peer received, as (destination, sequence number).
#[derive(Default)]
struct PeerLog {
    datagrams: Vec<(Ipv4Addr, u32)>,
    arp_answered: u32,
}

/// Runs the VM for `ms` while the peer answers ARP requests for `answers`
/// with its own MAC (it plays the host, or the VM, that has them) and logs
/// every UDP datagram it receives.
fn run_with_peer(lab: &mut Lab, ms: u64, answers: &[Ipv4Addr]) -> PeerLog {
    let mut log = PeerLog::default();
    let peer_mac = lab.peer.mac();
    let end = time::since_boot_ns() + ms * 1_000_000;
    while time::since_boot_ns() < end {
        let busy = kloop::step(&mut lab.net, None);
        let mut replies = Vec::new();
        while let Some(frame) = lab.peer.receive(|f| f.to_vec()) {
            let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else {
                continue;
            };
            match eth.ethertype() {
                EthernetProtocol::Arp => {
                    let Ok(ArpRepr::EthernetIpv4 {
                        operation: ArpOperation::Request,
                        source_hardware_addr,
                        source_protocol_addr,
                        target_protocol_addr,
                        ..
                    }) = ArpPacket::new_checked(eth.payload()).and_then(|p| ArpRepr::parse(&p))
                    else {
                        continue;
                    };
                    if answers.contains(&target_protocol_addr) {
                        let reply = ArpRepr::EthernetIpv4 {
                            operation: ArpOperation::Reply,
                            source_hardware_addr: EthernetAddress(peer_mac),
                            source_protocol_addr: target_protocol_addr,
                            target_hardware_addr: source_hardware_addr,
                            target_protocol_addr: source_protocol_addr,
                        };
                        replies.push(arp_frame(peer_mac, source_hardware_addr.0, &reply));
                    }
                }
                EthernetProtocol::Ipv4 => {
                    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                        continue;
                    };
                    if ip.next_header() != IpProtocol::Udp {
                        continue;
                    }
                    let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
                        continue;
                    };
                    if let Ok(seq) = <[u8; 4]>::try_from(udp.payload()) {
                        log.datagrams.push((ip.dst_addr(), u32::from_be_bytes(seq)));
                    }
                }
                _ => {}
            }
        }
        for reply in replies {
            peer_send(lab, &reply);
            log.arp_answered += 1;
        }
        if !busy {
            kloop::idle(&lab.net);
        }
    }
    log
}

/// An ARP packet the peer received: (operation, sender MAC, sender address,
/// target address).
type ArpSeen = (ArpOperation, [u8; 6], Ipv4Addr, Ipv4Addr);

/// Runs the VM for `ms` and returns every ARP packet the peer received.
fn peer_arp(lab: &mut Lab, ms: u64) -> Vec<ArpSeen> {
    let mut seen = Vec::new();
    let end = time::since_boot_ns() + ms * 1_000_000;
    while time::since_boot_ns() < end {
        let busy = kloop::step(&mut lab.net, None);
        while let Some(frame) = lab.peer.receive(|f| f.to_vec()) {
            let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else {
                continue;
            };
            if eth.ethertype() != EthernetProtocol::Arp {
                continue;
            }
            if let Ok(ArpRepr::EthernetIpv4 {
                operation,
                source_hardware_addr,
                source_protocol_addr,
                target_protocol_addr,
                ..
            }) = ArpPacket::new_checked(eth.payload()).and_then(|p| ArpRepr::parse(&p))
            {
                seen.push((
                    operation,
                    source_hardware_addr.0,
                    source_protocol_addr,
                    target_protocol_addr,
                ));
            }
        }
        if !busy {
            kloop::idle(&lab.net);
        }
    }
    seen
}

/// The peer (a host at `PEER`) asks who has `target`; returns the MACs that
/// answered for it.
fn who_answers(lab: &mut Lab, target: Ipv4Addr) -> Vec<[u8; 6]> {
    let peer_mac = lab.peer.mac();
    let request = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(peer_mac),
        source_protocol_addr: PEER,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    peer_send(lab, &arp_frame(peer_mac, [0xff; 6], &request));
    peer_arp(lab, 100)
        .into_iter()
        .filter(|(op, _, src, dst)| *op == ArpOperation::Reply && *src == target && *dst == PEER)
        .map(|(_, mac, _, _)| mac)
        .collect()
}

/// Another VM (MAC `mac`, played by the peer's NIC) announces `locator`
/// with a gratuitous ARP, as a destination does at the commit of a move.
fn claim(lab: &mut Lab, locator: Ipv4Addr, mac: [u8; 6]) {
    let garp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: locator,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: locator,
    };
    peer_send(lab, &arp_frame(mac, [0xff; 6], &garp));
    let _ = peer_arp(lab, 50);
}

/// The destination VM of the tests below.
const OTHER_VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xc5, 0x00, 0x77];

/// A frozen capsule's VM answers ARP for its locator until another MAC
/// claims it (the destination's gratuitous ARP at the commit); from then on
/// it neither answers nor announces it, while its frozen copy waits for the
/// release — and that claim is no conflict.
fn a_frozen_source_stops_answering_arp_once_another_mac_claims_the_locator() {
    with_lab(|lab| {
        let loc = locator(24);
        let vm_mac = lab.net.nic.mac();
        start(lab, "arp-frozen", 24);
        let _ = peer_arp(lab, 100);
        assert_eq!(who_answers(lab, loc), [vm_mac], "a running capsule");
        let _image = migrate::freeze("arp-frozen", KEY, &mut lab.net).unwrap();
        assert_eq!(
            who_answers(lab, loc),
            [vm_mac],
            "frozen, before anyone else claimed the locator"
        );
        let conflicts = lab.net.switch.status().arp_conflicts;
        claim(lab, loc, OTHER_VM_MAC);
        assert!(lab.net.switch.has_ceded(loc));
        assert_eq!(
            who_answers(lab, loc),
            [] as [[u8; 6]; 0],
            "the frozen source still answers ARP for {loc} after the commit"
        );
        // Nor does it announce it any more.
        let Network { switch, nic, .. } = &mut lab.net;
        switch.announce(nic, loc);
        assert!(
            peer_arp(lab, 50).iter().all(|(_, _, src, _)| *src != loc),
            "the frozen source announced {loc} after giving it up"
        );
        assert_eq!(
            lab.net.switch.status().arp_conflicts,
            conflicts,
            "a claim on a frozen capsule's locator counted as a conflict"
        );
        // Released: the mark goes with the capsule.
        migrate::release("arp-frozen", PEER, &mut lab.net).unwrap();
        assert!(!lab.net.switch.has_ceded(loc));
        assert!(lab.net.switch.resident(loc).is_none());
    });
}

/// A move that fails after the destination claimed the locator is rolled
/// back with a thaw: the source claims it back with a gratuitous ARP and
/// answers for it again.
fn thaw_reclaims_the_locator_and_announces_it() {
    with_lab(|lab| {
        let loc = locator(25);
        let vm_mac = lab.net.nic.mac();
        start(lab, "arp-thawed", 25);
        let _ = peer_arp(lab, 100);
        let _image = migrate::freeze("arp-thawed", KEY, &mut lab.net).unwrap();
        claim(lab, loc, OTHER_VM_MAC);
        assert_eq!(who_answers(lab, loc), [] as [[u8; 6]; 0]);
        migrate::thaw("arp-thawed", 2, &mut lab.net).unwrap();
        let seen = peer_arp(lab, 100);
        assert!(
            seen.iter()
                .any(|&(op, mac, src, dst)| op == ArpOperation::Request
                    && mac == vm_mac
                    && src == loc
                    && dst == loc),
            "no gratuitous ARP for {loc} after the thaw: {seen:?}"
        );
        assert!(!lab.net.switch.has_ceded(loc));
        assert_eq!(who_answers(lab, loc), [vm_mac], "after the thaw");
        // Running again: a claim now is a conflict, and it keeps answering.
        let conflicts = lab.net.switch.status().arp_conflicts;
        claim(lab, loc, OTHER_VM_MAC);
        assert_eq!(lab.net.switch.status().arp_conflicts, conflicts + 1);
        assert_eq!(who_answers(lab, loc), [vm_mac]);
        capsule::kill("arp-thawed", &mut lab.net).unwrap();
        let _ = peer_arp(lab, 50);
    });
}

/// A running capsule's locator claimed by another MAC (a gratuitous ARP or
/// an answer) is a sign of two copies: counted in `arp_conflicts`, which the
/// VM's `Status` reports. ARP from its own VM's MAC, and about other
/// addresses, is not.
fn a_running_capsule_counts_a_conflict_when_another_mac_claims_its_locator() {
    with_lab(|lab| {
        let loc = locator(26);
        let vm_mac = lab.net.nic.mac();
        start(lab, "arp-running", 26);
        let _ = peer_arp(lab, 100);
        let before = lab.net.switch.status().arp_conflicts;
        claim(lab, loc, vm_mac);
        claim(lab, locator(27), OTHER_VM_MAC);
        assert_eq!(
            lab.net.switch.status().arp_conflicts,
            before,
            "ARP that claims nothing of this VM's counted as a conflict"
        );
        claim(lab, loc, OTHER_VM_MAC);
        // An answer from another MAC for the locator, too.
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(OTHER_VM_MAC),
            source_protocol_addr: loc,
            target_hardware_addr: EthernetAddress(vm_mac),
            target_protocol_addr: MACHINE,
        };
        peer_send(lab, &arp_frame(OTHER_VM_MAC, vm_mac, &reply));
        let _ = peer_arp(lab, 50);
        assert_eq!(lab.net.switch.status().arp_conflicts, before + 2);
        assert_eq!(lab.net.switch.counters.arp_conflicts, before + 2);
        // It keeps running and answering: the conflict is for the
        // orchestrator to settle.
        assert!(!lab.net.switch.has_ceded(loc));
        assert_eq!(who_answers(lab, loc), [vm_mac]);
        capsule::kill("arp-running", &mut lab.net).unwrap();
        let _ = peer_arp(lab, 50);
    });
}

/// Checks that sequence numbers 0..MAX_QUEUED all arrived once, in the order
/// they were sent. QEMU's hub may swap two frames when the peer's receive
/// ring is full (a frame queued for it is overtaken by the next one), so a
/// few neighbours out of place are tolerated; a burst sent in reverse or
/// scrambled order is not.
fn assert_whole_and_in_order(seqs: &[u32], what: &str) {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..MAX_QUEUED as u32).collect::<Vec<_>>(),
        "{what} did not arrive whole: {seqs:?}"
    );
    let descents = seqs.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(descents <= 8, "{what} arrived out of order: {seqs:?}");
}

/// A VM holds what its capsules send to a moving locator. When the capsule
/// arrives on that very VM, the held packets are its own: they must reach it
/// here, not go out on the wire to a VM that no longer answers for it.
fn held_packets_reach_a_capsule_that_arrives_on_the_holding_vm() {
    with_lab(|lab| {
        start(lab, "sender", 21);
        start(lab, "mover", 22);
        let _ = run_with_peer(lab, 100, &[]);
        // The mover leaves for "vm2" (its arena goes; a forwarding entry
        // stays), and this VM holds what its own capsules send it.
        let image = migrate::freeze("mover", KEY, &mut lab.net).unwrap();
        migrate::release("mover", Ipv4Addr::new(192, 0, 2, 12), &mut lab.net).unwrap();
        let now = time::since_boot_ns();
        lab.net.switch.hold(locator(22), now + 10_000_000_000);
        for seq in 0..5 {
            let packet = udp_packet(locator(21), locator(22), seq);
            assert!(
                lab.net
                    .switch
                    .egress(&packet, &mut lab.net.nic, now)
                    .is_none(),
                "a packet to a held locator was delivered"
            );
        }
        assert_eq!(lab.net.switch.held_packets(), 5);
        let before = received(22);
        // The move ends here instead: the capsule is restored on this VM,
        // then the orchestrator releases the hold.
        migrate::restore(&image, KEY, 2, &mut lab.net).unwrap();
        let now = time::since_boot_ns();
        let Network { switch, nic, .. } = &mut lab.net;
        switch.release_held(locator(22), nic, now);
        let log = run_with_peer(lab, 300, &[locator(22)]);
        assert_eq!(
            received(22) - before,
            5,
            "the held packets did not reach the capsule that arrived here"
        );
        assert!(
            log.datagrams.iter().all(|(dst, _)| *dst != locator(22)),
            "held packets for a resident capsule went out on the wire"
        );
        assert_eq!(lab.net.switch.held_packets(), 0);
        capsule::kill("mover", &mut lab.net).unwrap();
    });
}

/// A frozen capsule's queue takes `MAX_QUEUED` packets; what does not fit is
/// counted. The source then forwards the whole queue to the capsule's new
/// VM at once: every packet must leave, in order, though the NIC's ring
/// holds only 64 frames.
fn a_frozen_capsules_queue_counts_its_drops_and_its_release_leaves_whole() {
    with_lab(|lab| {
        start(lab, "frozen", 23);
        let _ = run_with_peer(lab, 100, &[]);
        let _image = migrate::freeze("frozen", KEY, &mut lab.net).unwrap();
        let before = lab.net.switch.counters;
        let (peer_mac, vm_mac) = (lab.peer.mac(), lab.net.nic.mac());
        const SENT: u32 = MAX_QUEUED as u32 + 44;
        for seq in 0..SENT {
            let packet = udp_packet(PEER, locator(23), seq);
            let frame = ethernet(peer_mac, vm_mac, EthernetProtocol::Ipv4, &packet);
            peer_send(lab, &frame);
            if seq % 16 == 15 {
                // Let the VM take them in before the peer's ring fills.
                let _ = run_with_peer(lab, 2, &[]);
            }
        }
        let end = time::since_boot_ns() + 3_000_000_000;
        while lab.net.switch.counters.to_capsules - before.to_capsules < u64::from(SENT) {
            assert!(
                time::since_boot_ns() < end,
                "only {} of {SENT} packets reached the switch",
                lab.net.switch.counters.to_capsules - before.to_capsules
            );
            let _ = run_with_peer(lab, 5, &[]);
        }
        let drops = lab.net.switch.counters.capsule_queue_drops - before.capsule_queue_drops;
        assert_eq!(drops, 44, "drops beyond the frozen capsule's queue");
        assert_eq!(
            lab.net.switch.status().capsule_queue_drops,
            before.capsule_queue_drops + 44
        );
        // It moved to "the peer": its held queue goes there in one burst.
        migrate::release("frozen", PEER, &mut lab.net).unwrap();
        let log = run_with_peer(lab, 1500, &[PEER]);
        let forwarded: Vec<u32> = log
            .datagrams
            .iter()
            .filter(|(dst, _)| *dst == locator(23))
            .map(|(_, seq)| *seq)
            .collect();
        assert_whole_and_in_order(&forwarded, "the frozen capsule's queue");
        assert_eq!(
            lab.net.switch.counters.tx_drops, before.tx_drops,
            "frames were lost to a full transmit queue"
        );
        assert_eq!(lab.net.switch.outbox_len(), 0);
    });
}

/// What local capsules send to a held locator is bounded (the excess is
/// counted), and released at once it leaves whole, at the NIC's pace.
fn a_released_hold_leaves_whole_and_its_excess_is_counted() {
    with_lab(|lab| {
        // 198.18.0.40 lives on "another VM", played by the peer.
        let away = locator(40);
        let before = lab.net.switch.counters;
        let now = time::since_boot_ns();
        lab.net.switch.hold(away, now + 10_000_000_000);
        const SENT: u32 = MAX_QUEUED as u32 + 10;
        for seq in 0..SENT {
            let packet = udp_packet(locator(21), away, seq);
            let Network { switch, nic, .. } = &mut lab.net;
            assert!(switch.egress(&packet, nic, now).is_none());
        }
        assert_eq!(lab.net.switch.held_packets(), MAX_QUEUED);
        assert_eq!(lab.net.switch.counters.held_drops - before.held_drops, 10);
        let now = time::since_boot_ns();
        let Network { switch, nic, .. } = &mut lab.net;
        assert_eq!(switch.release_held(away, nic, now), MAX_QUEUED);
        let log = run_with_peer(lab, 1500, &[away]);
        assert!(
            log.arp_answered >= 1,
            "the switch did not ask where {away} is"
        );
        let released: Vec<u32> = log
            .datagrams
            .iter()
            .filter(|(dst, _)| *dst == away)
            .map(|(_, seq)| *seq)
            .collect();
        assert_whole_and_in_order(&released, "the released hold");
        assert_eq!(lab.net.switch.counters.tx_drops, before.tx_drops);
        assert_eq!(lab.net.switch.outbox_len(), 0);
    });
}

/// ARP is unauthenticated: a flood of requests from ever new senders (for a
/// resident locator, and between strangers) must neither grow the neighbour
/// table beyond its bound nor the kernel's memory; evictions are counted and
/// aged entries go.
fn neighbour_table_stays_bounded_under_an_arp_flood() {
    with_lab(|lab| {
        let resident = locator(21);
        let flood_round = |lab: &mut Lab, round: u32| {
            for i in 0..20_000u32 {
                let n = round * 20_000 + i;
                let [_, b, c, d] = n.to_be_bytes();
                let mac = [0x02, 0x00, round as u8, b, c, d];
                let sender = Ipv4Addr::new(10, b, c, d);
                // Half ask for a resident capsule, half for someone else.
                let target = if n.is_multiple_of(2) {
                    resident
                } else {
                    Ipv4Addr::new(192, 0, 2, 200)
                };
                let request = ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Request,
                    source_hardware_addr: EthernetAddress(mac),
                    source_protocol_addr: sender,
                    target_hardware_addr: EthernetAddress([0; 6]),
                    target_protocol_addr: target,
                };
                let frame = arp_frame(mac, [0xff; 6], &request);
                let now = time::since_boot_ns();
                let Network { switch, nic, .. } = &mut lab.net;
                switch.ingress(&frame, nic, now);
                assert!(switch.neighbour_count() <= MAX_NEIGHBOURS);
            }
            // Let queues (answers, the machine stack's) drain.
            let _ = run_with_peer(lab, 200, &[]);
        };
        let evictions_before = lab.net.switch.counters.neighbour_evictions;
        flood_round(lab, 0);
        let heap_after_first = mm::stats().heap_used_bytes;
        flood_round(lab, 1);
        flood_round(lab, 2);
        let heap_after_third = mm::stats().heap_used_bytes;
        assert!(
            lab.net.switch.neighbour_count() <= MAX_NEIGHBOURS,
            "{} neighbour entries",
            lab.net.switch.neighbour_count()
        );
        let evictions = lab.net.switch.counters.neighbour_evictions - evictions_before;
        assert!(
            evictions >= 30_000 - MAX_NEIGHBOURS as u64,
            "{evictions} evictions for 30000 senders asking for a capsule"
        );
        assert_eq!(
            lab.net.switch.status().neighbour_evictions,
            lab.net.switch.counters.neighbour_evictions
        );
        let growth = heap_after_third.saturating_sub(heap_after_first);
        assert!(
            growth < 32 * 1024,
            "the kernel heap grew by {growth} bytes under 40000 more ARP requests"
        );
        // Entries age out (five minutes without news).
        let later = time::since_boot_ns() + 301_000_000_000;
        let Network { switch, nic, .. } = &mut lab.net;
        switch.expire(nic, later);
        assert_eq!(switch.neighbour_count(), 0, "aged entries stayed");
    });
}

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    setup();
    run(
        "switch",
        &[
            Test {
                name: "held_packets_reach_a_capsule_that_arrives_on_the_holding_vm",
                run: held_packets_reach_a_capsule_that_arrives_on_the_holding_vm,
            },
            Test {
                name: "a_frozen_capsules_queue_counts_its_drops_and_its_release_leaves_whole",
                run: a_frozen_capsules_queue_counts_its_drops_and_its_release_leaves_whole,
            },
            Test {
                name: "a_released_hold_leaves_whole_and_its_excess_is_counted",
                run: a_released_hold_leaves_whole_and_its_excess_is_counted,
            },
            Test {
                name: "a_frozen_source_stops_answering_arp_once_another_mac_claims_the_locator",
                run: a_frozen_source_stops_answering_arp_once_another_mac_claims_the_locator,
            },
            Test {
                name: "thaw_reclaims_the_locator_and_announces_it",
                run: thaw_reclaims_the_locator_and_announces_it,
            },
            Test {
                name: "a_running_capsule_counts_a_conflict_when_another_mac_claims_its_locator",
                run: a_running_capsule_counts_a_conflict_when_another_mac_claims_its_locator,
            },
            // Last: it ages the table with a clock five minutes ahead.
            Test {
                name: "neighbour_table_stays_bounded_under_an_arp_flood",
                run: neighbour_table_stays_bounded_under_an_arp_flood,
            },
        ],
    )
}
