//! In-kernel test of the capsule clock across a move to a VM that has been
//! up for less time than the capsule has run (a capsule suspended after a
//! minute and resumed into a freshly booted lab): capsule time goes on from
//! where it stopped, never back, and its sleeps end on time.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use core::sync::atomic::{AtomicU64, Ordering};

use capsules_kernel::boot::BootInfo;
use capsules_kernel::capsule::{self, CapsuleConfig, CapsuleState, Program, api, migrate};
use capsules_kernel::drivers::virtio::net::VirtioNet;
use capsules_kernel::net::Network;
use capsules_kernel::testing::{Test, run};
use capsules_kernel::{arch, kloop, time};
use capsules_wire::bootcfg::Ipv4Cidr;
use capsules_wire::image::CapsuleImage;
use spin::Mutex;

const KEY: &[u8] = &[0x44; 32];
const NAME: &str = "ticking";
/// How often the capsule has woken from a 1 ms sleep (about every 10 ms: an
/// idle kernel loop waits for the next timer tick).
static WAKEUPS: AtomicU64 = AtomicU64::new(0);
/// The capsule clock (ms) at its latest wake-up.
static CLOCK_MS: AtomicU64 = AtomicU64::new(0);
/// Set when the capsule saw its clock go backwards (reported, not asserted
/// in the capsule: a failing assertion there would end only the capsule).
static WENT_BACK: AtomicU64 = AtomicU64::new(0);

fn ticking(_: &[String]) -> Result<(), String> {
    let mut last = 0;
    loop {
        let now = api::now_ns();
        if now < last {
            WENT_BACK.store(1, Ordering::Relaxed);
        }
        last = now;
        CLOCK_MS.store(now / 1_000_000, Ordering::Relaxed);
        WAKEUPS.fetch_add(1, Ordering::Relaxed);
        api::sleep_ms(1);
    }
}

static PROGRAMS: &[Program] = &[Program {
    name: "ticking",
    description: "",
    main: ticking,
}];

static NET: Mutex<Option<Network>> = Mutex::new(None);

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

fn uptime_ns() -> u64 {
    capsule::list()
        .into_iter()
        .find(|c| c.name == NAME)
        .map(|c| {
            assert_eq!(c.state, CapsuleState::Running, "{NAME} does not run");
            c.uptime_ns
        })
        .expect("capsule listed")
}

/// Moves the capsule "away and back": freeze, release, and restore its
/// image (changed by `edit`) at the next epoch.
fn move_back(net: &mut Network, epoch: &mut u64, edit: impl FnOnce(&mut CapsuleImage)) {
    let frozen = migrate::freeze(NAME, KEY, net).unwrap();
    migrate::release(NAME, Ipv4Addr::new(192, 0, 2, 12), net).unwrap();
    let mut image = CapsuleImage::decode(&frozen, KEY).unwrap();
    edit(&mut image);
    *epoch += 1;
    migrate::restore(&image.encode(KEY, &[7; 16]), KEY, *epoch, net).unwrap();
}

fn a_capsule_older_than_its_new_vm_keeps_its_clock() {
    let mut guard = NET.lock();
    let net = guard.as_mut().expect("network up");
    let mut epoch = 1;
    capsule::start(
        CapsuleConfig {
            name: NAME.to_string(),
            program: "ticking".to_string(),
            args: Vec::new(),
            locator: Ipv4Addr::new(198, 18, 0, 7),
            slot: 7,
            memory_limit: 8 << 20,
            epoch,
        },
        net,
    )
    .unwrap();
    kloop::run_for(net, None, 100_000_000);
    assert!(
        WAKEUPS.load(Ordering::Relaxed) > 3,
        "the capsule did not run"
    );

    // As if it had run a minute on a VM booted long before this one: its
    // image says so, and this kernel has been up for a few seconds only.
    let minute = time::since_boot_ns() + 60_000_000_000;
    move_back(net, &mut epoch, |image| image.clock_ns = minute);
    kloop::run_for(net, None, 100_000_000);
    let (clock, saved) = (CLOCK_MS.load(Ordering::Relaxed), minute / 1_000_000);
    assert!(
        (saved..saved + 1000).contains(&clock),
        "capsule clock {clock} ms after restoring a capsule whose clock read {saved} ms \
         (kernel uptime {} ms)",
        time::since_boot_ns() / 1_000_000
    );
    assert!(
        uptime_ns() / 1_000_000 >= saved,
        "the capsule's uptime fell back"
    );

    // Moved once more as it is: its task sleeps until a capsule time a
    // minute past this kernel's uptime, and must wake on time, not stall.
    let (wakeups, clock) = (
        WAKEUPS.load(Ordering::Relaxed),
        CLOCK_MS.load(Ordering::Relaxed),
    );
    move_back(net, &mut epoch, |_| {});
    kloop::run_for(net, None, 200_000_000);
    let after = WAKEUPS.load(Ordering::Relaxed);
    assert!(
        after > wakeups + 5,
        "the capsule stalled after the move: {wakeups} -> {after} wake-ups"
    );
    let now = CLOCK_MS.load(Ordering::Relaxed);
    assert!(
        (clock..clock + 1000).contains(&now),
        "capsule clock went from {clock} ms to {now} ms across a move"
    );
    assert_eq!(
        WENT_BACK.load(Ordering::Relaxed),
        0,
        "the capsule saw its clock go back"
    );
    capsule::kill(NAME, net).unwrap();
}

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    setup();
    run(
        "clock",
        &[Test {
            name: "a_capsule_older_than_its_new_vm_keeps_its_clock",
            run: a_capsule_older_than_its_new_vm_keeps_its_clock,
        }],
    )
}
