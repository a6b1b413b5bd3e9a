//! Routed labs (`lab up --subnets 2`): two VM subnets in their own
//! namespaces, a client subnet with a capsule-unaware Linux host, and the
//! router VM — our kernel in `role=router` — as the only path between them.
//! Real clients (ping, curl, redis-cli, dig, a RESP INCR loop) run on the
//! client host and reach capsules through the router, whose translation
//! table capsulectl keeps in step with the directory.

use std::process::Output;
use std::time::Duration;

use capsules_system_tests::clients::{IncrClient, Redis, Reply};
use capsules_system_tests::{Lab, describe, require_clients, text, wait_for};

const VM2_ADDR: &str = "198.51.100.12";
/// A locator of the default range that no capsule holds.
const NOBODY: &str = "198.18.0.250";

fn routed_lab(tag: &str) -> Lab {
    require_clients(&[
        ("ping", "iputils-ping"),
        ("curl", "curl"),
        ("redis-cli", "redis-tools"),
        ("dig", "dnsutils"),
    ]);
    Lab::up_with(tag, 2, &["--subnets", "2"])
}

fn on_client(lab: &Lab, argv: &[&str]) -> Output {
    let mut args = vec!["lab", "exec", "--client", "--"];
    args.extend_from_slice(argv);
    lab.ctl(&args)
}

fn on_subnet(lab: &Lab, k: &str, argv: &[&str]) -> Output {
    let mut args = vec!["lab", "exec", "--subnet", k, "--"];
    args.extend_from_slice(argv);
    lab.ctl(&args)
}

fn assert_ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", describe(out));
    text(&out.stdout)
}

fn client_netns(lab: &Lab) -> String {
    format!("{}.client", lab.netns())
}

fn router_pid(lab: &Lab) -> u32 {
    let dir = capsulectl::state::lab_dir(&lab.name);
    let state = capsulectl::state::load(&dir)
        .expect("lab state")
        .expect("lab state exists");
    state
        .routed
        .expect("a routed lab")
        .router
        .pid
        .expect("router pid")
}

#[test]
fn the_client_reaches_capsules_on_both_subnets_only_through_the_router() {
    let lab = routed_lab("routed");
    // Placement and `vm ls`: vm1 on subnet 1, vm2 on subnet 2, the router.
    let vms = lab.vm_ls();
    let subnet_of = |name: &str| {
        vms.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in vm ls: {vms:?}"))["subnet"]
            .as_u64()
            .expect("subnet")
    };
    assert_eq!(subnet_of("vm1"), 1);
    assert_eq!(subnet_of("vm2"), 2);
    assert_eq!(subnet_of("router"), 0);
    assert!(
        vms.iter().all(|v| v["state"] == "running"),
        "not every VM runs: {vms:?}"
    );
    assert!(
        vms.iter()
            .any(|v| v["name"] == "vm2" && v["ip"] == VM2_ADDR),
        "{vms:?}"
    );

    let web = lab.run_locator("http", "web", &["--on", "vm1"], &[]);
    let kv = lab.run_locator("kv", "kv", &["--on", "vm2"], &[]);

    // ping and curl / redis-cli from the client host, through the router.
    for loc in [&web, &kv] {
        assert_ok(
            &on_client(&lab, &["ping", "-c2", "-W3", loc]),
            &format!("ping {loc} from the client host"),
        );
    }
    let page = assert_ok(
        &on_client(
            &lab,
            &["curl", "-sf", "--max-time", "10", &format!("http://{web}/")],
        ),
        "curl from the client host",
    );
    assert!(!page.is_empty(), "empty page");
    assert_eq!(
        assert_ok(
            &on_client(&lab, &["redis-cli", "-h", &kv, "SET", "where", "subnet2"]),
            "redis-cli SET"
        )
        .trim(),
        "OK"
    );
    assert_eq!(
        assert_ok(
            &on_client(&lab, &["redis-cli", "-h", &kv, "GET", "where"]),
            "redis-cli GET"
        )
        .trim(),
        "subnet2"
    );
    // The directory's DNS (on subnet 1's host side) answers the client
    // host through the router too.
    let answer = assert_ok(
        &on_client(
            &lab,
            &["dig", "@192.0.2.1", "+short", "+time=3", "kv.capsule"],
        ),
        "dig from the client host",
    );
    assert_eq!(answer.trim(), kv);

    // A locator nobody holds: ICMP unreachable from the router, not silence.
    let out = on_client(&lab, &["ping", "-c1", "-W3", NOBODY]);
    assert!(!out.status.success(), "ping {NOBODY} succeeded");
    let said = text(&out.stdout);
    assert!(
        said.contains("Destination Host Unreachable") && said.contains("203.0.113.254"),
        "no ICMP unreachable from the router: {}",
        describe(&out)
    );

    // A killed capsule's locator becomes unreachable as well.
    lab.ctl_ok(&["kill", "web"]);
    let out = on_client(&lab, &["ping", "-c1", "-W3", &web]);
    assert!(
        text(&out.stdout).contains("Destination Host Unreachable"),
        "{}",
        describe(&out)
    );

    // No namespace forwards: the router is the only path between subnets.
    for out in [
        on_subnet(&lab, "1", &["cat", "/proc/sys/net/ipv4/ip_forward"]),
        on_subnet(&lab, "2", &["cat", "/proc/sys/net/ipv4/ip_forward"]),
        on_client(&lab, &["cat", "/proc/sys/net/ipv4/ip_forward"]),
    ] {
        assert_eq!(assert_ok(&out, "ip_forward").trim(), "0");
    }
    // With the router up, subnet 1's host side reaches vm2 (through it)…
    assert_ok(
        &on_subnet(&lab, "1", &["ping", "-c1", "-W3", VM2_ADDR]),
        "ping vm2 from subnet 1",
    );
    assert_ok(
        &on_subnet(&lab, "2", &["ping", "-c1", "-W3", "192.0.2.11"]),
        "ping vm1 from subnet 2",
    );
    // …and with the router stopped, nothing does.
    let pid = router_pid(&lab);
    // The router QEMU of this test's own lab, by its recorded pid.
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    wait_for(Duration::from_secs(10), "the router QEMU to end", || {
        (!std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty()))
        .then_some(())
    });
    for (k, target) in [("1", VM2_ADDR), ("2", "192.0.2.11")] {
        let out = on_subnet(&lab, k, &["ping", "-c2", "-W2", target]);
        assert!(
            !out.status.success(),
            "subnet {k} reached {target} without the router: {}",
            describe(&out)
        );
    }
    let out = on_client(&lab, &["ping", "-c1", "-W2", &kv]);
    assert!(
        !out.status.success(),
        "the client reached kv without the router"
    );
    // The capsule itself still runs (capsulectl reaches vm2 from its own
    // subnet's namespace, not through the router).
    let row = lab.ps_row("kv").expect("kv in ps");
    assert_eq!(row["state"], "running", "{row}");
}

#[test]
fn a_capsule_moves_between_subnets_while_the_client_behind_the_router_counts() {
    let lab = routed_lab("routed-mv");
    let kv = lab.run_locator("kv", "kv", &["--on", "vm1"], &[]);
    let mut redis = Redis::connect_from(&client_netns(&lab), &kv);
    assert_eq!(redis.cmd(&["SET", "k", "v"]), Reply::Simple("OK".into()));
    let (client, mut seen) = IncrClient::start(redis);
    for to in ["vm2", "vm1"] {
        lab.migrate_ok("kv", to);
        seen = client.wait(seen, &format!("INCR replies after the move to {to}"));
        std::thread::sleep(Duration::from_millis(300));
        let row = lab.ps_row("kv").expect("kv in ps");
        assert_eq!(row["vm"], to, "{row}");
    }
    let report = client.finish();
    let mut redis = report.redis;
    assert_eq!(
        redis.cmd(&["GET", "counter"]),
        Reply::Bulk(Some(report.replies.to_string().into_bytes())),
        "a reply was lost or repeated across the moves"
    );
    assert_eq!(redis.cmd(&["GET", "k"]), Reply::Bulk(Some(b"v".to_vec())));
    eprintln!(
        "{} INCRs in sequence from the client host across two cross-subnet moves",
        report.replies
    );
}
