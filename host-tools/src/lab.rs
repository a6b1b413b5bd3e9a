//! Labs: bring up, inspect and tear down a namespace full of Capsules VMs.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsules_wire::bootcfg::{
    BootConfig, DEFAULT_CONTROL_PORT, Ipv4Cidr, LogLevel, MAX_NAME_LEN, encode_hex,
};
use capsules_wire::control::Status;
use serde::Serialize;

use crate::control::ControlClient;
use crate::directory::CapsuleRange;
use crate::netns::{self, NetnsGuard};
use crate::progress::Progress;
use crate::qemu::{self, Accel, AccelChoice, Nic, VmSpec};
use crate::state::{self, LabState, VmRecord};

/// The lab LAN: bridge (gateway) address and prefix; VM i (counted from 1)
/// gets .(10+i), so a two-VM lab is 192.0.2.11 and .12.
pub const LAB_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const LAB_PREFIX: u8 = 24;
const FIRST_VM_HOST: u8 = 10;
pub const MAX_VMS: usize = 64;
/// Where `cargo build --release` in kernel/ puts the ELF, relative to the repo.
pub const KERNEL_RELATIVE_PATH: &str =
    "kernel/target/x86_64-unknown-linux-gnu/release/capsules-kernel";
pub const KERNEL_ENV: &str = "CAPSULES_KERNEL";
const CLUSTER_KEY_LEN: usize = 32;
/// How long `lab up` waits for every control port.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-connection timeout of control requests.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// Options of `lab up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    pub vms: usize,
    pub mem_mib: u32,
    pub accel: AccelChoice,
    pub kernel: Option<PathBuf>,
    pub capsule_range: CapsuleRange,
    /// VM subnets: 1 is a single-subnet lab as before; 2 or more make a
    /// routed lab (crate::routed) with a client subnet and a router VM.
    pub subnets: usize,
    /// The VM subnets' networks (/24s), in order; empty: the defaults
    /// (`routed::default_subnets`).
    pub subnet_list: Vec<Ipv4Cidr>,
}

/// Lab names become part of a namespace name and a directory name.
pub fn validate_lab_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        bail!("invalid lab name '{name}': use 1-{MAX_NAME_LEN} characters of [A-Za-z0-9_-]");
    }
    Ok(())
}

/// Name, address and MAC of VM `index` (1..=MAX_VMS).
pub fn vm_identity(index: usize) -> (String, Ipv4Addr, String) {
    let host = FIRST_VM_HOST + u8::try_from(index).expect("VM index below MAX_VMS");
    let ip = Ipv4Addr::new(192, 0, 2, host);
    let mac = format!("52:54:00:c5:00:{index:02x}");
    (format!("vm{index}"), ip, mac)
}

/// The kernel command line of one lab VM. `locators` is the lab's capsule
/// range, which the VM's switch treats as on-link. It carries no key: every
/// local user can read QEMU's command line (the key goes through fw_cfg, see
/// [`state::write_key_file`]).
pub fn vm_cmdline(vm: &VmRecord, gateway: Ipv4Addr, locators: CapsuleRange) -> String {
    BootConfig {
        ip: Some(Ipv4Cidr {
            addr: vm.ip,
            prefix: vm.prefix,
        }),
        gateway: Some(gateway),
        control_port: vm.control_port,
        log_level: LogLevel::Info,
        name: Some(vm.name.clone()),
        probe: false,
        locators: Ipv4Cidr {
            addr: locators.base,
            prefix: locators.prefix,
        },
        ..BootConfig::default()
    }
    .to_cmdline()
}

/// Finds the kernel: `--kernel`, then `$CAPSULES_KERNEL`, then the release ELF
/// in a repository above this executable or the working directory.
pub fn resolve_kernel(explicit: Option<&Path>) -> Result<PathBuf> {
    let chosen = explicit.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(KERNEL_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(path) = chosen {
        if !path.is_file() {
            bail!("kernel {} does not exist", path.display());
        }
        return Ok(fs::canonicalize(&path)?);
    }
    let mut starts = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        starts.extend(exe.parent().map(Path::to_path_buf));
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    for start in &starts {
        for dir in start.ancestors() {
            let candidate = dir.join(KERNEL_RELATIVE_PATH);
            if candidate.is_file() {
                return Ok(fs::canonicalize(candidate)?);
            }
        }
    }
    bail!(
        "kernel ELF not found ({KERNEL_RELATIVE_PATH} above the executable or the working directory): \
         build it with `cd kernel && cargo build --release`, or pass --kernel PATH or set {KERNEL_ENV}"
    )
}

fn require_qemu() -> Result<()> {
    if !netns::on_path(qemu::QEMU_BINARY) {
        bail!(
            "{} not found: apt-get install qemu-system-x86",
            qemu::QEMU_BINARY
        );
    }
    Ok(())
}

fn random_key() -> Result<Vec<u8>> {
    let mut key = vec![0u8; CLUSTER_KEY_LEN];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness for the key: {e}"))?;
    Ok(key)
}

/// The last `lines` lines of a file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            if all.is_empty() {
                "(empty)".into()
            } else {
                all[start..].join("\n")
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Why a VM is not serving, with its logs.
fn vm_failure_report(vm: &VmRecord, what: &str) -> String {
    format!(
        "{} ({}): {what}\n--- last lines of {} ---\n{}\n--- last lines of {} ---\n{}",
        vm.name,
        vm.ip,
        vm.serial_log.display(),
        tail(&vm.serial_log, 20),
        vm.qemu_log.display(),
        tail(&vm.qemu_log, 5)
    )
}

/// What `lab up` reports per VM.
#[derive(Debug, Clone, Serialize)]
pub struct UpReport {
    pub lab: String,
    pub accel_reason: String,
    pub state: LabState,
}

/// Creates a lab and waits until every VM's control service answers.
pub fn up(opts: &UpOptions) -> Result<UpReport> {
    up_with_overrides(opts, &[])
}

/// Like [`up`], with some VMs booting another kernel (`--kernel-for VM=PATH`),
/// for checks that refuse to move capsules between different builds.
pub fn up_with_overrides(opts: &UpOptions, kernel_for: &[(String, PathBuf)]) -> Result<UpReport> {
    validate_lab_name(&opts.name)?;
    if opts.vms == 0 || opts.vms > MAX_VMS {
        bail!("--vms must be between 1 and {MAX_VMS}");
    }
    netns::require_root_and_ip()?;
    require_qemu()?;
    let kernel = resolve_kernel(opts.kernel.as_deref())?;
    let build_id = crate::elf::read_build_id(&kernel)?;
    let ns = netns::netns_name(&opts.name);
    let dir = state::lab_dir(&opts.name);
    if netns::exists(&ns) || state::load(&dir)?.is_some() {
        bail!(
            "lab '{}' already exists (namespace {ns}, state {}): use `capsulectl lab down --lab {}` first",
            opts.name,
            dir.display(),
            opts.name
        );
    }
    let (accel, accel_reason) = qemu::choose_accel(&kernel, opts.accel)?;
    let key = random_key()?;
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let routed = match opts.subnets {
        0 => bail!("--subnets must be at least 1"),
        1 if opts.subnet_list.len() > 1 => {
            bail!("--subnet-list names several subnets: give --subnets too")
        }
        1 => None,
        n => {
            let mut subnets = crate::routed::default_subnets(n);
            if !opts.subnet_list.is_empty() {
                if opts.subnet_list.len() != n {
                    bail!(
                        "--subnet-list names {} subnets, --subnets says {n}",
                        opts.subnet_list.len()
                    );
                }
                subnets = opts.subnet_list.clone();
            }
            crate::routed::check_subnets(&subnets, opts.capsule_range)?;
            Some(crate::routed::plan(&opts.name, &ns, &dir, &subnets))
        }
    };
    let vms = (1..=opts.vms)
        .map(|i| {
            let (name, mut ip, mac) = vm_identity(i);
            let (mut subnet, mut vm_netns) = (1, None);
            if let Some(routed) = &routed {
                (subnet, ip, vm_netns) = crate::routed::place(routed, i);
            }
            VmRecord {
                serial_log: dir.join(format!("{name}.serial.log")),
                qemu_log: dir.join(format!("{name}.qemu.log")),
                name,
                ip,
                prefix: LAB_PREFIX,
                mac,
                tap: netns::tap_name(i),
                control_port: DEFAULT_CONTROL_PORT,
                pid: None,
                subnet,
                netns: vm_netns,
            }
        })
        .collect();
    let mut kernel_overrides = std::collections::BTreeMap::new();
    for (vm, path) in kernel_for {
        if !(1..=opts.vms).any(|i| vm_identity(i).0 == *vm) {
            bail!(
                "--kernel-for names VM '{vm}', but the lab has vm1..vm{}",
                opts.vms
            );
        }
        let id = crate::elf::read_build_id(path)?;
        kernel_overrides.insert(vm.clone(), (path.clone(), encode_hex(&id)));
    }
    let mut lab = LabState {
        kernel_overrides,
        name: opts.name.clone(),
        netns: ns.clone(),
        bridge: netns::BRIDGE_NAME.into(),
        gateway: LAB_GATEWAY,
        key_hex: encode_hex(&key),
        accel: accel.as_str().into(),
        kernel: kernel.clone(),
        kernel_build_id: encode_hex(&build_id),
        mem_mib: opts.mem_mib,
        vms,
        capsule_range: opts.capsule_range,
        directory_pid: None,
        routed,
    };
    // Saved before anything is created, so `lab down` can clean up whatever a
    // failed or interrupted `lab up` leaves behind.
    state::save(&dir, &lab)?;
    // Counts VMs whose control service answers; on a terminal only, and only
    // once booting takes a moment.
    let progress = Progress::count(
        opts.vms as u64,
        format!("lab '{}': booting {} VMs", opts.name, opts.vms),
    );
    let started = start_lab(&mut lab, &dir, accel, &build_id, &progress);
    progress.finish();
    match started {
        Ok(()) => Ok(UpReport {
            lab: opts.name.clone(),
            accel_reason,
            state: lab,
        }),
        Err(e) => {
            if let Err(cleanup) = down_state(&lab, &dir) {
                eprintln!("capsulectl: cleanup after failed lab up also failed: {cleanup:#}");
            }
            Err(e)
        }
    }
}

fn start_lab(
    lab: &mut LabState,
    dir: &Path,
    accel: Accel,
    build_id: &[u8],
    progress: &Progress,
) -> Result<()> {
    netns::create_lab_network(&lab.netns, lab.gateway, LAB_PREFIX)?;
    if let Some(routed) = lab.routed.clone() {
        crate::routed::create_networks(lab, &routed)?;
    } else {
        // Capsule locators are on-link on the bridge: the namespace ARPs for
        // them and whichever VM hosts the capsule answers.
        netns::ip(&[
            "-n",
            &lab.netns,
            "route",
            "add",
            &lab.capsule_range.to_string(),
            "dev",
            &lab.bridge,
        ])?;
    }
    for vm in &lab.vms {
        netns::add_tap(vm.netns.as_deref().unwrap_or(&lab.netns), &vm.tap)?;
    }
    let key = lab.key()?;
    // Root-only, beside the state file; QEMU reads it at start-up.
    let key_file = state::write_key_file(dir, &key)?;
    let _inside = NetnsGuard::enter(&lab.netns)?;
    if lab.routed.is_some() {
        start_router(lab, dir, accel, &key, &key_file, build_id)?;
    }
    let mut children = Vec::new();
    for i in 0..lab.vms.len() {
        let vm = &lab.vms[i];
        // A VM of another subnet starts in that subnet's namespace, where
        // its tap is.
        let _there = vm.netns.as_deref().map(NetnsGuard::enter).transpose()?;
        let child = qemu::spawn_detached(&vm_spec(lab, vm, &key_file, accel), &vm.qemu_log)?;
        lab.vms[i].pid = Some(child.id());
        state::save(dir, lab)?;
        children.push(child);
    }
    wait_ready_with_progress(lab, &mut children, &key, build_id, READY_TIMEOUT, progress)?;
    drop(_inside);
    progress.set_message(format!("lab '{}': starting the directory", lab.name));
    start_directory(lab, dir)
}

/// Boots the router VM of a routed lab (the caller is inside the lab
/// namespace, where its taps are until they move to their subnets), waits
/// until its control service answers with the expected build, and gives it
/// the (empty) translation table.
fn start_router(
    lab: &mut LabState,
    dir: &Path,
    accel: Accel,
    key: &[u8],
    key_file: &Path,
    build_id: &[u8],
) -> Result<()> {
    let Some(routed) = lab.routed.clone() else {
        return Ok(());
    };
    let spec = VmSpec {
        kernel: lab.kernel.clone(),
        cmdline: crate::routed::router_cmdline(&routed, lab.capsule_range),
        key_file: Some(key_file.to_path_buf()),
        mem_mib: lab.mem_mib,
        accel,
        serial_log: routed.router.serial_log.clone(),
        monitor: Some(monitor_path(&routed.router)),
        nic: Nic::Taps(
            routed
                .router_nics
                .iter()
                .map(|n| (n.tap.clone(), n.mac.clone()))
                .collect(),
        ),
    };
    let child = qemu::spawn_detached(&spec, &routed.router.qemu_log)?;
    if let Some(r) = lab.routed.as_mut() {
        r.router.pid = Some(child.id());
    }
    state::save(dir, lab)?;
    // Its first NIC is on the lab namespace's bridge already: once the
    // control service answers, QEMU has long opened every tap (it does
    // before the guest starts), and the others can move to their subnets.
    let router = lab
        .routed
        .as_ref()
        .map(|r| r.router.clone())
        .unwrap_or(routed.router.clone());
    let mut only = lab.clone();
    only.vms = vec![router];
    only.kernel_overrides.clear();
    let mut children = [child];
    wait_ready(&only, &mut children, key, build_id, READY_TIMEOUT)?;
    crate::routed::move_router_taps(lab, &routed)?;
    crate::routed::push(lab, true, Vec::new())
}

/// How QEMU runs `vm` of `lab` (the caller is inside the namespace where
/// its tap lives).
pub fn vm_spec(lab: &LabState, vm: &VmRecord, key_file: &Path, accel: Accel) -> VmSpec {
    let gateway = lab
        .routed
        .as_ref()
        .and_then(|r| crate::routed::gateway_of(r, vm.subnet))
        .unwrap_or(lab.gateway);
    VmSpec {
        kernel: lab.kernel_of(&vm.name).0.to_path_buf(),
        cmdline: vm_cmdline(vm, gateway, lab.capsule_range),
        key_file: Some(key_file.to_path_buf()),
        mem_mib: lab.mem_mib,
        accel,
        serial_log: vm.serial_log.clone(),
        monitor: Some(monitor_path(vm)),
        nic: Nic::Tap {
            ifname: vm.tap.clone(),
            mac: vm.mac.clone(),
        },
    }
}

/// The DNS address of a lab's directory: the bridge address, port 53.
pub fn directory_addr(lab: &LabState) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(lab.gateway, 53))
}

/// True when `pid` is this lab's directory server (checked through its
/// command line, so a recycled pid is never taken for it).
pub fn is_our_directory(pid: u32, lab: &str) -> bool {
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    cmdline_is_our_directory(&raw, lab)
}

fn cmdline_is_our_directory(raw: &[u8], lab: &str) -> bool {
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    args.windows(4)
        .any(|w| w == [&b"directory"[..], b"serve", b"--lab", lab.as_bytes()])
}

/// Whether the lab's recorded directory process is alive.
pub fn directory_running(lab: &LabState) -> bool {
    lab.directory_pid
        .is_some_and(|pid| is_our_directory(pid, &lab.name))
}

/// Starts the lab's directory server as a background process (its own
/// session, output in `directory.log`), records its pid in the lab state and
/// waits until it answers DNS. It enters the lab namespace itself.
pub fn start_directory(lab: &mut LabState, dir: &Path) -> Result<()> {
    if directory_running(lab) {
        bail!(
            "the directory of lab '{}' is already running (pid {})",
            lab.name,
            lab.directory_pid.unwrap_or_default()
        );
    }
    let exe = capsulectl_exe()?;
    let log = dir.join("directory.log");
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["directory", "serve", "--lab", &lab.name])
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe and the only call between fork and
    // exec; it detaches the server from our terminal and process group.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the directory server")?;
    lab.directory_pid = Some(child.id());
    state::save(dir, lab)?;
    let _inside = NetnsGuard::enter(&lab.netns)?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the directory server exited with {status}\n--- last lines of {} ---\n{}",
                log.display(),
                tail(&log, 10)
            );
        }
        let probe = format!("{}.", crate::directory::DNS_ZONE);
        if crate::directory::lookup(directory_addr(lab), &probe, Duration::from_millis(200)).is_ok()
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!(
                "the directory server does not answer DNS on {}\n--- last lines of {} ---\n{}",
                directory_addr(lab),
                log.display(),
                tail(&log, 10)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `capsulectl` binary that runs the directory server: this process if
/// it is capsulectl, else `$CAPSULECTL`, else a `capsulectl` beside this
/// executable (the benchmarks and tests link the library and live in the
/// same target directory).
pub fn capsulectl_exe() -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this executable")?;
    if me
        .file_name()
        .is_some_and(|n| n.to_string_lossy() == "capsulectl")
    {
        return Ok(me);
    }
    if let Some(p) = std::env::var_os("CAPSULECTL").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let beside = me.parent().map(|d| d.join("capsulectl"));
    let up = me
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("capsulectl"));
    for candidate in beside.into_iter().chain(up) {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "cannot find the capsulectl binary to run the directory server: build it \
         (`cargo build --release -p capsulectl`) or set CAPSULECTL=PATH"
    )
}

/// Stops the lab's directory server (SIGTERM, then SIGKILL), by its recorded
/// pid only, and forgets the pid.
pub fn stop_directory(lab: &mut LabState, dir: &Path) -> Result<()> {
    let exited = end_directory(lab, dir)?;
    wait_reaped(exited.into_iter());
    Ok(())
}

/// Ends the directory server and records that; returns its pid and start
/// time for `wait_reaped` (the exited process may still await its reaping).
fn end_directory(lab: &mut LabState, dir: &Path) -> Result<Option<(u32, Option<u64>)>> {
    let mut exited = None;
    if let Some(pid) = lab.directory_pid {
        let ours = |p: u32| is_our_directory(p, &lab.name);
        if ours(pid) {
            exited = Some((pid, process_start_ticks(pid)));
        }
        for sig in [libc::SIGTERM, libc::SIGKILL] {
            if !ours(pid) {
                break;
            }
            signal_checked(pid, sig, &ours);
            let start = Instant::now();
            while ours(pid) && start.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if ours(pid) {
            bail!("directory server pid {pid} survived SIGKILL");
        }
    }
    lab.directory_pid = None;
    if dir.exists() {
        state::save(dir, lab)?;
    }
    Ok(exited)
}

/// Polls every VM until its control service gives an authenticated Version
/// with the expected build id; fails early when a QEMU process ends.
pub fn wait_ready(
    lab: &LabState,
    children: &mut [Child],
    key: &[u8],
    build_id: &[u8],
    timeout: Duration,
) -> Result<()> {
    wait_ready_with_progress(lab, children, key, build_id, timeout, &Progress::hidden())
}

/// [`wait_ready`], counting ready VMs on `progress`.
fn wait_ready_with_progress(
    lab: &LabState,
    children: &mut [Child],
    key: &[u8],
    build_id: &[u8],
    timeout: Duration,
    progress: &Progress,
) -> Result<()> {
    let start = Instant::now();
    let mut ready = vec![false; lab.vms.len()];
    let mut last_error: Vec<String> = vec!["not tried yet".into(); lab.vms.len()];
    while ready.iter().any(|r| !r) {
        for (i, vm) in lab.vms.iter().enumerate() {
            if ready[i] {
                continue;
            }
            if let Some(status) = children[i].try_wait()? {
                let why = match status
                    .code()
                    .and_then(capsules_wire::exit::KernelExit::from_qemu_status)
                {
                    Some(k) => format!(
                        "QEMU exited during boot: kernel reported '{}'",
                        k.describe()
                    ),
                    None => format!("QEMU exited during boot with {status}"),
                };
                bail!("{}", vm_failure_report(vm, &why));
            }
            // A VM with its own kernel (`--kernel-for`) has its own build id.
            let expected = match lab.kernel_overrides.get(&vm.name) {
                Some((_, id)) => id.clone(),
                None => encode_hex(build_id),
            };
            match ask_version(vm, key) {
                Ok((_, reported, _)) if encode_hex(&reported) == expected => {
                    ready[i] = true;
                    progress.inc(1);
                }
                Ok((_, reported, _)) => bail!(
                    "{}",
                    vm_failure_report(
                        vm,
                        &format!(
                            "reports build id {} but the kernel file has {expected}",
                            encode_hex(&reported),
                        )
                    )
                ),
                Err(e) => last_error[i] = format!("{e:#}"),
            }
        }
        if ready.iter().all(|r| *r) {
            break;
        }
        if start.elapsed() > timeout {
            let reports: Vec<String> = lab
                .vms
                .iter()
                .enumerate()
                .filter(|(i, _)| !ready[*i])
                .map(|(i, vm)| {
                    vm_failure_report(
                        vm,
                        &format!(
                            "control port not answering after {} s (last error: {})",
                            timeout.as_secs(),
                            last_error[i]
                        ),
                    )
                })
                .collect();
            bail!("{}", reports.join("\n"));
        }
        progress.tick();
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn control_addr(vm: &VmRecord) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(vm.ip, vm.control_port))
}

/// Connects to a VM's control port (the caller is inside the lab namespace).
/// A VM of another subnet (routed labs) is reached from its own subnet's
/// namespace: the socket is made there, so control never depends on the
/// router.
pub fn connect(vm: &VmRecord, key: &[u8]) -> Result<ControlClient> {
    let _there = vm.netns.as_deref().map(NetnsGuard::enter).transpose()?;
    ControlClient::connect(control_addr(vm), key, CONTROL_TIMEOUT)
}

fn ask_version(vm: &VmRecord, key: &[u8]) -> Result<(u16, Vec<u8>, String)> {
    connect(vm, key)?.version()
}

/// Loads a lab's state or explains that there is no such lab.
pub fn load_lab(name: &str) -> Result<(LabState, PathBuf)> {
    validate_lab_name(name)?;
    let dir = state::lab_dir(name);
    match state::load(&dir)? {
        Some(lab) => Ok((lab, dir)),
        None => bail!(
            "no lab named '{name}' (no state in {}): start one with `capsulectl lab up --lab {name}`",
            dir.display()
        ),
    }
}

/// The QEMU monitor socket of `vm`, beside its serial log.
pub fn monitor_path(vm: &VmRecord) -> PathBuf {
    vm.serial_log.with_file_name(format!("{}.monitor", vm.name))
}

/// Runs one human-monitor command (such as `info registers`) on `vm`'s QEMU
/// and returns what it printed: a post-mortem of a VM that stopped answering
/// on the network.
pub fn monitor_command(vm: &VmRecord, command: &str) -> Result<String> {
    use std::io::{Read, Write};
    let path = monitor_path(vm);
    let mut sock = std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("cannot connect to the monitor {}", path.display()))?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    sock.write_all(format!("{command}\n").as_bytes())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // The monitor never closes the stream; what it says arrives within the
    // timeout, after which the read fails and we stop.
    while let Ok(n) = sock.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&out);
    // Drop the banner and prompts; keep the command's output.
    Ok(text
        .lines()
        .filter(|l| !l.starts_with("QEMU ") && !l.starts_with("(qemu)"))
        .map(|l| l.trim_end_matches('\r'))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Whether `vm`'s QEMU (its recorded pid) still runs. A VM for which this is
/// false holds nothing and never will; it is not worth a connection attempt.
pub fn vm_alive(vm: &VmRecord) -> bool {
    vm.pid.is_some_and(|pid| is_our_qemu(pid, vm))
}

/// True when `pid` is a live QEMU started for this VM. Checked through its
/// command line, so a recycled pid is never mistaken for ours.
pub fn is_our_qemu(pid: u32, vm: &VmRecord) -> bool {
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    cmdline_is_our_qemu(&raw, vm)
}

fn cmdline_is_our_qemu(raw: &[u8], vm: &VmRecord) -> bool {
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    let serial = format!("file:{}", vm.serial_log.display());
    args.first()
        .is_some_and(|a0| a0.ends_with(qemu::QEMU_BINARY.as_bytes()))
        && args.contains(&serial.as_bytes())
}

/// Sends `sig` to our QEMU. The process is pinned with a pidfd first and
/// checked through /proc afterwards, so the signal cannot reach a process that
/// reused the pid in between.
fn signal(pid: u32, sig: libc::c_int, vm: &VmRecord) {
    signal_checked(pid, sig, &|p| is_our_qemu(p, vm));
}

/// Sends `sig` to `pid` through a pidfd, only if `is_ours(pid)` still holds
/// once the pidfd pins the process.
fn signal_checked(pid: u32, sig: libc::c_int, is_ours: &dyn Fn(u32) -> bool) {
    let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
    let Ok(fd) = libc::c_int::try_from(fd) else {
        return;
    };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    if is_ours(pid) {
        // SAFETY: a valid pidfd, a signal number and no siginfo (null is allowed).
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }
}

/// When a process started, in clock ticks since boot (field 22 of
/// /proc/PID/stat): with the pid, it names one process for its whole life,
/// zombie state included, so a recycled pid is never taken for it.
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count the
    // fields after its closing parenthesis.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// How long `lab down` waits for the parent of an exited QEMU (init, as
/// `lab up` has long returned) to reap it. Instant under systemd; some
/// container inits reap about once a second.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// Stops a lab's VMs together: authenticated Shutdown to each, then SIGTERM,
/// then SIGKILL to those still running, each step with a bounded wait. Returns
/// the exited QEMUs (pid, start time) for `wait_reaped`, or fails naming the
/// one that survived SIGKILL.
pub fn stop_vms(
    vms: &[VmRecord],
    key: &[u8],
    in_namespace: bool,
) -> Result<Vec<(u32, Option<u64>)>> {
    // Each running QEMU of ours, pinned by its start time.
    let ours: Vec<(&VmRecord, u32, Option<u64>)> = vms
        .iter()
        .filter_map(|vm| {
            let pid = vm.pid?;
            let start = process_start_ticks(pid);
            is_our_qemu(pid, vm).then_some((vm, pid, start))
        })
        .collect();
    let running = |(vm, pid, _): &&(&VmRecord, u32, Option<u64>)| is_our_qemu(*pid, vm);
    let wait_all = |timeout: Duration| {
        let start = Instant::now();
        while ours.iter().any(|p| running(&p)) && start.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    if in_namespace {
        for (vm, _, _) in &ours {
            let _ = connect(vm, key).and_then(|mut c| c.shutdown());
        }
        wait_all(Duration::from_secs(3));
    }
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        for (vm, pid, _) in ours.iter().filter(running) {
            signal(*pid, sig, vm);
        }
        wait_all(Duration::from_secs(3));
    }
    if let Some((vm, pid, _)) = ours.iter().find(running) {
        bail!("QEMU pid {pid} of {} survived SIGKILL", vm.name);
    }
    Ok(ours.iter().map(|(_, pid, ticks)| (*pid, *ticks)).collect())
}

/// An exited process stays a zombie until its parent reaps it. Waits (at
/// most REAP_GRACE) for that, so that no process of a lab is left when
/// `lab down` returns. Each process is given as its pid and start time.
pub fn wait_reaped(processes: impl Iterator<Item = (u32, Option<u64>)>) {
    let pinned: Vec<(u32, u64)> = processes
        .filter_map(|(pid, ticks)| Some((pid, ticks?)))
        .collect();
    let start = Instant::now();
    while start.elapsed() < REAP_GRACE
        && pinned
            .iter()
            .any(|(pid, ticks)| process_start_ticks(*pid) == Some(*ticks))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops every VM of a lab and deletes its network and state.
pub fn down_state(lab: &LabState, dir: &Path) -> Result<()> {
    let key = lab.key()?;
    let mut exited: Vec<_> = end_directory(&mut lab.clone(), dir)?.into_iter().collect();
    {
        let guard = if netns::exists(&lab.netns) {
            Some(NetnsGuard::enter(&lab.netns)?)
        } else {
            None
        };
        let mut vms = lab.vms.clone();
        if let Some(routed) = &lab.routed {
            vms.push(routed.router.clone());
        }
        exited.extend(stop_vms(&vms, &key, guard.is_some())?);
    }
    // Together, so that the wait is one reaping round, not one per process.
    wait_reaped(exited.into_iter());
    if let Some(routed) = &lab.routed {
        crate::routed::delete_networks(routed)?;
    }
    let taps: Vec<String> = lab
        .vms
        .iter()
        .filter(|vm| vm.netns.is_none())
        .map(|vm| vm.tap.clone())
        .collect();
    netns::delete_lab_network(&lab.netns, &taps)?;
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(())
}

/// `lab down`: also cleans a namespace left without a state file.
pub fn down(name: &str) -> Result<()> {
    validate_lab_name(name)?;
    netns::require_root_and_ip()?;
    let dir = state::lab_dir(name);
    let ns = netns::netns_name(name);
    match state::load(&dir)? {
        Some(lab) => down_state(&lab, &dir),
        None if netns::exists(&ns) => {
            for k in 2..=crate::routed::MAX_SUBNETS {
                netns::delete_lab_network(&crate::routed::subnet_netns(&ns, k), &[])?;
            }
            netns::delete_lab_network(&crate::routed::client_netns(&ns), &[])?;
            netns::delete_lab_network(&ns, &[])?;
            let _ = fs::remove_dir_all(&dir);
            Ok(())
        }
        None => bail!(
            "no lab named '{name}' (no state in {} and no namespace {ns})",
            dir.display()
        ),
    }
}

/// What `vm ls` shows for one VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmInfo {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The VM's subnet (1 unless the lab is routed; the router shows 0).
    pub subnet: usize,
    pub mac: String,
    pub pid: Option<u32>,
    /// running (control service answers), unreachable (QEMU alive but not
    /// answering) or dead.
    pub state: String,
    pub accel: String,
    /// Build id the VM reports, hex.
    pub build_id: Option<String>,
    /// Whether it equals the build id of the lab's kernel file.
    pub build_id_matches: Option<bool>,
    pub uptime_ns: Option<u64>,
    pub boot_ns: Option<u64>,
    pub mem_used_bytes: Option<u64>,
    pub mem_total_bytes: Option<u64>,
    pub nic: Option<NicInfo>,
    pub switch: Option<SwitchInfo>,
    pub error: Option<String>,
}

/// The capsule switch's neighbour table and drop counters (see
/// `capsules_wire::control::SwitchStatus`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SwitchInfo {
    pub neighbours: u64,
    pub neighbour_evictions: u64,
    pub capsule_queue_drops: u64,
    pub held_drops: u64,
    pub tx_drops: u64,
    /// ARP from another MAC claiming a running capsule's locator (two
    /// copies); 0 from kernels that do not report it.
    pub arp_conflicts: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NicInfo {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub interrupts: u64,
}

impl VmInfo {
    fn base(lab: &LabState, vm: &VmRecord, state: &str) -> Self {
        Self {
            name: vm.name.clone(),
            ip: vm.ip,
            subnet: vm.subnet,
            mac: vm.mac.clone(),
            pid: vm.pid,
            state: state.into(),
            accel: lab.accel.clone(),
            build_id: None,
            build_id_matches: None,
            uptime_ns: None,
            boot_ns: None,
            mem_used_bytes: None,
            mem_total_bytes: None,
            nic: None,
            switch: None,
            error: None,
        }
    }

    fn with_status(mut self, build_id: &[u8], expected: &str, s: &Status) -> Self {
        let hex = encode_hex(build_id);
        self.build_id_matches = Some(hex == expected);
        self.build_id = Some(hex);
        self.uptime_ns = Some(s.uptime_ns);
        self.boot_ns = Some(s.boot_ns);
        self.mem_used_bytes = Some(s.mem_used_bytes);
        self.mem_total_bytes = Some(s.mem_total_bytes);
        self.nic = Some(NicInfo {
            rx_packets: s.nic.rx_packets,
            rx_bytes: s.nic.rx_bytes,
            tx_packets: s.nic.tx_packets,
            tx_bytes: s.nic.tx_bytes,
            rx_dropped: s.nic.rx_dropped,
            interrupts: s.nic.interrupts,
        });
        self.switch = Some(SwitchInfo {
            neighbours: s.switch.neighbours,
            neighbour_evictions: s.switch.neighbour_evictions,
            capsule_queue_drops: s.switch.capsule_queue_drops,
            held_drops: s.switch.held_drops,
            tx_drops: s.switch.tx_drops,
            arp_conflicts: s.switch.arp_conflicts,
        });
        self
    }
}

/// `vm ls`: asks every VM of the lab for its version and status.
pub fn list(name: &str) -> Result<Vec<VmInfo>> {
    netns::require_root_and_ip()?;
    let (lab, _) = load_lab(name)?;
    let key = lab.key()?;
    let _inside = if netns::exists(&lab.netns) {
        Some(NetnsGuard::enter(&lab.netns)?)
    } else {
        None
    };
    let mut vms = lab.vms.clone();
    if let Some(routed) = &lab.routed {
        let mut router = routed.router.clone();
        router.subnet = 0;
        vms.push(router);
    }
    Ok(vms
        .iter()
        .map(|vm| {
            let alive = vm_alive(vm);
            if !alive {
                return VmInfo::base(&lab, vm, "dead");
            }
            let asked = connect(vm, &key).and_then(|mut c| {
                let (_, build_id, _) = c.version()?;
                Ok((build_id, c.status()?))
            });
            match asked {
                Ok((build_id, status)) => VmInfo::base(&lab, vm, "running").with_status(
                    &build_id,
                    lab.kernel_of(&vm.name).1,
                    &status,
                ),
                Err(e) => {
                    let mut info = VmInfo::base(&lab, vm, "unreachable");
                    info.error = Some(format!("{e:#}"));
                    info
                }
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsules_wire::control::{NicCounters, SwitchStatus};

    #[test]
    fn vm_identities_follow_the_lab_plan() {
        assert_eq!(
            vm_identity(1),
            (
                "vm1".into(),
                Ipv4Addr::new(192, 0, 2, 11),
                "52:54:00:c5:00:01".into()
            )
        );
        assert_eq!(
            vm_identity(11),
            (
                "vm11".into(),
                Ipv4Addr::new(192, 0, 2, 21),
                "52:54:00:c5:00:0b".into()
            )
        );
        assert_eq!(vm_identity(MAX_VMS).1, Ipv4Addr::new(192, 0, 2, 74));
    }

    #[test]
    fn lab_names_are_checked() {
        for ok in ["default", "t-1_x", "a"] {
            validate_lab_name(ok).unwrap();
        }
        for bad in ["", "a/b", "x y", "../etc", &"n".repeat(33)] {
            assert!(validate_lab_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cmdline_is_what_the_kernel_parses() {
        let dir = Path::new("/tmp/x");
        let lab = crate::state::tests::sample_state(dir);
        let range: CapsuleRange = "10.77.0.0/16".parse().unwrap();
        let line = vm_cmdline(&lab.vms[0], lab.gateway, range);
        assert!(!line.contains("key"), "{line}");
        let cfg = BootConfig::parse(&line).unwrap();
        assert_eq!(
            (cfg.locators.addr, cfg.locators.prefix),
            (Ipv4Addr::new(10, 77, 0, 0), 16)
        );
        assert_eq!(cfg.ip.unwrap().addr, Ipv4Addr::new(192, 0, 2, 11));
        assert_eq!(cfg.gateway, Some(LAB_GATEWAY));
        assert_eq!(cfg.name.as_deref(), Some("vm1"));
        assert!(!cfg.probe);
    }

    #[test]
    fn qemu_identity_check_reads_argv() {
        let lab = crate::state::tests::sample_state(Path::new("/run/capsules/t"));
        let vm = &lab.vms[0];
        let ours = b"qemu-system-x86_64\0-serial\0file:/run/capsules/t/vm1.serial.log\0";
        assert!(cmdline_is_our_qemu(ours, vm));
        let other_lab = b"qemu-system-x86_64\0-serial\0file:/run/capsules/u/vm1.serial.log\0";
        assert!(!cmdline_is_our_qemu(other_lab, vm));
        let not_qemu = b"bash\0file:/run/capsules/t/vm1.serial.log\0";
        assert!(!cmdline_is_our_qemu(not_qemu, vm));
        assert!(!cmdline_is_our_qemu(b"", vm));
        assert!(!is_our_qemu(std::process::id(), vm));
    }

    #[test]
    fn directory_identity_check_reads_argv() {
        let ours = b"/x/capsulectl\0directory\0serve\0--lab\0t\0";
        assert!(cmdline_is_our_directory(ours, "t"));
        assert!(!cmdline_is_our_directory(ours, "u"));
        assert!(!cmdline_is_our_directory(b"/x/capsulectl\0lab\0up\0", "t"));
        assert!(!is_our_directory(std::process::id(), "t"));
    }

    #[test]
    fn info_carries_status() {
        let lab = crate::state::tests::sample_state(Path::new("/tmp/x"));
        let status = Status {
            uptime_ns: 5,
            boot_ns: 4,
            mem_total_bytes: 3,
            mem_used_bytes: 2,
            heap_size_bytes: 1,
            heap_used_bytes: 1,
            nic: NicCounters {
                rx_packets: 9,
                ..NicCounters::default()
            },
            tsc_hz: 1,
            switch: SwitchStatus {
                neighbour_evictions: 6,
                capsule_queue_drops: 7,
                ..SwitchStatus::default()
            },
        };
        let info =
            VmInfo::base(&lab, &lab.vms[0], "running").with_status(&[0xab, 0xcd], "abcd", &status);
        assert_eq!(info.build_id.as_deref(), Some("abcd"));
        assert_eq!(info.build_id_matches, Some(true));
        assert_eq!(info.nic.unwrap().rx_packets, 9);
        let switch = info.switch.unwrap();
        assert_eq!(
            (switch.neighbour_evictions, switch.capsule_queue_drops),
            (6, 7)
        );
    }

    #[test]
    fn tail_shows_last_lines() {
        let p = std::env::temp_dir().join(format!("capsulectl-tail-{}", std::process::id()));
        fs::write(&p, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&p, 2), "b\nc");
        fs::write(&p, "").unwrap();
        assert_eq!(tail(&p, 2), "(empty)");
        fs::remove_file(&p).unwrap();
        assert!(tail(&p, 2).contains("cannot read"));
    }
}
