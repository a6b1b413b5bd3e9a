//! The lab network: a network namespace with a bridge and one tap per VM.
//!
//! Everything is configured with `ip -n NS …`, so nothing ever touches the root
//! namespace. To talk to VMs (and to start QEMU so it finds its taps) this
//! process enters the namespace itself with setns(2).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Prefix of every namespace a lab creates; `lab down` touches only these.
pub const NETNS_PREFIX: &str = "capsules-";

pub fn netns_name(lab: &str) -> String {
    format!("{NETNS_PREFIX}{lab}")
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

/// True when the named namespace exists.
pub fn exists(ns: &str) -> bool {
    netns_path(ns).exists()
}

/// Whether a program is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let candidate = dir.join(program);
            std::fs::metadata(&candidate).is_ok_and(|m| m.is_file())
        })
    })
}

/// Checks what every lab command needs: root rights and the `ip` tool.
pub fn require_root_and_ip() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "capsulectl lab commands need root (network namespaces, bridges, taps): run it as root, e.g. with sudo"
        );
    }
    if !on_path("ip") {
        bail!("the 'ip' tool was not found on PATH: apt-get install iproute2");
    }
    Ok(())
}

/// Runs `ip ARGS…` and turns a failure into an error carrying its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run 'ip'")?;
    if !out.status.success() {
        bail!(
            "'ip {}' failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Names of the devices inside a lab namespace.
pub fn tap_name(index: usize) -> String {
    format!("tap{index}")
}
pub const BRIDGE_NAME: &str = "br0";
/// The lab LAN carries jumbo frames: the VMs' machine addresses (control
/// traffic and capsule images) use them; capsules keep 1500 and TCP's MSS
/// keeps every connection within both ends' MTU.
pub const LAB_MTU: u32 = 9000;

/// Creates the namespace with loopback up and a bridge holding `gateway/prefix`.
pub fn create_lab_network(ns: &str, gateway: Ipv4Addr, prefix: u8) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        ns,
        "link",
        "add",
        BRIDGE_NAME,
        "mtu",
        &LAB_MTU.to_string(),
        "type",
        "bridge",
    ])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{gateway}/{prefix}"),
        "dev",
        BRIDGE_NAME,
    ])?;
    ip(&["-n", ns, "link", "set", BRIDGE_NAME, "up"])?;
    Ok(())
}

/// Adds a tap, enslaved to the lab bridge and up.
pub fn add_tap(ns: &str, tap: &str) -> Result<()> {
    ip(&["-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"])?;
    ip(&["-n", ns, "link", "set", tap, "mtu", &LAB_MTU.to_string()])?;
    ip(&["-n", ns, "link", "set", tap, "master", BRIDGE_NAME])?;
    ip(&["-n", ns, "link", "set", tap, "up"])?;
    Ok(())
}

/// Adds a tap that belongs to no bridge yet (the router's: QEMU opens it in
/// the lab namespace, then it moves to its subnet's, see
/// [`enslave_tap`]).
pub fn add_bare_tap(ns: &str, tap: &str) -> Result<()> {
    ip(&["-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"])?;
    ip(&["-n", ns, "link", "set", tap, "mtu", &LAB_MTU.to_string()])
}

/// Puts a tap (moved into `ns`, which resets it) on the namespace's bridge
/// with the lab MTU, and up.
pub fn enslave_tap(ns: &str, tap: &str) -> Result<()> {
    ip(&["-n", ns, "link", "set", tap, "mtu", &LAB_MTU.to_string()])?;
    ip(&["-n", ns, "link", "set", tap, "master", BRIDGE_NAME])?;
    ip(&["-n", ns, "link", "set", tap, "up"])
}

/// Deletes the lab's devices and the namespace. Missing pieces are fine: this
/// also cleans up after a half-built or crashed lab.
pub fn delete_lab_network(ns: &str, taps: &[String]) -> Result<()> {
    if !exists(ns) {
        return Ok(());
    }
    for tap in taps {
        let _ = ip(&["-n", ns, "link", "del", tap]);
    }
    let _ = ip(&["-n", ns, "link", "del", BRIDGE_NAME]);
    ip(&["netns", "del", ns])
}

fn setns_net(file: &File) -> std::io::Result<()> {
    // SAFETY: the descriptor is valid for the duration of the call (owned by
    // `file`); setns only changes this thread's namespace membership.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// While alive, the calling thread is inside a lab namespace; dropping it
/// returns to the namespace it came from. Enter before starting other threads:
/// setns(2) switches only the calling thread, and threads (and child
/// processes) created afterwards inherit its namespace.
pub struct NetnsGuard {
    original: File,
}

impl NetnsGuard {
    pub fn enter(ns: &str) -> Result<Self> {
        let original = File::open("/proc/thread-self/ns/net")
            .context("cannot open this thread's network namespace")?;
        let path = netns_path(ns);
        let target = File::open(&path)
            .with_context(|| format!("cannot open {} (does the lab exist?)", path.display()))?;
        setns_net(&target).with_context(|| format!("setns into network namespace {ns} failed"))?;
        Ok(Self { original })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // Failing to return would leave later work in the lab namespace;
        // there is no sensible recovery, so say so loudly.
        if let Err(e) = setns_net(&self.original) {
            eprintln!("capsulectl: cannot return to the original network namespace: {e}");
        }
    }
}

/// The command that runs `argv` inside the namespace through `ip netns exec`
/// (which also gives it the namespace's /sys and /etc/netns files).
pub fn exec_command(ns: &str, argv: &[String]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(argv);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(netns_name("default"), "capsules-default");
        assert_eq!(tap_name(3), "tap3");
        let cmd = exec_command("capsules-x", &["ping".into(), "-c1".into()]);
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(cmd.get_program(), "ip");
        assert_eq!(args, ["netns", "exec", "capsules-x", "ping", "-c1"]);
    }

    #[test]
    fn path_lookup() {
        assert!(on_path("sh"));
        assert!(!on_path("surely-not-a-program-capsules"));
    }
}
