//! In-kernel tests of the control service's request handlers, called as the
//! service calls them once a session has authenticated a request
//! (`ControlService::serve`): authenticated requests that once crashed or
//! exhausted the kernel — a capsule started at a multicast, broadcast or zero
//! locator, concurrent admissions of images checked against the same free
//! memory, suspends that never freed their image.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use core::sync::atomic::{AtomicU64, Ordering};

use capsules_kernel::boot::BootInfo;
use capsules_kernel::capsule::{self, Program, api};
use capsules_kernel::control::ControlService;
use capsules_kernel::drivers::virtio::net::VirtioNet;
use capsules_kernel::mm::{self, frame};
use capsules_kernel::net::Network;
use capsules_kernel::testing::{Test, run};
use capsules_kernel::{arch, kloop};
use capsules_wire::bootcfg::Ipv4Cidr;
use capsules_wire::control::{
    CapsuleState, ErrorCode, MAX_IMAGE_CHUNK, Request, Response, RunCapsule,
};
use spin::Mutex;

const KEY: &[u8] = &[0x5a; 32];
const LOCATOR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);
const SLOT: u32 = 7;

/// Counts published by the `holder` capsule.
static COUNT: AtomicU64 = AtomicU64::new(0);

/// Holds 256 KiB of non-zero data (so its image is at least that big) and
/// counts.
fn holder(_: &[String]) -> Result<(), String> {
    let data = vec![0xa5u8; 256 * 1024];
    loop {
        core::hint::black_box(&data);
        COUNT.fetch_add(1, Ordering::Relaxed);
        api::sleep_ms(1);
    }
}

static PROGRAMS: &[Program] = &[Program {
    name: "holder",
    description: "",
    main: holder,
}];

struct Vm {
    net: Network,
    control: ControlService,
}

static VM: Mutex<Option<Vm>> = Mutex::new(None);

fn with_vm<R>(f: impl FnOnce(&mut Vm) -> R) -> R {
    f(VM.lock().as_mut().expect("VM set up"))
}

fn setup() {
    arch::enable_interrupts();
    let nic = VirtioNet::init(0, true).expect("NIC 0");
    let mut net = Network::new(
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
    let control = ControlService::new(&mut net, KEY, 7000, "test-vm");
    *VM.lock() = Some(Vm { net, control });
}

impl Vm {
    fn serve(&mut self, request: Request) -> Response {
        self.control.serve(&request, &mut self.net)
    }

    /// Kernel-loop rounds (control service included) for `ms`.
    fn run_ms(&mut self, ms: u64) {
        kloop::run_for(&mut self.net, Some(&mut self.control), ms * 1_000_000);
    }

    fn run_capsule(&mut self, name: &str, locator: Ipv4Addr, epoch: u64) -> Response {
        self.serve(Request::RunCapsule(RunCapsule {
            name: name.into(),
            program: "holder".into(),
            args: Vec::new(),
            locator,
            slot: SLOT,
            memory_limit: 0,
            epoch,
        }))
    }
}

fn assert_error(response: &Response, want: ErrorCode, what: &str) {
    match response {
        Response::Error { code, .. } if *code == want => {}
        other => panic!("{what}: expected a {want:?} error, got {other:?}"),
    }
}

fn run_capsule_refuses_locators_that_are_not_unicast_hosts() {
    with_vm(|vm| {
        for bad in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 251),
            Ipv4Addr::new(239, 1, 2, 3),
            Ipv4Addr::new(240, 0, 0, 9),
            Ipv4Addr::LOCALHOST,
        ] {
            let response = vm.run_capsule("bad", bad, 1);
            assert_error(
                &response,
                ErrorCode::InvalidArgument,
                &alloc::format!("{bad}"),
            );
            let Response::Error { message, .. } = response else {
                unreachable!()
            };
            assert!(message.contains("unicast"), "unclear refusal: {message}");
        }
        // Nothing was started, and the kernel loop goes on.
        vm.run_ms(50);
        assert_eq!(
            vm.serve(Request::ListCapsules),
            Response::Capsules(Vec::new())
        );
    });
}

/// Suspends (freeze, read the image, kill) and resumes (begin, chunks,
/// commit) capsule after capsule: the kernel heap must come back to where
/// it was, not keep every image it handed out.
fn suspend_and_resume_cycles_keep_kernel_heap_use_flat() {
    with_vm(|vm| {
        let mut heap_after_first = 0;
        let mut image_len = 0;
        for cycle in 0..6u64 {
            let name = alloc::format!("cycle{cycle}");
            assert!(
                matches!(
                    vm.run_capsule(&name, LOCATOR, 1),
                    Response::CapsuleStarted(_)
                ),
                "start {name}"
            );
            vm.run_ms(30);
            // Suspend: freeze, read the whole image, kill.
            let len = match vm.serve(Request::FreezeCapsule { name: name.clone() }) {
                Response::Frozen { image_len } => image_len,
                other => panic!("freeze {name}: {other:?}"),
            };
            let mut image = Vec::new();
            while (image.len() as u64) < len {
                match vm.serve(Request::ReadImage {
                    name: name.clone(),
                    offset: image.len() as u64,
                    len: MAX_IMAGE_CHUNK as u32,
                }) {
                    Response::ImageChunk { data } if !data.is_empty() => {
                        image.extend_from_slice(&data)
                    }
                    other => panic!("read the image of {name}: {other:?}"),
                }
            }
            assert_eq!(
                vm.serve(Request::KillCapsule { name: name.clone() }),
                Response::Killed
            );
            // Resume it from the image.
            assert_eq!(
                vm.serve(Request::RestoreBegin {
                    name: name.clone(),
                    image_len: len,
                }),
                Response::Done
            );
            for (i, chunk) in image.chunks(MAX_IMAGE_CHUNK).enumerate() {
                assert_eq!(
                    vm.serve(Request::RestoreChunk {
                        name: name.clone(),
                        offset: (i * MAX_IMAGE_CHUNK) as u64,
                        data: chunk.to_vec(),
                    }),
                    Response::Done
                );
            }
            match vm.serve(Request::RestoreCommit {
                name: name.clone(),
                epoch: 2,
            }) {
                Response::CapsuleStarted(info) => assert_eq!(info.state, CapsuleState::Running),
                other => panic!("resume {name}: {other:?}"),
            }
            let before = COUNT.load(Ordering::Relaxed);
            vm.run_ms(30);
            assert!(
                COUNT.load(Ordering::Relaxed) > before,
                "{name} does not run after its resume"
            );
            assert_eq!(
                vm.serve(Request::KillCapsule { name: name.clone() }),
                Response::Killed
            );
            vm.run_ms(10);
            drop(image);
            let heap_used = mm::stats().heap_used_bytes;
            if cycle == 0 {
                heap_after_first = heap_used;
                image_len = len;
                assert!(image_len >= 256 * 1024, "image of only {image_len} bytes");
            } else {
                assert!(
                    heap_used < heap_after_first + 16 * 1024,
                    "kernel heap use grew from {heap_after_first} to {heap_used} bytes in \
                     {cycle} suspend/resume cycles of {image_len}-byte images"
                );
            }
        }
    });
}

/// Two images admitted one after the other, before either has arrived, must
/// not both be granted the same free memory: admission takes what it admits.
fn concurrent_restore_admissions_cannot_share_free_memory() {
    with_vm(|vm| {
        // Each needs 60 % of what is free (its image, and the arena it
        // becomes): one fits, two do not.
        let image_len = frame::available() * mm::PAGE_SIZE * 3 / 10;
        let begin = |vm: &mut Vm, name: &str| {
            vm.serve(Request::RestoreBegin {
                name: name.into(),
                image_len,
            })
        };
        assert_eq!(begin(vm, "first"), Response::Done);
        assert_error(
            &begin(vm, "second"),
            ErrorCode::LimitReached,
            "a second admission on the same free memory",
        );
        // Ending the first transfer gives its memory back.
        assert_eq!(
            vm.serve(Request::RestoreAbort {
                name: "first".into()
            }),
            Response::Done
        );
        assert_eq!(begin(vm, "second"), Response::Done);
        assert_eq!(
            vm.serve(Request::RestoreAbort {
                name: "second".into()
            }),
            Response::Done
        );
        vm.run_ms(20);
        let name = "after".to_string();
        assert!(matches!(
            vm.run_capsule(&name, LOCATOR, 1),
            Response::CapsuleStarted(_)
        ));
        assert_eq!(vm.serve(Request::KillCapsule { name }), Response::Killed);
    });
}

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    setup();
    run(
        "control",
        &[
            Test {
                name: "run_capsule_refuses_locators_that_are_not_unicast_hosts",
                run: run_capsule_refuses_locators_that_are_not_unicast_hosts,
            },
            Test {
                name: "suspend_and_resume_cycles_keep_kernel_heap_use_flat",
                run: suspend_and_resume_cycles_keep_kernel_heap_use_flat,
            },
            Test {
                name: "concurrent_restore_admissions_cannot_share_free_memory",
                run: concurrent_restore_admissions_cannot_share_free_memory,
            },
        ],
    )
}
