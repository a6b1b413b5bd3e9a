//! System tests of faults injected at every phase of a move (issue 8).
//!
//! capsulectl is built for these tests with the `fault-injection` feature
//! (host-tools/src/fault.rs): `CAPSULES_FAULT=PHASE:exit` ends it on the spot
//! at that phase, as SIGKILL would; `PHASE:drop-answer` loses the answer to
//! the request made there; `PHASE:pause-MS` stops it there (writing the
//! phase to `$CAPSULES_FAULT_MARK`) while the test kills a VM or takes a
//! link down. The matrix: capsulectl killed, an answer lost, the destination
//! killed, the source killed and the destination's link down for 2 s, each
//! at every phase. After each fault the capsule runs in exactly one place
//! (or nowhere, said so by `ps` and the directory, when the VM holding the
//! only copy died), `recover` leaves a consistent directory, and whenever a
//! copy survived, the client's INCRs go on without a reply missing or
//! repeated. Run one at a time (`--test-threads=1`).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use capsules_system_tests::clients::{IncrClient, Redis, other_vm};
use capsules_system_tests::{Lab, describe, require_clients, text, wait_for};
use serde_json::Value;

const REDIS_CLI: (&str, &str) = ("redis-cli", "redis-tools");

const PHASES: [&str; 8] = [
    "precopy",
    "freeze",
    "transfer",
    "restore",
    "commit-sent",
    "commit-answered",
    "release",
    "directory",
];

/// Every copy of `name` that a VM reports: (vm, state). A dead VM (its
/// QEMU gone) reports nothing; a live one that does not answer fails the
/// test, since it could hold a copy.
fn copies_on_vms(lab: &Lab, name: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for vm in ["vm1", "vm2"] {
        let out = lab.ctl(&["debug", "capsules", "--vm", vm]);
        if !out.status.success() {
            let listed = lab.vm_ls();
            let state = listed
                .iter()
                .find(|v| v["name"] == vm)
                .map(|v| v["state"].clone());
            assert_eq!(
                state,
                Some(Value::from("dead")),
                "{vm} did not list its capsules but is not dead: {}",
                describe(&out)
            );
            continue;
        }
        for line in text(&out.stdout).lines() {
            if let Some((n, state)) = line.split_once(' ')
                && n == name
            {
                found.push((vm.to_string(), state.to_string()));
            }
        }
    }
    found
}

/// Exactly one copy of `name` runs, no other copy is left anywhere, and the
/// directory names that copy with no operation open. Returns its VM.
fn assert_exactly_one_copy(lab: &Lab, name: &str, context: &str) -> String {
    let copies = copies_on_vms(lab, name);
    assert_eq!(
        copies.len(),
        1,
        "{context}: copies of {name} on the VMs: {copies:?}"
    );
    let (vm, state) = &copies[0];
    assert_eq!(state, "running", "{context}: {copies:?}");
    let rows: Vec<Value> = lab.ps().into_iter().filter(|r| r["name"] == name).collect();
    assert_eq!(rows.len(), 1, "{context}: ps rows {rows:?}");
    let row = &rows[0];
    assert_eq!(row["vm"], vm.as_str(), "{context}: {row}");
    assert_eq!(row["state"], "running", "{context}: {row}");
    assert_eq!(row["recorded"], true, "{context}: {row}");
    assert!(row["intent"].is_null(), "{context}: {row}");
    assert_eq!(row["epoch"], row["directory_epoch"], "{context}: {row}");
    vm.clone()
}

fn fault_env(spec: &str) -> (&'static str, PathBuf) {
    ("CAPSULES_FAULT", PathBuf::from(spec))
}

#[test]
fn capsulectl_killed_at_any_phase_of_a_move_leaves_exactly_one_copy() {
    let lab = Lab::up("flt-kill", 2);
    let loc = lab.run_locator("kv", "kv", &["--on", "vm1"], &[]);
    let redis = Redis::connect(&lab, &loc);
    let (client, mut seen) = IncrClient::start(redis);
    let mut at = "vm1".to_string();
    let mut epochs = vec![lab.ps_row("kv").unwrap()["epoch"].as_u64().unwrap()];
    for phase in PHASES {
        let to = other_vm(&at);
        let (k, v) = fault_env(&format!("{phase}:exit"));
        let out = lab.ctl_env(&[(k, &v)], &["migrate", "kv", "--to", to]);
        assert_eq!(
            out.status.code(),
            Some(137),
            "migrate killed at {phase}: {}",
            describe(&out)
        );
        // The interrupted move is on record, and ps says so.
        let open = lab
            .ps()
            .into_iter()
            .any(|r| r["name"] == "kv" && r["intent"].is_string());
        assert!(
            open,
            "no open intent after a kill at {phase}: {:?}",
            lab.ps()
        );
        let out = lab.ctl_ok(&["recover", "--json"]);
        let done: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(done.as_array().map(Vec::len), Some(1), "{phase}: {done}");
        let now = assert_exactly_one_copy(&lab, "kv", &format!("killed at {phase}"));
        // Before the commit nothing moved; once the commit is answered (or
        // later) the move took effect. A commit sent but never answered may
        // have been taken or not: either is right, as long as it is one copy.
        let expected = match phase {
            "precopy" | "freeze" | "transfer" | "restore" => Some(at.as_str()),
            "commit-sent" => None,
            _ => Some(to),
        };
        if let Some(vm) = expected {
            assert_eq!(now, vm, "killed at {phase}: {done}");
        }
        let epoch = lab.ps_row("kv").unwrap()["epoch"].as_u64().unwrap();
        // Before the freeze the copy never stopped, so it keeps its epoch;
        // from the freeze on, a thaw or the new copy runs at a higher one.
        let before = *epochs.last().unwrap();
        if matches!(phase, "precopy" | "freeze") {
            assert_eq!(epoch, before, "kill at {phase}: {epochs:?} then {epoch}");
        } else {
            assert!(
                epoch > before,
                "the epoch did not move on after a kill at {phase}: {epochs:?} then {epoch}"
            );
        }
        epochs.push(epoch);
        seen = client.wait(seen + 10, &format!("INCR replies after a kill at {phase}"));
        at = now;
    }
    // And a plain move still works afterwards.
    lab.migrate_ok("kv", other_vm(&at));
    client.wait(seen + 10, "INCR replies after the last move");
    client.finish();
    let journal = capsules_system_tests::host::journal::read(
        &capsules_system_tests::host::state::lab_dir(&lab.name),
    )
    .unwrap();
    let recovered = journal.iter().filter(|l| l["by"] == "recover").count();
    assert_eq!(recovered, PHASES.len(), "{journal:?}");
}

#[test]
fn a_capsule_command_recovers_a_move_left_open_by_itself() {
    let lab = Lab::up("flt-auto", 2);
    lab.run_locator("kv", "kv", &["--on", "vm1"], &[]);
    let (k, v) = fault_env("transfer:exit");
    let out = lab.ctl_env(&[(k, &v)], &["migrate", "kv", "--to", "vm2"]);
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    assert_eq!(copies_on_vms(&lab, "kv"), [("vm1".into(), "frozen".into())]);
    // Any capsule command, here starting another capsule, finishes the job.
    let out = lab.ctl(&["run", "echo", "--name", "other"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        describe(&out).contains("recovered 'kv'"),
        "run should say what it recovered: {}",
        describe(&out)
    );
    assert_exactly_one_copy(&lab, "kv", "after run");
}

/// No copy of `name` runs or is frozen anywhere, and `ps` (and, once
/// `recover` ran, the directory) says it is lost because `vm` died.
fn assert_lost(lab: &Lab, name: &str, vm: &str, context: &str) {
    let copies = copies_on_vms(lab, name);
    assert!(copies.is_empty(), "{context}: copies left: {copies:?}");
    let rows: Vec<Value> = lab.ps().into_iter().filter(|r| r["name"] == name).collect();
    assert_eq!(rows.len(), 1, "{context}: ps rows {rows:?}");
    let row = &rows[0];
    assert_eq!(row["state"], "lost", "{context}: {row}");
    assert!(
        row["reason"].as_str().unwrap_or("").contains(vm),
        "{context}: the reason should name {vm}: {row}"
    );
    assert!(row["intent"].is_null(), "{context}: {row}");
}

/// Kills our own QEMU of `vm`, by its recorded pid.
fn kill_vm(lab: &Lab, vm: &str) {
    let pid = lab
        .vm_ls()
        .iter()
        .find(|v| v["name"] == vm)
        .and_then(|v| v["pid"].as_u64())
        .expect("QEMU pid") as i32;
    // SAFETY: no memory involved; the pid is this lab's QEMU.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
}

/// Takes `vm`'s link (its tap on the bridge of the lab namespace `netns`)
/// down or up again.
fn set_link(netns: &str, vm: &str, up: bool) {
    let index: usize = vm.trim_start_matches("vm").parse().expect("vmN");
    let tap = capsules_system_tests::host::netns::tap_name(index);
    let out = Command::new("ip")
        .args(["-n", netns, "link", "set", &tap])
        .arg(if up { "up" } else { "down" })
        .output()
        .expect("cannot run ip");
    assert!(
        out.status.success(),
        "ip link set {tap}: {}",
        describe(&out)
    );
}

/// `migrate NAME --to TO` stopped for `pause_ms` at `phase`; `during` runs
/// once it stands there. Returns capsulectl's output.
fn migrate_pausing_at(
    lab: &Lab,
    name: &str,
    to: &str,
    phase: &str,
    pause_ms: u64,
    during: impl FnOnce(),
) -> Output {
    lab.migrate_pausing_at(name, to, phase, pause_ms, during).1
}

/// `recover --json`: settles whatever the fault left open (an intent, a
/// record on a dead VM); what it did.
fn recover(lab: &Lab) -> Vec<Value> {
    let out = lab.ctl_ok(&["recover", "--json"]);
    let done: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    done.as_array().cloned().unwrap_or_default()
}

/// A fresh `kv` capsule on vm1 under INCR load, for one cell of a matrix.
fn loaded_kv(lab: &Lab, name: &str) -> (IncrClient, u64) {
    let loc = lab.run_locator("kv", name, &["--on", "vm1"], &[]);
    IncrClient::start(Redis::connect(lab, &loc))
}

/// Where the capsule must run after `victim` (the source vm1 or the
/// destination vm2 of a move to vm2) was killed at `phase`; `None`: nowhere.
/// Until the commit is sent only the source holds a live copy; from then on
/// the destination may have run the capsule and answered clients, so its
/// copy is the only current one (the source's frozen copy is out of date).
fn survivor(victim: &str, phase: &str) -> Option<&'static str> {
    let committed = matches!(
        phase,
        "commit-sent" | "commit-answered" | "release" | "directory"
    );
    match (victim, committed) {
        ("vm2", false) => Some("vm1"),
        ("vm2", true) => None,
        // The source dies: before the stream is complete nothing else holds
        // the capsule; from `restore` on the destination has the whole image
        // and the move completes there.
        (_, false) if phase != "restore" => None,
        _ => Some("vm2"),
    }
}

/// One VM killed at every phase of a move from vm1 to vm2, a fresh capsule
/// per phase, the VM restarted after each.
fn vm_killed_at_every_phase(tag: &str, victim: &str) {
    require_clients(&[REDIS_CLI]);
    let lab = Lab::up(tag, 2);
    for (i, phase) in PHASES.iter().enumerate() {
        let name = format!("kv{i}");
        let context = format!("{victim} killed at {phase}");
        let (client, seen) = loaded_kv(&lab, &name);
        migrate_pausing_at(&lab, &name, "vm2", phase, 3000, || kill_vm(&lab, victim));
        recover(&lab);
        match survivor(victim, phase) {
            Some(vm) => {
                assert_eq!(assert_exactly_one_copy(&lab, &name, &context), vm);
                client.wait(seen + 10, &format!("INCR replies after {context}"));
                client.finish();
            }
            None => {
                assert_lost(&lab, &name, victim, &context);
                client.abandon();
                // Nothing can move, thaw or suspend what is lost.
                for args in [&["migrate", &name, "--to", "vm1"][..], &["thaw", &name]] {
                    let out = lab.ctl(args);
                    assert!(
                        !out.status.success() && describe(&out).contains("lost"),
                        "{context}: {args:?}: {}",
                        describe(&out)
                    );
                }
                // kill removes the record.
                lab.ctl_ok(&["kill", &name]);
                assert!(lab.ps().iter().all(|r| r["name"] != name.as_str()));
            }
        }
        let out = lab.ctl_ok(&["vm", "restart", victim, "--json"]);
        let restarted: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(restarted["was"], "dead", "{context}: {restarted}");
        // Capsules that survived keep running elsewhere; the next round
        // starts from a clean pair of VMs.
        if let Some(vm) = survivor(victim, phase) {
            lab.ctl_ok(&["kill", &name]);
            assert_ne!(vm, victim);
        }
    }
}

#[test]
fn destination_killed_at_any_phase_leaves_one_copy_or_says_it_is_lost() {
    vm_killed_at_every_phase("flt-dst", "vm2");
}

#[test]
fn source_killed_at_any_phase_leaves_one_copy_or_says_it_is_lost() {
    vm_killed_at_every_phase("flt-src", "vm1");
}

#[test]
fn a_lost_answer_at_any_phase_leaves_exactly_one_copy() {
    require_clients(&[REDIS_CLI]);
    let lab = Lab::up("flt-drop", 2);
    let loc = lab.run_locator("kv", "kv", &["--on", "vm1"], &[]);
    let (client, mut seen) = IncrClient::start(Redis::connect(&lab, &loc));
    let mut at = "vm1".to_string();
    for phase in PHASES {
        let to = other_vm(&at);
        let (k, v) = fault_env(&format!("{phase}:drop-answer"));
        let out = lab.ctl_env(&[(k, &v)], &["migrate", "kv", "--to", to]);
        eprintln!("answer lost at {phase}: {}", describe(&out));
        recover(&lab);
        let now = assert_exactly_one_copy(&lab, "kv", &format!("answer lost at {phase}"));
        // Before the commit nothing moved; a commit that went out was taken
        // (the VM answered, only the answer was lost).
        let expected = match phase {
            "precopy" | "freeze" | "transfer" | "restore" => at.as_str(),
            _ => to,
        };
        assert_eq!(now, expected, "answer lost at {phase}: {}", describe(&out));
        seen = client.wait(
            seen + 10,
            &format!("INCR replies after a lost answer at {phase}"),
        );
        at = now;
    }
    lab.migrate_ok("kv", other_vm(&at));
    client.wait(seen + 10, "INCR replies after the last move");
    client.finish();
}

#[test]
fn destination_link_down_for_two_seconds_at_any_phase_leaves_exactly_one_copy() {
    require_clients(&[REDIS_CLI]);
    let lab = Lab::up("flt-link", 2);
    let loc = lab.run_locator("kv", "kv", &["--on", "vm1"], &[]);
    let (client, mut seen) = IncrClient::start(Redis::connect(&lab, &loc));
    let mut at = "vm1".to_string();
    let mut epoch = lab.ps_row("kv").unwrap()["epoch"].as_u64().unwrap();
    for phase in PHASES {
        let to = other_vm(&at);
        let context = format!("{to}'s link down 2 s from {phase}");
        let mut link_up = None;
        let out = migrate_pausing_at(&lab, "kv", to, phase, 200, || {
            let (netns, vm) = (lab.netns(), to.to_string());
            set_link(&netns, &vm, false);
            // Up again 2 s later, whatever capsulectl is doing by then.
            link_up = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(2));
                set_link(&netns, &vm, true);
            }));
        });
        link_up
            .expect("link taken down")
            .join()
            .expect("link up again");
        // A move that could not decide while the link was down leaves its
        // intent for recover, which decides now that every VM answers.
        if !out.status.success() {
            wait_for(
                Duration::from_secs(30),
                &format!("{context}: recover"),
                || {
                    let done = recover(&lab);
                    let open = lab.ps().iter().any(|r| r["intent"].is_string());
                    (!open).then_some(done)
                },
            );
        }
        let now = assert_exactly_one_copy(&lab, "kv", &context);
        let e = lab.ps_row("kv").unwrap()["epoch"].as_u64().unwrap();
        assert!(e >= epoch, "{context}: epoch went back from {epoch} to {e}");
        epoch = e;
        seen = client.wait(seen + 10, &format!("INCR replies after {context}"));
        at = now;
    }
    client.finish();
}

#[test]
fn vm_restart_refuses_a_vm_that_runs_capsules_unless_forced() {
    let lab = Lab::up("flt-rst", 2);
    lab.run_locator("echo", "e1", &["--on", "vm1"], &[]);
    let out = lab.ctl(&["vm", "restart", "vm1"]);
    assert!(
        !out.status.success() && describe(&out).contains("e1"),
        "{}",
        describe(&out)
    );
    assert_exactly_one_copy(&lab, "e1", "after a refused restart");
    // A VM with nothing on it restarts under the same identity.
    let before = lab.vm_ls();
    let out = lab.ctl_ok(&["vm", "restart", "vm2", "--json"]);
    let done: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["was"], "running", "{done}");
    let after = lab.vm_ls();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (&b["name"], &b["ip"], &b["mac"]),
            (&a["name"], &a["ip"], &a["mac"])
        );
    }
    assert_ne!(before[1]["pid"], after[1]["pid"]);
    lab.run_locator("echo", "e2", &["--on", "vm2"], &[]);
    assert_exactly_one_copy(&lab, "e2", "a capsule on the restarted VM");
    // Forced: the capsule ends with the old run and is recorded lost.
    let out = lab.ctl_ok(&["vm", "restart", "vm1", "--force", "--json"]);
    let done: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["lost"], serde_json::json!(["e1"]), "{done}");
    assert_lost(&lab, "e1", "vm1", "after a forced restart");
    let out = lab.ctl(&["vm", "restart", "vm9"]);
    assert!(
        !out.status.success() && describe(&out).contains("unknown VM 'vm9'"),
        "{}",
        describe(&out)
    );
}
