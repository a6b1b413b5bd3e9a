//! QEMU's firmware configuration device (fw_cfg), read through its legacy
//! I/O ports: a 16-bit selector at 0x510 and a byte-wide data port at 0x511.
//! Selecting an item rewinds it; each read of the data port returns its next
//! byte (and 0 past its end).
//!
//! QEMU's `-fw_cfg name=opt/…,file=PATH` puts a host file into the device:
//! this is how the cluster key reaches the kernel ([`KEY_FILE`]) without
//! appearing on any command line. Items are found by name in the file
//! directory (selector 0x19: a big-endian `u32` count, then 64-byte entries
//! of big-endian `u32` size, `u16` selector, `u16` reserved and a
//! NUL-padded 56-byte name). The `pc`, `q35` and `microvm` machines all
//! have these ports; without the device the signature check fails and no
//! file is found.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use capsules_wire::auth::{MAX_CLUSTER_KEY_LEN, MIN_CLUSTER_KEY_LEN};

use crate::arch::x86_64::port::{inb, outw};

const SELECTOR_PORT: u16 = 0x510;
const DATA_PORT: u16 = 0x511;
const SIGNATURE: u16 = 0x0000;
const FILE_DIR: u16 = 0x0019;
/// Bytes of a name in a directory entry, NUL padding included.
const NAME_LEN: usize = 56;
/// More directory entries than QEMU ever has: a bound, not a limit in use.
const MAX_FILES: u32 = 4096;

/// The fw_cfg file that holds the lab's cluster key (16-64 raw bytes).
pub const KEY_FILE: &str = "opt/capsules/key";

/// One entry of the file directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub name: String,
    pub size: u32,
    pub selector: u16,
}

/// Selects item `selector` and reads its first `buf.len()` bytes.
fn read_item(selector: u16, buf: &mut [u8]) {
    crate::arch::without_interrupts(|| {
        // SAFETY: 0x510 is QEMU's fw_cfg selector register; writing it only
        // chooses which item the data port reads (on a machine without
        // fw_cfg the write goes nowhere). Interrupts are off, so nothing
        // selects another item between this write and the reads below.
        unsafe { outw(SELECTOR_PORT, selector) };
        for byte in buf.iter_mut() {
            // SAFETY: 0x511 is the fw_cfg data register; a read returns the
            // selected item's next byte and has no other effect (0xff
            // without the device).
            *byte = unsafe { inb(DATA_PORT) };
        }
    })
}

/// Whether the device is there: its signature item reads "QEMU".
pub fn present() -> bool {
    let mut signature = [0u8; 4];
    read_item(SIGNATURE, &mut signature);
    &signature == b"QEMU"
}

/// The file directory, empty without the device.
pub fn files() -> Vec<File> {
    if !present() {
        return Vec::new();
    }
    // The count and the entries are one item: read them in one go.
    let mut count = [0u8; 4];
    read_item(FILE_DIR, &mut count);
    let count = u32::from_be_bytes(count).min(MAX_FILES) as usize;
    let mut dir = vec![0u8; 4 + count * 64];
    read_item(FILE_DIR, &mut dir);
    dir[4..]
        .chunks_exact(64)
        .filter_map(|entry| {
            let size = u32::from_be_bytes(entry[0..4].try_into().ok()?);
            let selector = u16::from_be_bytes(entry[4..6].try_into().ok()?);
            let raw = &entry[8..8 + NAME_LEN];
            let end = raw.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
            let name = core::str::from_utf8(&raw[..end]).ok()?;
            Some(File {
                name: name.into(),
                size,
                selector,
            })
        })
        .collect()
}

/// The directory entry named `name`, if the device has one.
pub fn find(name: &str) -> Option<File> {
    files().into_iter().find(|f| f.name == name)
}

/// The contents of file `name`, if present and at most `max_len` bytes long
/// (`Err` with its size when longer).
pub fn read_file(name: &str, max_len: usize) -> Option<Result<Vec<u8>, u32>> {
    let file = find(name)?;
    if file.size as usize > max_len {
        return Some(Err(file.size));
    }
    let mut data = vec![0u8; file.size as usize];
    read_item(file.selector, &mut data);
    Some(Ok(data))
}

/// Why the cluster key could not be taken from fw_cfg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// The file has a length outside 16-64 bytes.
    BadLength(u32),
}

/// The cluster key from [`KEY_FILE`]: `Ok(None)` when QEMU was given none.
pub fn cluster_key() -> Result<Option<Vec<u8>>, KeyError> {
    match read_file(KEY_FILE, MAX_CLUSTER_KEY_LEN) {
        None => Ok(None),
        Some(Err(size)) => Err(KeyError::BadLength(size)),
        Some(Ok(key)) if key.len() < MIN_CLUSTER_KEY_LEN => {
            Err(KeyError::BadLength(key.len() as u32))
        }
        Some(Ok(key)) => Ok(Some(key)),
    }
}
