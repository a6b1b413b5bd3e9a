//! Helpers for the system tests: they drive the real `capsulectl` binary
//! against real QEMU VMs in a lab namespace, with real clients (ping).
//!
//! Prerequisites (root, QEMU, iproute2, ping, a built kernel) are checked up
//! front and a missing one FAILS the test with a message saying what to do:
//! these tests never skip silently. `.ci/run` installs everything.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

pub use capsulectl as host;

pub mod clients;

/// The workspace root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `capsulectl` binary under test: `$CAPSULECTL`, else built now.
///
/// The build uses its own target directory: the `cargo test` that runs us
/// holds the lock on the workspace's, so building there would deadlock.
pub fn capsulectl_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("CAPSULECTL").filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "CAPSULECTL={} does not exist",
                path.display()
            );
            return path;
        }
        let target = repo_root().join("target").join("system-tests");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(repo_root())
            .args([
                "build",
                "--quiet",
                "-p",
                "capsulectl",
                "--bin",
                "capsulectl",
                // The tests' own build carries the fault-injection points
                // (host-tools/src/fault.rs); the release binary does not.
                "--features",
                "fault-injection",
            ])
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .expect("cannot run cargo to build capsulectl");
        assert!(status.success(), "building capsulectl failed");
        target.join("debug").join("capsulectl")
    })
    .clone()
}

/// The kernel the labs boot: `$CAPSULES_KERNEL` or the release build.
pub fn kernel_elf() -> PathBuf {
    let path = std::env::var_os("CAPSULES_KERNEL")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(capsulectl::lab::KERNEL_RELATIVE_PATH));
    assert!(
        path.is_file(),
        "kernel ELF {} is missing: build it with `cd kernel && cargo build --release` \
         (tests/run-all.sh does this first)",
        path.display()
    );
    path
}

/// Fails the test, with what to do, when the machine cannot run labs.
pub fn require_lab_prerequisites() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "system tests need root (network namespaces, taps): run them as root; .ci/run does"
    );
    for (program, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("ip", "iproute2"),
        ("ping", "iputils-ping"),
    ] {
        assert!(
            capsulectl::netns::on_path(program),
            "{program} not found: apt-get install {package} (or run .ci/run)"
        );
    }
    kernel_elf();
}

/// Runs `capsulectl ARGS…` and returns its output.
pub fn capsulectl(args: &[&str]) -> Output {
    Command::new(capsulectl_bin())
        .args(args)
        .output()
        .expect("cannot run capsulectl")
}

/// Like [`capsulectl`], but fails the test unless it exits 0; returns stdout.
pub fn capsulectl_ok(args: &[&str]) -> String {
    let out = capsulectl(args);
    assert!(
        out.status.success(),
        "capsulectl {} failed with {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A lab name no other test (or run) uses.
pub fn unique_lab_name(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "st{}-{tag}{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running lab that is torn down when dropped, also when the test panics.
pub struct Lab {
    pub name: String,
    pub up_output: String,
    down: bool,
}

impl Lab {
    pub fn up(tag: &str, vms: usize) -> Self {
        Self::up_with(tag, vms, &[])
    }

    /// `lab up` with more flags (`--subnets 2`, …).
    pub fn up_with(tag: &str, vms: usize, flags: &[&str]) -> Self {
        require_lab_prerequisites();
        let name = unique_lab_name(tag);
        let vms = vms.to_string();
        // Build the guard before `lab up` finishes so a half-built lab is
        // cleaned too.
        let mut lab = Lab {
            name,
            up_output: String::new(),
            down: false,
        };
        let mut args = vec!["lab", "up", "--lab", &lab.name, "--vms", &vms];
        args.extend_from_slice(flags);
        lab.up_output = capsulectl_ok(&args);
        lab
    }

    /// A guard for a lab that a test tries to create itself (for instance
    /// one expected to fail): it is torn down on drop if anything remains.
    pub fn guard(name: &str) -> Self {
        Lab {
            name: name.to_string(),
            up_output: String::new(),
            down: false,
        }
    }

    /// Runs a command inside the lab namespace through `capsulectl lab exec`.
    pub fn exec(&self, argv: &[&str]) -> Output {
        let mut args = vec!["lab", "exec", "--lab", &self.name, "--"];
        args.extend_from_slice(argv);
        capsulectl(&args)
    }

    /// `vm ls --json`, parsed.
    pub fn vm_ls(&self) -> Vec<serde_json::Value> {
        let out = capsulectl_ok(&["vm", "ls", "--lab", &self.name, "--json"]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("vm ls --json: {e}: {out}"));
        v.as_array().expect("vm ls --json is an array").clone()
    }

    /// A protocol check through the hidden `debug control` command.
    pub fn control_check(&self, vm: &str, check: &str) -> serde_json::Value {
        let out = capsulectl_ok(&[
            "debug", "control", "--lab", &self.name, "--vm", vm, "--check", check,
        ]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("debug control: {e}: {out}"))
    }

    /// `lab down`, asserting success.
    pub fn down(&mut self) {
        self.down = true;
        capsulectl_ok(&["lab", "down", "--lab", &self.name]);
    }

    pub fn netns(&self) -> String {
        capsulectl::netns::netns_name(&self.name)
    }
}

impl Lab {
    /// On a failing test: the last serial lines of every VM, so a CI log
    /// shows what the kernels said before the lab is torn down.
    fn print_serial_tails(&self) {
        let dir = capsulectl::state::lab_dir(&self.name);
        let Ok(Some(state)) = capsulectl::state::load(&dir) else {
            return;
        };
        for vm in &state.vms {
            eprintln!(
                "--- lab {}: last serial lines of {} ---\n{}",
                self.name,
                vm.name,
                capsulectl::lab::tail(&vm.serial_log, 40)
            );
            // Where its CPU is now: a VM that stopped answering shows the
            // loop it is stuck in (resolve with addr2line on the kernel ELF).
            if let Ok(regs) = capsulectl::lab::monitor_command(vm, "info registers") {
                let rip = regs.split_whitespace().find(|w| w.starts_with("RIP="));
                eprintln!("{}: {}", vm.name, rip.unwrap_or("RIP unknown"));
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_serial_tails();
        }
        let exists = capsulectl::netns::exists(&self.netns())
            || capsulectl::state::lab_dir(&self.name).exists();
        if !self.down && exists {
            let out = capsulectl(&["lab", "down", "--lab", &self.name]);
            if !out.status.success() {
                eprintln!(
                    "teardown of lab {} failed: {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Pids of processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) && text.contains("qemu-system") {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Network namespaces as `ip netns list` shows them.
pub fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("cannot run ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test, with what to install, when a client program is missing.
pub fn require_clients(programs: &[(&str, &str)]) {
    for (program, package) in programs {
        assert!(
            capsulectl::netns::on_path(program),
            "{program} not found: apt-get install {package} (or run .ci/run)"
        );
    }
}

/// Text of an output's stdout and stderr, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `f` every 100 ms until it returns `Some`, or panics with `what`
/// after `timeout`.
pub fn wait_for<T>(
    timeout: std::time::Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A per-test scratch directory (the lab namespace shares the filesystem).
pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("capsules-st-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create a scratch directory");
    dir
}

impl Lab {
    /// `capsulectl ARGS… --lab NAME` (flags before any `--`).
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = Vec::new();
        match args.iter().position(|a| *a == "--") {
            Some(i) => {
                all.extend_from_slice(&args[..i]);
                all.extend_from_slice(&["--lab", &self.name]);
                all.extend_from_slice(&args[i..]);
            }
            None => {
                all.extend_from_slice(args);
                all.extend_from_slice(&["--lab", &self.name]);
            }
        }
        capsulectl(&all)
    }

    /// Like [`Lab::ctl`], failing the test unless it succeeds; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "capsulectl {} --lab {}: {}",
            args.join(" "),
            self.name,
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `capsulectl run PROGRAM --name NAME [FLAGS…] --json [-- ARGS…]`, parsed.
    pub fn run_capsule(
        &self,
        program: &str,
        name: Option<&str>,
        flags: &[&str],
        args: &[&str],
    ) -> serde_json::Value {
        let mut argv = vec!["run", program, "--json"];
        if let Some(n) = name {
            argv.extend_from_slice(&["--name", n]);
        }
        argv.extend_from_slice(flags);
        if !args.is_empty() {
            argv.push("--");
            argv.extend_from_slice(args);
        }
        let out = self.ctl_ok(&argv);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("run --json: {e}: {out}"))
    }

    /// The locator of a new capsule.
    pub fn run_locator(&self, program: &str, name: &str, flags: &[&str], args: &[&str]) -> String {
        let v = self.run_capsule(program, Some(name), flags, args);
        v["locator"].as_str().expect("locator").to_string()
    }

    /// `ps --json`, parsed.
    pub fn ps(&self) -> Vec<serde_json::Value> {
        let out = self.ctl_ok(&["ps", "--json"]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("ps --json: {e}: {out}"));
        v.as_array().expect("ps --json is an array").clone()
    }

    /// The `ps` row of one capsule: the copy the directory names (other
    /// copies, if any, have rows of their own with `recorded` false).
    pub fn ps_row(&self, name: &str) -> Option<serde_json::Value> {
        self.ps()
            .into_iter()
            .find(|r| r["name"] == name && r["recorded"] == true)
    }

    /// Runs a shell script inside the lab namespace.
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }

    /// Sends `data` through a TCP connection to ADDR:PORT with socat and
    /// returns what came back (the server closes, or 2 s of quiet after our
    /// end was sent).
    pub fn tcp_roundtrip(&self, addr: &str, port: u16, data: &[u8], tag: &str) -> Output {
        let dir = scratch_dir(tag);
        let input = dir.join("in");
        std::fs::write(&input, data).expect("write input");
        let script = format!(
            "socat -t 2 -T 20 - TCP:{addr}:{port},connect-timeout=3 < {}",
            input.display()
        );
        let out = self.sh(&script);
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    /// Whether an echo capsule at ADDR:PORT echoes a short line.
    pub fn echo_answers(&self, addr: &str, port: u16) -> bool {
        let line = format!("hello {addr}:{port}\n");
        let out = self.tcp_roundtrip(addr, port, line.as_bytes(), "echo-check");
        out.status.success() && out.stdout == line.as_bytes()
    }

    /// `dig @192.0.2.1 NAME.capsule +short` inside the lab.
    pub fn dig_short(&self, name: &str) -> String {
        let out = self.exec(&[
            "dig",
            "@192.0.2.1",
            &format!("{name}.capsule"),
            "+short",
            "+time=2",
            "+tries=2",
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// Pids of directory servers of lab `name` (`capsulectl directory serve --lab NAME`).
pub fn directory_processes(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| capsulectl::lab::is_our_directory(*pid, name))
        .collect()
}

/// Bytes as text, for messages and comparisons.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The body `/bytes/N` of the http program promises: byte i is (i*31 + i/251) mod 256.
pub fn http_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + i / 251) % 256) as u8).collect()
}

/// The fields of `ps --json` rows that only a change of the lab could alter
/// (uptime and memory move on their own).
pub fn stable(rows: &[serde_json::Value]) -> Vec<String> {
    rows.iter()
        .map(|r| {
            ["name", "program", "locator", "slot", "vm", "state"]
                .iter()
                .map(|k| r[*k].to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

impl Lab {
    /// `migrate NAME --to TO` with capsulectl (built with fault injection)
    /// stopped for `pause_ms` at `phase`; `during` runs once it stands there.
    /// Returns what `during` returned and capsulectl's output.
    pub fn migrate_pausing_at<T>(
        &self,
        name: &str,
        to: &str,
        phase: &str,
        pause_ms: u64,
        during: impl FnOnce() -> T,
    ) -> (T, Output) {
        let dir = scratch_dir(&format!("{}-{phase}", self.name));
        let mark = dir.join("mark");
        let child = Command::new(capsulectl_bin())
            .args(["migrate", name, "--to", to, "--lab", &self.name])
            .env("CAPSULES_FAULT", format!("{phase}:pause-{pause_ms}"))
            .env("CAPSULES_FAULT_MARK", &mark)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start capsulectl");
        wait_for(
            std::time::Duration::from_secs(60),
            &format!("migrate to reach {phase}"),
            || mark.exists().then_some(()),
        );
        let during = during();
        let out = child.wait_with_output().expect("capsulectl output");
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("migrate paused at {phase}: {}", describe(&out));
        (during, out)
    }
}
