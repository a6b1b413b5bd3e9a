//! System tests of migration: capsules move between real QEMU VMs (and to a
//! file and back) while real Linux clients in the lab namespace keep their
//! connections open (socat, redis over one TCP connection, curl keep-alive, a
//! listener fed by `ticker`, and two capsules talking to each other). The
//! failure cases check that a capsule never gets lost: a destination that
//! dies mid-transfer, damaged image files and a different kernel build
//! (faults at every phase of a move are in faults.rs).
//! Run one at a time (`--test-threads=1`).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use capsules_system_tests::clients::{Bg, IncrClient, Redis, Reply, other_vm};
use capsules_system_tests::{
    Lab, capsulectl, capsulectl_bin, describe, http_bytes, repo_root, require_clients, scratch_dir,
    stable, text, unique_lab_name, wait_for,
};
use serde_json::Value;

const SOCAT: (&str, &str) = ("socat", "socat");
const CURL: (&str, &str) = ("curl", "curl");
const REDIS_CLI: (&str, &str) = ("redis-cli", "redis-tools");
const NSTAT: (&str, &str) = ("nstat", "iproute2");
const SS: (&str, &str) = ("ss", "iproute2");

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn downtimes(moves: &[Value]) -> Vec<String> {
    moves
        .iter()
        .map(|m| format!("{:.0}ms", m["downtime_ms"].as_f64().unwrap_or(-1.0)))
        .collect()
}

/// A deterministic byte stream that does not repeat with any short period,
/// so a lost, duplicated or reordered segment shows in a comparison.
struct Pattern {
    x: u32,
}

impl Pattern {
    fn new() -> Self {
        Pattern { x: 0x1234_5678 }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            // xorshift32
            self.x ^= self.x << 13;
            self.x ^= self.x >> 17;
            self.x ^= self.x << 5;
            *b = (self.x >> 24) as u8;
        }
    }

    fn bytes(len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Pattern::new().fill(&mut v);
        v
    }
}

/// Complete lines of a file (a trailing partial line is left out).
fn complete_lines(path: &Path) -> Vec<String> {
    let body = std::fs::read_to_string(path).unwrap_or_default();
    let end = body.rfind('\n').map(|i| i + 1).unwrap_or(0);
    body[..end].lines().map(str::to_string).collect()
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Starts `socat -u TCP-LISTEN:9000 … OPEN:FILE` in the lab and waits until
/// it listens.
fn start_listener(lab: &Lab, file: &Path) -> Bg {
    let listener = Bg::spawn(
        "the socat listener",
        lab.command_in(&[
            "socat",
            "-u",
            "TCP-LISTEN:9000,reuseaddr,bind=192.0.2.1",
            &format!("OPEN:{},creat,append", file.display()),
        ]),
    );
    wait_for(
        Duration::from_secs(10),
        "the listener on 192.0.2.1:9000",
        || {
            let out = lab.exec(&["ss", "-Hltn", "sport = :9000"]);
            text(&out.stdout).contains("9000").then_some(())
        },
    );
    listener
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn echo_stream_survives_ten_migrations_byte_for_byte() {
    const MIN_BYTES: u64 = 64 << 20;
    require_clients(&[SOCAT, NSTAT]);
    let lab = Lab::up("mig-echo", 2);
    let loc = lab.run_locator("echo", "echo", &["--on", "vm1"], &[]);
    let dir = scratch_dir("mig-echo");
    let (got_path, err_path) = (dir.join("got"), dir.join("err"));

    let mut cmd = lab.command_in(&[
        "socat",
        "-t",
        "30",
        "-T",
        "60",
        "-",
        &format!("TCP:{loc}:7,connect-timeout=5"),
    ]);
    cmd.stdin(Stdio::piped())
        .stdout(File::create(&got_path).unwrap())
        .stderr(File::create(&err_path).unwrap());
    let mut stream = Bg::spawn("the socat stream", cmd);
    // The stream is fed from here: it goes on until the moves are done and
    // at least 64 MiB went in, so it is busy during every move however fast
    // the machine is.
    let mut stdin = stream.child().stdin.take().unwrap();
    let moves_done = Arc::new(AtomicBool::new(false));
    let writer = {
        let moves_done = moves_done.clone();
        std::thread::spawn(move || -> std::io::Result<u64> {
            let mut pattern = Pattern::new();
            let mut buf = vec![0u8; 256 << 10];
            let mut sent = 0u64;
            while sent < MIN_BYTES || !moves_done.load(Ordering::Relaxed) {
                pattern.fill(&mut buf);
                stdin.write_all(&buf)?;
                sent += buf.len() as u64;
            }
            Ok(sent)
        })
    };
    wait_for(Duration::from_secs(20), "the first echoed bytes", || {
        (file_len(&got_path) > 0).then_some(())
    });
    let timeouts_before = lab.tcp_timeouts();

    let mut moves = Vec::new();
    let mut vm = "vm1";
    while moves.len() < 10 {
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            stream.running(),
            "the stream ended before move {} ({} bytes back): {}",
            moves.len() + 1,
            file_len(&got_path),
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        let before = file_len(&got_path);
        let to = other_vm(vm);
        moves.push(lab.migrate_ok("echo", to));
        vm = to;
        eprintln!("  stream: {before} bytes back before this move");
    }
    moves_done.store(true, Ordering::Relaxed);
    let sent = writer
        .join()
        .expect("writer panicked")
        .unwrap_or_else(|e| panic!("writing into socat failed: {e}"));
    let status = stream.wait(Duration::from_secs(300));
    let timeouts_after = lab.tcp_timeouts();
    assert!(
        status.success(),
        "socat ended with {status}: {}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );

    // Byte for byte, without holding both copies in memory.
    let mut got = BufReader::with_capacity(1 << 20, File::open(&got_path).unwrap());
    let mut expected = Pattern::new();
    let (mut want, mut have) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0u64;
    while offset < sent {
        let n = ((sent - offset) as usize).min(want.len());
        expected.fill(&mut want[..n]);
        let mut filled = 0;
        while filled < n {
            let k = got.read(&mut have[filled..n]).unwrap();
            if k == 0 {
                break;
            }
            filled += k;
        }
        assert_eq!(
            filled,
            n,
            "echo returned {} of {sent} bytes",
            offset + filled as u64
        );
        if let Some(i) = (0..n).find(|&i| want[i] != have[i]) {
            panic!(
                "echoed bytes differ from the sent ones at offset {}",
                offset + i as u64
            );
        }
        offset += n as u64;
    }
    let mut rest = Vec::new();
    got.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "{} bytes more came back than were sent",
        rest.len()
    );
    eprintln!(
        "{sent} bytes echoed intact across {} moves; downtimes {:?}; TcpExtTCPTimeouts {timeouts_before} -> {timeouts_after}",
        moves.len(),
        downtimes(&moves)
    );
    assert_eq!(
        timeouts_after,
        timeouts_before,
        "the Linux peer had {} retransmission timeout(s) (TcpExtTCPTimeouts) during the moves; downtimes {:?}",
        timeouts_after.saturating_sub(timeouts_before),
        downtimes(&moves)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn redis_connection_counts_without_a_gap_across_ten_migrations() {
    let lab = Lab::up("mig-kv", 2);
    let loc = lab.run_locator("kv", "kv", &["--on", "vm1"], &[]);
    let mut redis = Redis::connect(&lab, &loc);
    let keys: Vec<(String, String)> = (0..8)
        .map(|i| {
            (
                format!("key:{i}"),
                format!("value {i} {}", "x".repeat(i * 100)),
            )
        })
        .collect();
    for (k, v) in &keys {
        assert_eq!(redis.cmd(&["SET", k, v]), Reply::Simple("OK".into()));
    }

    let (client, mut seen) = IncrClient::start(redis);
    let mut moves = Vec::new();
    let mut vm = "vm1";
    for i in 0..10 {
        let to = other_vm(vm);
        moves.push(lab.migrate_ok("kv", to));
        vm = to;
        // The same connection is served at the new place.
        seen = client.wait(seen, &format!("INCR replies after move {}", i + 1));
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = client.finish();
    let mut redis = report.redis;
    assert_eq!(
        redis.cmd(&["GET", "counter"]),
        Reply::Bulk(Some(report.replies.to_string().into_bytes())),
        "the counter differs from the number of INCRs answered"
    );
    for (k, v) in &keys {
        assert_eq!(
            redis.cmd(&["GET", k]),
            Reply::Bulk(Some(v.clone().into_bytes())),
            "{k} changed across the moves"
        );
    }
    assert_eq!(redis.cmd(&["DBSIZE"]), Reply::Int(keys.len() as i64 + 1));
    eprintln!(
        "{} INCRs in sequence on one connection across {} moves; downtimes {:?}",
        report.replies,
        moves.len(),
        downtimes(&moves)
    );
}

#[test]
fn curl_keep_alive_fetches_correct_bodies_across_migrations() {
    const URLS: usize = 20;
    const SIZE: usize = 1_000_000;
    require_clients(&[CURL]);
    let lab = Lab::up("mig-http", 2);
    let loc = lab.run_locator("http", "web", &["--on", "vm1"], &[]);
    let dir = scratch_dir("mig-http");
    let url = format!("http://{loc}/bytes/{SIZE}");
    let bodies: Vec<PathBuf> = (1..=URLS).map(|i| dir.join(format!("body{i}"))).collect();
    let mut argv: Vec<String> = [
        "curl",
        "-sS",
        "--max-time",
        "180",
        "--limit-rate",
        "4M",
        "-w",
        "%{num_connects} %{http_code}\\n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for b in &bodies {
        argv.extend(["-o".to_string(), b.display().to_string(), url.clone()]);
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut cmd = lab.command_in(&argv);
    cmd.stdout(File::create(dir.join("w")).unwrap())
        .stderr(File::create(dir.join("err")).unwrap());
    let mut curl = Bg::spawn("curl", cmd);

    // Move while the fifth body is on its way, and back while the 13th is.
    let mut moves = Vec::new();
    for (when, to) in [(5, "vm2"), (13, "vm1")] {
        wait_for(
            Duration::from_secs(60),
            &format!("curl to start body {when}"),
            || bodies[when - 1].exists().then_some(()),
        );
        assert!(
            !bodies[URLS - 1].exists(),
            "curl was already at the last body"
        );
        moves.push(lab.migrate_ok("web", to));
        assert!(curl.running(), "curl had finished right after the move");
    }
    let status = curl.wait(Duration::from_secs(180));
    let err = std::fs::read_to_string(dir.join("err")).unwrap_or_default();
    assert!(status.success(), "curl ended with {status}: {err}");
    let expected = http_bytes(SIZE);
    for (i, b) in bodies.iter().enumerate() {
        let got = std::fs::read(b).unwrap_or_default();
        assert_eq!(got.len(), SIZE, "body {} length", i + 1);
        assert!(got == expected, "body {} differs from the formula", i + 1);
    }
    let w = std::fs::read_to_string(dir.join("w")).unwrap();
    let lines: Vec<&str> = w.lines().collect();
    let mut want = vec!["1 200"];
    want.extend(std::iter::repeat_n("0 200", URLS - 1));
    assert_eq!(lines, want, "one kept-alive connection for all transfers");
    eprintln!(
        "{URLS} bodies of {SIZE} bytes on one connection across {} moves; downtimes {:?}",
        moves.len(),
        downtimes(&moves)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ticker_keeps_its_outgoing_connection_across_migrations() {
    require_clients(&[SOCAT, SS]);
    let lab = Lab::up("mig-ticker", 2);
    let dir = scratch_dir("mig-ticker");
    let file = dir.join("ticks");
    let _listener = start_listener(&lab, &file);
    lab.run_capsule(
        "ticker",
        Some("tick"),
        &["--on", "vm1"],
        &["192.0.2.1:9000", "50"],
    );
    wait_for(Duration::from_secs(20), "5 ticker lines", || {
        (complete_lines(&file).len() >= 5).then_some(())
    });
    let mut moves = Vec::new();
    let mut vm = "vm1";
    for _ in 0..6 {
        let to = other_vm(vm);
        moves.push(lab.migrate_ok("tick", to));
        vm = to;
        std::thread::sleep(Duration::from_millis(300));
    }
    let after_moves = complete_lines(&file).len();
    let lines = wait_for(Duration::from_secs(20), "more ticker lines", || {
        let lines = complete_lines(&file);
        (lines.len() >= after_moves + 10).then_some(lines)
    });
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            line,
            &format!("ticker tick {}", i + 1),
            "line {} (gap or repeat); all lines: {lines:?}",
            i + 1
        );
    }
    eprintln!(
        "{} ticker lines in order across {} moves; downtimes {:?}",
        lines.len(),
        moves.len(),
        downtimes(&moves)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ticker `name` kept its first connection: it connected once and never
/// lost it. (A reconnect can go unnoticed by the sink, which counts lines per
/// ticker name, not per connection, when no line was lost with the old one.)
fn assert_ticker_never_reconnected(lab: &Lab, name: &str) {
    let log = lab.ctl_ok(&["logs", name]);
    let connects = log.matches("ticker connected to").count();
    assert!(
        connects == 1 && !log.contains("reconnecting") && !log.contains("retrying"),
        "ticker {name} connected {connects} times:\n{log}"
    );
}

#[test]
fn two_capsules_keep_talking_while_each_migrates() {
    let lab = Lab::up("mig-pair", 2);
    let sink = lab.run_locator("sink", "sink", &["--on", "vm1"], &[]);
    lab.run_capsule(
        "ticker",
        Some("tick"),
        &["--on", "vm2"],
        &[&format!("{sink}:9000"), "20"],
    );
    let mut count = wait_for(Duration::from_secs(20), "the sink to count 20", || {
        let (n, _) = lab.sink_count("sink", "tick");
        (n >= 20).then_some(n)
    });
    let mut moves = Vec::new();
    for (name, start) in [("sink", "vm1"), ("tick", "vm2")] {
        let mut vm = start;
        for _ in 0..3 {
            let to = other_vm(vm);
            moves.push(lab.migrate_ok(name, to));
            vm = to;
            std::thread::sleep(Duration::from_millis(300));
        }
        // The conversation goes on after this capsule's moves.
        let before = count;
        count = wait_for(
            Duration::from_secs(20),
            &format!("the sink's count to grow past {before} after moving {name}"),
            || {
                let (n, log) = lab.sink_count("sink", "tick");
                assert!(!log.contains("GAP"), "the sink saw a gap:\n{log}");
                (n >= before + 30).then_some(n)
            },
        );
        assert_ticker_never_reconnected(&lab, "tick");
    }
    let (_, log) = lab.sink_count("sink", "tick");
    for bad in ["GAP", "unexpected line", "bad number"] {
        assert!(!log.contains(bad), "sink log has '{bad}':\n{log}");
    }
    assert_ticker_never_reconnected(&lab, "tick");
    eprintln!(
        "sink counted {count} lines without a gap across {} moves; downtimes {:?}",
        moves.len(),
        downtimes(&moves)
    );
}

#[test]
fn suspended_kv_resumes_intact_in_a_new_lab() {
    require_clients(&[REDIS_CLI]);
    let dir = scratch_dir("mig-suspend");
    let key_file = dir.join("image.key");
    let env = [("CAPSULES_IMAGE_KEY_FILE", key_file.as_path())];
    let image = dir.join("kv.img");
    let data: Vec<(String, String)> = (0..6)
        .map(|i| {
            (
                format!("key:{i}"),
                format!("value-{i}-{}", "y".repeat(i * 50)),
            )
        })
        .collect();

    let mut first = Lab::up("mig-susp-a", 2);
    let loc = first.run_locator("kv", "kv", &["--on", "vm2"], &[]);
    let redis = |lab: &Lab, args: &[&str]| lab.redis_cli(&loc, args);
    for (k, v) in &data {
        assert_eq!(redis(&first, &["SET", k, v]), "OK");
    }
    for n in ["1", "2", "3"] {
        assert_eq!(redis(&first, &["INCR", "counter"]), n);
    }
    let out = first.ctl_env(&env, &["suspend", "kv", "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "suspend: {}", describe(&out));
    assert!(
        first.ps_row("kv").is_none(),
        "kv still listed after suspend"
    );
    first.down();

    // inspect FILE: what the image holds.
    let out = first.ctl_env(&env, &["inspect", image.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "inspect: {}", describe(&out));
    let info: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("inspect --json: {e}: {}", describe(&out)));
    assert_eq!(info["name"], "kv", "{info}");
    assert_eq!(info["program"], "kv", "{info}");
    assert_eq!(info["locator"], loc.as_str(), "{info}");
    let tasks = info["tasks"].as_array().expect("tasks");
    assert!(!tasks.is_empty(), "no tasks in the image: {info}");
    let sockets = info["sockets"].as_array().expect("sockets");
    assert!(
        sockets
            .iter()
            .any(|s| s["local"].as_str().unwrap_or("").ends_with(":6379")),
        "no socket on port 6379 in the image: {info}"
    );
    let out = first.ctl_env(&env, &["inspect", image.to_str().unwrap()]);
    let human = text(&out.stdout);
    assert!(out.status.success(), "inspect: {}", describe(&out));
    for want in ["kv", &loc, "tasks", "sockets"] {
        assert!(
            human.contains(want),
            "inspect does not show '{want}':\n{human}"
        );
    }

    let second = Lab::up("mig-susp-b", 2);
    let out = second.ctl_env(&env, &["resume", image.to_str().unwrap(), "--on", "vm1"]);
    assert!(out.status.success(), "resume: {}", describe(&out));
    let row = second.ps_row("kv").expect("kv in ps after resume");
    assert_eq!(row["vm"], "vm1", "{row}");
    assert_eq!(row["state"], "running", "{row}");
    assert_eq!(row["locator"], loc.as_str(), "{row}");
    for (k, v) in &data {
        assert_eq!(&redis(&second, &["GET", k]), v, "{k} after resume");
    }
    assert_eq!(redis(&second, &["INCR", "counter"]), "4");
    assert_eq!(redis(&second, &["DBSIZE"]), (data.len() + 1).to_string());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn destination_killed_during_transfer_leaves_the_capsule_serving_on_the_source() {
    require_clients(&[REDIS_CLI]);
    let lab = Lab::up("mig-kill", 2);
    let loc = lab.run_locator("kv", "kv", &["--on", "vm1"], &[]);
    let dir = scratch_dir("mig-kill");
    // 8 MiB of printable bytes, so the image is big and the transfer slow.
    let big: Vec<u8> = Pattern::bytes(8 << 20)
        .iter()
        .map(|b| {
            b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ+/"[(*b & 63) as usize]
        })
        .collect();
    std::fs::write(dir.join("big"), &big).unwrap();
    let out = lab.sh(&format!(
        "redis-cli -h {loc} -x SET big < {}",
        dir.join("big").display()
    ));
    assert!(
        out.status.success() && text(&out.stdout).trim() == "OK",
        "SET big: {}",
        describe(&out)
    );

    // A client connected before the attempt, busy throughout.
    let redis = Redis::connect(&lab, &loc);
    let (client, seen) = IncrClient::start(redis);

    let vms = lab.vm_ls();
    let vm2_pid = vms
        .iter()
        .find(|v| v["name"] == "vm2")
        .and_then(|v| v["pid"].as_u64())
        .expect("vm2's QEMU pid") as i32;
    let mut cmd = Command::new(capsulectl_bin());
    cmd.args(["migrate", "kv", "--to", "vm2", "--lab", &lab.name])
        .env("CAPSULES_FAULT_CHUNK_DELAY_MS", "200")
        .stdin(Stdio::null())
        .stdout(File::create(dir.join("out")).unwrap())
        .stderr(File::create(dir.join("err")).unwrap());
    let mut mover = Bg::spawn("capsulectl migrate", cmd);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        mover.running(),
        "migrate ended before the destination was killed"
    );
    // The destination VM of this lab, killed by its recorded pid.
    // SAFETY: no memory involved.
    assert_eq!(unsafe { libc::kill(vm2_pid, libc::SIGKILL) }, 0);
    let killed_at = Instant::now();
    let status = loop {
        if let Some(status) = mover.child().try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "capsulectl migrate still runs {:?} after the destination VM was killed: it \
             should fail and thaw 'kv' on vm1; the client meanwhile is stuck at INCR reply {} \
             (it was at {seen} before the attempt)",
            killed_at.elapsed(),
            client.latest()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let said = format!(
        "{}{}",
        std::fs::read_to_string(dir.join("out")).unwrap_or_default(),
        std::fs::read_to_string(dir.join("err")).unwrap_or_default()
    );
    eprintln!(
        "migrate ended {:?} after the kill with {status}: {said}",
        killed_at.elapsed()
    );
    assert!(!status.success(), "migrate succeeded to a dead VM: {said}");

    let row = lab.ps_row("kv").expect("kv in ps");
    assert_eq!(row["vm"], "vm1", "{row}");
    assert_eq!(row["state"], "running", "{row}");
    // The connection made before the attempt goes on without an error.
    client.wait(seen + 20, "INCR replies after the failed move");
    let report = client.finish();
    let mut redis = report.redis;
    assert_eq!(redis.cmd(&["STRLEN", "big"]), Reply::Int(big.len() as i64));
    assert_eq!(redis.cmd(&["GET", "big"]), Reply::Bulk(Some(big.clone())));
    // And a fresh client too.
    let out = lab.exec(&["redis-cli", "-h", &loc, "STRLEN", "big"]);
    assert_eq!(
        text(&out.stdout).trim(),
        big.len().to_string(),
        "{}",
        describe(&out)
    );
    // Last, so the checks above show the behaviour even when this fails: the
    // message says that the destination failed and where the capsule runs.
    assert!(
        said.contains("vm2") && said.contains("keeps running on vm1"),
        "migrate does not say clearly what happened (which VM failed, and that \
         'kv' keeps running on vm1): {said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_lost_commit_answer_completes_the_move_instead_of_running_the_capsule_twice() {
    let lab = Lab::up("mig-lost", 2);
    let loc = lab.run_locator("kv", "kv", &["--on", "vm1"], &[]);
    let redis = Redis::connect(&lab, &loc);
    let (client, seen) = IncrClient::start(redis);
    // The destination commits, but capsulectl never reads its answer.
    let out = lab.ctl_env(
        &[("CAPSULES_FAULT", Path::new("commit-sent:drop-answer"))],
        &["migrate", "kv", "--to", "vm2"],
    );
    let said = describe(&out);
    assert!(out.status.success(), "migrate: {said}");
    assert!(
        said.contains("answer was lost") && said.contains("completing the move"),
        "migrate does not say what happened: {said}"
    );
    // Exactly one copy, at the destination, and the directory agrees.
    for vm in ["vm1", "vm2"] {
        let listed = lab.ctl_ok(&["debug", "capsules", "--vm", vm]);
        let here = listed.lines().filter(|l| l.starts_with("kv ")).count();
        assert_eq!(here, usize::from(vm == "vm2"), "kv on {vm}: {listed}");
    }
    let row = lab.ps_row("kv").expect("kv in ps");
    assert_eq!(row["vm"], "vm2", "{row}");
    assert_eq!(row["state"], "running", "{row}");
    // `thaw` is for capsules an interrupted move left frozen: a running one,
    // or an unknown name, gets a clear refusal and nothing changes.
    let out = lab.ctl(&["thaw", "kv"]);
    assert!(
        !out.status.success() && describe(&out).contains("not frozen"),
        "thaw of a running capsule: {}",
        describe(&out)
    );
    let out = lab.ctl(&["thaw", "nosuch"]);
    assert!(
        !out.status.success() && describe(&out).contains("no capsule named"),
        "thaw of an unknown capsule: {}",
        describe(&out)
    );
    // The client's connection goes on at the new place without an error.
    client.wait(seen + 20, "INCR replies after the move");
    client.finish();
}

#[test]
fn corrupted_and_truncated_images_are_refused_and_change_nothing() {
    require_clients(&[REDIS_CLI]);
    let dir = scratch_dir("mig-badimg");
    let key_file = dir.join("image.key");
    let env = [("CAPSULES_IMAGE_KEY_FILE", key_file.as_path())];
    let lab = Lab::up("mig-badimg", 2);
    let loc = lab.run_locator("kv", "kv", &["--on", "vm1"], &[]);
    lab.run_locator("echo", "bystander", &["--on", "vm2"], &[]);
    let out = lab.exec(&["redis-cli", "-h", &loc, "SET", "k", "v"]);
    assert_eq!(text(&out.stdout).trim(), "OK", "{}", describe(&out));
    let image = dir.join("kv.img");
    let out = lab.ctl_env(&env, &["suspend", "kv", "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "suspend: {}", describe(&out));
    let good = std::fs::read(&image).unwrap();
    assert!(good.len() > 1000, "image of {} bytes", good.len());

    let mut corrupted = good.clone();
    corrupted[good.len() / 2] ^= 0x40;
    let corrupted_path = dir.join("corrupted.img");
    std::fs::write(&corrupted_path, &corrupted).unwrap();
    let truncated_path = dir.join("truncated.img");
    std::fs::write(&truncated_path, &good[..good.len() * 2 / 3]).unwrap();

    let ps_before = stable(&lab.ps());
    for (path, word) in [
        (&corrupted_path, "corrupted"),
        (&truncated_path, "truncated"),
    ] {
        for on in ["vm1", "vm2"] {
            let out = lab.ctl_env(&env, &["resume", path.to_str().unwrap(), "--on", on]);
            assert!(!out.status.success(), "resume of a {word} image succeeded");
            assert!(
                text(&out.stderr).contains(word),
                "resume of a {word} image should say '{word}': {}",
                describe(&out)
            );
            assert_eq!(
                stable(&lab.ps()),
                ps_before,
                "ps changed after a {word} image"
            );
        }
        let out = lab.ctl_env(&env, &["inspect", path.to_str().unwrap()]);
        assert!(!out.status.success(), "inspect of a {word} image succeeded");
    }
    // The intact image still revives, with its data.
    let out = lab.ctl_env(&env, &["resume", image.to_str().unwrap(), "--on", "vm2"]);
    assert!(out.status.success(), "resume: {}", describe(&out));
    let out = lab.exec(&["redis-cli", "-h", &loc, "GET", "k"]);
    assert_eq!(text(&out.stdout).trim(), "v", "{}", describe(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same kernel, built with another build tag: a different build id.
fn alt_kernel() -> PathBuf {
    let target = PathBuf::from("/tmp/capsules-alt-kernel");
    let elf = target.join("x86_64-unknown-linux-gnu/release/capsules-kernel");
    let status = Command::new("cargo")
        .current_dir(repo_root().join("kernel"))
        .args(["build", "--release", "--quiet", "--target-dir"])
        .arg(&target)
        .env("CAPSULES_BUILD_TAG", "-alt")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .expect("cannot run cargo to build the -alt kernel");
    assert!(
        status.success() && elf.is_file(),
        "building the -alt kernel failed: cd kernel && CAPSULES_BUILD_TAG=-alt cargo build --release --target-dir {}",
        target.display()
    );
    elf
}

#[test]
fn migration_to_a_different_kernel_build_is_refused_before_freezing() {
    require_clients(&[REDIS_CLI]);
    let alt = alt_kernel();
    let name = unique_lab_name("mig-build");
    let lab = Lab::guard(&name);
    let out = capsulectl(&[
        "lab",
        "up",
        "--lab",
        &name,
        "--vms",
        "2",
        "--kernel-for",
        &format!("vm2={}", alt.display()),
    ]);
    assert!(
        out.status.success(),
        "lab up --kernel-for: {}",
        describe(&out)
    );
    let loc = lab.run_locator("kv", "kv", &["--on", "vm1"], &[]);
    let redis = Redis::connect(&lab, &loc);
    let (client, seen) = IncrClient::start(redis);
    let uptime = |lab: &Lab| {
        lab.ps_row("kv").expect("kv in ps")["uptime_ns"]
            .as_u64()
            .expect("uptime_ns")
    };
    let up_before = uptime(&lab);

    let out = lab.ctl(&["migrate", "kv", "--to", "vm2"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "migrate to another build succeeded: {}",
        describe(&out)
    );
    assert!(
        err.contains("build") && err.contains("refused before freezing"),
        "migrate should say the builds differ: {}",
        describe(&out)
    );
    let row = lab.ps_row("kv").expect("kv in ps");
    assert_eq!(row["vm"], "vm1", "{row}");
    assert_eq!(row["state"], "running", "{row}");
    std::thread::sleep(Duration::from_millis(300));
    let up_after = uptime(&lab);
    assert!(
        up_after > up_before,
        "uptime stood still: {up_before} then {up_after}"
    );
    client.wait(seen + 20, "INCR replies after the refusal");
    client.finish();
}

#[test]
fn demo_reports_zero_errors() {
    let name = unique_lab_name("mig-demo");
    let _lab = Lab::guard(&name);
    let started = Instant::now();
    let out = capsulectl(&["demo", "--lab", &name, "--moves", "2", "--json"]);
    assert!(out.status.success(), "demo: {}", describe(&out));
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("demo --json: {e}: {}", describe(&out)));
    assert_eq!(report["errors"], 0, "{report}");
    let moves = report["migrations"].as_array().expect("migrations");
    assert!(moves.len() >= 4, "{} migrations: {report}", moves.len());
    assert!(
        !report["kv"].is_null() && !report["http"].is_null(),
        "{report}"
    );
    eprintln!(
        "demo: {} migrations, 0 errors in {:?}; downtimes {:?}",
        moves.len(),
        started.elapsed(),
        downtimes(moves)
    );
}
