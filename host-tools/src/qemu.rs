//! How a Capsules VM is started in QEMU: the one place that builds its command
//! line, spawns it detached, and probes which accelerator really works.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsules_wire::exit::KernelExit;

pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// The fw_cfg name under which the guest finds the cluster key (the kernel's
/// `drivers::fw_cfg::KEY_FILE`).
pub const KEY_FW_CFG_NAME: &str = "opt/capsules/key";

/// An accelerator QEMU runs the guest on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }

    /// The `-accel`/`-cpu` arguments. KVM passes the host CPU through; TCG
    /// emulates the richest CPU model it has.
    fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// The network card of a VM: a tap device (already created in the lab
/// namespace) or none at all (accelerator probes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nic {
    Tap {
        ifname: String,
        mac: String,
    },
    /// Several taps, one virtio-net device each, in this (PCI) order: the
    /// router of a routed lab.
    Taps(Vec<(String, String)>),
    None,
}

/// Everything that differs between VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub cmdline: String,
    pub mem_mib: u32,
    pub accel: Accel,
    pub serial_log: PathBuf,
    /// A QEMU monitor socket, for post-mortems of a VM that stopped answering.
    pub monitor: Option<PathBuf>,
    pub nic: Nic,
    /// A root-only file holding the cluster key, handed to the guest through
    /// fw_cfg: QEMU's command line (world-readable in /proc) names the file,
    /// never the key.
    pub key_file: Option<PathBuf>,
}

/// A value for a QEMU `key=value,…` option: commas are doubled.
fn qemu_option_value(value: &Path) -> String {
    value.to_string_lossy().replace(',', ",,")
}

/// The complete QEMU argument list (without the program name) for one VM.
pub fn qemu_args(spec: &VmSpec) -> Vec<String> {
    let mut args: Vec<String> = [
        "-machine",
        "q35",
        "-m",
        &spec.mem_mib.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        &spec.kernel.to_string_lossy(),
        "-append",
        &spec.cmdline,
        "-serial",
        &format!("file:{}", spec.serial_log.display()),
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(key_file) = &spec.key_file {
        args.push("-fw_cfg".into());
        args.push(format!(
            "name={KEY_FW_CFG_NAME},file={}",
            qemu_option_value(key_file)
        ));
    }
    if let Some(monitor) = &spec.monitor {
        args.push("-monitor".into());
        args.push(format!("unix:{},server=on,wait=off", monitor.display()));
    }
    match &spec.nic {
        Nic::Tap { ifname, mac } => {
            args.push("-netdev".into());
            args.push(format!(
                "tap,id=net0,ifname={ifname},script=no,downscript=no"
            ));
            args.push("-device".into());
            args.push(format!("virtio-net-pci,netdev=net0,mac={mac}"));
        }
        Nic::Taps(taps) => {
            for (i, (ifname, mac)) in taps.iter().enumerate() {
                args.push("-netdev".into());
                args.push(format!(
                    "tap,id=net{i},ifname={ifname},script=no,downscript=no"
                ));
                args.push("-device".into());
                args.push(format!("virtio-net-pci,netdev=net{i},mac={mac}"));
            }
        }
        Nic::None => {
            args.push("-nic".into());
            args.push("none".into());
        }
    }
    args.extend(spec.accel.args().iter().map(|s| s.to_string()));
    args
}

/// Starts QEMU so that it outlives this process: a new session (no terminal
/// signals reach it), stdin from /dev/null, stdout and stderr to `log`.
/// The caller must already be in the lab's network namespace: QEMU inherits it
/// and finds its tap there.
pub fn spawn_detached(spec: &VmSpec, log: &Path) -> Result<std::process::Child> {
    let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(QEMU_BINARY);
    cmd.args(qemu_args(spec))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent;
    // it is the only call made between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {QEMU_BINARY}"))
}

/// The result of one probe boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The kernel booted and exited with [`KernelExit::Success`].
    Booted,
    /// QEMU ended some other way (status, or `None` when killed by a signal).
    Failed(Option<i32>),
    /// It neither booted nor failed in time (nested KVM tends to hang).
    TimedOut,
}

/// Boots `kernel` with `probe` on `accel` and waits at most `timeout`.
pub fn probe_boot(kernel: &Path, accel: Accel, timeout: Duration) -> Result<ProbeOutcome> {
    let spec = VmSpec {
        kernel: kernel.to_path_buf(),
        cmdline: "probe".into(),
        mem_mib: 64,
        accel,
        serial_log: PathBuf::from("/dev/null"),
        monitor: None,
        nic: Nic::None,
        key_file: None,
    };
    let mut child = Command::new(QEMU_BINARY)
        .args(qemu_args(&spec))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {QEMU_BINARY}"))?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(match status.code() {
                Some(c) if c == KernelExit::Success.qemu_status() => ProbeOutcome::Booted,
                code => ProbeOutcome::Failed(code),
            });
        }
        if start.elapsed() > timeout {
            // Our own child, killed through its handle: no pid reuse possible.
            let _ = child.kill();
            let _ = child.wait();
            return Ok(ProbeOutcome::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the user asked for on `--accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// Picks the accelerator and explains the choice in one line.
pub fn choose_accel(kernel: &Path, choice: AccelChoice) -> Result<(Accel, String)> {
    Ok(match choice {
        AccelChoice::Kvm => {
            if !Path::new("/dev/kvm").exists() {
                bail!(
                    "--accel kvm: /dev/kvm does not exist on this machine (use --accel auto or tcg)"
                );
            }
            (Accel::Kvm, "kvm (requested)".into())
        }
        AccelChoice::Tcg => (Accel::Tcg, "tcg (requested)".into()),
        AccelChoice::Auto => {
            if !Path::new("/dev/kvm").exists() {
                (Accel::Tcg, "tcg (auto: no /dev/kvm)".into())
            } else {
                match probe_boot(kernel, Accel::Kvm, Duration::from_secs(5))? {
                    ProbeOutcome::Booted => (Accel::Kvm, "kvm (auto: probe boot succeeded)".into()),
                    ProbeOutcome::Failed(code) => (
                        Accel::Tcg,
                        format!(
                            "tcg (auto: KVM probe boot failed with status {})",
                            code.map_or("signal".into(), |c| c.to_string())
                        ),
                    ),
                    ProbeOutcome::TimedOut => {
                        (Accel::Tcg, "tcg (auto: KVM probe boot hung for 5 s)".into())
                    }
                }
            }
        }
    })
}

/// Checks that the kernel boots at all on `accel` (used before a lab starts,
/// so a broken kernel gives one clear error instead of N timeouts).
pub fn require_probe_boot(kernel: &Path, accel: Accel) -> Result<()> {
    match probe_boot(kernel, accel, Duration::from_secs(30))? {
        ProbeOutcome::Booted => Ok(()),
        ProbeOutcome::Failed(Some(code)) => match KernelExit::from_qemu_status(code) {
            Some(k) => bail!(
                "kernel {} does not boot on {}: it exited with '{}'",
                kernel.display(),
                accel.as_str(),
                k.describe()
            ),
            None => bail!(
                "kernel {} does not boot on {}: QEMU exited with status {code}",
                kernel.display(),
                accel.as_str()
            ),
        },
        ProbeOutcome::Failed(None) => bail!("QEMU was killed by a signal during a probe boot"),
        ProbeOutcome::TimedOut => bail!(
            "kernel {} did not finish a probe boot on {} within 30 s",
            kernel.display(),
            accel.as_str()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nic: Nic, accel: Accel) -> VmSpec {
        VmSpec {
            kernel: "/k/capsules-kernel".into(),
            cmdline: "ip=192.0.2.10/24 gw=192.0.2.1 ctl=7070 log=info name=vm0".into(),
            mem_mib: 256,
            accel,
            serial_log: "/run/capsules/l/vm0.serial.log".into(),
            monitor: Some("/run/capsules/l/vm0.monitor".into()),
            nic,
            key_file: Some("/run/capsules/l/cluster.key".into()),
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn lab_vm_arguments() {
        let nic = Nic::Tap {
            ifname: "tap0".into(),
            mac: "52:54:00:c5:00:00".into(),
        };
        let args = qemu_args(&spec(nic, Accel::Tcg));
        assert_eq!(after(&args, "-machine"), ["q35"]);
        assert_eq!(after(&args, "-m"), ["256"]);
        assert_eq!(after(&args, "-kernel"), ["/k/capsules-kernel"]);
        assert_eq!(
            after(&args, "-append"),
            ["ip=192.0.2.10/24 gw=192.0.2.1 ctl=7070 log=info name=vm0"]
        );
        assert_eq!(
            after(&args, "-serial"),
            ["file:/run/capsules/l/vm0.serial.log"]
        );
        assert_eq!(
            after(&args, "-netdev"),
            ["tap,id=net0,ifname=tap0,script=no,downscript=no"]
        );
        assert_eq!(
            after(&args, "-device"),
            [
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "virtio-net-pci,netdev=net0,mac=52:54:00:c5:00:00"
            ]
        );
        assert_eq!(
            after(&args, "-fw_cfg"),
            ["name=opt/capsules/key,file=/run/capsules/l/cluster.key"]
        );
        assert_eq!(after(&args, "-accel"), ["tcg"]);
        assert_eq!(after(&args, "-cpu"), ["max"]);
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing");
        }
    }

    #[test]
    fn the_key_file_is_named_never_the_key() {
        let mut s = spec(Nic::None, Accel::Tcg);
        s.key_file = Some("/tmp/odd,dir/cluster.key".into());
        let args = qemu_args(&s);
        // A comma in the path is doubled, as QEMU's option syntax wants.
        assert_eq!(
            after(&args, "-fw_cfg"),
            ["name=opt/capsules/key,file=/tmp/odd,,dir/cluster.key"]
        );
        assert!(!args.iter().any(|a| a.contains("key=")), "{args:?}");
        s.key_file = None;
        assert!(after(&qemu_args(&s), "-fw_cfg").is_empty());
    }

    #[test]
    fn probe_arguments_use_kvm_host_cpu_and_no_nic() {
        let args = qemu_args(&spec(Nic::None, Accel::Kvm));
        assert_eq!(after(&args, "-accel"), ["kvm"]);
        assert_eq!(after(&args, "-cpu"), ["host"]);
        assert_eq!(after(&args, "-nic"), ["none"]);
        assert!(after(&args, "-netdev").is_empty());
    }
}
