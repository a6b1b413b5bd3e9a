//! The lab state file, so that separate `capsulectl` invocations cooperate.
//!
//! `lab up` writes everything later commands need (namespace, pids, addresses,
//! MACs, the cluster key, accelerator, kernel) to `STATE_ROOT/LAB/lab.json`,
//! where STATE_ROOT is `$CAPSULES_STATE_DIR` or `/run/capsules`. The serial and
//! QEMU logs of each VM live beside it. The file holds the cluster key, so it is
//! written with mode 0600; so is `cluster.key` beside it, the raw key that QEMU
//! hands to the guests through fw_cfg.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::directory::CapsuleRange;

/// Environment variable that moves the state root away from `/run/capsules`.
pub const STATE_DIR_ENV: &str = "CAPSULES_STATE_DIR";
const DEFAULT_STATE_ROOT: &str = "/run/capsules";
const STATE_FILE: &str = "lab.json";
/// The raw cluster key in the lab's state directory, for QEMU's fw_cfg.
pub const KEY_FILE: &str = "cluster.key";

/// One VM of a lab, as started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub mac: String,
    pub tap: String,
    pub control_port: u16,
    /// QEMU's pid; `None` until it was spawned.
    pub pid: Option<u32>,
    pub serial_log: PathBuf,
    pub qemu_log: PathBuf,
    /// The subnet the VM sits on (1 = the lab namespace's; routed labs have
    /// more, see [`Routed`]).
    #[serde(default = "first_subnet")]
    pub subnet: usize,
    /// The namespace holding the VM's tap when it is not the lab namespace
    /// (a VM on subnet 2 or higher of a routed lab): QEMU starts there and
    /// control connections are opened from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

fn first_subnet() -> usize {
    1
}

/// One VM subnet of a routed lab: its own namespace and bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetRecord {
    /// 1, 2, …; subnet 1 lives in the lab namespace.
    pub index: usize,
    pub netns: String,
    /// The network, e.g. 192.0.2.0/24.
    pub network: Ipv4Addr,
    pub prefix: u8,
    /// The host side's address on the bridge (.1).
    pub host: Ipv4Addr,
    /// The router's address on this subnet: the VMs' gateway.
    pub router: Ipv4Addr,
}

/// One NIC of the router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterNic {
    pub netns: String,
    pub tap: String,
    pub mac: String,
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// What a routed lab (`lab up --subnets N`, N ≥ 2) adds: its subnets, the
/// client subnet with its capsule-unaware host, and the router VM that
/// alone joins them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routed {
    pub subnets: Vec<SubnetRecord>,
    pub client_netns: String,
    /// The client host: the client namespace's own stack.
    pub client: Ipv4Addr,
    pub client_network: Ipv4Addr,
    pub client_prefix: u8,
    /// The router's address on the client subnet (the client's route).
    pub client_router: Ipv4Addr,
    /// The router VM (its control service listens on its first NIC, on
    /// subnet 1).
    pub router: VmRecord,
    /// Its NICs in order: one per subnet, then the client subnet.
    pub router_nics: Vec<RouterNic>,
}

/// A lab: one network namespace with a bridge, taps and VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub netns: String,
    pub bridge: String,
    pub gateway: Ipv4Addr,
    /// The cluster key as hex (as on the kernel command line).
    pub key_hex: String,
    /// The accelerator the VMs run on: "kvm" or "tcg".
    pub accel: String,
    pub kernel: PathBuf,
    /// Build id of `kernel` as hex, read from its ELF note at `lab up`.
    pub kernel_build_id: String,
    pub mem_mib: u32,
    pub vms: Vec<VmRecord>,
    /// Where capsule locators come from (older state files lack it: default).
    #[serde(default)]
    pub capsule_range: CapsuleRange,
    /// Pid of the lab's directory server (`capsulectl directory serve`).
    #[serde(default)]
    pub directory_pid: Option<u32>,
    /// VMs that boot another kernel than `kernel` (tests of build checks):
    /// VM name → (kernel, its build id as hex).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub kernel_overrides: std::collections::BTreeMap<String, (PathBuf, String)>,
    /// Routed labs only (`--subnets` 2 or more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed: Option<Routed>,
}

impl LabState {
    /// The kernel VM `vm` boots and its build id (hex).
    pub fn kernel_of(&self, vm: &str) -> (&Path, &str) {
        match self.kernel_overrides.get(vm) {
            Some((path, id)) => (path.as_path(), id.as_str()),
            None => (self.kernel.as_path(), self.kernel_build_id.as_str()),
        }
    }

    /// The cluster key. Control sessions derive their key from it; images
    /// take [`Self::image_key`].
    pub fn key(&self) -> Result<Vec<u8>> {
        capsules_wire::bootcfg::decode_hex(&self.key_hex)
            .context("the lab state file holds a malformed cluster key")
    }

    /// The key that seals images in this lab, derived from the cluster key
    /// (never the key that authenticates control messages).
    pub fn image_key(&self) -> Result<Vec<u8>> {
        Ok(capsules_wire::auth::image_key(&self.key()?).to_vec())
    }

    pub fn vm(&self, name: &str) -> Result<&VmRecord> {
        match self.vms.iter().find(|vm| vm.name == name) {
            Some(vm) => Ok(vm),
            None => bail!("lab '{}' has no VM named '{name}'", self.name),
        }
    }

    pub fn vm_mut(&mut self, name: &str) -> Result<&mut VmRecord> {
        let lab = self.name.clone();
        match self.vms.iter_mut().find(|vm| vm.name == name) {
            Some(vm) => Ok(vm),
            None => bail!("lab '{lab}' has no VM named '{name}'"),
        }
    }
}

/// The directory all labs' state lives under.
pub fn state_root() -> PathBuf {
    std::env::var_os(STATE_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT))
}

/// The state directory of one lab.
pub fn lab_dir(lab: &str) -> PathBuf {
    state_root().join(lab)
}

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Replaces `path` with `bytes` atomically (a synced temporary file beside
/// it, then rename): a reader sees the old file or the new one, never a mix,
/// and a crash leaves one of them whole.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    // The rename is durable only once the directory that holds the name is
    // on disk too (a crash could otherwise bring back the old file).
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", parent.display()))
}

/// Writes the raw cluster key to `dir/cluster.key`, mode 0600 from the
/// moment it exists, and returns its path (for QEMU's `-fw_cfg`).
pub fn write_key_file(dir: &Path, key: &[u8]) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(KEY_FILE);
    write_atomically(&path, key, 0o600)?;
    Ok(path)
}

/// Writes the state atomically, readable by root only (it holds the key).
pub fn save(dir: &Path, state: &LabState) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_atomically(&state_file(dir), &serde_json::to_vec_pretty(state)?, 0o600)
}

/// Reads a lab's state; `Ok(None)` when the lab has no state file.
pub fn load(dir: &Path) -> Result<Option<LabState>> {
    let path = state_file(dir);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("corrupt lab state file {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_state(dir: &Path) -> LabState {
        LabState {
            name: "t".into(),
            netns: "capsules-t".into(),
            bridge: "br0".into(),
            gateway: Ipv4Addr::new(192, 0, 2, 1),
            key_hex: "00".repeat(32),
            accel: "tcg".into(),
            kernel: "/k/capsules-kernel".into(),
            kernel_build_id: "abcd".into(),
            mem_mib: 256,
            vms: vec![VmRecord {
                name: "vm1".into(),
                ip: Ipv4Addr::new(192, 0, 2, 11),
                prefix: 24,
                mac: "52:54:00:c5:00:01".into(),
                tap: "tap1".into(),
                control_port: 7070,
                pid: Some(1234),
                serial_log: dir.join("vm1.serial.log"),
                qemu_log: dir.join("vm1.qemu.log"),
                subnet: 1,
                netns: None,
            }],
            capsule_range: CapsuleRange::default(),
            directory_pid: None,
            kernel_overrides: Default::default(),
            routed: None,
        }
    }

    #[test]
    fn state_file_round_trips_and_is_private() {
        let dir = std::env::temp_dir().join(format!("capsulectl-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(load(&dir).unwrap(), None);
        let state = sample_state(&dir);
        save(&dir, &state).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(state.clone()));
        let mode = fs::metadata(state_file(&dir)).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert_eq!(state.key().unwrap(), vec![0u8; 32]);
        assert_eq!(
            state.image_key().unwrap(),
            capsules_wire::auth::image_key(&[0u8; 32])
        );
        assert_ne!(state.image_key().unwrap(), state.key().unwrap());
        let key_file = write_key_file(&dir, &[7u8; 32]).unwrap();
        assert_eq!(key_file, dir.join("cluster.key"));
        assert_eq!(fs::read(&key_file).unwrap(), vec![7u8; 32]);
        let mode = fs::metadata(&key_file).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(state.vm("vm1").is_ok());
        assert!(state.vm("vm9").is_err());
        fs::write(state_file(&dir), b"{not json").unwrap();
        assert!(load(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
