//! Capsule benchmarks: memory per idle capsule, capsules per VM, and request
//! rates of the `kv` and `http` programs. Each runs in a real lab
//! (`capsulectl::lab::up`, the same code as `capsulectl lab up`, directory
//! included) that is torn down on drop, also on failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsulectl::capsules::{self, LabSession, RunOptions};
use capsulectl::lab::{self, UpOptions};
use capsulectl::qemu::AccelChoice;
use std::path::PathBuf;

use crate::{median, sorted};

/// A lab for one benchmark, torn down when dropped.
pub struct CapsuleLab {
    pub name: String,
    pub accel: String,
}

impl CapsuleLab {
    pub fn up(
        tag: &str,
        mem_mib: u32,
        accel: AccelChoice,
        kernel: Option<PathBuf>,
    ) -> Result<Self> {
        let name = format!("bench{}-{tag}", std::process::id());
        let report = lab::up(&UpOptions {
            name: name.clone(),
            vms: 1,
            mem_mib,
            accel,
            kernel,
            capsule_range: Default::default(),
            subnets: 1,
            subnet_list: Vec::new(),
        })?;
        eprintln!("lab {name}: accelerator {}", report.accel_reason);
        Ok(Self {
            name,
            accel: report.state.accel,
        })
    }

    pub fn session(&self) -> Result<LabSession> {
        LabSession::open(&self.name)
    }
}

impl Drop for CapsuleLab {
    fn drop(&mut self) {
        if let Err(e) = lab::down(&self.name) {
            eprintln!("cannot tear down lab {}: {e:#}", self.name);
        }
    }
}

fn run(s: &LabSession, program: &str, name: &str) -> Result<Ipv4Addr> {
    Ok(capsules::run(
        s,
        &RunOptions {
            program: program.into(),
            name: Some(name.into()),
            ..Default::default()
        },
    )?
    .locator)
}

fn mem_used(s: &LabSession) -> Result<u64> {
    let vm = &s.lab.vms[0];
    Ok(s.connect(vm)?.status()?.mem_used_bytes)
}

/// Memory of idle echo capsules: the arena bytes each reports and the VM's
/// used-memory growth per capsule, over `rounds` rounds of `per_round`.
pub fn memory(lab: &CapsuleLab, rounds: usize, per_round: usize) -> Result<Vec<Vec<String>>> {
    let s = lab.session()?;
    let mut arena = Vec::new();
    let mut delta = Vec::new();
    for round in 0..rounds {
        let before = mem_used(&s)?;
        let names: Vec<String> = (0..per_round).map(|i| format!("m{round}-{i}")).collect();
        for n in &names {
            run(&s, "echo", n)?;
        }
        // Let every capsule reach its accept() and go idle.
        std::thread::sleep(Duration::from_secs(1));
        let after = mem_used(&s)?;
        let rows = capsules::ps(&s)?;
        let mut per: Vec<f64> = rows
            .iter()
            .filter_map(|r| r.memory_bytes)
            .map(|b| b as f64)
            .collect();
        per = sorted(per);
        arena.push(median(&per));
        delta.push(after.saturating_sub(before) as f64 / per_round as f64);
        eprintln!(
            "round {}: median arena {:.0} B, VM used +{} B for {per_round} capsules",
            round + 1,
            median(&per),
            after.saturating_sub(before)
        );
        for n in &names {
            capsules::kill(&s, n, false)?;
        }
    }
    let (arena, delta) = (sorted(arena), sorted(delta));
    Ok(vec![
        vec![
            "idle echo capsule: arena memory (ps memory_bytes)".into(),
            lab.accel.clone(),
            format!("{rounds} rounds x {per_round}"),
            format!("median {:.1} KiB", median(&arena) / 1024.0),
            format!("max {:.1} KiB", arena[arena.len() - 1] / 1024.0),
        ],
        vec![
            "idle echo capsule: VM memory used per capsule".into(),
            lab.accel.clone(),
            format!("{rounds} rounds x {per_round}"),
            format!("median {:.1} KiB", median(&delta) / 1024.0),
            format!("max {:.1} KiB", delta[delta.len() - 1] / 1024.0),
        ],
    ])
}

/// How many idle echo capsules one VM holds: start them until the VM
/// refuses (or `cap` is reached) and report why it stopped.
pub fn density(lab: &CapsuleLab, cap: usize, mem_mib: u32) -> Result<Vec<Vec<String>>> {
    let s = lab.session()?;
    let start = Instant::now();
    let mut count = 0;
    let mut why = format!("stopped at the cap of {cap}");
    while count < cap {
        match run(&s, "echo", &format!("d{count}")) {
            Ok(_) => count += 1,
            Err(e) => {
                why = format!("{e:#}");
                break;
            }
        }
        if count % 100 == 0 {
            eprintln!(
                "{count} capsules after {:.1} s",
                start.elapsed().as_secs_f64()
            );
        }
    }
    let used = mem_used(&s)?;
    eprintln!("{count} echo capsules; then: {why}; VM memory used {used} B");
    // Do they still serve? Check a few, spread over the range.
    let map = s.load_map()?;
    let mut served = 0;
    let sample: Vec<_> = map.capsules.values().step_by((count / 5).max(1)).collect();
    for c in &sample {
        if echo_once(c.locator, 7).is_ok() {
            served += 1;
        }
    }
    Ok(vec![vec![
        format!("idle echo capsules in one {mem_mib} MiB VM"),
        lab.accel.clone(),
        format!("{served}/{} sampled serve", sample.len()),
        format!("{count} capsules"),
        format!("ended by: {why}"),
    ]])
}

fn echo_once(ip: Ipv4Addr, port: u16) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"ping\n")?;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf)?;
    if &buf != b"ping\n" {
        bail!("echo answered {buf:?}");
    }
    Ok(())
}

/// Requests per second of each test from `redis-benchmark -q` output
/// (`SET: 12345.67 requests per second, p50=…`; progress lines end in \r).
pub fn parse_redis_benchmark(out: &str) -> Vec<(String, f64)> {
    out.split(['\n', '\r'])
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let rps = rest.split_whitespace().next()?.parse().ok()?;
            rest.contains("requests per second")
                .then(|| (name.trim().to_string(), rps))
        })
        .collect()
}

/// `kv` under redis-benchmark (GET and SET, 10 clients, 20000 requests),
/// median over `runs`.
pub fn kv(lab: &CapsuleLab, runs: usize) -> Result<Vec<Vec<String>>> {
    if !capsulectl::netns::on_path("redis-benchmark") {
        bail!("redis-benchmark not found: apt-get install redis-tools");
    }
    let s = lab.session()?;
    let ip = run(&s, "kv", "kvbench")?;
    let mut get = Vec::new();
    let mut set = Vec::new();
    let mut hung = 0;
    for i in 0..runs {
        // This thread is inside the lab namespace, so the child is too.
        let mut cmd = Command::new("redis-benchmark");
        cmd.args(["-h", &ip.to_string(), "-p", "6379"])
            .args(["-t", "get,set", "-c", "10", "-n", "20000", "-q"]);
        let Some(text) = output_within(cmd, Duration::from_secs(180))? else {
            eprintln!(
                "run {}: redis-benchmark made no progress in 180 s; killed",
                i + 1
            );
            hung += 1;
            continue;
        };
        let figures = parse_redis_benchmark(&text);
        eprintln!("run {}: {figures:?}", i + 1);
        for (name, rps) in figures {
            match name.as_str() {
                "GET" => get.push(rps),
                "SET" => set.push(rps),
                _ => {}
            }
        }
    }
    if get.is_empty() || set.is_empty() {
        bail!("redis-benchmark reported no GET/SET figures ({hung} of {runs} runs hung)");
    }
    let row = |what: &str, v: Vec<f64>| {
        let v = sorted(v);
        vec![
            format!("kv {what}: redis-benchmark -c 10 -n 20000"),
            lab.accel.clone(),
            format!("{} runs ({hung} hung)", v.len()),
            format!("median {:.0} req/s", median(&v)),
            format!("min {:.0} req/s", v[0]),
        ]
    };
    Ok(vec![row("SET", set), row("GET", get)])
}

/// Runs `cmd` and returns its stdout, or `None` when it has not ended
/// within `limit` (it is then killed: our own child, by its handle).
fn output_within(mut cmd: Command, limit: Duration) -> Result<Option<String>> {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    // Read stdout on a thread so a full pipe cannot stall the child.
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(Some(reader.join().unwrap_or_default()));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One keep-alive HTTP/1.1 connection: sends GET `path` and reads the
/// response (headers, then Content-Length bytes of body); returns body bytes.
struct HttpConn {
    reader: BufReader<TcpStream>,
    request: Vec<u8>,
}

impl HttpConn {
    fn open(ip: Ipv4Addr, path: &str) -> Result<Self> {
        let s = TcpStream::connect_timeout(&SocketAddr::from((ip, 80)), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {ip}\r\n\r\n").into_bytes();
        Ok(Self {
            reader: BufReader::new(s),
            request,
        })
    }

    fn get(&mut self) -> Result<usize> {
        self.reader.get_mut().write_all(&self.request)?;
        let mut line = String::new();
        let mut length = None;
        let mut first = true;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("connection closed in the headers");
            }
            if first {
                if !line.starts_with("HTTP/1.1 200") {
                    bail!("status line {line:?}");
                }
                first = false;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = Some(v.trim().parse::<usize>()?);
            }
        }
        let n = length.context("response without Content-Length")?;
        let mut left = n;
        let mut buf = [0u8; 16384];
        while left > 0 {
            let want = left.min(buf.len());
            let k = self.reader.read(&mut buf[..want])?;
            if k == 0 {
                bail!("connection closed in the body");
            }
            left -= k;
        }
        Ok(n)
    }
}

/// Requests (and body bytes) per second over `conns` keep-alive connections
/// for `secs` seconds, and the errors of connections that broke or stalled
/// (a stalled connection stops counting; the others go on).
fn http_load(ip: Ipv4Addr, path: &str, conns: usize, secs: f64) -> (f64, f64, Vec<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..conns {
        let stop = stop.clone();
        let path = path.to_string();
        // Threads are created by the thread that is inside the lab
        // namespace, so they are inside it too.
        handles.push(std::thread::spawn(move || -> (u64, u64, Option<String>) {
            let (mut reqs, mut bytes) = (0u64, 0u64);
            let mut c = match HttpConn::open(ip, &path) {
                Ok(c) => c,
                Err(e) => return (0, 0, Some(format!("connect: {e:#}"))),
            };
            while !stop.load(Ordering::Relaxed) {
                match c.get() {
                    Ok(n) => {
                        bytes += n as u64;
                        reqs += 1;
                    }
                    Err(e) => return (reqs, bytes, Some(format!("after {reqs} requests: {e:#}"))),
                }
            }
            (reqs, bytes, None)
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let (mut reqs, mut bytes, mut errors) = (0u64, 0u64, Vec::new());
    for h in handles {
        match h.join() {
            Ok((r, b, e)) => {
                reqs += r;
                bytes += b;
                errors.extend(e);
            }
            Err(_) => errors.push("client thread panicked".into()),
        }
    }
    // Measured up to the stop signal: a stalled connection's read timeout
    // must not stretch the interval.
    let t = secs.max(1e-9);
    (reqs as f64 / t, bytes as f64 / t, errors)
}

/// `http`: small requests over 4 keep-alive connections, and a 1 MiB body
/// over one, median over `runs` runs of 5 s.
pub fn http(lab: &CapsuleLab, runs: usize) -> Result<Vec<Vec<String>>> {
    let s = lab.session()?;
    let ip = run(&s, "http", "httpbench")?;
    let mut small = Vec::new();
    let mut big = Vec::new();
    let mut broken = 0;
    for i in 0..runs {
        let (rps, _, e1) = http_load(ip, "/healthz", 4, 5.0);
        let (_, bps, e2) = http_load(ip, "/bytes/1048576", 1, 5.0);
        eprintln!(
            "run {}: /healthz {rps:.0} req/s; /bytes/1048576 {:.2} MiB/s",
            i + 1,
            bps / 1048576.0
        );
        for e in e1.iter().chain(&e2) {
            eprintln!("run {}: connection failed: {e}", i + 1);
        }
        broken += e1.len() + e2.len();
        small.push(rps);
        big.push(bps / 1048576.0);
    }
    let (small, big) = (sorted(small), sorted(big));
    Ok(vec![
        vec![
            "http GET /healthz, 4 keep-alive connections".into(),
            lab.accel.clone(),
            format!("{runs} runs x 5 s, {broken} conn. failed"),
            format!("median {:.0} req/s", median(&small)),
            format!("min {:.0} req/s", small[0]),
        ],
        vec![
            "http GET /bytes/1048576, 1 connection".into(),
            lab.accel.clone(),
            format!("{runs} runs x 5 s, {broken} conn. failed"),
            format!("median {:.2} MiB/s", median(&big)),
            format!("min {:.2} MiB/s", big[0]),
        ],
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_benchmark_output_is_parsed() {
        let out = "SET: rps=0.0 (overall: nan) avg_msec=nan\r\
                   SET: 8123.45 requests per second, p50=1.031 msec\n\
                   GET: rps=5000.0 (overall: 5000.0)\rGET: 9001.00 requests per second, p50=0.9 msec\n\n";
        assert_eq!(
            parse_redis_benchmark(out),
            [("SET".to_string(), 8123.45), ("GET".to_string(), 9001.0)]
        );
    }
}
