//! System tests of capsules: real programs in real VMs, reached by real
//! clients (dig, socat, curl, redis-cli) from inside the lab namespace, and
//! the directory that names them. Run one at a time (`--test-threads=1`).

use std::process::{Command, Stdio};
use std::time::Duration;

use capsules_system_tests::{
    Lab, capsulectl_bin, describe, http_bytes, require_clients, scratch_dir, stable, text, wait_for,
};

const SOCAT: (&str, &str) = ("socat", "socat");
const DIG: (&str, &str) = ("dig", "dnsutils");
const CURL: (&str, &str) = ("curl", "curl");
const REDIS_CLI: (&str, &str) = ("redis-cli", "redis-tools");

/// Bytes that do not repeat with any short period, so a lost, duplicated or
/// reordered segment shows in a byte-for-byte comparison.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            // xorshift32: deterministic, cheap, no dependency.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn dns_names_echo_bytes_and_ticker_reaches_the_lab() {
    require_clients(&[SOCAT, DIG]);
    let lab = Lab::up("dns", 1);
    let web = lab.run_locator("echo", "web", &[], &[]);
    assert!(
        web.starts_with("198.18."),
        "locator {web} outside the capsule range"
    );

    // dig finds the capsule; unknown names are NXDOMAIN; other types of a
    // known name are NOERROR with no answer.
    assert_eq!(lab.dig_short("web"), web);
    let out = lab.exec(&["dig", "@192.0.2.1", "nosuch.capsule", "+time=2", "+tries=2"]);
    assert!(
        text(&out.stdout).contains("status: NXDOMAIN"),
        "{}",
        describe(&out)
    );
    let out = lab.exec(&["dig", "@192.0.2.1", "web.capsule", "AAAA", "+time=2"]);
    let aaaa = text(&out.stdout);
    assert!(
        aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"),
        "{aaaa}"
    );
    // Garbage to the DNS port does not stop the server.
    let out = lab.sh("printf 'not dns at all' | socat -t 1 - UDP:192.0.2.1:53; true");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(lab.dig_short("web"), web, "directory died on garbage");

    // Several MiB through the echo capsule, compared byte for byte.
    let dir = scratch_dir("echo4m");
    let sent = pattern(4 << 20);
    std::fs::write(dir.join("sent"), &sent).unwrap();
    let out = lab.sh(&format!(
        "socat -t 30 -T 60 - TCP:{web}:7,connect-timeout=5 < {0}/sent > {0}/got",
        dir.display()
    ));
    assert!(
        out.status.success(),
        "socat through echo: {}",
        describe(&out)
    );
    let got = std::fs::read(dir.join("got")).unwrap();
    assert_eq!(
        got.len(),
        sent.len(),
        "echo returned {} of {} bytes",
        got.len(),
        sent.len()
    );
    assert!(got == sent, "echoed bytes differ from the sent ones");

    // A ticker capsule connects out to a listener in the lab namespace.
    let file = dir.join("ticks");
    let mut listener = Command::new(capsulectl_bin())
        .args(["lab", "exec", "--lab", &lab.name, "--", "socat", "-u"])
        .arg("TCP-LISTEN:9000,reuseaddr,bind=192.0.2.1")
        .arg(format!("CREATE:{}", file.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("cannot start the listener");
    // Wait until the listener is bound before the ticker dials.
    wait_for(
        Duration::from_secs(10),
        "the listener on 192.0.2.1:9000",
        || {
            let out = lab.exec(&["ss", "-Hltn", "sport = :9000"]);
            text(&out.stdout).contains("9000").then_some(())
        },
    );
    lab.run_capsule("ticker", Some("tick"), &[], &["192.0.2.1:9000", "100"]);
    let lines = wait_for(Duration::from_secs(20), "10 ticker lines", || {
        let body = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<String> = body.lines().map(str::to_string).collect();
        (lines.len() >= 10).then_some(lines)
    });
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line, &format!("ticker tick {}", i + 1), "lines: {lines:?}");
    }
    // `logs -f` follows the ticker and ends when it is killed.
    let mut follow = Command::new(capsulectl_bin())
        .args(["logs", "-f", "tick", "--lab", &lab.name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start logs -f");
    std::thread::sleep(Duration::from_millis(600));
    lab.ctl_ok(&["kill", "tick"]);
    let ended = wait_for(Duration::from_secs(10), "logs -f to end", || {
        follow.try_wait().unwrap()
    });
    let followed = follow.wait_with_output().unwrap();
    assert!(ended.success(), "logs -f: {}", describe(&followed));
    assert!(
        text(&followed.stdout).contains("tick"),
        "{}",
        describe(&followed)
    );
    // Our own child, by pid.
    let _ = listener.kill();
    let _ = listener.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn capsules_on_one_and_two_vms_are_reachable_on_their_own_locators_only() {
    require_clients(&[SOCAT, DIG]);
    let lab = Lab::up("two", 2);
    let a = lab.run_locator("echo", "a", &["--on", "vm1"], &[]);
    let b = lab.run_locator("echo", "b", &["--on", "vm1"], &["--port", "7007"]);
    let c = lab.run_locator("echo", "c", &["--on", "vm2"], &[]);
    assert!(
        a != b && b != c && a != c,
        "locators not unique: {a} {b} {c}"
    );
    // Placement without --on: the VM with the fewest capsules (vm2 has one).
    let d = lab.run_capsule("echo", None, &[], &[]);
    assert_eq!(d["name"], "echo-1", "{d}");
    assert_eq!(d["vm"], "vm2", "{d}");

    // Concurrent `run`s (separate processes) get distinct locators and
    // slots: the directory lock serialises them.
    let racers: Vec<_> = (0..4)
        .map(|i| {
            Command::new(capsulectl_bin())
                .args(["run", "echo", "--json", "--name", &format!("race{i}")])
                .args(["--lab", &lab.name])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("cannot start capsulectl run")
        })
        .collect();
    let mut raced = std::collections::BTreeSet::new();
    for r in racers {
        let out = r.wait_with_output().unwrap();
        assert!(out.status.success(), "concurrent run: {}", describe(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        raced.insert((v["locator"].to_string(), v["slot"].to_string()));
    }
    let all: Vec<serde_json::Value> = lab.ps();
    let locators: std::collections::BTreeSet<String> =
        all.iter().map(|r| r["locator"].to_string()).collect();
    let slots: std::collections::BTreeSet<String> =
        all.iter().map(|r| r["slot"].to_string()).collect();
    assert_eq!(raced.len(), 4);
    assert_eq!(
        (locators.len(), slots.len()),
        (all.len(), all.len()),
        "{all:?}"
    );
    for i in 0..4 {
        lab.ctl_ok(&["kill", &format!("race{i}")]);
    }

    for (ip, port) in [(&a, 7), (&b, 7007), (&c, 7)] {
        assert!(
            lab.echo_answers(ip, port),
            "echo at {ip}:{port} does not answer"
        );
    }
    // Each capsule has its own stack: b does not listen on 7, a not on 7007,
    // and a locator nobody holds does not answer at all.
    assert!(!lab.echo_answers(&b, 7), "b answered on port 7");
    assert!(!lab.echo_answers(&a, 7007), "a answered on port 7007");
    assert!(
        !lab.echo_answers("198.18.250.250", 7),
        "a locator nobody holds answered"
    );
    for (name, ip) in [("a", &a), ("b", &b), ("c", &c)] {
        assert_eq!(&lab.dig_short(name), ip, "dig {name}");
    }
    for (name, vm) in [("a", "vm1"), ("b", "vm1"), ("c", "vm2"), ("echo-1", "vm2")] {
        let row = lab
            .ps_row(name)
            .unwrap_or_else(|| panic!("{name} not in ps"));
        assert_eq!(row["vm"], vm, "{row}");
        assert_eq!(row["state"], "running", "{row}");
        assert_eq!(row["program"], "echo", "{row}");
    }

    // Killing one leaves the others serving, and its name and address go.
    lab.ctl_ok(&["kill", "a"]);
    assert!(!lab.echo_answers(&a, 7), "a still answers after kill");
    assert!(lab.echo_answers(&b, 7007), "b stopped serving");
    assert!(lab.echo_answers(&c, 7), "c stopped serving");
    assert!(lab.ps_row("a").is_none());
    assert_eq!(lab.ps().len(), 3);
    let out = lab.exec(&["dig", "@192.0.2.1", "a.capsule", "+time=2"]);
    assert!(text(&out.stdout).contains("NXDOMAIN"), "{}", describe(&out));
}

#[test]
fn crashing_capsules_end_alone() {
    require_clients(&[SOCAT]);
    let lab = Lab::up("crash", 1);
    let neighbour = lab.run_locator("echo", "neighbour", &[], &[]);
    for program in ["crash-panic", "crash-divide", "crash-pagefault"] {
        let name = program.to_string();
        lab.run_capsule(program, Some(&name), &[], &["300"]);
        let row = wait_for(Duration::from_secs(15), &format!("{name} to fault"), || {
            lab.ps_row(&name).filter(|r| r["state"] == "faulted")
        });
        let reason = row["reason"].as_str().unwrap_or("");
        assert!(!reason.is_empty(), "faulted without a reason: {row}");
        let logs = lab.ctl_ok(&["logs", &name]);
        assert!(
            logs.contains(&format!("started: program {program}")) && logs.lines().count() > 1,
            "log of {name} does not tell what happened:\n{logs}"
        );
        // The neighbour on the same VM is untouched.
        assert!(
            lab.echo_answers(&neighbour, 7),
            "neighbour died with {name}"
        );
        let n = lab.ps_row("neighbour").unwrap();
        assert_eq!(n["state"], "running", "{n}");
        // The VM itself still serves its control port.
        assert_eq!(lab.vm_ls()[0]["state"], "running");
        eprintln!("{name}: faulted: {reason}");
    }
    // Ended capsules stay listed until killed; kill removes them.
    assert_eq!(lab.ps().len(), 4);
    for program in ["crash-panic", "crash-divide", "crash-pagefault"] {
        lab.ctl_ok(&["kill", program]);
    }
    let names: Vec<String> = lab.ps().iter().map(|r| r["name"].to_string()).collect();
    assert_eq!(names, ["\"neighbour\""]);
    assert!(lab.echo_answers(&neighbour, 7));
}

#[test]
fn http_capsule_serves_curl() {
    require_clients(&[CURL, SOCAT]);
    let lab = Lab::up("http", 1);
    let ip = lab.run_locator("http", "site", &[], &[]);
    let out = lab.exec(&["curl", "-sS", "--max-time", "10", &format!("http://{ip}/")]);
    let page = text(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        page.contains("site") && page.contains(&ip),
        "status page:\n{page}"
    );

    let out = lab.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        &format!("http://{ip}/healthz"),
    ]);
    assert_eq!(text(&out.stdout), "ok\n", "{}", describe(&out));

    for n in [0usize, 1, 1000, 300_000] {
        let out = lab.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "30",
            &format!("http://{ip}/bytes/{n}"),
        ]);
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(out.stdout.len(), n, "/bytes/{n} length");
        assert!(
            out.stdout == http_bytes(n),
            "/bytes/{n} content differs from the formula"
        );
    }

    // Keep-alive: two URLs in one curl invocation share one connection.
    let out = lab.exec(&[
        "curl",
        "-sv",
        "--max-time",
        "10",
        &format!("http://{ip}/healthz"),
        &format!("http://{ip}/bytes/10"),
    ]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing connection"),
        "no connection reuse:\n{err}"
    );

    // A request that is not HTTP gets a 400.
    let out = lab.tcp_roundtrip(&ip, 80, b"NONSENSE\r\n\r\n", "http-bad");
    assert!(
        text(&out.stdout).starts_with("HTTP/1.1 400"),
        "{}",
        describe(&out)
    );
    assert_eq!(lab.ps_row("site").unwrap()["state"], "running");
}

#[test]
fn kv_capsule_serves_redis_cli() {
    require_clients(&[REDIS_CLI]);
    let lab = Lab::up("kv", 1);
    let ip = lab.run_locator("kv", "store", &[], &[]);
    let redis = |args: &[&str]| lab.redis_cli(&ip, args).trim().to_string();
    assert_eq!(redis(&["PING"]), "PONG");
    assert_eq!(redis(&["SET", "greeting", "hello world"]), "OK");
    assert_eq!(redis(&["GET", "greeting"]), "hello world");
    assert_eq!(redis(&["GET", "missing"]), "");
    for expected in ["1", "2", "3"] {
        assert_eq!(redis(&["INCR", "counter"]), expected);
    }
    assert_eq!(redis(&["INCRBY", "counter", "10"]), "13");
    assert_eq!(redis(&["EXPIRE", "greeting", "100"]), "1");
    let ttl: i64 = redis(&["TTL", "greeting"]).parse().unwrap();
    assert!((95..=100).contains(&ttl), "TTL {ttl}");
    assert_eq!(redis(&["TTL", "counter"]), "-1");

    // A pipelined batch: 2000 SETs in RESP through --pipe, in one go.
    let dir = scratch_dir("kvpipe");
    let mut batch = String::new();
    for i in 0..2000 {
        let (k, v) = (format!("key:{i}"), format!("value-{i}"));
        batch.push_str(&format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
            k.len(),
            v.len()
        ));
    }
    std::fs::write(dir.join("batch"), batch).unwrap();
    let out = lab.sh(&format!(
        "redis-cli -h {ip} --pipe < {}/batch",
        dir.display()
    ));
    let said = text(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(said.contains("errors: 0, replies: 2000"), "{said}");
    assert_eq!(redis(&["GET", "key:1999"]), "value-1999");
    assert_eq!(redis(&["DBSIZE"]), "2002");

    // An unknown command gets an error and the same connection goes on.
    let out = lab.sh(&format!(
        "printf 'NOSUCHCOMMAND x\\nPING\\nGET key:7\\n' | redis-cli -h {ip}"
    ));
    let said = text(&out.stdout);
    let lines: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() == 3, "{}", describe(&out));
    assert!(lines[0].starts_with("ERR"), "{said}");
    assert_eq!(&lines[1..], ["PONG", "value-7"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The directory map file, to check that failed commands leave it alone.
fn map_bytes(lab: &Lab) -> Vec<u8> {
    std::fs::read(capsules_system_tests::host::state::lab_dir(&lab.name).join("directory.json"))
        .unwrap_or_default()
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let lab = Lab::up("bad", 1);
    let web = lab.run_locator("echo", "web", &[], &[]);
    let ps_before = stable(&lab.ps());
    let map_before = map_bytes(&lab);
    let refusals: [(&[&str], &str); 6] = [
        (&["run", "nosuchprogram"], "nosuchprogram"),
        (&["run", "echo", "--name", "web"], "already exists"),
        (&["run", "echo", "--on", "vm9"], "unknown VM 'vm9'"),
        (
            &["run", "echo", "--name", "Bad_Name"],
            "invalid capsule name",
        ),
        (&["kill", "nosuch"], "no capsule named 'nosuch'"),
        (&["logs", "nosuch"], "no capsule named 'nosuch'"),
    ];
    for (args, message) in refusals {
        let out = lab.ctl(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
        assert!(
            text(&out.stderr).contains(message),
            "{args:?} should say '{message}': {}",
            describe(&out)
        );
    }
    // Unknown program: the VM's own words are passed on.
    let out = lab.ctl(&["run", "nosuchprogram"]);
    assert!(
        text(&out.stderr).contains("vm1 refused"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        stable(&lab.ps()),
        ps_before,
        "ps changed after refused commands"
    );
    assert_eq!(
        map_bytes(&lab),
        map_before,
        "directory changed after refused commands"
    );

    // A VM that does not answer: run on it fails clearly, ps says so.
    let pid = lab.vm_ls()[0]["pid"].as_u64().unwrap() as i32;
    // Our own VM, frozen and thawed by pid. SAFETY: no memory involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let out = lab.ctl(&["run", "echo", "--on", "vm1"]);
    let stopped_ps = lab.ps();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("does not answer"),
        "{}",
        describe(&out)
    );
    assert_eq!(stopped_ps[0]["state"], "unreachable", "{stopped_ps:?}");
    assert_eq!(
        map_bytes(&lab),
        map_before,
        "directory changed after a failed run"
    );

    // Everything still works afterwards, and the next capsule gets fresh
    // numbers.
    assert!(lab.echo_answers(&web, 7));
    let next = lab.run_capsule("echo", Some("next"), &[], &[]);
    assert_ne!(next["locator"], web.as_str());
    assert!(lab.echo_answers(next["locator"].as_str().unwrap(), 7));
}

#[test]
fn directory_restart_keeps_the_map() {
    require_clients(&[DIG]);
    let mut lab = Lab::up("dirrestart", 1);
    let one = lab.run_locator("echo", "one", &[], &[]);
    let two = lab.run_locator("echo", "two", &[], &[]);
    assert_eq!(lab.dig_short("one"), one);
    let status = |lab: &Lab| -> serde_json::Value {
        let out = lab.ctl(&["directory", "status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)))
    };
    let st = status(&lab);
    assert_eq!(st["running"], true, "{st}");
    assert_eq!(st["capsules"], 2, "{st}");
    let pid = st["pid"].as_u64().expect("directory pid") as i32;
    // The directory this test's lab started, killed by its recorded pid.
    // SAFETY: no memory involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_for(Duration::from_secs(5), "the directory to die", || {
        (status(&lab)["running"] == false).then_some(())
    });
    let silent = lab.dig_short("one");
    assert!(
        !silent.contains(&one) && silent.contains("no servers could be reached"),
        "an answer without a directory? {silent}"
    );
    lab.ctl_ok(&["directory", "start"]);
    let st = status(&lab);
    assert_eq!(st["running"], true, "{st}");
    assert_ne!(st["pid"].as_u64(), Some(pid as u64));
    assert_eq!(lab.dig_short("one"), one);
    assert_eq!(lab.dig_short("two"), two);
    assert_eq!(lab.ps().len(), 2);
    // The map goes on from where it was: a new capsule gets new numbers.
    let three = lab.run_locator("echo", "three", &[], &[]);
    assert!(three != one && three != two);
    assert_eq!(lab.dig_short("three"), three);
    // A second start is refused while one runs.
    let out = lab.ctl(&["directory", "start"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("already running"),
        "{}",
        describe(&out)
    );
    let new_pid = status(&lab)["pid"].as_u64().unwrap() as u32;
    lab.down();
    assert!(
        !capsules_system_tests::host::lab::is_our_directory(new_pid, &lab.name),
        "the directory survived lab down"
    );
}
