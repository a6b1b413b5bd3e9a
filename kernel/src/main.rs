//! The Capsules kernel image: brings up the NIC, the machine stack and the
//! control service, then serves until asked to shut down.

#![no_std]
#![no_main]

use capsules_kernel::boot::BootInfo;
use capsules_kernel::control::ControlService;
use capsules_kernel::drivers::virtio::net::VirtioNet;
use capsules_kernel::net::machine::MachineStack;
use capsules_kernel::{arch, diag, println, time};
use capsules_wire::exit::KernelExit;

/// How long a shutdown waits for its reply to reach the client.
const SHUTDOWN_FLUSH_NS: u64 = 200_000_000;

#[unsafe(no_mangle)]
fn kernel_main(info: &'static BootInfo) -> ! {
    let config = &info.config;
    if config.probe {
        println!(
            "capsules: probe boot complete after {} us",
            time::since_boot_ns() / 1000
        );
        arch::exit_qemu(KernelExit::Success);
    }
    arch::wait_for_interrupt(); // enable interrupts (timer) from here on
    let Some(ip) = config.ip else {
        log::error!("no ip= on the command line: the network stays down; halting");
        loop {
            arch::wait_for_interrupt();
        }
    };
    let nic = match VirtioNet::init(0, true) {
        Ok(nic) => nic,
        Err(e) => {
            log::error!("no usable virtio-net device ({e:?}); ending");
            arch::exit_qemu(KernelExit::BadConfig);
        }
    };
    let mut stack = MachineStack::new(nic, ip, config.gateway);
    let name = config.name.as_deref().unwrap_or("vm");
    let mut control = match &config.key {
        Some(key) => Some(ControlService::new(
            &mut stack,
            key,
            config.control_port,
            name,
        )),
        None => {
            log::warn!("no key= on the command line: control service disabled");
            None
        }
    };
    println!(
        "capsules: ready name={name} ip={ip} ctl={} build={} boot_us={}",
        config.control_port,
        capsules_kernel::build_id_hex(),
        capsules_kernel::control::boot_ns() / 1000
    );
    diag::set_running("main loop");
    let mut shutdown_deadline = None;
    loop {
        let mut busy = stack.poll();
        if let Some(control) = control.as_mut() {
            busy |= control.poll(&mut stack);
            if control.shutdown_requested() {
                let deadline =
                    *shutdown_deadline.get_or_insert(time::since_boot_ns() + SHUTDOWN_FLUSH_NS);
                if control.flushed(&stack) || time::since_boot_ns() > deadline {
                    log::info!("shutting down");
                    arch::exit_qemu(KernelExit::Success);
                }
            }
        }
        if !busy {
            // Nothing left to do: sleep until a packet or the next tick. The
            // interrupt flag is cleared first so that an interrupt arriving
            // between the check and the halt is not lost.
            arch::disable_interrupts();
            if stack.nic.has_work() {
                arch::enable_interrupts();
            } else {
                arch::wait_for_interrupt();
            }
        }
    }
}
