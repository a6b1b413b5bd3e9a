//! System tests: real labs of QEMU VMs driven through the `capsulectl` binary.
//! Run one at a time (`--test-threads=1`): every TCG guest keeps a core busy.

use capsules_system_tests::host::{elf, state};
use capsules_system_tests::{
    Lab, capsulectl, capsulectl_ok, kernel_elf, netns_list, processes_mentioning,
    require_lab_prerequisites, unique_lab_name,
};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_nothing_left(lab: &Lab) {
    let ns = lab.netns();
    assert!(
        !netns_list()
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ns.as_str())),
        "namespace {ns} still exists:\n{}",
        netns_list()
    );
    let dir = state::lab_dir(&lab.name);
    let needle = format!("{}/", dir.display());
    let left = processes_mentioning(&needle);
    assert!(
        left.is_empty(),
        "QEMU processes of the lab remain: {left:?}"
    );
    assert!(!dir.exists(), "state directory {} remains", dir.display());
    let servers = capsules_system_tests::directory_processes(&lab.name);
    assert!(
        servers.is_empty(),
        "directory servers of the lab remain: {servers:?}"
    );
}

/// A process named by its pid and start time (field 22 of /proc/PID/stat),
/// so a recycled pid is not taken for it.
fn start_ticks(pid: u64) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19).map(str::to_string)
}

/// The lab's QEMU processes (pid, start time) as `vm ls` reports them.
fn qemu_processes(lab: &Lab) -> Vec<(u64, String)> {
    lab.vm_ls()
        .iter()
        .filter_map(|vm| {
            let pid = vm["pid"].as_u64()?;
            Some((pid, start_ticks(pid)?))
        })
        .collect()
}

/// No process of `processes` exists any more, not even as a zombie that
/// waits to be reaped: `lab down` returns only when the lab is gone.
fn assert_processes_gone(processes: &[(u64, String)]) {
    for (pid, ticks) in processes {
        if start_ticks(*pid).as_ref() == Some(ticks) {
            let state = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("State:"))
                .unwrap_or("")
                .to_string();
            panic!("QEMU pid {pid} still exists after `lab down` ({state})");
        }
    }
}

#[test]
fn two_vm_lab_serves_ping_and_control_and_leaves_nothing_behind() {
    let root_before = root_namespace_addresses();
    let mut lab = Lab::up("two", 2);
    for expected in [
        "vm1",
        "vm2",
        "192.0.2.12/24",
        "192.0.2.11/24",
        "52:54:00:c5:00:01",
    ] {
        assert!(
            lab.up_output.contains(expected),
            "lab up output lacks {expected}:\n{}",
            lab.up_output
        );
    }

    // The real ping, from inside the lab namespace, reaches both VMs.
    for ip in ["192.0.2.11", "192.0.2.12"] {
        let out = lab.exec(&["ping", "-c3", "-W2", ip]);
        assert!(
            out.status.success(),
            "ping {ip} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
    }
    // The lab LAN carries jumbo frames to the machine addresses: a 9000-byte
    // IP packet that must not be fragmented (DF) goes out and comes back whole.
    let out = lab.exec(&["ping", "-c2", "-W2", "-M", "do", "-s", "8972", "192.0.2.11"]);
    assert!(
        out.status.success(),
        "jumbo ping failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    // Nothing of the lab is configured in the root namespace.
    assert_eq!(root_namespace_addresses(), root_before);
    // `lab exec` passes the exit status through.
    let out = lab.exec(&["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));

    // Both control services answer with the build id of the kernel file.
    let expected_id = capsules_wire_hex(&elf::read_build_id(&kernel_elf()).unwrap());
    let vms = lab.vm_ls();
    assert_eq!(vms.len(), 2, "{vms:?}");
    for vm in &vms {
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["build_id"], expected_id.as_str(), "{vm}");
        assert!(vm["pid"].as_u64().is_some(), "{vm}");
        assert!(vm["uptime_ns"].as_u64().unwrap() > 0, "{vm}");
    }
    assert_eq!(vms[0]["ip"], "192.0.2.11");
    assert_eq!(vms[1]["ip"], "192.0.2.12");

    // A wrong key, a malformed frame and an oversized frame are refused with
    // the right error, and the VM keeps serving an authenticated client.
    for (check, code) in [
        ("wrong-key", "unauthenticated"),
        ("malformed", "malformed"),
        ("oversized", "oversized"),
    ] {
        let r = lab.control_check("vm2", check);
        assert_eq!(r["outcome"], "refused", "{check}: {r}");
        assert_eq!(r["code"], code, "{check}: {r}");
        assert_eq!(r["still_serving"], true, "{check}: {r}");
    }
    let r = lab.control_check("vm1", "version");
    assert_eq!(r["outcome"], "ok", "{r}");

    // A second lab of the same name is refused clearly.
    let again = capsulectl(&["lab", "up", "--lab", &lab.name, "--vms", "1"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    let qemus = qemu_processes(&lab);
    assert_eq!(qemus.len(), 2, "{qemus:?}");
    lab.down();
    assert_processes_gone(&qemus);
    assert_nothing_left(&lab);

    // Down again: the lab is unknown now, which is a clear error. The old
    // spelling --name still names the lab.
    let again = capsulectl(&["lab", "down", "--name", &lab.name]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("no lab named"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn lab_down_cleans_up_a_lab_whose_vm_died() {
    let mut lab = Lab::up("dead", 2);
    let vms = lab.vm_ls();
    let pid = vms[0]["pid"].as_u64().expect("pid") as i32;
    let qemus = qemu_processes(&lab);
    // Our own VM, started by this test through capsulectl; killed by pid.
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let mut state_seen = String::new();
    for _ in 0..50 {
        state_seen = lab.vm_ls()[0]["state"].as_str().unwrap_or("").to_string();
        if state_seen == "dead" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(state_seen, "dead");
    lab.down();
    assert_processes_gone(&qemus);
    assert_nothing_left(&lab);
}

#[test]
fn commands_on_an_unknown_lab_fail_clearly() {
    require_lab_prerequisites();
    let name = unique_lab_name("none");
    for args in [
        vec!["lab", "down", "--lab", name.as_str()],
        vec!["vm", "ls", "--lab", name.as_str()],
        vec!["lab", "exec", "--lab", name.as_str(), "--", "true"],
        vec!["ps", "--lab", name.as_str()],
    ] {
        let out = capsulectl(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("no lab named"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn bad_command_lines_are_usage_errors() {
    for args in [
        vec!["lab", "sideways"],
        vec!["lab", "up", "--accel", "warp"],
        vec!["frobnicate"],
    ] {
        let out = capsulectl(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    assert!(capsulectl_ok(&["--help"]).contains("lab"));
}

/// Interface names and addresses of the root namespace (the namespace this
/// test runs in), one "IFNAME ADDR" per entry.
fn root_namespace_addresses() -> std::collections::BTreeSet<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .expect("cannot run ip addr");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3).then(|| format!("{} {}", f[1], f[3]))
        })
        .collect()
}

fn capsules_wire_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn failed_lab_up_shows_the_logs_and_removes_everything() {
    require_lab_prerequisites();
    // A real ELF with a build id but no PVH note: QEMU refuses to boot it.
    let not_a_kernel = "/bin/sh";
    let name = unique_lab_name("fail");
    let _cleanup = Lab::guard(&name);
    let out = capsulectl(&[
        "lab",
        "up",
        "--lab",
        &name,
        "--vms",
        "1",
        "--accel",
        "tcg",
        "--kernel",
        not_a_kernel,
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("QEMU exited during boot"), "{err}");
    assert!(err.contains("last lines of"), "{err}");
    assert!(
        err.contains("PVH"),
        "QEMU's own complaint should be shown: {err}"
    );
    let ns = capsules_system_tests::host::netns::netns_name(&name);
    assert!(!netns_list().contains(&ns), "{}", netns_list());
    assert!(!state::lab_dir(&name).exists());
}

#[test]
fn lab_down_kills_a_vm_that_does_not_answer() {
    let mut lab = Lab::up("hung", 1);
    let pid = lab.vm_ls()[0]["pid"].as_u64().expect("pid") as i32;
    // Freeze our own VM: it can neither answer Shutdown nor handle SIGTERM,
    // so only the SIGKILL step of `lab down` can end it.
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    assert_eq!(lab.vm_ls()[0]["state"], "unreachable");
    lab.down();
    assert_nothing_left(&lab);
}
