//! In-kernel tests of command-line handling: the PVH command line arrives,
//! and the shared parser behaves the same inside the kernel as on the host.

#![no_std]
#![no_main]

use capsules_kernel::boot::{self, BootInfo, MemoryKind, Redacted};
use capsules_kernel::testing::{Test, run};
use capsules_wire::bootcfg::{BootConfig, BootConfigError, KEY_REFUSED, LogLevel};

fn loader_command_line_arrives() {
    let info = boot::info();
    // The runner passes KERNEL_TEST_CMDLINE, "log=info" unless overridden.
    assert!(
        info.cmdline().contains("log="),
        "cmdline was '{}'",
        info.cmdline()
    );
    assert_eq!(BootConfig::parse(info.cmdline()).as_ref(), Ok(&info.config));
}

fn memory_map_arrives() {
    let ram: u64 = boot::info()
        .memory_map()
        .iter()
        .filter(|r| r.kind == MemoryKind::Ram)
        .map(|r| r.len)
        .sum();
    // The runner gives the VM 256 MiB.
    assert!((240 << 20..=256 << 20).contains(&ram), "RAM {ram}");
}

fn full_line_parses() {
    let cfg = BootConfig::parse("ip=192.0.2.11/24 gw=192.0.2.1 ctl=7171 log=debug name=vm1")
        .expect("valid line");
    let ip = cfg.ip.expect("ip");
    assert_eq!((ip.addr.octets(), ip.prefix), ([192, 0, 2, 11], 24));
    assert_eq!(cfg.gateway.map(|g| g.octets()), Some([192, 0, 2, 1]));
    assert_eq!(cfg.control_port, 7171);
    assert_eq!(cfg.log_level, LogLevel::Debug);
    assert_eq!(cfg.name.as_deref(), Some("vm1"));
    assert_eq!(BootConfig::parse(&cfg.to_cmdline()), Ok(cfg));
}

fn bad_lines_are_refused() {
    assert!(matches!(
        BootConfig::parse("bogus=1"),
        Err(BootConfigError::UnknownOption(_))
    ));
    assert!(matches!(
        BootConfig::parse("ip=1.2.3.4"),
        Err(BootConfigError::Malformed { option: "ip", .. })
    ));
    assert!(matches!(
        BootConfig::parse("ctl=99999"),
        Err(BootConfigError::Malformed { option: "ctl", .. })
    ));
    // The key never travels on the command line (it comes through fw_cfg).
    assert_eq!(
        BootConfig::parse("key=000102030405060708090a0b0c0d0e0f"),
        Err(BootConfigError::Inconsistent(KEY_REFUSED))
    );
    assert_eq!(
        BootConfig::parse("log=info log=info"),
        Err(BootConfigError::Repeated("log"))
    );
}

fn key_never_reaches_the_log() {
    let mut out = alloc::string::String::new();
    use core::fmt::Write;
    write!(
        out,
        "{}",
        Redacted("ip=192.0.2.11/24 key=00112233445566778899aabbccddeeff name=a")
    )
    .unwrap();
    assert_eq!(out, "ip=192.0.2.11/24 key=<redacted> name=a");
}

extern crate alloc;

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    run(
        "cmdline",
        &[
            Test {
                name: "loader_command_line_arrives",
                run: loader_command_line_arrives,
            },
            Test {
                name: "memory_map_arrives",
                run: memory_map_arrives,
            },
            Test {
                name: "full_line_parses",
                run: full_line_parses,
            },
            Test {
                name: "bad_lines_are_refused",
                run: bad_lines_are_refused,
            },
            Test {
                name: "key_never_reaches_the_log",
                run: key_never_reaches_the_log,
            },
        ],
    )
}
