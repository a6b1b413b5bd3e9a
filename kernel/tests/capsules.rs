//! In-kernel tests of capsules: the scheduler (preemption, fairness, sleep,
//! join), arenas and allocation routing, fault containment, and the capsule
//! switch (ARP, demultiplexing, framing, malformed frames). The VM has two
//! NICs on a QEMU-internal hub: NIC 0 carries the capsules, NIC 1 plays a
//! host on the same LAN.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use core::sync::atomic::{AtomicU64, Ordering};

use capsules_kernel::boot::BootInfo;
use capsules_kernel::capsule::api::{self, UdpSocket};
use capsules_kernel::capsule::{self, CapsuleConfig, CapsuleState, Program};
use capsules_kernel::drivers::virtio::net::VirtioNet;
use capsules_kernel::mm::arena;
use capsules_kernel::net::Network;
use capsules_kernel::testing::{Test, run};
use capsules_kernel::{arch, kloop, programs, sched, time};
use capsules_wire::bootcfg::Ipv4Cidr;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, TcpSeqNumber, UdpPacket, UdpRepr,
};
use spin::Mutex;

const MACHINE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);

static COUNTS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static HEAP_ADDR: AtomicU64 = AtomicU64::new(0);
static SLEPT_NS: AtomicU64 = AtomicU64::new(0);

fn counter_index() -> usize {
    api::locator().octets()[3] as usize % 8
}

fn count(_: &[String]) -> Result<(), String> {
    let i = counter_index();
    loop {
        COUNTS[i].fetch_add(1, Ordering::Relaxed);
        core::hint::black_box(&COUNTS);
    }
}

fn two_tasks_count(_: &[String]) -> Result<(), String> {
    let i = counter_index();
    for _ in 0..3 {
        api::spawn("extra", move || {
            loop {
                COUNTS[i].fetch_add(1, Ordering::Relaxed);
            }
        })
        .map_err(String::from)?;
    }
    loop {
        COUNTS[i].fetch_add(1, Ordering::Relaxed);
    }
}

fn allocate(_: &[String]) -> Result<(), String> {
    let data: Vec<u64> = vec![7; 100_000];
    HEAP_ADDR.store(data.as_ptr() as u64, Ordering::Relaxed);
    api::sleep_ms(1_000_000);
    drop(data);
    Ok(())
}

fn sleep_and_join(_: &[String]) -> Result<(), String> {
    let start = time::since_boot_ns();
    let worker = api::spawn("sleeper", || api::sleep_ms(50)).map_err(String::from)?;
    api::join(worker);
    SLEPT_NS.store(time::since_boot_ns() - start, Ordering::Relaxed);
    Ok(())
}

fn udp_echo(_: &[String]) -> Result<(), String> {
    let socket = UdpSocket::bind(5000).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    loop {
        let (n, addr, port) = socket.recv_from(&mut buf).map_err(|e| e.to_string())?;
        buf[..n].reverse();
        socket
            .send_to(&buf[..n], addr, port)
            .map_err(|e| e.to_string())?;
    }
}

/// Port of `listen-late`, which binds it only after a pause.
const LATE_PORT: u16 = 7000;

/// A program slow to reach its `bind`: a client that connects as soon as
/// the capsule exists must not be refused.
fn listen_late(_: &[String]) -> Result<(), String> {
    api::sleep_ms(300);
    let mut listener = api::TcpListener::bind(LATE_PORT).map_err(|e| e.to_string())?;
    let mut stream = listener.accept().map_err(|e| e.to_string())?;
    stream.write_all(b"late\n").map_err(|e| e.to_string())?;
    loop {
        api::sleep_ms(1000);
    }
}

/// Nine tasks, each parked on its own UDP port (5000 echoes, 5001..5008
/// only count what they get).
fn udp_many(_: &[String]) -> Result<(), String> {
    for port in 5001..5009u16 {
        api::spawn("listener", move || {
            let socket = UdpSocket::bind(port).expect("bind");
            let mut buf = [0u8; 64];
            while socket.recv_from(&mut buf).is_ok() {
                COUNTS[(port - 5000) as usize % 8].fetch_add(1, Ordering::Relaxed);
            }
        })
        .map_err(String::from)?;
    }
    udp_echo(&[])
}

/// Damages its own heap's free list, as writes after free would, then calls
/// the allocator, which dies inside while it holds the arena's lock: with
/// `fault`, a large allocation follows the damaged links into unmapped
/// memory (a page fault); with `panic`, freeing a block next to a damaged
/// node trips the allocator's own consistency check (a panic).
fn die_inside_the_allocator(args: &[String]) -> Result<(), String> {
    let blocks: Vec<*mut [u64; 8]> = (0..16)
        .map(|_| alloc::boxed::Box::into_raw(alloc::boxed::Box::new([0u64; 8])))
        .collect();
    let slot = arena::slot_of(blocks[0] as u64).ok_or("block outside the arena")?;
    // Far beyond what the arena has mapped.
    let unmapped = arena::window_base(slot) + (512 << 20);
    let free = |block: *mut [u64; 8]| {
        // SAFETY: the block came from `Box::into_raw` and is freed once.
        drop(unsafe { alloc::boxed::Box::from_raw(block) })
    };
    let damage = |block: *mut [u64; 8]| {
        // SAFETY: deliberately unsound (a write after free): the freed block
        // now holds a node of the free list, whose size and link this
        // overwrites with an unmapped address.
        unsafe {
            let words = block.cast::<u64>();
            words.write_volatile(unmapped);
            words.add(1).write_volatile(unmapped);
        }
    };
    match args.first().map(String::as_str) {
        Some("fault") => {
            // Every other block, so each freed one is a node of its own.
            blocks.iter().step_by(2).for_each(|b| free(*b));
            blocks.iter().step_by(2).for_each(|b| damage(*b));
            let big: Vec<u8> = Vec::with_capacity(4 << 20);
            core::hint::black_box(&big);
        }
        Some("panic") => {
            free(blocks[0]);
            damage(blocks[0]);
            free(blocks[2]);
        }
        _ => return Err("usage: fault|panic".into()),
    }
    Err("the damaged allocator went on".into())
}

/// Puts a socket handle where the kernel loop finds it (`target`): among
/// the closing TCP streams, or as what this task waits on — as damaged
/// capsule memory would. The handle names its UDP socket, not a TCP one.
fn plant_bad_socket_handle(args: &[String]) -> Result<(), String> {
    let _udp = UdpSocket::bind(7000).map_err(|e| e.to_string())?;
    let slot = arena::domain().ok_or("not in a capsule")?;
    let root = arena::root(slot).ok_or("no root")? as *mut capsule::CapsuleRoot;
    let handle = smoltcp::iface::SocketHandle::default();
    let guard = sched::preempt_disable();
    // SAFETY: deliberately damages this capsule's own state; preemption is
    // off, so the kernel loop does not read it meanwhile.
    let root = unsafe { &mut *root };
    match args.first().map(String::as_str) {
        Some("closing") => {
            root.closing.push(handle);
            drop(guard);
            // Changes socket state, so the kernel loop polls the stack.
            let _other = UdpSocket::bind(7001).map_err(|e| e.to_string())?;
            api::sleep_ms(1_000_000);
        }
        Some("waiting") => {
            // SAFETY: the running task's control block is live while it runs.
            let id = unsafe { (*sched::current_task().ok_or("no task")?).id };
            root.net_waits
                .insert(id, (handle, capsule::NetWant::TcpReadable));
            drop(guard);
            sched::block(sched::TaskState::WaitingNet { seen: u64::MAX });
        }
        _ => return Err("usage: closing|waiting".into()),
    }
    Err("the bad handle went unnoticed".into())
}

static PROGRAMS: &[Program] = &[
    Program {
        name: "count",
        description: "",
        main: count,
    },
    Program {
        name: "count4",
        description: "",
        main: two_tasks_count,
    },
    Program {
        name: "allocate",
        description: "",
        main: allocate,
    },
    Program {
        name: "sleep-join",
        description: "",
        main: sleep_and_join,
    },
    Program {
        name: "udp-echo",
        description: "",
        main: udp_echo,
    },
    Program {
        name: "udp-many",
        description: "",
        main: udp_many,
    },
    Program {
        name: "listen-late",
        description: "",
        main: listen_late,
    },
    Program {
        name: "crash-panic",
        description: "",
        main: programs::faults::panic_after,
    },
    Program {
        name: "crash-divide",
        description: "",
        main: programs::faults::divide_by_zero_after,
    },
    Program {
        name: "crash-pagefault",
        description: "",
        main: programs::faults::touch_unmapped_after,
    },
    Program {
        name: "crash-in-alloc",
        description: "",
        main: die_inside_the_allocator,
    },
    Program {
        name: "bad-handle",
        description: "",
        main: plant_bad_socket_handle,
    },
];

struct Lab {
    net: Network,
    peer: VirtioNet,
}

static LAB: Mutex<Option<Lab>> = Mutex::new(None);

fn with_lab<R>(f: impl FnOnce(&mut Lab) -> R) -> R {
    f(LAB.lock().as_mut().expect("lab set up"))
}

fn start(lab: &mut Lab, name: &str, program: &str, last_octet: u8, slot: u32) {
    start_with(lab, name, program, &[], last_octet, slot);
}

fn start_with(lab: &mut Lab, name: &str, program: &str, args: &[&str], last_octet: u8, slot: u32) {
    capsule::start(
        CapsuleConfig {
            name: name.to_string(),
            program: program.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            locator: Ipv4Addr::new(198, 18, 0, last_octet),
            slot,
            memory_limit: 16 << 20,
            epoch: 1,
        },
        &mut lab.net,
    )
    .unwrap_or_else(|e| panic!("start {name}: {e}"));
}

fn state_of(name: &str) -> CapsuleState {
    capsule::list()
        .into_iter()
        .find(|c| c.name == name)
        .map(|c| c.state)
        .expect("capsule listed")
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

fn preemption_shares_the_cpu_fairly_between_capsules() {
    with_lab(|lab| {
        // One capsule with one task, one with four: fairness is per capsule.
        start(lab, "one", "count", 1, 1);
        start(lab, "four", "count4", 2, 2);
        kloop::run_for(&mut lab.net, None, 400_000_000);
        let (a, b) = (
            COUNTS[1].load(Ordering::Relaxed),
            COUNTS[2].load(Ordering::Relaxed),
        );
        assert!(a > 0 && b > 0, "a capsule starved: {a} vs {b}");
        let ratio = a as f64 / b as f64;
        assert!((0.5..2.0).contains(&ratio), "unfair: {a} vs {b}");
        let tasks: Vec<u32> = capsule::list().iter().map(|c| c.tasks).collect();
        assert_eq!(tasks, [1, 4]);
        capsule::kill("one", &mut lab.net).unwrap();
        capsule::kill("four", &mut lab.net).unwrap();
        assert!(capsule::list().is_empty());
        let before = COUNTS[1].load(Ordering::Relaxed);
        kloop::run_for(&mut lab.net, None, 50_000_000);
        assert_eq!(
            COUNTS[1].load(Ordering::Relaxed),
            before,
            "a killed capsule still runs"
        );
    });
}

fn allocations_land_in_the_capsule_arena() {
    with_lab(|lab| {
        start(lab, "alloc", "allocate", 3, 3);
        kloop::run_for(&mut lab.net, None, 50_000_000);
        let addr = HEAP_ADDR.load(Ordering::Relaxed);
        assert_eq!(
            arena::slot_of(addr),
            Some(3),
            "capsule data at {addr:#x} is not in its window"
        );
        let (mapped, used, limit) = arena::usage(3).expect("arena exists");
        assert!(used >= 800_000 && mapped >= used && limit == 16 << 20);
        // Kernel allocations stay out of arenas.
        let kernel_box = alloc::boxed::Box::new(5u64);
        assert_eq!(arena::slot_of(&*kernel_box as *const u64 as u64), None);
        capsule::kill("alloc", &mut lab.net).unwrap();
        assert!(arena::usage(3).is_none(), "arena survived its capsule");
    });
}

fn sleep_and_join_work() {
    with_lab(|lab| {
        start(lab, "sleeper", "sleep-join", 4, 4);
        kloop::run_for(&mut lab.net, None, 200_000_000);
        let slept = SLEPT_NS.load(Ordering::Relaxed);
        assert!(
            (50_000_000..150_000_000).contains(&slept),
            "slept {slept} ns for 50 ms"
        );
        assert_eq!(state_of("sleeper"), CapsuleState::Exited);
        capsule::kill("sleeper", &mut lab.net).unwrap();
    });
}

fn faults_end_only_their_capsule() {
    with_lab(|lab| {
        start(lab, "neighbour", "count", 5, 5);
        start(lab, "panics", "crash-panic", 6, 6);
        start(lab, "divides", "crash-divide", 7, 7);
        start(lab, "touches", "crash-pagefault", 8, 8);
        kloop::run_for(&mut lab.net, None, 200_000_000);
        for (name, slot, why) in [
            ("panics", 6, "panic"),
            ("divides", 7, "CPU exception"),
            ("touches", 8, "CPU exception"),
        ] {
            match state_of(name) {
                CapsuleState::Faulted(reason) => {
                    assert!(reason.starts_with(why), "{name}: {reason}")
                }
                other => panic!("{name} is {other:?}"),
            }
            assert!(
                arena::usage(slot).is_none(),
                "{name}'s memory was not freed"
            );
            let (log, _) = capsule::read_log(name, 0, 4096).unwrap();
            assert!(
                core::str::from_utf8(&log).unwrap().contains("ended by"),
                "{name} log lacks the reason"
            );
        }
        let (log, _) = capsule::read_log("divides", 0, 4096).unwrap();
        assert!(core::str::from_utf8(&log).unwrap().contains("divide error"));
        let (log, _) = capsule::read_log("touches", 0, 4096).unwrap();
        assert!(
            core::str::from_utf8(&log)
                .unwrap()
                .contains("0x00007fffdead0000")
        );
        let before = COUNTS[5].load(Ordering::Relaxed);
        kloop::run_for(&mut lab.net, None, 50_000_000);
        assert!(
            COUNTS[5].load(Ordering::Relaxed) > before,
            "the neighbour stopped"
        );
        assert_eq!(state_of("neighbour"), CapsuleState::Running);
        for name in ["neighbour", "panics", "divides", "touches"] {
            capsule::kill(name, &mut lab.net).unwrap();
        }
    });
}

/// A capsule that dies inside its own allocator (so the arena's lock stays
/// held by a task that never runs again) ends alone: reporting its death and
/// freeing its arena must not wait for that lock.
fn dying_inside_the_allocator_ends_only_its_capsule() {
    with_lab(|lab| {
        start(lab, "steady", "count", 9, 9);
        start_with(lab, "faults", "crash-in-alloc", &["fault"], 10, 10);
        start_with(lab, "panics", "crash-in-alloc", &["panic"], 13, 13);
        kloop::run_for(&mut lab.net, None, 200_000_000);
        for (name, slot, why, detail) in [
            ("faults", 10, "CPU exception", "page fault"),
            ("panics", 13, "panic", "linked_list_allocator"),
        ] {
            match state_of(name) {
                CapsuleState::Faulted(reason) => {
                    assert!(reason.starts_with(why), "{name}: {reason}")
                }
                other => panic!("{name} is {other:?}"),
            }
            let (log, _) = capsule::read_log(name, 0, 4096).unwrap();
            let log = core::str::from_utf8(&log).unwrap();
            assert!(log.contains(detail), "{name}'s log: {log}");
            assert!(arena::usage(slot).is_none(), "{name}'s arena was not freed");
        }
        let before = COUNTS[9 % 8].load(Ordering::Relaxed);
        kloop::run_for(&mut lab.net, None, 50_000_000);
        assert!(
            COUNTS[9 % 8].load(Ordering::Relaxed) > before,
            "the neighbour stopped"
        );
        // The window is whole again: a new capsule there allocates normally.
        capsule::kill("faults", &mut lab.net).unwrap();
        capsule::kill("panics", &mut lab.net).unwrap();
        start(lab, "after", "allocate", 10, 10);
        kloop::run_for(&mut lab.net, None, 50_000_000);
        assert_eq!(state_of("after"), CapsuleState::Running);
        let (_, used, _) = arena::usage(10).expect("new arena");
        assert!(
            used >= 800_000,
            "the new capsule allocated only {used} bytes"
        );
        for name in ["steady", "after"] {
            capsule::kill(name, &mut lab.net).unwrap();
        }
    });
}

/// The kernel loop reads socket handles from capsule memory (closing streams,
/// what parked tasks wait on). A bad one ends that capsule with a reason; the
/// kernel and the other capsules go on.
fn a_bad_socket_handle_ends_only_its_capsule() {
    with_lab(|lab| {
        start(lab, "steady", "count", 9, 9);
        start_with(lab, "bad-close", "bad-handle", &["closing"], 11, 11);
        start_with(lab, "bad-wait", "bad-handle", &["waiting"], 12, 12);
        kloop::run_for(&mut lab.net, None, 200_000_000);
        for (name, slot, what) in [
            ("bad-close", 11, "closing streams"),
            ("bad-wait", 12, "waits on (TcpReadable)"),
        ] {
            match state_of(name) {
                CapsuleState::Faulted(reason) => assert!(
                    reason.contains("bad socket handle #0") && reason.contains(what),
                    "{name}: {reason}"
                ),
                other => panic!("{name} is {other:?}"),
            }
            let (log, _) = capsule::read_log(name, 0, 4096).unwrap();
            assert!(
                core::str::from_utf8(&log)
                    .unwrap()
                    .contains("ended by bad state"),
                "{name}'s log lacks the reason"
            );
            assert!(arena::usage(slot).is_none(), "{name}'s arena was not freed");
        }
        let before = COUNTS[9 % 8].load(Ordering::Relaxed);
        kloop::run_for(&mut lab.net, None, 50_000_000);
        assert!(
            COUNTS[9 % 8].load(Ordering::Relaxed) > before,
            "the neighbour stopped"
        );
        for name in ["steady", "bad-close", "bad-wait"] {
            capsule::kill(name, &mut lab.net).unwrap();
        }
    });
}

fn send_frame(peer: &mut VirtioNet, frame: &[u8]) {
    peer.transmit(frame.len(), |buf| buf.copy_from_slice(frame))
        .expect("peer transmit");
}

/// Frames the peer receives within `ms`, besides its own broadcasts.
fn peer_frames(lab: &mut Lab, ms: u64) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let end = time::since_boot_ns() + ms * 1_000_000;
    while time::since_boot_ns() < end {
        kloop::step(&mut lab.net, None);
        while let Some(f) = lab.peer.receive(|f| f.to_vec()) {
            got.push(f);
        }
        kloop::idle(&lab.net);
    }
    got
}

fn arp_request(peer_mac: [u8; 6], target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(peer_mac),
        source_protocol_addr: PEER,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut frame = vec![0u8; 14 + repr.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame);
    EthernetRepr {
        src_addr: EthernetAddress(peer_mac),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut eth);
    repr.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
    frame
}

fn arp_replies_for(frames: &[Vec<u8>], ip: Ipv4Addr) -> Vec<EthernetAddress> {
    frames
        .iter()
        .filter_map(|f| {
            let eth = EthernetFrame::new_checked(f).ok()?;
            if eth.ethertype() != EthernetProtocol::Arp {
                return None;
            }
            match ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()? {
                ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Reply,
                    source_protocol_addr,
                    source_hardware_addr,
                    ..
                } if source_protocol_addr == ip => Some(source_hardware_addr),
                _ => None,
            }
        })
        .collect()
}

fn switch_answers_arp_only_for_resident_locators() {
    with_lab(|lab| {
        start(lab, "udp", "udp-echo", 20, 20);
        let _ = peer_frames(lab, 50); // the capsule's gratuitous ARP
        let peer_mac = lab.peer.mac();
        let locator = Ipv4Addr::new(198, 18, 0, 20);
        send_frame(&mut lab.peer, &arp_request(peer_mac, locator));
        send_frame(
            &mut lab.peer,
            &arp_request(peer_mac, Ipv4Addr::new(198, 18, 0, 21)),
        );
        send_frame(&mut lab.peer, &arp_request(peer_mac, MACHINE));
        let frames = peer_frames(lab, 100);
        let vm_mac = EthernetAddress(lab.net.nic.mac());
        assert_eq!(arp_replies_for(&frames, locator), [vm_mac], "locator ARP");
        assert!(
            arp_replies_for(&frames, Ipv4Addr::new(198, 18, 0, 21)).is_empty(),
            "answered for a stranger"
        );
        assert_eq!(
            arp_replies_for(&frames, MACHINE),
            [vm_mac],
            "machine ARP (smoltcp)"
        );
    });
}

fn udp_frame(peer_mac: [u8; 6], vm_mac: [u8; 6], dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: 4000,
        dst_port: 5000,
    };
    let ip = Ipv4Repr {
        src_addr: PEER,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    let mut frame = vec![0u8; 14 + ip.buffer_len() + udp.header_len() + payload.len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame);
    EthernetRepr {
        src_addr: EthernetAddress(peer_mac),
        dst_addr: EthernetAddress(vm_mac),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let mut ipp = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip.emit(&mut ipp, &smoltcp::phy::ChecksumCapabilities::default());
    let mut udpp = UdpPacket::new_unchecked(ipp.payload_mut());
    udp.emit(
        &mut udpp,
        &PEER.into(),
        &dst.into(),
        payload.len(),
        |buf| buf.copy_from_slice(payload),
        &smoltcp::phy::ChecksumCapabilities::default(),
    );
    frame
}

fn tcp_syn(peer_mac: [u8; 6], vm_mac: [u8; 6], dst: Ipv4Addr, dst_port: u16) -> Vec<u8> {
    const TCP_HEADER: usize = 20;
    let ip = Ipv4Repr {
        src_addr: PEER,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: TCP_HEADER,
        hop_limit: 64,
    };
    let mut frame = vec![0u8; 14 + ip.buffer_len() + TCP_HEADER];
    let mut eth = EthernetFrame::new_unchecked(&mut frame);
    EthernetRepr {
        src_addr: EthernetAddress(peer_mac),
        dst_addr: EthernetAddress(vm_mac),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let mut ipp = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip.emit(&mut ipp, &smoltcp::phy::ChecksumCapabilities::default());
    let mut tcp = TcpPacket::new_unchecked(ipp.payload_mut());
    tcp.set_src_port(40000);
    tcp.set_dst_port(dst_port);
    tcp.set_seq_number(TcpSeqNumber(1000));
    tcp.set_header_len(TCP_HEADER as u8);
    tcp.clear_flags();
    tcp.set_syn(true);
    tcp.set_window_len(8192);
    tcp.fill_checksum(&PEER.into(), &dst.into());
    frame
}

/// (SYN, ACK, RST) of every TCP segment from `src`.
fn tcp_flags_from(frames: &[Vec<u8>], src: Ipv4Addr) -> Vec<(bool, bool, bool)> {
    frames
        .iter()
        .filter_map(|f| {
            let eth = EthernetFrame::new_checked(f).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Tcp || ip.src_addr() != src {
                return None;
            }
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            Some((tcp.syn(), tcp.ack(), tcp.rst()))
        })
        .collect()
}

fn udp_payloads(frames: &[Vec<u8>]) -> Vec<(Ipv4Addr, Vec<u8>)> {
    frames
        .iter()
        .filter_map(|f| {
            let eth = EthernetFrame::new_checked(f).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Udp {
                return None;
            }
            let udp = UdpPacket::new_checked(ip.payload()).ok()?;
            Some((ip.src_addr(), udp.payload().to_vec()))
        })
        .collect()
}

/// A datagram for one of nine parked tasks wakes that task only: the others
/// stay parked (a woken task dirties its stack, which a pre-copy must then
/// send again, and costs a switch).
fn a_packet_wakes_only_the_task_waiting_for_it() {
    with_lab(|lab| {
        // Alone on the CPU, so the switch counter counts only this capsule.
        for c in capsule::list() {
            capsule::kill(&c.name, &mut lab.net).unwrap();
        }
        start(lab, "many", "udp-many", 21, 21);
        let _ = peer_frames(lab, 300);
        let quiet = sched::switch_count();
        let _ = peer_frames(lab, 100);
        assert_eq!(
            sched::switch_count(),
            quiet,
            "parked tasks ran without a packet"
        );
        let (peer_mac, vm_mac) = (lab.peer.mac(), lab.net.nic.mac());
        let locator = Ipv4Addr::new(198, 18, 0, 21);
        for _ in 0..5 {
            send_frame(
                &mut lab.peer,
                &udp_frame(peer_mac, vm_mac, locator, b"ping"),
            );
        }
        let replies = udp_payloads(&peer_frames(lab, 300));
        assert_eq!(replies.len(), 5, "echo replies: {replies:?}");
        let switches = sched::switch_count() - quiet;
        log::info!("{switches} switches for 5 datagrams");
        // At most five times the echo task in and out (fewer when one wake
        // takes several datagrams); waking all nine tasks costs 18 per round.
        assert!(
            switches <= 12,
            "{switches} task switches for 5 datagrams to one of 9 parked tasks"
        );
        capsule::kill("many", &mut lab.net).unwrap();
    });
}

fn switch_delivers_to_the_capsule_and_frames_its_reply() {
    with_lab(|lab| {
        let (peer_mac, vm_mac) = (lab.peer.mac(), lab.net.nic.mac());
        let locator = Ipv4Addr::new(198, 18, 0, 20);
        send_frame(
            &mut lab.peer,
            &udp_frame(peer_mac, vm_mac, locator, b"hello capsule"),
        );
        let frames = peer_frames(lab, 200);
        let replies = udp_payloads(&frames);
        assert_eq!(
            replies,
            [(locator, b"eluspac olleh".to_vec())],
            "capsule reply"
        );
        // To the machine address: not the capsule's business.
        send_frame(
            &mut lab.peer,
            &udp_frame(peer_mac, vm_mac, MACHINE, b"for the machine"),
        );
        let frames = peer_frames(lab, 100);
        assert!(udp_payloads(&frames).is_empty());
    });
}

/// `capsulectl run` answers once the capsule exists, before its program
/// has run: a connection request arriving before the program's `bind` is
/// held until it binds, not refused.
fn a_connection_before_the_program_listens_is_not_refused() {
    with_lab(|lab| {
        let (peer_mac, vm_mac) = (lab.peer.mac(), lab.net.nic.mac());
        let locator = Ipv4Addr::new(198, 18, 0, 22);
        start(lab, "late", "listen-late", 22, 22);
        send_frame(
            &mut lab.peer,
            &tcp_syn(peer_mac, vm_mac, locator, LATE_PORT),
        );
        let segments = tcp_flags_from(&peer_frames(lab, 1000), locator);
        assert!(
            !segments.iter().any(|&(_, _, rst)| rst),
            "the early SYN was reset: {segments:?}"
        );
        assert!(
            segments.contains(&(true, true, false)),
            "no SYN-ACK once the program listened: {segments:?}"
        );
        capsule::kill("late", &mut lab.net).unwrap();
    });
}

fn malformed_frames_are_dropped_and_counted() {
    with_lab(|lab| {
        let (peer_mac, vm_mac) = (lab.peer.mac(), lab.net.nic.mac());
        let locator = Ipv4Addr::new(198, 18, 0, 20);
        let before = lab.net.switch.counters;
        let good = udp_frame(peer_mac, vm_mac, locator, b"abc");
        // Truncated IPv4 header.
        send_frame(&mut lab.peer, &good[..14 + 12]);
        // Bad IPv4 header checksum.
        let mut bad_sum = good.clone();
        bad_sum[14 + 10] ^= 0xff;
        send_frame(&mut lab.peer, &bad_sum);
        // IPv4 total length larger than the frame.
        let mut long = good.clone();
        long[14 + 2] = 0x0f;
        send_frame(&mut lab.peer, &long);
        // Truncated ARP.
        let arp = arp_request(peer_mac, locator);
        send_frame(&mut lab.peer, &arp[..20]);
        let frames = peer_frames(lab, 200);
        assert!(
            udp_payloads(&frames).is_empty(),
            "a malformed packet got an answer"
        );
        let after = lab.net.switch.counters;
        assert_eq!(
            after.malformed - before.malformed,
            4,
            "malformed frames counted"
        );
        // The capsule is unharmed and still answers.
        send_frame(&mut lab.peer, &good);
        let frames = peer_frames(lab, 200);
        assert_eq!(udp_payloads(&frames).len(), 1);
        capsule::kill("udp", &mut lab.net).unwrap();
    });
}

fn limits_and_bad_requests_are_refused() {
    with_lab(|lab| {
        let base = CapsuleConfig {
            name: "x".to_string(),
            program: "count".to_string(),
            args: Vec::new(),
            locator: Ipv4Addr::new(198, 18, 0, 30),
            slot: 30,
            memory_limit: 16 << 20,
            epoch: 1,
        };
        let with = |f: fn(&mut CapsuleConfig)| {
            let mut c = CapsuleConfig {
                name: base.name.clone(),
                program: base.program.clone(),
                args: Vec::new(),
                ..base
            };
            f(&mut c);
            c
        };
        assert!(matches!(
            capsule::start(with(|c| c.program = "nope".to_string()), &mut lab.net),
            Err(capsule::CapsuleError::UnknownProgram(_))
        ));
        assert!(matches!(
            capsule::start(with(|c| c.name = "bad name".to_string()), &mut lab.net),
            Err(capsule::CapsuleError::BadName)
        ));
        assert!(matches!(
            capsule::start(with(|c| c.slot = 1 << 20), &mut lab.net),
            Err(capsule::CapsuleError::LimitReached(_))
        ));
        assert!(matches!(
            capsule::start(with(|c| c.locator = MACHINE), &mut lab.net),
            Err(capsule::CapsuleError::LocatorTaken(_))
        ));
        // smoltcp would take these, then panic in the kernel loop.
        for bad in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(0, 1, 2, 3),
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::new(239, 255, 0, 7),
            Ipv4Addr::new(240, 0, 0, 1),
            Ipv4Addr::LOCALHOST,
        ] {
            let mut config = with(|_| {});
            config.locator = bad;
            assert_eq!(
                capsule::start(config, &mut lab.net).err(),
                Some(capsule::CapsuleError::BadLocator(bad)),
                "locator {bad}"
            );
        }
        assert!(
            capsule::list().is_empty(),
            "a refused locator left a capsule"
        );
        kloop::run_for(&mut lab.net, None, 20_000_000);
        capsule::start(with(|_| {}), &mut lab.net).unwrap();
        assert!(matches!(
            capsule::start(with(|c| c.slot = 31), &mut lab.net),
            Err(capsule::CapsuleError::NameTaken(_))
        ));
        assert!(matches!(
            capsule::start(with(|c| c.name = "y".to_string()), &mut lab.net),
            Err(capsule::CapsuleError::LocatorTaken(_))
        ));
        assert!(matches!(
            capsule::kill("missing", &mut lab.net),
            Err(capsule::CapsuleError::NotFound(_))
        ));
        assert_eq!(
            capsule::list().len(),
            1,
            "a refused start left something behind"
        );
        capsule::kill("x", &mut lab.net).unwrap();
    });
}

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    setup();
    run(
        "capsules",
        &[
            Test {
                name: "preemption_shares_the_cpu_fairly_between_capsules",
                run: preemption_shares_the_cpu_fairly_between_capsules,
            },
            Test {
                name: "allocations_land_in_the_capsule_arena",
                run: allocations_land_in_the_capsule_arena,
            },
            Test {
                name: "sleep_and_join_work",
                run: sleep_and_join_work,
            },
            Test {
                name: "faults_end_only_their_capsule",
                run: faults_end_only_their_capsule,
            },
            Test {
                name: "dying_inside_the_allocator_ends_only_its_capsule",
                run: dying_inside_the_allocator_ends_only_its_capsule,
            },
            Test {
                name: "a_bad_socket_handle_ends_only_its_capsule",
                run: a_bad_socket_handle_ends_only_its_capsule,
            },
            Test {
                name: "switch_answers_arp_only_for_resident_locators",
                run: switch_answers_arp_only_for_resident_locators,
            },
            Test {
                name: "switch_delivers_to_the_capsule_and_frames_its_reply",
                run: switch_delivers_to_the_capsule_and_frames_its_reply,
            },
            Test {
                name: "a_connection_before_the_program_listens_is_not_refused",
                run: a_connection_before_the_program_listens_is_not_refused,
            },
            Test {
                name: "malformed_frames_are_dropped_and_counted",
                run: malformed_frames_are_dropped_and_counted,
            },
            Test {
                name: "a_packet_wakes_only_the_task_waiting_for_it",
                run: a_packet_wakes_only_the_task_waiting_for_it,
            },
            Test {
                name: "limits_and_bad_requests_are_refused",
                run: limits_and_bad_requests_are_refused,
            },
        ],
    )
}
