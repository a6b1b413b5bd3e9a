//! System tests of what the kernel is told about its capsules' network and
//! time: a lab whose capsule range is not the default carries capsule
//! traffic between VMs and across moves (the range reaches the kernel on its
//! command line), and a capsule that ran a while keeps its clock when it is
//! resumed into a freshly booted lab; and once a move committed, only the
//! destination answers ARP for the capsule's locator, though the source
//! still holds its frozen copy until the release. Run one at a time
//! (`--test-threads=1`).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use capsules_system_tests::{
    Lab, capsulectl_bin, capsulectl_ok, describe, require_clients, scratch_dir, text,
    unique_lab_name, wait_for,
};

const REDIS_CLI: (&str, &str) = ("redis-cli", "redis-tools");
const ARPING: (&str, &str) = ("arping", "iputils-arping");

/// A lab of `vms` VMs with `--capsule-range RANGE`, torn down when dropped.
fn lab_with_range(tag: &str, vms: usize, range: &str) -> Lab {
    let mut lab = Lab::guard(&unique_lab_name(tag));
    lab.up_output = capsulectl_ok(&[
        "lab",
        "up",
        "--lab",
        &lab.name,
        "--vms",
        &vms.to_string(),
        "--capsule-range",
        range,
    ]);
    lab
}

/// Waits until the sink counted `more` lines past `from`, failing on a gap.
fn sink_grows(lab: &Lab, from: u64, more: u64, after: &str) -> u64 {
    wait_for(
        Duration::from_secs(20),
        &format!("the sink's count to grow past {} {after}", from + more),
        || {
            let (n, log) = lab.sink_count("sink", "tick");
            assert!(!log.contains("GAP"), "the sink saw a gap:\n{log}");
            (n >= from + more).then_some(n)
        },
    )
}

/// With `--capsule-range 10.77.0.0/16` (a range that exists only inside the
/// lab namespace), a capsule on vm2 reaches one on vm1, and their stream
/// survives moves that make a VM hold packets and release them to the other
/// VM, and to itself. The kernel learns the range from its command line;
/// before, it treated only 198.18.0.0/16 as on-link and sent the rest to
/// the gateway, which does not route.
#[test]
fn capsules_talk_and_move_in_a_lab_with_another_capsule_range() {
    let lab = lab_with_range("range", 2, "10.77.0.0/16");
    let sink = lab.run_locator("sink", "sink", &["--on", "vm1"], &[]);
    assert!(
        sink.starts_with("10.77."),
        "locator {sink} outside the range"
    );
    // A host of the lab reaches it too (the namespace routes the range to
    // the bridge).
    let out = lab.exec(&["ping", "-c", "1", "-W", "2", &sink]);
    assert!(out.status.success(), "ping {sink}: {}", describe(&out));
    lab.run_capsule(
        "ticker",
        Some("tick"),
        &["--on", "vm2"],
        &[&format!("{sink}:9000"), "20"],
    );
    let mut count = sink_grows(&lab, 0, 20, "(ticker on vm2, sink on vm1)");
    // tick joins the sink on vm1; then the sink leaves for vm2 while vm1
    // holds what tick sends it and releases it to vm2 on the wire; then
    // tick follows, vm2 holding what the sink sends it.
    for (name, to) in [("tick", "vm1"), ("sink", "vm2"), ("tick", "vm2")] {
        lab.migrate_ok(name, to);
        count = sink_grows(&lab, count, 30, &format!("after moving {name} to {to}"));
    }
    let (_, log) = lab.sink_count("sink", "tick");
    for bad in ["GAP", "unexpected line", "bad number"] {
        assert!(!log.contains(bad), "sink log has '{bad}':\n{log}");
    }
    for vm in lab.vm_ls() {
        let switch = &vm["switch"];
        assert!(switch.is_object(), "vm ls --json lacks the switch: {vm}");
        for key in ["capsule_queue_drops", "held_drops", "tx_drops"] {
            assert_eq!(switch[key], 0, "{}: {key} in {vm}", vm["name"]);
        }
    }
    let table = lab.ctl_ok(&["vm", "ls"]);
    assert!(table.contains("DROPS Q/HOLD/TX"), "vm ls:\n{table}");
    eprintln!("sink counted {count} lines from tick across 3 moves in 10.77.0.0/16");
}

/// `capsulectl ARGS… --lab NAME` with the image key in a scratch file.
fn ctl_with_key(lab: &Lab, key_file: &Path, args: &[&str]) -> Output {
    Command::new(capsulectl_bin())
        .args(args)
        .args(["--lab", &lab.name])
        .env("CAPSULES_IMAGE_KEY_FILE", key_file)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run capsulectl")
}

fn kv_uptime_s(lab: &Lab, locator: &str) -> u64 {
    let info = lab.redis_cli(locator, &["INFO"]);
    info.lines()
        .find_map(|l| l.trim().strip_prefix("uptime_in_seconds:"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no uptime_in_seconds in INFO:\n{info}"))
}

/// A kv that ran half a minute is suspended and resumed into a lab booted
/// just now, whose kernel has been up for less time than the capsule has
/// run. Its clock goes on from where it stopped: a key's time to live is
/// what was left of it (not half a minute more), expiries happen on time,
/// and its uptime does not fall back.
#[test]
fn a_capsule_resumed_into_a_younger_lab_keeps_its_clock() {
    require_clients(&[REDIS_CLI]);
    let dir = scratch_dir("clock");
    let key_file = dir.join("image.key");
    let image = dir.join("kv.img");
    let mut first = Lab::up("clock-a", 1);
    let loc = first.run_locator("kv", "kv", &["--on", "vm1"], &[]);
    let started = Instant::now();
    // Longer than the next lab takes to boot and resume it, with room.
    while started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(1));
    }
    let uptime_before = kv_uptime_s(&first, &loc);
    // The guest's clock is the TSC calibrated at boot; on a loaded TCG host it
    // may run a little slow against the wall clock.
    assert!(uptime_before >= 20, "kv uptime {uptime_before} s");
    assert_eq!(
        first.redis_cli(&loc, &["SET", "fresh", "v", "PX", "20000"]),
        "OK"
    );
    let out = ctl_with_key(
        &first,
        &key_file,
        &["suspend", "kv", "-o", image.to_str().unwrap()],
    );
    assert!(out.status.success(), "suspend: {}", describe(&out));
    first.down();

    let second = Lab::up("clock-b", 1);
    let out = ctl_with_key(
        &second,
        &key_file,
        &["resume", image.to_str().unwrap(), "--on", "vm1"],
    );
    assert!(out.status.success(), "resume: {}", describe(&out));
    let vm = second.vm_ls().swap_remove(0);
    let vm_uptime_s = vm["uptime_ns"].as_u64().unwrap_or(0) / 1_000_000_000;
    let pttl: i64 = second
        .redis_cli(&loc, &["PTTL", "fresh"])
        .parse()
        .expect("PTTL is a number");
    assert!(
        (1..=20_000).contains(&pttl),
        "PTTL of a key set with PX 20000 before the suspend is {pttl} ms after resuming \
         on a VM up for {vm_uptime_s} s (the capsule had run {uptime_before} s)"
    );
    let uptime_after = kv_uptime_s(&second, &loc);
    assert!(
        uptime_after >= uptime_before,
        "kv uptime fell from {uptime_before} s to {uptime_after} s"
    );
    // Expiries keep time: a key set now for 1 s is gone 2.5 s later.
    assert_eq!(
        second.redis_cli(&loc, &["SET", "soon", "v", "PX", "1000"]),
        "OK"
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(second.redis_cli(&loc, &["EXISTS", "soon"]), "0");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The MACs in arping's reply lines ("Unicast reply from A [MAC]  T ms"),
/// lower case, one per reply.
fn arping_reply_macs(output: &str) -> Vec<String> {
    output
        .lines()
        .filter(|l| l.contains("reply from"))
        .filter_map(|l| {
            let (_, rest) = l.split_once('[')?;
            let (mac, _) = rest.split_once(']')?;
            Some(mac.to_ascii_lowercase())
        })
        .collect()
}

/// A move stopped after its commit and before the release (capsulectl
/// built with `fault-injection`, `CAPSULES_FAULT=release:pause-8000`): the
/// capsule runs on vm2 while vm1 still holds its frozen copy. A host of the
/// LAN that asks who has the locator (arping, broadcasts only) hears only
/// from vm2: vm1 gave the locator up when vm2 announced it at the commit.
/// Before, both VMs answered until the release (and for ever, had the
/// release failed), so the host's ARP cache could point at the wrong VM.
#[test]
fn after_the_commit_only_the_destination_answers_arp_for_the_locator() {
    require_clients(&[ARPING]);
    let lab = Lab::up("arp", 2);
    let loc = lab.run_locator("kv", "kv", &["--on", "vm1"], &[]);
    let macs: Vec<(String, String)> = lab
        .vm_ls()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or_default().to_string(),
                v["mac"].as_str().unwrap_or_default().to_ascii_lowercase(),
            )
        })
        .collect();
    let mac_of = |vm: &str| {
        macs.iter()
            .find(|(name, _)| name == vm)
            .map(|(_, mac)| mac.clone())
            .unwrap_or_else(|| panic!("no MAC of {vm} in vm ls: {macs:?}"))
    };
    let (source, destination) = (mac_of("vm1"), mac_of("vm2"));
    let arping = |context: &str| {
        let out = lab.exec(&[
            "arping",
            "-b",
            "-c",
            "3",
            "-I",
            capsulectl::netns::BRIDGE_NAME,
            &loc,
        ]);
        let stdout = text(&out.stdout);
        eprintln!("arping {loc} {context}:\n{stdout}");
        (arping_reply_macs(&stdout), describe(&out))
    };
    // Before the move: vm1, and vm1 only.
    let (replies, out) = arping("before the move");
    assert!(!replies.is_empty(), "nobody answered for {loc}: {out}");
    assert!(
        replies.iter().all(|m| *m == source),
        "before the move, replies for {loc} from {replies:?} (vm1 is {source}): {out}"
    );

    // Committed, not released: vm1 holds a frozen copy, vm2 runs it.
    let ((replies, out), migrated) = lab.migrate_pausing_at("kv", "vm2", "release", 8000, || {
        let replies = arping("between the commit and the release");
        // Still before the release (the pause is longer than arping), else
        // the replies would prove nothing about a frozen copy.
        let on_source = lab.ctl_ok(&["debug", "capsules", "--vm", "vm1"]);
        assert!(
            on_source.lines().any(|l| l == "kv frozen"),
            "vm1 should still hold the frozen kv while arping ran: {on_source}"
        );
        replies
    });
    assert!(
        migrated.status.success(),
        "migrate: {}",
        describe(&migrated)
    );
    assert!(
        replies.contains(&destination),
        "the destination vm2 ({destination}) did not answer for {loc}: {out}"
    );
    assert!(
        replies.iter().all(|m| *m == destination),
        "after the commit, replies for {loc} came from {replies:?}; only vm2 ({destination}) \
         may answer, not the frozen source vm1 ({source}): {out}"
    );
    // After the release too; and no VM saw two copies.
    let (replies, out) = arping("after the release");
    assert!(
        !replies.is_empty() && replies.iter().all(|m| *m == destination),
        "after the release, replies for {loc} from {replies:?}: {out}"
    );
    for vm in lab.vm_ls() {
        assert_eq!(
            vm["switch"]["arp_conflicts"], 0,
            "{}: ARP conflicts in {vm}",
            vm["name"]
        );
    }
    let table = lab.ctl_ok(&["vm", "ls"]);
    assert!(table.contains("ARP CONFLICTS"), "vm ls:\n{table}");
}
