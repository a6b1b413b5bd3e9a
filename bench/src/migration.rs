//! Migration benchmark: downtime (freeze → running again, as `capsulectl
//! migrate` measures it) and the longest pause a live client sees, per move,
//! for a `kv` capsule that is idle or holds 1 MiB or 16 MiB of live heap,
//! with 1 or 100 open connections. One client does INCR in a loop on one
//! connection (and checks every reply); the others stay open and idle. The
//! Linux peer's retransmission timeouts are counted from its TCP statistics.
//! `--plot FILE.svg` draws the first scenario's run: the latency of every
//! INCR over time, each move shaded from freeze to running again. After the
//! moves each idle connection must answer an `ECHO` with its own tag; the
//! count that did is reported, and any that did not fails the benchmark.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsulectl::capsules::{self, LabSession, RunOptions};
use capsulectl::lab::{self, UpOptions};
use capsulectl::migrate;
use capsulectl::plot;
use capsulectl::qemu::AccelChoice;
use std::path::{Path, PathBuf};

use crate::{median, sorted};

pub(crate) struct TwoVmLab {
    pub(crate) name: String,
    pub(crate) netns: String,
    pub(crate) accel: String,
}

impl TwoVmLab {
    pub(crate) fn up(tag: &str, accel: AccelChoice, kernel: Option<PathBuf>) -> Result<Self> {
        let name = format!("bench{}-{tag}", std::process::id());
        let report = lab::up(&UpOptions {
            name: name.clone(),
            vms: 2,
            mem_mib: 512,
            accel,
            kernel,
            capsule_range: Default::default(),
            subnets: 1,
            subnet_list: Vec::new(),
        })?;
        Ok(Self {
            name,
            netns: report.state.netns.clone(),
            accel: report.accel_reason,
        })
    }
}

impl Drop for TwoVmLab {
    fn drop(&mut self) {
        if let Err(e) = lab::down(&self.name) {
            eprintln!("cannot tear down lab {}: {e:#}", self.name);
        }
    }
}

/// Retransmission timeouts the lab namespace's TCP has taken so far.
pub(crate) fn tcp_timeouts(netns: &str) -> Result<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "nstat", "-az", "TcpExtTCPTimeouts"])
        .output()
        .context("cannot run nstat (iproute2)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find(|l| l.starts_with("TcpExtTCPTimeouts"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

fn resp_line(reader: &mut BufReader<TcpStream>) -> Result<String> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    Ok(line)
}

/// Sets a `size`-byte value so the capsule's heap holds it.
fn fill_heap(addr: SocketAddr, size: usize) -> Result<()> {
    if size == 0 {
        return Ok(());
    }
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let value = vec![b'x'; size];
    write!(s, "*3\r\n$3\r\nSET\r\n$4\r\nheap\r\n${size}\r\n")?;
    s.write_all(&value)?;
    s.write_all(b"\r\n")?;
    let line = resp_line(&mut BufReader::new(s))?;
    if !line.starts_with("+OK") {
        bail!("SET of {size} bytes answered {line:?}");
    }
    Ok(())
}

pub struct Scenario {
    pub heap: usize,
    pub connections: usize,
}

impl Scenario {
    /// Short label for `--only`: `idle-1c`, `1m-100c`, …
    fn tag(&self) -> String {
        let heap = match self.heap >> 20 {
            0 => "idle".to_string(),
            m => format!("{m}m"),
        };
        format!("{heap}-{}c", self.connections)
    }
}

pub struct ScenarioResult {
    pub label: String,
    /// Idle connections that answered correctly after the moves, of how many.
    pub idle_answered: Option<(usize, usize)>,
    pub image_kib: u64,
    pub downtime: Vec<f64>,
    pub pause: Vec<f64>,
    pub timeouts: u64,
    pub errors: Vec<String>,
    /// Per INCR reply: (seconds since the client started, latency in ms).
    pub latencies: Vec<(f64, f64)>,
    /// Per move, on the same clock: the capsule stood still.
    pub bands: Vec<plot::Band>,
}

fn run_scenario(
    lab: &TwoVmLab,
    session: &LabSession,
    sc: &Scenario,
    moves: usize,
) -> Result<ScenarioResult> {
    let name = format!("kv-{}m-{}c", sc.heap >> 20, sc.connections);
    let started = capsules::run(
        session,
        &RunOptions {
            program: "kv".into(),
            name: Some(name.clone()),
            on: Some("vm1".into()),
            // Parsing a big SET holds the request and the value at once.
            memory_mib: Some(if sc.heap > (4 << 20) { 256 } else { 64 }),
            ..Default::default()
        },
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let addr = SocketAddr::from((started.locator, 6379));
    fill_heap(addr, sc.heap)?;
    let mut idle = Vec::new();
    for _ in 1..sc.connections {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        idle.push(s);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let longest = Arc::new(Mutex::new(0f64));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    // The client's and the moves' shared clock.
    let t0 = Instant::now();
    let client = {
        let (stop, longest, latencies) = (stop.clone(), longest.clone(), latencies.clone());
        std::thread::spawn(move || -> Result<u64> {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_nodelay(true)?;
            let mut w = s.try_clone()?;
            let mut r = BufReader::new(s);
            let mut last_value = None;
            let mut last = Instant::now();
            let mut replies = 0;
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                w.write_all(b"INCR bench\r\n")?;
                let line = resp_line(&mut r)?;
                let received = Instant::now();
                let v: i64 = line
                    .trim_end()
                    .trim_start_matches(':')
                    .parse()
                    .context("INCR reply")?;
                if let Some(p) = last_value
                    && v != p + 1
                {
                    bail!("INCR went from {p} to {v}");
                }
                last_value = Some(v);
                latencies.lock().expect("lock").push((
                    received.duration_since(t0).as_secs_f64(),
                    received.duration_since(sent).as_secs_f64() * 1000.0,
                ));
                let gap = last.elapsed().as_secs_f64() * 1000.0;
                let mut l = longest.lock().expect("lock");
                *l = l.max(gap);
                last = Instant::now();
                replies += 1;
            }
            Ok(replies)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let timeouts_before = tcp_timeouts(&lab.netns)?;
    let mut result = ScenarioResult {
        label: format!("{} MiB heap, {} conn", sc.heap >> 20, sc.connections),
        idle_answered: None,
        image_kib: 0,
        downtime: Vec::new(),
        pause: Vec::new(),
        timeouts: 0,
        errors: Vec::new(),
        latencies: Vec::new(),
        bands: Vec::new(),
    };
    let mut on = "vm1";
    for _ in 0..moves {
        let to = if on == "vm1" { "vm2" } else { "vm1" };
        *longest.lock().expect("lock") = 0.0;
        let called = t0.elapsed().as_secs_f64();
        match migrate::migrate(session, &name, to) {
            Ok(r) => {
                let from_s = called + r.freeze_offset_ms / 1000.0;
                result.bands.push(plot::Band {
                    label: format!("{} {}→{}", name, r.from, r.to),
                    from_s,
                    to_s: from_s + r.downtime_ms / 1000.0,
                    series: Some(0),
                });
                result.downtime.push(r.downtime_ms);
                result.image_kib = r.image_bytes / 1024;
                on = to;
            }
            Err(e) => result.errors.push(format!("{e:#}")),
        }
        // Let the client's first replies after the move land before reading its pause.
        std::thread::sleep(Duration::from_millis(300));
        result.pause.push(*longest.lock().expect("lock"));
    }
    stop.store(true, Ordering::Relaxed);
    match client.join() {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => result.errors.push(format!("client: {e:#}")),
        Err(_) => result.errors.push("client panicked".into()),
    }
    result.timeouts = tcp_timeouts(&lab.netns)?.saturating_sub(timeouts_before);
    result.latencies = std::mem::take(&mut *latencies.lock().expect("lock"));
    if !idle.is_empty() {
        let (answered, failures) = check_idle(&idle);
        result.idle_answered = Some((answered, idle.len()));
        if answered < idle.len() {
            result.errors.push(format!(
                "{} of {} idle connections did not answer correctly after the moves; first: {}",
                idle.len() - answered,
                idle.len(),
                failures.first().map(String::as_str).unwrap_or("?")
            ));
        }
    }
    drop(idle);
    let _ = capsules::kill(session, &name, true);
    Ok(result)
}

/// `ECHO idle-I` for idle connection I: an answer naming another connection
/// would show connections mixed up by a move.
fn idle_tag(i: usize) -> String {
    format!("idle-{i}")
}

fn echo_request(tag: &str) -> Vec<u8> {
    format!("*2\r\n$4\r\nECHO\r\n${}\r\n{tag}\r\n", tag.len()).into_bytes()
}

/// Reads the answer to `ECHO tag`: exactly the bulk string `tag`.
fn read_echo(reader: &mut impl BufRead, tag: &str) -> Result<()> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        bail!("connection closed");
    }
    if line != format!("${}\r\n", tag.len()) {
        bail!("ECHO {tag} answered {line:?}");
    }
    line.clear();
    reader.read_line(&mut line)?;
    if line != format!("{tag}\r\n") {
        bail!("ECHO {tag} answered {line:?}");
    }
    Ok(())
}

/// Sends `ECHO idle-I` on every idle connection, then reads every answer;
/// how many answered correctly, and what went wrong on the others.
fn check_idle(idle: &[TcpStream]) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let mut sent = Vec::new();
    for (i, s) in idle.iter().enumerate() {
        let tag = idle_tag(i);
        let outcome = (|| -> Result<()> {
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            (&*s).write_all(&echo_request(&tag))?;
            Ok(())
        })();
        match outcome {
            Ok(()) => sent.push((i, tag)),
            Err(e) => failures.push(format!("idle connection {i}: {e:#}")),
        }
    }
    let mut answered = 0;
    for (i, tag) in sent {
        match read_echo(&mut BufReader::new(&idle[i]), &tag) {
            Ok(()) => answered += 1,
            Err(e) => failures.push(format!("idle connection {i}: {e:#}")),
        }
    }
    (answered, failures)
}

/// Runs every scenario with `moves` migrations each and prints a table;
/// fails if any scenario had an error (a move, the client, or an idle
/// connection that no longer answers).
pub fn bench_migration(
    accel: AccelChoice,
    kernel: Option<PathBuf>,
    moves: usize,
    only: &[String],
    mut plot_to: Option<&Path>,
) -> Result<()> {
    let scenarios = [
        Scenario {
            heap: 0,
            connections: 1,
        },
        Scenario {
            heap: 1 << 20,
            connections: 1,
        },
        Scenario {
            heap: 16 << 20,
            connections: 1,
        },
        Scenario {
            heap: 0,
            connections: 100,
        },
        Scenario {
            heap: 1 << 20,
            connections: 100,
        },
        Scenario {
            heap: 16 << 20,
            connections: 100,
        },
    ];
    let known: Vec<String> = scenarios.iter().map(Scenario::tag).collect();
    if let Some(unknown) = only.iter().find(|o| !known.contains(o)) {
        bail!("unknown scenario '{unknown}'; known: {}", known.join(", "));
    }
    let lab = TwoVmLab::up("migrate", accel, kernel)?;
    let session = LabSession::open(&lab.name)?;
    println!(
        "migration ({} moves per scenario, accelerator {})",
        moves, lab.accel
    );
    println!(
        "{:<26} {:>9} {:>17} {:>17} {:>5} {:>6}",
        "scenario", "image KiB", "downtime med/max", "pause med/max", "RTOs", "errors"
    );
    let mut failed = Vec::new();
    for sc in scenarios
        .iter()
        .filter(|sc| only.is_empty() || only.contains(&sc.tag()))
    {
        let r = run_scenario(&lab, &session, sc, moves)?;
        let d = sorted(r.downtime.clone());
        let p = sorted(r.pause.clone());
        let fmt = |v: &[f64]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}/{:.1} ms", median(v), v[v.len() - 1])
            }
        };
        println!(
            "{:<26} {:>9} {:>17} {:>17} {:>5} {:>6}",
            r.label,
            r.image_kib,
            fmt(&d),
            fmt(&p),
            r.timeouts,
            r.errors.len()
        );
        if let Some((answered, of)) = r.idle_answered {
            println!("  idle connections answering after the moves: {answered}/{of}");
        }
        for e in &r.errors {
            eprintln!("  error: {e}");
        }
        if !r.errors.is_empty() {
            failed.push(format!("{}: {} error(s)", sc.tag(), r.errors.len()));
        }
        if let Some(path) = plot_to.take() {
            plot::write_svg(&figure(&r, &lab.accel), path)?;
            eprintln!("  plot of this scenario: {}", path.display());
        }
    }
    if !failed.is_empty() {
        bail!("migration benchmark failed: {}", failed.join("; "));
    }
    Ok(())
}

/// The `--plot` picture of one scenario's run.
fn figure(r: &ScenarioResult, accel: &str) -> plot::Figure {
    plot::Figure {
        title: format!(
            "Migration benchmark: INCR latency while kv moves ({})",
            r.label
        ),
        subtitle: format!(
            "accelerator {accel}; {} moves, each shaded from freeze to running again",
            r.bands.len()
        ),
        series: vec![plot::Series {
            label: "kv: INCR on one connection".into(),
            points: r.latencies.clone(),
        }],
        bands: r.bands.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_of_an_idle_connection() {
        let tag = idle_tag(42);
        assert_eq!(
            echo_request(&tag),
            b"*2\r\n$4\r\nECHO\r\n$7\r\nidle-42\r\n".to_vec()
        );
        read_echo(&mut &b"$7\r\nidle-42\r\n"[..], &tag).unwrap();
    }

    #[test]
    fn wrong_echo_answers_fail() {
        let tag = idle_tag(42);
        for bad in [
            &b""[..],
            b"$7\r\nidle-41\r\n",
            b"$8\r\nidle-420\r\n",
            b"-ERR unknown command\r\n",
            b"+PONG\r\n",
            b"$7\r\n",
        ] {
            assert!(
                read_echo(&mut &bad[..], &tag).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
