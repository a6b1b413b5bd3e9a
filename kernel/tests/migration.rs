//! In-kernel tests of freezing, serialising and reviving a capsule: the
//! image carries the whole arena (tasks, heap, stacks), the clock continues,
//! and bad images are refused before anything is mapped.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use core::sync::atomic::{AtomicU64, Ordering};

use capsules_kernel::boot::BootInfo;
use capsules_kernel::capsule::migrate::{self, RestoreError};
use capsules_kernel::capsule::{self, CapsuleConfig, CapsuleState, Program, api};
use capsules_kernel::drivers::virtio::net::VirtioNet;
use capsules_kernel::mm::arena;
use capsules_kernel::net::Network;
use capsules_kernel::testing::{Test, run};
use capsules_kernel::{arch, kloop};
use capsules_wire::bootcfg::Ipv4Cidr;
use capsules_wire::control::{MAX_BATCH_PAGES, PageBatch};
use capsules_wire::image::{CapsuleImage, ImageError, ImageKind};
use spin::Mutex;

const KEY: &[u8] = &[0x11; 32];
/// Published by the capsule: its own count, kept on its stack and heap.
static PUBLISHED: AtomicU64 = AtomicU64::new(0);
static CLOCK_MS: AtomicU64 = AtomicU64::new(0);

/// The count at which the capsule found its heap no longer matching its
/// stack; 0 while they match. The capsule only reports it: an assertion in
/// the capsule would end the capsule alone (fault containment), which no test
/// would notice. The kernel side asserts, in [`assert_counter_healthy`].
static DAMAGED_AT: AtomicU64 = AtomicU64::new(0);

/// Counts, keeping the latest counts in a heap-allocated vector (so the heap
/// must travel) and checking it against the count on its stack, publishing
/// the count, and remembers the capsule clock.
fn counter(_: &[String]) -> Result<(), String> {
    let mut history: Vec<u64> = Vec::new();
    let mut count: u64 = 0;
    loop {
        count += 1;
        history.push(count);
        if history.len() > 1000 {
            history.drain(..500);
        }
        // The history must be the latest counts, one after another.
        let first = count + 1 - history.len() as u64;
        let intact = history.iter().zip(first..).all(|(h, want)| *h == want);
        if !intact && DAMAGED_AT.load(Ordering::Relaxed) == 0 {
            DAMAGED_AT.store(count, Ordering::Relaxed);
        }
        PUBLISHED.store(count, Ordering::Relaxed);
        CLOCK_MS.store(api::uptime_ms(), Ordering::Relaxed);
        api::sleep_ms(1);
    }
}

/// Asserted from the kernel side: the counter capsule `name` is running, its
/// count still goes on, and it never found its heap changed under it.
fn assert_counter_healthy(net: &mut Network, name: &str) {
    assert_eq!(
        state_of(name),
        Some(CapsuleState::Running),
        "{name} does not run"
    );
    let before = PUBLISHED.load(Ordering::Relaxed);
    kloop::run_for(net, None, 50_000_000);
    assert!(
        PUBLISHED.load(Ordering::Relaxed) > before,
        "{name} stopped counting at {before}"
    );
    assert_eq!(
        state_of(name),
        Some(CapsuleState::Running),
        "{name} ended while counting"
    );
    assert_eq!(
        DAMAGED_AT.load(Ordering::Relaxed),
        0,
        "{name}'s heap no longer matched its count"
    );
}

static ASKED: AtomicU64 = AtomicU64::new(0);

/// Asks the kernel who and where it is, as fast as it can: most of its time
/// is spent inside capsule API calls, so a freeze usually finds it there.
fn asker(_: &[String]) -> Result<(), String> {
    loop {
        let vm = api::vm_name();
        let name = api::name();
        core::hint::black_box((vm, name, api::locator(), api::now_ns()));
        ASKED.fetch_add(1, Ordering::Relaxed);
    }
}

static PROGRAMS: &[Program] = &[
    Program {
        name: "counter",
        description: "",
        main: counter,
    },
    Program {
        name: "asker",
        description: "",
        main: asker,
    },
];
static NET: Mutex<Option<Network>> = Mutex::new(None);

fn with_net<R>(f: impl FnOnce(&mut Network) -> R) -> R {
    f(NET.lock().as_mut().expect("network up"))
}

fn setup() {
    arch::enable_interrupts();
    let nic = VirtioNet::init(0, true).expect("NIC 0");
    let net = Network::new(
        nic,
        Ipv4Cidr {
            addr: Ipv4Addr::new(192, 0, 2, 10),
            prefix: 24,
        },
        None,
        Ipv4Cidr {
            addr: Ipv4Addr::new(198, 18, 0, 0),
            prefix: 16,
        },
    );
    capsule::init(PROGRAMS, "test-vm");
    *NET.lock() = Some(net);
}

fn state_of(name: &str) -> Option<CapsuleState> {
    capsule::list()
        .into_iter()
        .find(|c| c.name == name)
        .map(|c| c.state)
}

static IMAGE: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn freeze_stops_the_capsule_and_thaw_resumes_it() {
    with_net(|net| {
        capsule::start(
            CapsuleConfig {
                name: "c".to_string(),
                program: "counter".to_string(),
                args: Vec::new(),
                locator: Ipv4Addr::new(198, 18, 0, 42),
                slot: 42,
                memory_limit: 8 << 20,
                epoch: 1,
            },
            net,
        )
        .unwrap();
        kloop::run_for(net, None, 100_000_000);
        assert!(
            PUBLISHED.load(Ordering::Relaxed) > 5,
            "the capsule did not run"
        );
        let image = migrate::freeze("c", KEY, net).unwrap();
        assert_eq!(state_of("c"), Some(CapsuleState::Frozen));
        let at_freeze = PUBLISHED.load(Ordering::Relaxed);
        kloop::run_for(net, None, 50_000_000);
        assert_eq!(
            PUBLISHED.load(Ordering::Relaxed),
            at_freeze,
            "a frozen capsule ran"
        );
        // A second freeze of a frozen capsule is refused.
        assert!(migrate::freeze("c", KEY, net).is_err());
        // At epoch 2 from here: its images restore above it, at 3.
        migrate::thaw("c", 2, net).unwrap();
        kloop::run_for(net, None, 50_000_000);
        assert!(
            PUBLISHED.load(Ordering::Relaxed) > at_freeze,
            "thawed capsule did not resume"
        );
        assert_counter_healthy(net, "c");
        drop(image);
    });
}

/// A capsule is frozen wherever its task was switched out and then ends on
/// this VM (it moved away). Nothing it was in the middle of may stay locked:
/// the kernel, and the next capsule to arrive, read the same state.
fn a_capsule_stopped_inside_api_calls_leaves_no_kernel_state_locked() {
    with_net(|net| {
        for round in 0..40u64 {
            capsule::start(
                CapsuleConfig {
                    name: "asker".to_string(),
                    program: "asker".to_string(),
                    args: Vec::new(),
                    locator: Ipv4Addr::new(198, 18, 0, 50),
                    slot: 50,
                    memory_limit: 8 << 20,
                    epoch: 1,
                },
                net,
            )
            .unwrap();
            // A different stopping point every round.
            kloop::run_for(net, None, 15_000_000 + round * 731_000);
            migrate::freeze("asker", KEY, net).unwrap();
            capsule::kill("asker", net).unwrap();
            // Would spin for ever if the task had died holding a lock.
            assert_eq!(capsule::vm_name(), "test-vm");
            assert!(capsule::programs().iter().any(|p| p.name == "asker"));
        }
        assert!(
            ASKED.load(Ordering::Relaxed) > 40,
            "the asker hardly ran: {}",
            ASKED.load(Ordering::Relaxed)
        );
    });
}

fn image_carries_the_whole_capsule() {
    with_net(|net| {
        assert_counter_healthy(net, "c");
        let image = migrate::freeze("c", KEY, net).unwrap();
        let decoded = CapsuleImage::decode(&image, KEY).unwrap();
        assert_eq!(
            (
                decoded.name.as_str(),
                decoded.program.as_str(),
                decoded.slot
            ),
            ("c", "counter", 42)
        );
        assert_eq!(decoded.locator, Ipv4Addr::new(198, 18, 0, 42));
        let (mapped, _, _) = arena::usage(42).unwrap();
        assert_eq!(decoded.arena_len, mapped);
        let carried: usize = decoded.segments.iter().map(|s| s.data.len()).sum();
        assert!((carried as u64) < mapped, "zero pages were not skipped");
        assert_eq!(decoded.tasks.len(), 1);
        assert!(decoded.log_tail.starts_with(b"capsule c started"));
        *IMAGE.lock() = image;
    });
}

fn bad_images_are_refused_before_mapping() {
    with_net(|net| {
        let image = IMAGE.lock().clone();
        // The capsule still exists here: its name and slot are taken.
        assert!(matches!(
            migrate::restore(&image, KEY, 3, net),
            Err(RestoreError::Capsule(_))
        ));
        let before = capsule::list().len();
        let truncated = &image[..image.len() / 2];
        assert!(matches!(
            migrate::restore(truncated, KEY, 3, net),
            Err(RestoreError::Image(ImageError::Truncated))
        ));
        let mut tampered = image.clone();
        let middle = tampered.len() / 2;
        tampered[middle] ^= 0x01;
        assert!(matches!(
            migrate::restore(&tampered, KEY, 3, net),
            Err(RestoreError::Image(_))
        ));
        assert!(matches!(
            migrate::restore(&image, &[0x22; 32], 3, net),
            Err(RestoreError::Image(ImageError::BadMac))
        ));
        let mut other_build = CapsuleImage::decode(&image, KEY).unwrap();
        other_build.build_id[0] ^= 0xff;
        assert_eq!(
            migrate::restore(&other_build.encode(KEY, &[1; 16]), KEY, 3, net).err(),
            Some(RestoreError::WrongBuild)
        );
        assert_eq!(
            capsule::list().len(),
            before,
            "a refused image changed the capsule list"
        );
    });
}

fn restore_elsewhere_continues_where_it_stopped() {
    with_net(|net| {
        let image = IMAGE.lock().clone();
        let at_freeze = PUBLISHED.load(Ordering::Relaxed);
        let clock_at_freeze = CLOCK_MS.load(Ordering::Relaxed);
        // Release as if the capsule now ran on another VM: its arena goes.
        migrate::release("c", Ipv4Addr::new(192, 0, 2, 12), net).unwrap();
        assert_eq!(state_of("c"), None);
        assert!(
            arena::usage(42).is_none(),
            "released capsule kept its arena"
        );
        assert_eq!(net.switch.resident(Ipv4Addr::new(198, 18, 0, 42)), None);
        assert_eq!(net.switch.forwarding_entries(), 1);
        // Time passes while "in transit": the capsule clock must not jump.
        kloop::run_for(net, None, 300_000_000);
        let info = migrate::restore(&image, KEY, 3, net).unwrap();
        assert_eq!(
            (info.name.as_str(), info.slot, info.state),
            ("c", 42, CapsuleState::Running)
        );
        assert_eq!(net.switch.resident(Ipv4Addr::new(198, 18, 0, 42)), Some(42));
        assert_eq!(
            net.switch.forwarding_entries(),
            0,
            "restoring here supersedes the forwarding entry"
        );
        kloop::run_for(net, None, 100_000_000);
        let after = PUBLISHED.load(Ordering::Relaxed);
        assert!(after > at_freeze, "restored capsule did not run");
        // It went on from its own count (its stack and heap came back), not from zero.
        assert!(
            after < at_freeze + 1000,
            "count jumped from {at_freeze} to {after}"
        );
        let clock = CLOCK_MS.load(Ordering::Relaxed);
        assert!(
            clock >= clock_at_freeze && clock < clock_at_freeze + 250,
            "capsule clock went from {clock_at_freeze} ms to {clock} ms across a 300 ms pause"
        );
        let (log, _) = capsule::read_log("c", 0, 4096).unwrap();
        let log = core::str::from_utf8(&log).unwrap();
        assert!(
            log.contains("started") && log.contains("restored"),
            "log did not travel: {log}"
        );
        assert_counter_healthy(net, "c");
        capsule::kill("c", net).unwrap();
    });
}

fn precopy_then_delta_restores_the_latest_state() {
    with_net(|net| {
        capsule::start(
            CapsuleConfig {
                name: "p".to_string(),
                program: "counter".to_string(),
                args: Vec::new(),
                locator: Ipv4Addr::new(198, 18, 0, 43),
                slot: 43,
                memory_limit: 8 << 20,
                epoch: 1,
            },
            net,
        )
        .unwrap();
        kloop::run_for(net, None, 100_000_000);
        let base = migrate::precopy("p", KEY).unwrap();
        let at_base = PUBLISHED.load(Ordering::Relaxed);
        // The pages, a batch at a time, with the capsule running in between.
        let mut batches: Vec<PageBatch> = Vec::new();
        let mut from = 0;
        loop {
            let batch = migrate::read_pages("p", from).unwrap();
            assert!(batch.next > from, "the page scan did not advance");
            assert!(batch.offsets.len() <= MAX_BATCH_PAGES);
            assert_eq!(
                state_of("p"),
                Some(CapsuleState::Running),
                "pre-copy stopped the capsule"
            );
            from = batch.next;
            let done = batch.next == batch.end;
            batches.push(batch);
            kloop::run_for(net, None, 5_000_000);
            if done {
                break;
            }
        }
        assert!(
            migrate::read_pages("p", 12).is_err(),
            "an unaligned page offset was read"
        );
        kloop::run_for(net, None, 100_000_000);
        assert!(
            PUBLISHED.load(Ordering::Relaxed) > at_base,
            "capsule did not run after the pre-copy"
        );
        let delta = migrate::freeze_delta("p", KEY, net).unwrap();
        assert!(
            migrate::read_pages("p", 0).is_err(),
            "pages were read from a frozen capsule"
        );
        let at_freeze = PUBLISHED.load(Ordering::Relaxed);
        let (b, d) = (
            CapsuleImage::decode(&base, KEY).unwrap(),
            CapsuleImage::decode(&delta, KEY).unwrap(),
        );
        assert_eq!((b.kind, d.kind), (ImageKind::Base, ImageKind::Delta));
        assert!(b.segments.is_empty(), "the base carries pages itself");
        let base_bytes: usize = batches.iter().map(|b| b.data.len()).sum();
        let delta_bytes: usize = d.segments.iter().map(|s| s.data.len()).sum();
        assert!(
            batches.iter().any(|b| b.offsets.first() == Some(&0)),
            "the arena header page was not sent"
        );
        assert!(
            delta_bytes < base_bytes,
            "the delta ({delta_bytes}) is not smaller than the pre-copied pages ({base_bytes})"
        );
        // Neither part restores alone.
        assert!(migrate::restore(&base, KEY, 3, net).is_err());
        assert!(migrate::restore(&delta, KEY, 3, net).is_err());
        migrate::release("p", Ipv4Addr::new(192, 0, 2, 12), net).unwrap();
        let staged = migrate::stage_base(&base, KEY, net).unwrap();
        assert!(
            migrate::stage_base(&delta, KEY, net).is_err(),
            "a delta was staged as a base"
        );
        // Pages beyond the staged arena are refused, and write nothing.
        let mut outside = batches[0].clone();
        outside.offsets = vec![b.arena_len];
        outside.data.truncate(4096);
        outside.end = b.arena_len + 4096;
        assert!(migrate::stage_pages(&staged, &outside).is_err());
        for batch in &batches {
            migrate::stage_pages(&staged, batch).unwrap();
        }
        migrate::restore_merged(staged, &delta, KEY, 3, net).unwrap();
        kloop::run_for(net, None, 100_000_000);
        let after = PUBLISHED.load(Ordering::Relaxed);
        // It continues from the freeze, not from the older base.
        assert!(
            after > at_freeze && after < at_freeze + 1000,
            "count went from {at_freeze} to {after}"
        );
        assert_counter_healthy(net, "p");
        // A staged base that is dropped leaves its window free again.
        let again = migrate::precopy("p", KEY).unwrap();
        let mut other = CapsuleImage::decode(&again, KEY).unwrap();
        other.name = "q".into();
        other.slot = 44;
        other.locator = Ipv4Addr::new(198, 18, 0, 44);
        other.root = other.root - arena::window_base(43) + arena::window_base(44);
        let sealed = other.encode_for_transfer(KEY, &[2; 16]);
        let staged = migrate::stage_base(&sealed, KEY, net).unwrap();
        migrate::abort_staged(staged);
        let staged = migrate::stage_base(&sealed, KEY, net).unwrap();
        // A delta of another capsule is refused, and the window is freed too.
        assert!(migrate::restore_merged(staged, &delta, KEY, 3, net).is_err());
        migrate::abort_staged(migrate::stage_base(&sealed, KEY, net).unwrap());
        assert_counter_healthy(net, "p");
        capsule::kill("p", net).unwrap();
    });
}

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    setup();
    run(
        "migration",
        &[
            Test {
                name: "freeze_stops_the_capsule_and_thaw_resumes_it",
                run: freeze_stops_the_capsule_and_thaw_resumes_it,
            },
            Test {
                name: "a_capsule_stopped_inside_api_calls_leaves_no_kernel_state_locked",
                run: a_capsule_stopped_inside_api_calls_leaves_no_kernel_state_locked,
            },
            Test {
                name: "image_carries_the_whole_capsule",
                run: image_carries_the_whole_capsule,
            },
            Test {
                name: "bad_images_are_refused_before_mapping",
                run: bad_images_are_refused_before_mapping,
            },
            Test {
                name: "restore_elsewhere_continues_where_it_stopped",
                run: restore_elsewhere_continues_where_it_stopped,
            },
            Test {
                name: "precopy_then_delta_restores_the_latest_state",
                run: precopy_then_delta_restores_the_latest_state,
            },
        ],
    )
}
