//! In-kernel tests of the special router's forwarding core
//! (`net::router::Router`): frames go in on a port, and what it sends comes
//! out as (port, frame) pairs, so no device is needed. Ports: 0 on the first
//! VM subnet, 1 on the second, 2 on the client subnet.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;

use capsules_kernel::boot::BootInfo;
use capsules_kernel::net::router::{
    MAX_PENDING, Router, build_ipv4, decrement_ttl, internet_checksum,
};
use capsules_kernel::testing::{Test, run};
use capsules_wire::bootcfg::Ipv4Cidr;
use capsules_wire::control::Translation;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpProtocol, Ipv4Packet,
};

const PORT_MACS: [[u8; 6]; 3] = [
    [0x52, 0x54, 0, 0xc5, 0xfe, 1],
    [0x52, 0x54, 0, 0xc5, 0xfe, 2],
    [0x52, 0x54, 0, 0xc5, 0xfe, 3],
];
const PORT_ADDRS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(192, 0, 2, 254),
    Ipv4Addr::new(198, 51, 100, 254),
    Ipv4Addr::new(203, 0, 113, 254),
];
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
const VM1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const VM1_MAC: [u8; 6] = [0x52, 0x54, 0, 0xc5, 0, 1];
const VM2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 12);
const VM2_MAC: [u8; 6] = [0x52, 0x54, 0, 0xc5, 0, 2];
const LOCATOR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT_PORT: usize = 2;
const SECOND: u64 = 1_000_000_000;

fn router() -> Router {
    let ports: Vec<([u8; 6], Ipv4Cidr)> = PORT_MACS
        .iter()
        .zip(PORT_ADDRS)
        .map(|(mac, addr)| (*mac, Ipv4Cidr { addr, prefix: 24 }))
        .collect();
    Router::new(
        &ports,
        Ipv4Cidr {
            addr: Ipv4Addr::new(198, 18, 0, 0),
            prefix: 16,
        },
    )
}

fn arp(
    op: ArpOperation,
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst_mac: [u8; 6],
    target: Ipv4Addr,
) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: op,
        source_hardware_addr: EthernetAddress(src_mac),
        source_protocol_addr: src,
        target_hardware_addr: EthernetAddress(if op == ArpOperation::Reply {
            dst_mac
        } else {
            [0; 6]
        }),
        target_protocol_addr: target,
    };
    let mut frame = vec![0u8; 14 + repr.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut eth);
    repr.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
    frame
}

fn ip_frame(src_mac: [u8; 6], dst_mac: [u8; 6], packet: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + packet.len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    eth.payload_mut().copy_from_slice(packet);
    frame
}

/// A UDP packet (its checksum left zero: the router does not look at it).
fn udp(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8; 8 + payload.len()];
    body[0..2].copy_from_slice(&4000u16.to_be_bytes());
    body[2..4].copy_from_slice(&5000u16.to_be_bytes());
    body[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    body[8..].copy_from_slice(payload);
    let mut packet = build_ipv4(src, dst, IpProtocol::Udp, &body);
    while packet[8] > ttl {
        decrement_ttl(&mut packet);
    }
    packet
}

fn echo_request(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut body = vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 1, b'h', b'i'];
    let sum = internet_checksum(&body);
    body[2..4].copy_from_slice(&sum.to_be_bytes());
    build_ipv4(src, dst, IpProtocol::Icmp, &body)
}

fn outputs(r: &mut Router) -> Vec<(usize, Vec<u8>)> {
    core::iter::from_fn(|| r.take_output()).collect()
}

/// The client asks for the router's address on its port, as Linux does
/// before its first packet; the router learns it.
fn client_knows_router(r: &mut Router) {
    let request = arp(
        ArpOperation::Request,
        CLIENT_MAC,
        CLIENT,
        [0xff; 6],
        PORT_ADDRS[CLIENT_PORT],
    );
    r.ingress(CLIENT_PORT, &request, 0);
    let out = outputs(r);
    assert_eq!(out.len(), 1, "one ARP answer");
}

fn translate(r: &mut Router, locator: Ipv4Addr, care_of: Option<Ipv4Addr>, epoch: u64) -> usize {
    r.update(
        false,
        &[Translation {
            locator,
            care_of,
            epoch,
        }],
    )
}

fn parse_arp(frame: &[u8]) -> ArpRepr {
    let eth = EthernetFrame::new_checked(frame).expect("ethernet");
    assert_eq!(eth.ethertype(), EthernetProtocol::Arp);
    ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).expect("arp")).expect("arp repr")
}

fn arp_answered_only_for_own_addresses() {
    let mut r = router();
    // Its own address on the port asked: answered with that port's MAC.
    let request = arp(
        ArpOperation::Request,
        CLIENT_MAC,
        CLIENT,
        [0xff; 6],
        PORT_ADDRS[2],
    );
    r.ingress(2, &request, 0);
    let out = outputs(&mut r);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, 2);
    let ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = parse_arp(&out[0].1)
    else {
        panic!("not IPv4 ARP");
    };
    assert_eq!(operation, ArpOperation::Reply);
    assert_eq!(source_hardware_addr, EthernetAddress(PORT_MACS[2]));
    assert_eq!(source_protocol_addr, PORT_ADDRS[2]);
    assert_eq!(target_protocol_addr, CLIENT);
    // A locator (even one it routes), another host, and its address on
    // another port: never answered.
    translate(&mut r, LOCATOR, Some(VM2), 1);
    for target in [LOCATOR, Ipv4Addr::new(203, 0, 113, 99), PORT_ADDRS[0], VM2] {
        let request = arp(ArpOperation::Request, CLIENT_MAC, CLIENT, [0xff; 6], target);
        r.ingress(2, &request, 0);
        assert!(outputs(&mut r).is_empty(), "answered ARP for {target}");
    }
    assert_eq!(r.counters.arp_not_ours, 4);
    assert_eq!(r.counters.arp_answered, 1);
    // A sender of another subnet is not learned.
    let stranger = arp(
        ArpOperation::Request,
        [2, 0, 0, 0, 0, 0x77],
        Ipv4Addr::new(10, 1, 2, 3),
        [0xff; 6],
        PORT_ADDRS[2],
    );
    let before = r.neighbour_count();
    r.ingress(2, &stranger, 0);
    assert_eq!(outputs(&mut r).len(), 1, "still answered");
    assert_eq!(
        r.neighbour_count(),
        before,
        "an off-subnet sender was learned"
    );
}

fn forwarding_decrements_ttl_and_updates_the_checksum() {
    let mut r = router();
    client_knows_router(&mut r);
    translate(&mut r, LOCATOR, Some(VM2), 1);
    let sent = udp(CLIENT, LOCATOR, 64, b"hello capsule");
    r.ingress(CLIENT_PORT, &ip_frame(CLIENT_MAC, PORT_MACS[2], &sent), 0);
    // The care-of address is asked for on its port, from the router's
    // address there; the packet waits.
    let out = outputs(&mut r);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, 1);
    let ArpRepr::EthernetIpv4 {
        operation,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = parse_arp(&out[0].1)
    else {
        panic!("not IPv4 ARP");
    };
    assert_eq!(operation, ArpOperation::Request);
    assert_eq!(source_protocol_addr, PORT_ADDRS[1]);
    assert_eq!(target_protocol_addr, VM2);
    assert_eq!(r.pending_count(), 1);
    let reply = arp(
        ArpOperation::Reply,
        VM2_MAC,
        VM2,
        PORT_MACS[1],
        PORT_ADDRS[1],
    );
    r.ingress(1, &reply, 1000);
    let out = outputs(&mut r);
    assert_eq!(out.len(), 1, "the waiting packet leaves");
    assert_eq!(out[0].0, 1);
    let eth = EthernetFrame::new_checked(&out[0].1[..]).unwrap();
    assert_eq!(eth.dst_addr(), EthernetAddress(VM2_MAC));
    assert_eq!(eth.src_addr(), EthernetAddress(PORT_MACS[1]));
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert_eq!(ip.hop_limit(), 63);
    assert!(ip.verify_checksum(), "header checksum not updated");
    assert_eq!(ip.dst_addr(), LOCATOR, "the locator stays the destination");
    // Everything but TTL and checksum is unchanged.
    let mut expected = sent.clone();
    decrement_ttl(&mut expected);
    assert_eq!(eth.payload(), &expected[..]);
    assert_eq!(internet_checksum(&eth.payload()[..20]), 0);
    assert_eq!(r.counters.forwarded, 1);
    // The next one goes at once (neighbour known), and the reply from the
    // capsule goes back to the client directly (learned from its ARP).
    r.ingress(
        CLIENT_PORT,
        &ip_frame(CLIENT_MAC, PORT_MACS[2], &sent),
        2000,
    );
    assert_eq!(outputs(&mut r).len(), 1);
    let back = udp(LOCATOR, CLIENT, 64, b"hello client");
    r.ingress(1, &ip_frame(VM2_MAC, PORT_MACS[1], &back), 3000);
    let out = outputs(&mut r);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, CLIENT_PORT);
    let eth = EthernetFrame::new_checked(&out[0].1[..]).unwrap();
    assert_eq!(eth.dst_addr(), EthernetAddress(CLIENT_MAC));
    // A packet at TTL 1 is not forwarded: time exceeded goes back.
    let dying = udp(CLIENT, LOCATOR, 1, b"x");
    r.ingress(
        CLIENT_PORT,
        &ip_frame(CLIENT_MAC, PORT_MACS[2], &dying),
        4000,
    );
    let out = outputs(&mut r);
    assert_eq!(out.len(), 1);
    let icmp = icmp_of(&out[0].1);
    assert_eq!((icmp.0, icmp.1), (11, 0), "time exceeded");
    assert_eq!(r.counters.ttl_expired, 1);
    // A bad header checksum is dropped and counted, not forwarded.
    let mut bad = sent.clone();
    bad[10] ^= 0xff;
    r.ingress(CLIENT_PORT, &ip_frame(CLIENT_MAC, PORT_MACS[2], &bad), 5000);
    assert!(outputs(&mut r).is_empty());
    assert_eq!(r.counters.malformed, 1);
}

/// (type, code, source, destination, quoted destination) of the ICMP packet
/// in `frame`.
fn icmp_of(frame: &[u8]) -> (u8, u8, Ipv4Addr, Ipv4Addr, Option<Ipv4Addr>) {
    let eth = EthernetFrame::new_checked(frame).unwrap();
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(ip.next_header(), IpProtocol::Icmp);
    let body = ip.payload();
    assert_eq!(internet_checksum(body), 0, "ICMP checksum");
    let quoted = (body.len() >= 28).then(|| Ipv4Addr::new(body[24], body[25], body[26], body[27]));
    (body[0], body[1], ip.src_addr(), ip.dst_addr(), quoted)
}

fn a_locator_without_an_entry_gets_icmp_unreachable() {
    let mut r = router();
    client_knows_router(&mut r);
    let unknown = Ipv4Addr::new(198, 18, 0, 9);
    let sent = udp(CLIENT, unknown, 64, b"anyone?");
    r.ingress(CLIENT_PORT, &ip_frame(CLIENT_MAC, PORT_MACS[2], &sent), 0);
    let out = outputs(&mut r);
    assert_eq!(out.len(), 1, "not silence");
    assert_eq!(out[0].0, CLIENT_PORT);
    let (kind, code, src, dst, quoted) = icmp_of(&out[0].1);
    assert_eq!((kind, code), (3, 1), "host unreachable");
    assert_eq!(src, PORT_ADDRS[CLIENT_PORT]);
    assert_eq!(dst, CLIENT);
    assert_eq!(quoted, Some(unknown));
    // A capsule that stopped (an entry without a care-of address): the same.
    translate(&mut r, unknown, Some(VM1), 3);
    translate(&mut r, unknown, None, 3);
    r.ingress(CLIENT_PORT, &ip_frame(CLIENT_MAC, PORT_MACS[2], &sent), 0);
    let out = outputs(&mut r);
    assert_eq!(out.len(), 1);
    assert_eq!(icmp_of(&out[0].1).0, 3);
    // Outside every subnet and the locator range: network unreachable.
    let far = udp(CLIENT, Ipv4Addr::new(10, 9, 9, 9), 64, b"far");
    r.ingress(CLIENT_PORT, &ip_frame(CLIENT_MAC, PORT_MACS[2], &far), 0);
    let out = outputs(&mut r);
    assert_eq!(out.len(), 1);
    assert_eq!(icmp_of(&out[0].1).0, 3);
    assert_eq!(icmp_of(&out[0].1).1, 0);
    assert_eq!(r.counters.unreachable, 3);
    // No ICMP error about an ICMP error.
    let mut error = vec![3u8, 1, 0, 0, 0, 0, 0, 0];
    error.extend_from_slice(&sent[..28]);
    let sum = internet_checksum(&error);
    error[2..4].copy_from_slice(&sum.to_be_bytes());
    let error = build_ipv4(CLIENT, unknown, IpProtocol::Icmp, &error);
    r.ingress(CLIENT_PORT, &ip_frame(CLIENT_MAC, PORT_MACS[2], &error), 0);
    assert!(outputs(&mut r).is_empty());
}

fn an_older_epoch_is_ignored() {
    let mut r = router();
    assert_eq!(translate(&mut r, LOCATOR, Some(VM1), 5), 0);
    assert_eq!(translate(&mut r, LOCATOR, Some(VM2), 4), 1, "older applied");
    assert_eq!(r.translation(LOCATOR).unwrap().care_of, Some(VM1));
    assert_eq!(translate(&mut r, LOCATOR, Some(VM2), 6), 0);
    assert_eq!(r.translation(LOCATOR).unwrap().care_of, Some(VM2));
    // The stop of the copy at epoch 6, then a late update of epoch 5.
    assert_eq!(translate(&mut r, LOCATOR, None, 6), 0);
    assert_eq!(translate(&mut r, LOCATOR, Some(VM1), 5), 1);
    assert_eq!(r.translation(LOCATOR).unwrap().care_of, None);
    assert_eq!(r.counters.translations_ignored, 2);
    // Outside the locator range: refused.
    assert_eq!(translate(&mut r, VM1, Some(VM2), 1), 1);
    // The whole table: what it does not name goes.
    let other = Ipv4Addr::new(198, 18, 0, 2);
    translate(&mut r, other, Some(VM1), 1);
    assert_eq!(r.translations(), 2);
    r.update(
        true,
        &[Translation {
            locator: other,
            care_of: Some(VM2),
            epoch: 2,
        }],
    );
    assert_eq!(r.translations(), 1);
    assert!(r.translation(LOCATOR).is_none());
    assert_eq!(r.translation(other).unwrap().care_of, Some(VM2));
}

fn echo_is_answered_on_own_addresses() {
    let mut r = router();
    client_knows_router(&mut r);
    for addr in [PORT_ADDRS[CLIENT_PORT], PORT_ADDRS[0]] {
        let ping = echo_request(CLIENT, addr);
        r.ingress(CLIENT_PORT, &ip_frame(CLIENT_MAC, PORT_MACS[2], &ping), 0);
        let out = outputs(&mut r);
        assert_eq!(out.len(), 1, "no echo reply from {addr}");
        let (kind, code, src, dst, _) = icmp_of(&out[0].1);
        assert_eq!((kind, code, src, dst), (0, 0, addr, CLIENT));
    }
    assert_eq!(r.counters.echo_answered, 2);
    // Other traffic for its address on port 0 from port 0 is the control
    // service's; from elsewhere it is not served.
    let tcp = build_ipv4(VM1, PORT_ADDRS[0], IpProtocol::Tcp, &[0u8; 20]);
    r.ingress(0, &ip_frame(VM1_MAC, PORT_MACS[0], &tcp), 0);
    assert_eq!(r.machine_rx.len(), 1);
    let tcp = build_ipv4(CLIENT, PORT_ADDRS[0], IpProtocol::Tcp, &[0u8; 20]);
    r.ingress(CLIENT_PORT, &ip_frame(CLIENT_MAC, PORT_MACS[2], &tcp), 0);
    assert_eq!(r.machine_rx.len(), 1);
    assert_eq!(r.counters.not_served, 1);
}

fn packets_awaiting_arp_are_bounded_and_expire() {
    let mut r = router();
    client_knows_router(&mut r);
    translate(&mut r, LOCATOR, Some(VM2), 1);
    let sent = udp(CLIENT, LOCATOR, 64, b"into the void");
    let frame = ip_frame(CLIENT_MAC, PORT_MACS[2], &sent);
    for _ in 0..MAX_PENDING + 44 {
        r.ingress(CLIENT_PORT, &frame, 0);
    }
    let out = outputs(&mut r);
    assert_eq!(out.len(), 1, "one ARP request, not one per packet");
    assert_eq!(r.pending_count(), MAX_PENDING);
    assert_eq!(r.counters.pending_drops, 44);
    r.expire(4 * SECOND);
    assert_eq!(r.pending_count(), 0);
    assert_eq!(r.counters.arp_timeouts, MAX_PENDING as u64);
    // Hostile input does not panic: truncated and garbage frames.
    for len in 0..frame.len() {
        r.ingress(CLIENT_PORT, &frame[..len], 5 * SECOND);
    }
    r.ingress(7, &frame, 5 * SECOND);
    let _ = outputs(&mut r);
}

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    run(
        "router",
        &[
            Test {
                name: "arp_answered_only_for_own_addresses",
                run: arp_answered_only_for_own_addresses,
            },
            Test {
                name: "forwarding_decrements_ttl_and_updates_the_checksum",
                run: forwarding_decrements_ttl_and_updates_the_checksum,
            },
            Test {
                name: "a_locator_without_an_entry_gets_icmp_unreachable",
                run: a_locator_without_an_entry_gets_icmp_unreachable,
            },
            Test {
                name: "an_older_epoch_is_ignored",
                run: an_older_epoch_is_ignored,
            },
            Test {
                name: "echo_is_answered_on_own_addresses",
                run: echo_is_answered_on_own_addresses,
            },
            Test {
                name: "packets_awaiting_arp_are_bounded_and_expire",
                run: packets_awaiting_arp_are_bounded_and_expire,
            },
        ],
    )
}
