//! The Capsules kernel image: brings up the NIC, the capsule switch, the
//! machine stack and the control service, then serves until asked to shut down.

#![no_std]
#![no_main]

use capsules_kernel::boot::BootInfo;
use capsules_kernel::control::ControlService;
use capsules_kernel::drivers::virtio::net::VirtioNet;
use capsules_kernel::net::Network;
use capsules_kernel::{arch, capsule, diag, kloop, println, programs, time};
use capsules_wire::bootcfg::Ipv4Cidr;
use capsules_wire::exit::KernelExit;

/// How long a shutdown waits for its reply to reach the client.
const SHUTDOWN_FLUSH_NS: u64 = 200_000_000;

/// Capsule locators are reached on-link (they answer ARP themselves).
const LOCATOR_RANGE: Ipv4Cidr = Ipv4Cidr {
    addr: core::net::Ipv4Addr::new(198, 18, 0, 0),
    prefix: 16,
};

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
    arch::enable_interrupts();
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
    let mut net = Network::new(nic, ip, config.gateway, LOCATOR_RANGE);
    let name = config.name.as_deref().unwrap_or("vm");
    capsule::init(programs::ALL, name);
    let mut control = match &config.key {
        Some(key) => Some(ControlService::new(
            &mut net,
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
    diag::set_running("kernel loop");
    let mut shutdown_deadline = None;
    loop {
        let busy = kloop::step(&mut net, control.as_mut());
        if let Some(control) = control.as_ref()
            && control.shutdown_requested()
        {
            let deadline =
                *shutdown_deadline.get_or_insert(time::since_boot_ns() + SHUTDOWN_FLUSH_NS);
            if control.flushed(&net) || time::since_boot_ns() > deadline {
                log::info!("shutting down");
                arch::exit_qemu(KernelExit::Success);
            }
        }
        if !busy {
            kloop::idle(&net);
        }
    }
}
