//! In-kernel tests of QEMU's fw_cfg device, through which the cluster key
//! arrives: the runner (qemu/run-kernel-test.sh) hands QEMU a 0600 file as
//! `opt/capsules/key` holding the 32 bytes below, and nothing on the command
//! line.

#![no_std]
#![no_main]

extern crate alloc;

use capsules_kernel::boot::{self, BootInfo};
use capsules_kernel::drivers::fw_cfg;
use capsules_kernel::testing::{Test, run};

/// What the runner writes into the key file.
const RUNNER_KEY: &[u8] = b"capsules in-kernel test key 0001";

fn device_is_present() {
    assert!(fw_cfg::present(), "fw_cfg signature not found at 0x510");
}

fn directory_lists_the_key_file() {
    let files = fw_cfg::files();
    // QEMU always adds files of its own (etc/…), so the directory is parsed
    // right if those names come out whole.
    assert!(
        files.iter().any(|f| f.name.starts_with("etc/")),
        "no etc/ file among {files:?}"
    );
    let key = fw_cfg::find(fw_cfg::KEY_FILE).expect("opt/capsules/key in the directory");
    assert_eq!(key.size as usize, RUNNER_KEY.len());
    assert!(
        key.selector >= 0x20,
        "file selectors start at 0x20: {key:?}"
    );
    assert!(fw_cfg::find("opt/capsules/none").is_none());
    assert!(fw_cfg::find("opt/capsules/ke").is_none(), "prefix matched");
}

fn key_arrives_byte_for_byte() {
    let key = fw_cfg::cluster_key()
        .expect("a key of valid length")
        .expect("a key");
    assert_eq!(key, RUNNER_KEY);
    // Reading again gives the same bytes (selecting an item rewinds it).
    assert_eq!(fw_cfg::cluster_key(), Ok(Some(RUNNER_KEY.to_vec())));
}

fn a_file_longer_than_allowed_is_not_read() {
    assert_eq!(
        fw_cfg::read_file(fw_cfg::KEY_FILE, 16),
        Some(Err(RUNNER_KEY.len() as u32))
    );
    assert_eq!(fw_cfg::read_file("opt/capsules/none", 64), None);
}

fn key_is_not_on_the_command_line() {
    let line = boot::info().cmdline();
    assert!(!line.contains("key"), "command line '{line}'");
    let text = core::str::from_utf8(RUNNER_KEY).unwrap();
    assert!(!line.contains(text));
}

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    run(
        "fw_cfg",
        &[
            Test {
                name: "device_is_present",
                run: device_is_present,
            },
            Test {
                name: "directory_lists_the_key_file",
                run: directory_lists_the_key_file,
            },
            Test {
                name: "key_arrives_byte_for_byte",
                run: key_arrives_byte_for_byte,
            },
            Test {
                name: "a_file_longer_than_allowed_is_not_read",
                run: a_file_longer_than_allowed_is_not_read,
            },
            Test {
                name: "key_is_not_on_the_command_line",
                run: key_is_not_on_the_command_line,
            },
        ],
    )
}
