//! The Capsules kernel image: brings up the NIC, the capsule switch, the
//! machine stack and the control service, then serves until asked to shut down.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use capsules_kernel::boot::BootInfo;
use capsules_kernel::control::ControlService;
use capsules_kernel::drivers::fw_cfg;
use capsules_kernel::drivers::virtio::net::VirtioNet;
use capsules_kernel::net::Network;
use capsules_kernel::{arch, capsule, diag, kloop, println, programs, time};
use capsules_wire::bootcfg::Role;
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
    arch::enable_interrupts();
    let (mut net, ip) = if config.role == Role::Router {
        // The special router: one NIC per address of `nics=`, in PCI order.
        let mut nics = Vec::new();
        for nth in 0..config.router_nics.len() {
            match VirtioNet::init(nth, true) {
                Ok(nic) => nics.push(nic),
                Err(e) => {
                    log::error!(
                        "router: nics= names {} addresses, but virtio-net #{nth} is not usable ({e:?}); ending",
                        config.router_nics.len()
                    );
                    arch::exit_qemu(KernelExit::BadConfig);
                }
            }
        }
        let net = Network::new_router(nics, &config.router_nics, config.locators);
        (net, config.router_nics[0])
    } else {
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
        // Capsule locators (`locators=`, the lab's capsule range) are reached
        // on-link: capsules on other VMs answer ARP for them themselves.
        (Network::new(nic, ip, config.gateway, config.locators), ip)
    };
    let name = config.name.as_deref().unwrap_or("vm");
    capsule::init(programs::ALL, name);
    // The cluster key comes from QEMU's fw_cfg, never the command line.
    let mut control = match fw_cfg::cluster_key() {
        Ok(Some(key)) => Some(ControlService::new(
            &mut net,
            &key,
            config.control_port,
            name,
        )),
        Ok(None) => {
            log::warn!(
                "no fw_cfg file {}: control service disabled",
                fw_cfg::KEY_FILE
            );
            None
        }
        Err(e) => {
            log::error!("fw_cfg file {}: {e:?}; ending", fw_cfg::KEY_FILE);
            arch::exit_qemu(KernelExit::BadConfig);
        }
    };
    println!(
        "capsules: ready name={name} ip={ip} ctl={} build={} boot_us={}{}",
        config.control_port,
        capsules_kernel::build_id_hex(),
        capsules_kernel::control::boot_ns() / 1000,
        if config.role == Role::Router {
            " role=router"
        } else {
            ""
        }
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
