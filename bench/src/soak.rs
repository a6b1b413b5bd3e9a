//! Soak: a `kv` and an `http` capsule, started as `capsulectl run` starts
//! them, under steady client load while each is moved `--moves` times
//! between the two VMs of a lab (kv, then http, then kv again, …; each
//! capsule alternates vm1 ↔ vm2). It checks that no reply is lost or
//! repeated, that the Linux side of the lab takes no retransmission timeout,
//! and that neither VM's memory grows.
//!
//! - kv: one connection doing `INCR` in a loop; every reply must be exactly
//!   one more than the previous one.
//! - http: one kept-alive connection alternating `GET /` (the status page,
//!   whose `requests_served` must have grown by exactly the requests sent
//!   since the previous one) and `GET /bytes/65536` (every byte compared with
//!   the pattern); every request must get exactly one complete response.
//! - Both connections must be quiet once the client stops: a byte arriving
//!   after the last reply is a repeated reply.
//! - `TcpExtTCPTimeouts` of the lab namespace, before and after.
//! - Each VM's used memory and kernel heap (control `Status`) at round 0,
//!   every `--sample-every` rounds (one round moves each capsule once; the
//!   interval is even) and at the end if the last round is even: every
//!   sample finds each capsule on its first VM. The
//!   verdict compares the first sample from round `--sample-every` on (the
//!   rounds before are warm-up) with the last one.
//!
//! Exits non-zero on any error, lost or repeated reply, RTO or memory
//! growth above [`MEMORY_SLACK`]. Method: docs/performance.md, "Soak".

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsulectl::capsules::{self, LabSession, RunOptions};
use capsulectl::migrate;
use capsulectl::qemu::AccelChoice;

use crate::migration::{TwoVmLab, tcp_timeouts};
use crate::{median, quantile, sorted};

/// Most a VM's used memory or heap may grow from the first sample after
/// the warm-up to the last one.
pub const MEMORY_SLACK: u64 = 256 * 1024;
/// Body size of the http client's `/bytes/N` requests: several TCP segments,
/// so that moves fall into bodies as well as between requests.
const HTTP_BODY: usize = 64 * 1024;
/// A reply later than this is an error (a lost reply, since TCP delivers
/// everything or fails).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Traffic flows between moves for at least this long.
const BETWEEN_MOVES: Duration = Duration::from_millis(100);
/// A client that has not had a reply this long after a move ended is stuck.
const REPLY_AFTER_MOVE: Duration = Duration::from_secs(10);
/// The soak stops early after this many failed moves.
const MAX_MOVE_ERRORS: usize = 10;
/// How long a connection must stay silent after the client's last reply.
const QUIET: Duration = Duration::from_millis(300);
/// Anomalies described one by one in the report (the counts are complete).
const MAX_ANOMALIES: usize = 20;

/// Where a value falls relative to the one expected from the previous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The first value seen: nothing to compare with.
    First,
    InOrder,
    /// This much above the expected value.
    Ahead(u64),
    /// This much below the expected value.
    Behind(u64),
}

/// A counter that must advance by a known step per observation.
#[derive(Debug, Default, Clone)]
pub struct Sequence {
    last: Option<i64>,
    pub observed: u64,
    /// Sum of the amounts by which values were ahead of the expected ones.
    pub ahead: u64,
    /// Sum of the amounts by which values were behind the expected ones.
    pub behind: u64,
}

impl Sequence {
    /// Records `value`, expected to be `step` more than the previous one.
    /// After a mismatch the next value is compared with this one, so one
    /// lost or repeated reply counts once.
    pub fn observe(&mut self, value: i64, step: i64) -> Step {
        let verdict = match self.last {
            None => Step::First,
            Some(last) => {
                let expected = last.saturating_add(step);
                match value.cmp(&expected) {
                    std::cmp::Ordering::Equal => Step::InOrder,
                    std::cmp::Ordering::Greater => Step::Ahead(value.abs_diff(expected)),
                    std::cmp::Ordering::Less => Step::Behind(value.abs_diff(expected)),
                }
            }
        };
        match verdict {
            Step::Ahead(n) => self.ahead = self.ahead.saturating_add(n),
            Step::Behind(n) => self.behind = self.behind.saturating_add(n),
            Step::First | Step::InOrder => {}
        }
        self.last = Some(value);
        self.observed += 1;
        verdict
    }
}

/// The integer of a RESP integer reply line (`:42\r\n`).
pub fn parse_int_reply(line: &str) -> Option<i64> {
    line.strip_suffix("\r\n")?.strip_prefix(':')?.parse().ok()
}

/// What the head of an HTTP response says about framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub content_length: u64,
    pub keep_alive: bool,
}

/// Parses an HTTP/1.1 response head (status line and headers, through the
/// blank line). Content-Length is required: the client frames by it.
pub fn parse_response_head(head: &str) -> Result<ResponseHead> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if parts.next() != Some("HTTP/1.1") {
        bail!("not an HTTP/1.1 status line: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status code in {status_line:?}"))?;
    let mut content_length = None;
    let mut keep_alive = true;
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("malformed header {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                bail!("two Content-Length headers");
            }
            content_length = Some(
                value
                    .parse::<u64>()
                    .with_context(|| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("connection") {
            keep_alive = !value.eq_ignore_ascii_case("close");
        }
    }
    Ok(ResponseHead {
        status,
        content_length: content_length.context("response without Content-Length")?,
        keep_alive,
    })
}

/// `requests_served` of the http status page.
pub fn served_count(page: &str) -> Option<i64> {
    page.lines()
        .find_map(|l| l.strip_prefix("requests_served:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The first byte of a `/bytes/N` body that differs from the pattern.
fn first_wrong_byte(body: &[u8]) -> Option<usize> {
    body.iter()
        .enumerate()
        .find(|(i, b)| **b != capsules_apps::http::pattern_byte(*i as u64))
        .map(|(i, _)| i)
}

/// Median, p99 (nearest rank) and maximum of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn summary(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let v = sorted(values.to_vec());
    Some(Summary {
        count: v.len(),
        median: median(&v),
        p99: quantile(&v, 0.99),
        max: v[v.len() - 1],
    })
}

fn describe(s: Option<Summary>) -> String {
    match s {
        Some(s) => format!(
            "median {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} moves)",
            s.median, s.p99, s.max, s.count
        ),
        None => "no moves".into(),
    }
}

/// Whether a series of memory samples `(round, bytes)` stayed flat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flatness {
    /// Growth from the baseline sample to the last one is at most the slack.
    Flat {
        from_round: usize,
        to_round: usize,
        growth: i64,
    },
    /// It grew by more than the slack.
    Grew {
        from_round: usize,
        to_round: usize,
        growth: i64,
    },
    /// Fewer than two samples from the warm-up on: nothing to judge.
    TooFewSamples,
}

/// Judges samples `(round, bytes)` in round order: the baseline is the first
/// sample at or after round `warmup`, compared with the last sample.
pub fn flatness(samples: &[(usize, u64)], warmup: usize, slack: u64) -> Flatness {
    let Some(&(from_round, base)) = samples.iter().find(|(round, _)| *round >= warmup) else {
        return Flatness::TooFewSamples;
    };
    let &(to_round, last) = samples.last().expect("a baseline was found");
    if to_round <= from_round {
        return Flatness::TooFewSamples;
    }
    let growth = last as i64 - base as i64;
    if growth > slack as i64 {
        Flatness::Grew {
            from_round,
            to_round,
            growth,
        }
    } else {
        Flatness::Flat {
            from_round,
            to_round,
            growth,
        }
    }
}

/// What one client saw.
#[derive(Debug, Default, Clone)]
pub struct ClientOutcome {
    pub requests: u64,
    /// Complete, correct responses.
    pub replies: u64,
    pub lost: u64,
    pub repeated: u64,
    /// Status-page counts compared (http) or INCR replies checked (kv).
    pub counts_checked: u64,
    pub bytes_verified: u64,
    /// The first few lost or repeated replies, described.
    pub anomalies: Vec<String>,
    /// Why the client stopped early.
    pub error: Option<String>,
}

impl ClientOutcome {
    fn anomaly(&mut self, what: String) {
        if self.anomalies.len() < MAX_ANOMALIES {
            self.anomalies.push(what);
        }
    }
}

/// Replies of one client as they come: how many, and the longest gap
/// between two of them since the last reset.
struct Pulse {
    replies: AtomicU64,
    done: AtomicBool,
    gaps: Mutex<(Instant, f64)>,
}

impl Pulse {
    fn new() -> Self {
        Self {
            replies: AtomicU64::new(0),
            done: AtomicBool::new(false),
            gaps: Mutex::new((Instant::now(), 0.0)),
        }
    }

    fn beat(&self) {
        let now = Instant::now();
        {
            let mut g = self.gaps.lock().expect("pulse lock");
            let gap = now.duration_since(g.0).as_secs_f64() * 1000.0;
            g.1 = g.1.max(gap);
            g.0 = now;
        }
        self.replies.fetch_add(1, Ordering::SeqCst);
    }

    fn replies(&self) -> u64 {
        self.replies.load(Ordering::SeqCst)
    }

    fn reset_longest(&self) {
        self.gaps.lock().expect("pulse lock").1 = 0.0;
    }

    fn longest_ms(&self) -> f64 {
        self.gaps.lock().expect("pulse lock").1
    }

    fn finished(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits until there are more than `count` replies; false on timeout or
    /// when the client has ended.
    fn wait_past(&self, count: u64, timeout: Duration) -> bool {
        let start = Instant::now();
        while self.replies() <= count {
            if self.finished() || start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// After the client's last reply nothing more may arrive: bytes would be a
/// repeated reply; the end of the stream means the capsule closed it.
fn expect_quiet(reader: &mut BufReader<TcpStream>) -> Result<usize> {
    if !reader.buffer().is_empty() {
        return Ok(reader.buffer().len());
    }
    reader.get_ref().set_read_timeout(Some(QUIET))?;
    let mut byte = [0u8; 512];
    match reader.get_mut().read(&mut byte) {
        Ok(0) => bail!("the capsule closed the connection"),
        Ok(n) => Ok(n),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(0)
        }
        Err(e) => Err(e.into()),
    }
}

fn kv_client(addr: SocketAddr, stop: &AtomicBool, pulse: &Pulse) -> ClientOutcome {
    let mut out = ClientOutcome::default();
    let mut seq = Sequence::default();
    let result = (|| -> Result<()> {
        let stream = connect(addr)?;
        let mut w = stream.try_clone()?;
        let mut r = BufReader::new(stream);
        let mut line = String::new();
        while !stop.load(Ordering::Relaxed) {
            w.write_all(b"INCR soak:counter\r\n")?;
            out.requests += 1;
            line.clear();
            if r.read_line(&mut line)? == 0 {
                bail!("the capsule closed the connection");
            }
            let v = parse_int_reply(&line)
                .with_context(|| format!("INCR answered {line:?}, not an integer"))?;
            let at = out.requests;
            match seq.observe(v, 1) {
                Step::Ahead(n) => {
                    out.anomaly(format!("reply {at}: INCR jumped {n} too far, to {v}"))
                }
                Step::Behind(n) => {
                    out.anomaly(format!("reply {at}: INCR went back by {n}, to {v}"))
                }
                Step::First | Step::InOrder => {}
            }
            out.replies += 1;
            pulse.beat();
        }
        let extra = expect_quiet(&mut r)?;
        if extra > 0 {
            out.repeated += 1;
            out.anomaly(format!("{extra} bytes arrived after the last reply"));
        }
        Ok(())
    })();
    if let Err(e) = result {
        out.error = Some(format!("kv client after {} replies: {e:#}", out.replies));
    }
    // Ahead: an INCR was applied without its reply reaching us (or twice).
    out.lost += seq.ahead;
    // Behind or equal: a reply came again.
    out.repeated += seq.behind;
    out.counts_checked = seq.observed;
    pulse.done.store(true, Ordering::SeqCst);
    out
}

/// Reads a response head, through its blank line.
fn read_head(r: &mut BufReader<TcpStream>) -> Result<String> {
    let mut head = String::new();
    loop {
        let n = r.read_line(&mut head)?;
        if n == 0 {
            bail!("the capsule closed the connection");
        }
        if head.ends_with("\r\n\r\n") {
            return Ok(head);
        }
        if head.len() > 16 * 1024 {
            bail!("response head over 16 KiB");
        }
    }
}

fn http_client(addr: SocketAddr, stop: &AtomicBool, pulse: &Pulse) -> ClientOutcome {
    let mut out = ClientOutcome::default();
    let mut seq = Sequence::default();
    let result = (|| -> Result<()> {
        let stream = connect(addr)?;
        let mut w = stream.try_clone()?;
        let mut r = BufReader::new(stream);
        let mut body = Vec::new();
        // Requests sent since the last status page, that one included.
        let mut since_page = 0;
        while !stop.load(Ordering::Relaxed) {
            let page = out.requests % 2 == 0;
            let path = if page {
                "/".to_string()
            } else {
                format!("/bytes/{HTTP_BODY}")
            };
            write!(w, "GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n")?;
            out.requests += 1;
            since_page += 1;
            let head = parse_response_head(&read_head(&mut r)?)?;
            if head.status != 200 || !head.keep_alive {
                bail!("GET {path} answered {head:?}");
            }
            if !page && head.content_length != HTTP_BODY as u64 {
                bail!("GET {path} announced {} bytes", head.content_length);
            }
            if head.content_length > 1 << 20 {
                bail!("GET {path} announced {} bytes", head.content_length);
            }
            body.resize(head.content_length as usize, 0);
            r.read_exact(&mut body)?;
            let at = out.requests;
            if page {
                let text = String::from_utf8_lossy(&body);
                let n = served_count(&text)
                    .with_context(|| format!("no requests_served in the status page {text:?}"))?;
                // Ahead: the capsule counted a request twice; behind: one
                // it answered was never counted, i.e. it answered another.
                match seq.observe(n, since_page) {
                    Step::Ahead(k) => {
                        out.repeated += k;
                        out.anomaly(format!(
                            "request {at}: requests_served {n}, {k} more than sent"
                        ));
                    }
                    Step::Behind(k) => {
                        out.lost += k;
                        out.anomaly(format!(
                            "request {at}: requests_served {n}, {k} fewer than sent"
                        ));
                    }
                    Step::First | Step::InOrder => {}
                }
                since_page = 0;
            } else {
                if let Some(i) = first_wrong_byte(&body) {
                    bail!("request {at}: body byte {i} of GET {path} is wrong");
                }
                out.bytes_verified += body.len() as u64;
            }
            out.replies += 1;
            pulse.beat();
        }
        let extra = expect_quiet(&mut r)?;
        if extra > 0 {
            out.repeated += 1;
            out.anomaly(format!("{extra} bytes arrived after the last response"));
        }
        Ok(())
    })();
    if let Err(e) = result {
        out.error = Some(format!(
            "http client after {} responses to {} requests: {e:#}",
            out.replies, out.requests
        ));
    }
    if out.requests > out.replies && out.error.is_some() {
        // The request in flight never got its complete response.
        out.lost += out.requests - out.replies;
    }
    out.counts_checked = seq.observed;
    pulse.done.store(true, Ordering::SeqCst);
    out
}

/// TCP counters reported beside the verdict to explain pauses: segments
/// retransmitted, tail-loss probes and fast retransmits (none of them is an
/// RTO; `TcpExtTCPTimeouts` is judged separately).
const INFO_COUNTERS: [&str; 3] = [
    "TcpRetransSegs",
    "TcpExtTCPLossProbes",
    "TcpExtTCPFastRetrans",
];

/// The value of counter `name` in `nstat` output (`NAME VALUE RATE`).
pub fn nstat_value(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(name)).then(|| f.next()?.parse().ok())?
    })
}

/// [`INFO_COUNTERS`] of the namespace now (0 for a counter nstat omits).
fn tcp_counters(netns: &str) -> Result<Vec<u64>> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nstat", "-azs"])
        .args(INFO_COUNTERS)
        .output()
        .context("cannot run nstat (iproute2)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(INFO_COUNTERS
        .iter()
        .map(|name| nstat_value(&text, name).unwrap_or(0))
        .collect())
}

/// Used memory and kernel heap of each VM at one point of the soak.
#[derive(Debug, Clone)]
struct MemSample {
    round: usize,
    /// Per VM, in lab order: (used bytes, heap used bytes).
    per_vm: Vec<(u64, u64)>,
}

fn sample_memory(session: &LabSession, round: usize) -> Result<MemSample> {
    let mut per_vm = Vec::new();
    for vm in &session.lab.vms {
        let status = session
            .connect(vm)?
            .status()
            .with_context(|| format!("Status of {}", vm.name))?;
        per_vm.push((status.mem_used_bytes, status.heap_used_bytes));
    }
    Ok(MemSample { round, per_vm })
}

/// Everything the soak measured; [`SoakReport::failures`] decides.
#[derive(Debug, Default)]
pub struct SoakReport {
    pub rounds_done: usize,
    pub errors: Vec<String>,
    pub kv: ClientOutcome,
    pub http: ClientOutcome,
    pub rtos: u64,
    /// Per series ("vm1 used", "vm2 heap", …).
    pub memory: Vec<(String, Flatness)>,
}

impl SoakReport {
    /// Why the soak failed; empty when it passed.
    pub fn failures(&self) -> Vec<String> {
        let mut why = Vec::new();
        let errors = self.errors.len()
            + usize::from(self.kv.error.is_some())
            + usize::from(self.http.error.is_some());
        if errors > 0 {
            why.push(format!("{errors} error(s)"));
        }
        let lost = self.kv.lost + self.http.lost;
        let repeated = self.kv.repeated + self.http.repeated;
        if lost > 0 || repeated > 0 {
            why.push(format!("{lost} lost and {repeated} repeated replies"));
        }
        if self.rtos > 0 {
            why.push(format!("{} retransmission timeout(s)", self.rtos));
        }
        for (series, f) in &self.memory {
            if let Flatness::Grew {
                from_round,
                to_round,
                growth,
            } = f
            {
                why.push(format!(
                    "{series} grew {} KiB from round {from_round} to {to_round} (limit {} KiB)",
                    growth / 1024,
                    MEMORY_SLACK / 1024
                ));
            }
        }
        why
    }
}

/// Sets the flag when dropped: the clients stop also when the soak fails.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct Moving {
    name: String,
    vm: String,
    pulse: Arc<Pulse>,
    downtime: Vec<f64>,
    total: Vec<f64>,
    pause: Vec<f64>,
}

/// `capsules-bench soak`: `moves` moves of each capsule, memory sampled every
/// `sample_every` rounds.
pub fn bench_soak(
    accel: AccelChoice,
    kernel: Option<PathBuf>,
    moves: usize,
    sample_every: usize,
) -> Result<()> {
    if moves == 0 {
        bail!("--moves must be at least 1");
    }
    if sample_every == 0 || sample_every % 2 == 1 {
        bail!(
            "--sample-every must be even, so that every sample finds each capsule on its first VM"
        );
    }
    let lab = TwoVmLab::up("soak", accel, kernel)?;
    let session = LabSession::open(&lab.name)?;
    println!(
        "soak: {moves} moves per capsule ({} migrations), memory every {sample_every} rounds, accelerator {}",
        2 * moves,
        lab.accel
    );
    let start = |program: &str, vm: &str| {
        capsules::run(
            &session,
            &RunOptions {
                program: program.into(),
                name: Some(format!("soak-{program}")),
                on: Some(vm.into()),
                ..Default::default()
            },
        )
    };
    let kv = start("kv", "vm1")?;
    let http = start("http", "vm2")?;
    eprintln!(
        "soak: kv at {} on vm1, http at {} on vm2",
        kv.locator, http.locator
    );
    // Let the capsules listen before the clients connect.
    std::thread::sleep(Duration::from_millis(300));
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(stop.clone());
    // Threads spawned here are in the lab namespace, like this one.
    let spawn = |f: fn(SocketAddr, &AtomicBool, &Pulse) -> ClientOutcome, addr: SocketAddr| {
        let pulse = Arc::new(Pulse::new());
        let (stop, p) = (stop.clone(), pulse.clone());
        (pulse, std::thread::spawn(move || f(addr, &stop, &p)))
    };
    let (kv_pulse, kv_thread) = spawn(kv_client, SocketAddr::from((kv.locator, 6379)));
    let (http_pulse, http_thread) = spawn(http_client, SocketAddr::from((http.locator, 80)));
    for (what, pulse) in [("kv", &kv_pulse), ("http", &http_pulse)] {
        if !pulse.wait_past(0, CLIENT_TIMEOUT) {
            bail!("the {what} client got no first reply");
        }
    }
    let rtos_before = tcp_timeouts(&lab.netns)?;
    let info_before = tcp_counters(&lab.netns)?;
    let mut report = SoakReport::default();
    let mut samples = vec![sample_memory(&session, 0)?];
    let mut capsules = [
        Moving {
            name: kv.name.clone(),
            vm: kv.vm.clone(),
            pulse: kv_pulse.clone(),
            downtime: Vec::new(),
            total: Vec::new(),
            pause: Vec::new(),
        },
        Moving {
            name: http.name.clone(),
            vm: http.vm.clone(),
            pulse: http_pulse.clone(),
            downtime: Vec::new(),
            total: Vec::new(),
            pause: Vec::new(),
        },
    ];
    // The reference for the pauses: the longest gap between replies in a
    // second without moves.
    kv_pulse.reset_longest();
    http_pulse.reset_longest();
    std::thread::sleep(Duration::from_secs(1));
    let still = [kv_pulse.longest_ms(), http_pulse.longest_ms()];
    let began = Instant::now();
    'rounds: for round in 1..=moves {
        for c in capsules.iter_mut() {
            let to = if c.vm == "vm1" { "vm2" } else { "vm1" };
            c.pulse.reset_longest();
            let called = Instant::now();
            let moved = migrate::migrate(&session, &c.name, to);
            // The whole call, as a user of `capsulectl migrate` waits for it
            // (`total_ms` of the report ends at the release).
            let whole_ms = called.elapsed().as_secs_f64() * 1e3;
            match moved {
                Ok(r) => {
                    c.vm = to.to_string();
                    c.downtime.push(r.downtime_ms);
                    c.total.push(whole_ms);
                    // The pause ends with the first reply after the move.
                    let seen = c.pulse.replies();
                    if !c.pulse.wait_past(seen, REPLY_AFTER_MOVE) {
                        report.errors.push(format!(
                            "round {round}: no reply from {} within {} s after its move",
                            c.name,
                            REPLY_AFTER_MOVE.as_secs()
                        ));
                    }
                    c.pause.push(c.pulse.longest_ms());
                }
                Err(e) => report
                    .errors
                    .push(format!("round {round}: moving {} to {to}: {e:#}", c.name)),
            }
            if report.errors.len() >= MAX_MOVE_ERRORS {
                eprintln!("soak: {MAX_MOVE_ERRORS} errors; stopping");
                break 'rounds;
            }
            std::thread::sleep(BETWEEN_MOVES);
        }
        report.rounds_done = round;
        // After an even number of rounds each capsule is back on its first VM.
        if round % sample_every == 0 || (round == moves && round % 2 == 0) {
            match sample_memory(&session, round) {
                Ok(s) => samples.push(s),
                Err(e) => report
                    .errors
                    .push(format!("round {round}: memory sample: {e:#}")),
            }
            eprintln!(
                "soak: round {round}/{moves} ({:.0} s): kv {} replies, http {} responses, {} errors",
                began.elapsed().as_secs_f64(),
                kv_pulse.replies(),
                http_pulse.replies(),
                report.errors.len()
            );
        }
        if kv_pulse.finished() || http_pulse.finished() {
            report
                .errors
                .push(format!("round {round}: a client ended early; stopping"));
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let join = |t: std::thread::JoinHandle<ClientOutcome>, what: &str| {
        t.join().unwrap_or_else(|_| ClientOutcome {
            error: Some(format!("{what} client panicked")),
            ..Default::default()
        })
    };
    report.kv = join(kv_thread, "kv");
    report.http = join(http_thread, "http");
    report.rtos = tcp_timeouts(&lab.netns)?.saturating_sub(rtos_before);
    let vm_names: Vec<String> = session.lab.vms.iter().map(|v| v.name.clone()).collect();
    for (i, vm) in vm_names.iter().enumerate() {
        for (kind, pick) in [
            ("used", (|s: &(u64, u64)| s.0) as fn(&(u64, u64)) -> u64),
            ("heap", |s: &(u64, u64)| s.1),
        ] {
            let series: Vec<(usize, u64)> = samples
                .iter()
                .map(|s| (s.round, pick(&s.per_vm[i])))
                .collect();
            report.memory.push((
                format!("{vm} {kind}"),
                flatness(&series, sample_every, MEMORY_SLACK),
            ));
        }
    }
    print_report(&report, &capsules, &samples, &vm_names);
    println!(
        "longest gap between replies in 1 s without moves (before the first): kv {:.1} ms, http {:.1} ms",
        still[0], still[1]
    );
    let after = tcp_counters(&lab.netns)?;
    println!(
        "for reading the pauses (not judged), in the lab namespace during the soak: {}",
        INFO_COUNTERS
            .iter()
            .zip(info_before.iter().zip(&after))
            .map(|(name, (b, a))| format!("{name} {}", a.saturating_sub(*b)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let failures = report.failures();
    if !failures.is_empty() {
        bail!("soak failed: {}", failures.join("; "));
    }
    if report
        .memory
        .iter()
        .any(|(_, f)| *f == Flatness::TooFewSamples)
    {
        println!(
            "soak passed, but memory was not judged: that needs at least {} rounds",
            2 * sample_every
        );
    } else {
        println!("soak passed");
    }
    Ok(())
}

fn print_report(report: &SoakReport, capsules: &[Moving], samples: &[MemSample], vms: &[String]) {
    let moved: usize = capsules.iter().map(|c| c.downtime.len()).sum();
    println!(
        "rounds: {} (each capsule moved once per round); migrations completed: {moved}",
        report.rounds_done
    );
    let all = |f: fn(&Moving) -> &Vec<f64>| -> Vec<f64> {
        capsules.iter().flat_map(|c| f(c).iter().copied()).collect()
    };
    println!(
        "downtime (freeze -> running):  {}",
        describe(summary(&all(|c| &c.downtime)))
    );
    println!(
        "move time (whole migrate):     {}",
        describe(summary(&all(|c| &c.total)))
    );
    for c in capsules {
        println!(
            "client pause, {:<10}      {}",
            format!("{}:", c.name),
            describe(summary(&c.pause))
        );
    }
    let kv = &report.kv;
    println!(
        "kv client:   {} INCR replies to {} requests on one connection; lost {}, repeated {}",
        kv.replies, kv.requests, kv.lost, kv.repeated
    );
    let http = &report.http;
    println!(
        "http client: {} complete responses to {} requests on one connection ({} status-page counts checked, {} MiB of bodies verified); lost {}, repeated {}",
        http.replies,
        http.requests,
        http.counts_checked,
        http.bytes_verified >> 20,
        http.lost,
        http.repeated
    );
    for a in kv.anomalies.iter().chain(&http.anomalies) {
        println!("  anomaly: {a}");
    }
    println!(
        "retransmission timeouts (TcpExtTCPTimeouts, lab namespace): {}",
        report.rtos
    );
    let mut header = format!("{:>6}", "round");
    for vm in vms {
        header += &format!(
            " {:>14} {:>14}",
            format!("{vm} used KiB"),
            format!("{vm} heap KiB")
        );
    }
    println!("memory:\n{header}");
    for s in samples {
        let mut line = format!("{:>6}", s.round);
        for (used, heap) in &s.per_vm {
            line += &format!(" {:>14} {:>14}", used / 1024, heap / 1024);
        }
        println!("{line}");
    }
    for (series, f) in &report.memory {
        let verdict = match f {
            Flatness::Flat {
                from_round,
                to_round,
                growth,
            } => format!("flat: {growth:+} B from round {from_round} to {to_round}"),
            Flatness::Grew {
                from_round,
                to_round,
                growth,
            } => format!("GREW: {growth:+} B from round {from_round} to {to_round}"),
            Flatness::TooFewSamples => {
                "not judged: fewer than two samples after the warm-up".into()
            }
        };
        println!(
            "  {series:<9} {verdict} (limit {} KiB)",
            MEMORY_SLACK / 1024
        );
    }
    let errors: Vec<&String> = report
        .errors
        .iter()
        .chain(&kv.error)
        .chain(&http.error)
        .collect();
    println!("errors: {}", errors.len());
    for e in errors {
        println!("  error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_in_order_counts_nothing() {
        let mut s = Sequence::default();
        assert_eq!(s.observe(7, 1), Step::First);
        for v in 8..100 {
            assert_eq!(s.observe(v, 1), Step::InOrder);
        }
        assert_eq!((s.ahead, s.behind, s.observed), (0, 0, 93));
    }

    #[test]
    fn sequence_counts_a_gap_once_and_resynchronises() {
        let mut s = Sequence::default();
        s.observe(1, 1);
        s.observe(2, 1);
        // 3 and 4 never seen.
        assert_eq!(s.observe(5, 1), Step::Ahead(2));
        assert_eq!(s.observe(6, 1), Step::InOrder);
        assert_eq!((s.ahead, s.behind), (2, 0));
    }

    #[test]
    fn sequence_counts_repeats() {
        let mut s = Sequence::default();
        s.observe(10, 1);
        assert_eq!(s.observe(10, 1), Step::Behind(1));
        assert_eq!(s.observe(11, 1), Step::InOrder);
        assert_eq!(s.observe(9, 1), Step::Behind(3));
        assert_eq!((s.ahead, s.behind), (0, 4));
    }

    #[test]
    fn sequence_with_larger_steps() {
        let mut s = Sequence::default();
        s.observe(1, 2);
        assert_eq!(s.observe(3, 2), Step::InOrder);
        assert_eq!(s.observe(6, 2), Step::Ahead(1));
        assert_eq!(s.observe(7, 2), Step::Behind(1));
        // Extreme values neither overflow nor panic.
        assert_eq!(s.observe(i64::MAX, 2), Step::Ahead((i64::MAX - 9) as u64));
        assert_eq!(s.observe(i64::MIN, 2), Step::Behind(u64::MAX));
    }

    #[test]
    fn nstat_output() {
        let text = "#kernel\nTcpRetransSegs                  12                 0.0\n\
                    TcpExtTCPLossProbes             3                  0.0\n";
        assert_eq!(nstat_value(text, "TcpRetransSegs"), Some(12));
        assert_eq!(nstat_value(text, "TcpExtTCPLossProbes"), Some(3));
        assert_eq!(nstat_value(text, "TcpExtTCPFastRetrans"), None);
        assert_eq!(nstat_value(text, "TcpRetrans"), None);
    }

    #[test]
    fn integer_replies() {
        assert_eq!(parse_int_reply(":42\r\n"), Some(42));
        assert_eq!(parse_int_reply(":-1\r\n"), Some(-1));
        assert_eq!(parse_int_reply(":42"), None);
        assert_eq!(parse_int_reply("-ERR no\r\n"), None);
        assert_eq!(parse_int_reply("$2\r\n"), None);
    }

    #[test]
    fn response_heads() {
        let h = parse_response_head(
            "HTTP/1.1 200 OK\r\nServer: capsules-http\r\nContent-Type: text/plain\r\n\
             Content-Length: 65536\r\nConnection: keep-alive\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            h,
            ResponseHead {
                status: 200,
                content_length: 65536,
                keep_alive: true
            }
        );
        let h = parse_response_head(
            "HTTP/1.1 404 Not Found\r\ncontent-length: 10\r\nconnection: Close\r\n\r\n",
        )
        .unwrap();
        assert_eq!((h.status, h.content_length, h.keep_alive), (404, 10, false));
        for bad in [
            "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 OK\r\nContent-Length: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "garbage",
        ] {
            assert!(parse_response_head(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn status_page_count() {
        let page = "capsule: soak-http\nprogram: http\nlocator: 198.18.0.2\nvm: vm1\n\
                    uptime_ms: 1200\nuptime: 1.200 s\nrequests_served: 4711\n";
        assert_eq!(served_count(page), Some(4711));
        assert_eq!(served_count("capsule: x\n"), None);
        assert_eq!(served_count("requests_served: many\n"), None);
    }

    #[test]
    fn body_pattern_check() {
        let mut body: Vec<u8> = (0..70_000u64)
            .map(capsules_apps::http::pattern_byte)
            .collect();
        assert_eq!(first_wrong_byte(&body), None);
        // A chunk repeated 251 bytes later is noticed.
        let copy = body[1000..1251].to_vec();
        body[1251..1502].copy_from_slice(&copy);
        assert_eq!(first_wrong_byte(&body), Some(1251));
    }

    #[test]
    fn summaries() {
        assert_eq!(summary(&[]), None);
        let s = summary(&(1..=200).rev().map(f64::from).collect::<Vec<_>>()).unwrap();
        assert_eq!(
            s,
            Summary {
                count: 200,
                median: 100.5,
                p99: 198.0,
                max: 200.0
            }
        );
    }

    #[test]
    fn flat_memory_passes_and_warm_up_is_ignored() {
        // Round 0 is before the warm-up: its lower figure does not count.
        let samples = [
            (0, 10 << 20),
            (100, 12 << 20),
            (200, 12 << 20),
            (1000, (12 << 20) + 4096),
        ];
        assert_eq!(
            flatness(&samples, 100, MEMORY_SLACK),
            Flatness::Flat {
                from_round: 100,
                to_round: 1000,
                growth: 4096
            }
        );
        // Shrinking is flat too.
        assert!(matches!(
            flatness(&[(100, 5 << 20), (200, 4 << 20)], 100, MEMORY_SLACK),
            Flatness::Flat { growth, .. } if growth == -(1 << 20)
        ));
    }

    #[test]
    fn growth_beyond_the_slack_fails() {
        let samples = [
            (0, 0),
            (100, 1 << 20),
            (500, (1 << 20) + MEMORY_SLACK),
            (600, (1 << 20) + MEMORY_SLACK + 1),
        ];
        assert_eq!(
            flatness(&samples, 100, MEMORY_SLACK),
            Flatness::Grew {
                from_round: 100,
                to_round: 600,
                growth: MEMORY_SLACK as i64 + 1
            }
        );
        // Exactly the slack is still flat.
        assert!(matches!(
            flatness(&samples[..3], 100, MEMORY_SLACK),
            Flatness::Flat { .. }
        ));
    }

    #[test]
    fn too_few_samples_are_not_judged() {
        assert_eq!(flatness(&[], 100, 0), Flatness::TooFewSamples);
        assert_eq!(
            flatness(&[(0, 1), (20, 1 << 30)], 100, 0),
            Flatness::TooFewSamples
        );
        assert_eq!(
            flatness(&[(0, 1), (100, 1 << 30)], 100, 0),
            Flatness::TooFewSamples
        );
    }

    #[test]
    fn failures_name_every_reason() {
        let mut r = SoakReport::default();
        assert!(r.failures().is_empty());
        r.memory.push((
            "vm1 used".into(),
            Flatness::Flat {
                from_round: 100,
                to_round: 1000,
                growth: 0,
            },
        ));
        r.memory.push(("vm2 heap".into(), Flatness::TooFewSamples));
        assert!(r.failures().is_empty());
        r.kv.lost = 1;
        r.http.repeated = 2;
        r.rtos = 3;
        r.http.error = Some("reset".into());
        r.errors.push("move failed".into());
        r.memory.push((
            "vm2 used".into(),
            Flatness::Grew {
                from_round: 100,
                to_round: 1000,
                growth: 1 << 20,
            },
        ));
        let why = r.failures();
        assert_eq!(
            why,
            [
                "2 error(s)",
                "1 lost and 2 repeated replies",
                "3 retransmission timeout(s)",
                "vm2 used grew 1024 KiB from round 100 to 1000 (limit 256 KiB)",
            ]
        );
    }
}
