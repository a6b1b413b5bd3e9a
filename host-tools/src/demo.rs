//! `capsulectl demo`: the product in one command. Brings up a two-VM lab,
//! starts `http` and `kv`, keeps real client connections busy — a Redis
//! client doing INCR on one connection, an HTTP client fetching `/bytes/N`
//! over one kept-alive connection — moves both capsules back and forth, and
//! reports downtime per move, the longest pause the clients saw, what was
//! verified, and errors (there should be none). With `--plot FILE.svg` it
//! also draws each request's latency over time with the moves shaded
//! ([`crate::plot`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::capsules::{self, LabSession, RunOptions};
use crate::directory::CapsuleRange;
use crate::lab::{self, UpOptions};
use crate::migrate::{self, MigrationReport};
use crate::plot;
use crate::qemu::AccelChoice;

pub struct DemoOptions {
    pub lab: String,
    /// Moves per capsule.
    pub moves: usize,
    pub accel: AccelChoice,
    /// Leave the lab up afterwards.
    pub keep: bool,
    /// Draw the clients' latency over time, with each move marked, to this SVG file.
    pub plot: Option<std::path::PathBuf>,
}

/// What one client saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientReport {
    pub replies: u64,
    pub bytes_verified: u64,
    pub longest_pause_ms: f64,
    pub errors: Vec<String>,
    /// Per reply: (seconds since the clients started, latency in ms). For
    /// the plot; not in the JSON report (`replies` counts them).
    #[serde(skip)]
    pub latencies: Vec<(f64, f64)>,
}

impl ClientReport {
    /// Records a reply, received at `at`, to a request sent at `sent`.
    fn reply(&mut self, t0: Instant, sent: Instant, at: Instant) {
        self.replies += 1;
        self.latencies.push((
            at.duration_since(t0).as_secs_f64(),
            at.duration_since(sent).as_secs_f64() * 1000.0,
        ));
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub lab: String,
    pub accelerator: String,
    pub migrations: Vec<MigrationReport>,
    pub kv: ClientReport,
    pub http: ClientReport,
    pub errors: usize,
    /// The SVG written for `--plot`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plot: Option<std::path::PathBuf>,
}

/// Bytes per HTTP request: large enough to span several TCP windows.
const HTTP_BODY: u64 = 256 * 1024;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Let traffic flow between moves.
const BETWEEN_MOVES: Duration = Duration::from_millis(400);

fn kv_client(addr: SocketAddr, stop: Arc<AtomicBool>, t0: Instant) -> ClientReport {
    let mut report = ClientReport::default();
    let result = (|| -> Result<()> {
        let mut stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        let mut last: Option<i64> = None;
        let mut last_reply = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let sent = Instant::now();
            stream.write_all(b"INCR demo:counter\r\n")?;
            line.clear();
            reader.read_line(&mut line)?;
            let value: i64 = line
                .trim_end()
                .strip_prefix(':')
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("unexpected reply {line:?}"))?;
            if let Some(prev) = last
                && value != prev + 1
            {
                bail!("INCR went from {prev} to {value}");
            }
            last = Some(value);
            report.reply(t0, sent, Instant::now());
            let gap = last_reply.elapsed().as_secs_f64() * 1000.0;
            report.longest_pause_ms = report.longest_pause_ms.max(gap);
            last_reply = Instant::now();
        }
        Ok(())
    })();
    if let Err(e) = result {
        report.errors.push(format!("kv client: {e:#}"));
    }
    report
}

fn http_client(addr: SocketAddr, stop: Arc<AtomicBool>, t0: Instant) -> ClientReport {
    let mut report = ClientReport::default();
    let result = (|| -> Result<()> {
        let stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut last_reply = Instant::now();
        let mut body = vec![0u8; HTTP_BODY as usize];
        let mut line = String::new();
        while !stop.load(Ordering::Relaxed) {
            let sent = Instant::now();
            write!(
                writer,
                "GET /bytes/{HTTP_BODY} HTTP/1.1\r\nHost: demo\r\n\r\n"
            )?;
            let mut length = None;
            line.clear();
            reader.read_line(&mut line)?;
            if !line.starts_with("HTTP/1.1 200") {
                bail!("unexpected status line {line:?}");
            }
            loop {
                line.clear();
                reader.read_line(&mut line)?;
                let header = line.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((k, v)) = header.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse::<u64>().ok();
                }
            }
            if length != Some(HTTP_BODY) {
                bail!("Content-Length {length:?}, expected {HTTP_BODY}");
            }
            reader.read_exact(&mut body)?;
            let received = Instant::now();
            if let Some(i) =
                (0..HTTP_BODY).find(|i| body[*i as usize] != capsules_apps::http::pattern_byte(*i))
            {
                bail!("body byte {i} is wrong");
            }
            report.reply(t0, sent, received);
            report.bytes_verified += HTTP_BODY;
            let gap = last_reply.elapsed().as_secs_f64() * 1000.0;
            report.longest_pause_ms = report.longest_pause_ms.max(gap);
            last_reply = Instant::now();
        }
        Ok(())
    })();
    if let Err(e) = result {
        report.errors.push(format!("http client: {e:#}"));
    }
    report
}

fn other_vm(vm: &str) -> &'static str {
    if vm == "vm1" { "vm2" } else { "vm1" }
}

pub fn demo(opts: &DemoOptions) -> Result<DemoReport> {
    if lab::load_lab(&opts.lab).is_ok() {
        lab::down(&opts.lab).with_context(|| format!("cannot clear the old '{}' lab", opts.lab))?;
    }
    let up = lab::up(&UpOptions {
        name: opts.lab.clone(),
        vms: 2,
        mem_mib: 256,
        accel: opts.accel,
        kernel: None,
        capsule_range: CapsuleRange::default(),
        subnets: 1,
        subnet_list: Vec::new(),
    })?;
    let result = run_demo(opts, &up.accel_reason);
    if !opts.keep {
        lab::down(&opts.lab)?;
    }
    result
}

fn run_demo(opts: &DemoOptions, accel: &str) -> Result<DemoReport> {
    let session = LabSession::open(&opts.lab)?;
    let start = |program: &str, vm: &str| {
        capsules::run(
            &session,
            &RunOptions {
                program: program.into(),
                name: Some(format!("demo-{program}")),
                on: Some(vm.into()),
                ..Default::default()
            },
        )
    };
    let web = start("http", "vm1")?;
    let db = start("kv", "vm2")?;
    eprintln!(
        "demo: http at {} on vm1, kv at {} on vm2",
        web.locator, db.locator
    );
    // Give the capsules a moment to listen before the clients connect.
    thread::sleep(Duration::from_millis(300));
    let stop = Arc::new(AtomicBool::new(false));
    // The clients' and the moves' shared clock.
    let t0 = Instant::now();
    let kv = {
        let stop = stop.clone();
        let addr = SocketAddr::from((db.locator, 6379));
        thread::spawn(move || kv_client(addr, stop, t0))
    };
    let http = {
        let stop = stop.clone();
        let addr = SocketAddr::from((web.locator, 80));
        thread::spawn(move || http_client(addr, stop, t0))
    };
    thread::sleep(BETWEEN_MOVES);
    let mut migrations = Vec::new();
    let mut bands = Vec::new();
    let mut errors = Vec::new();
    let mut places = [
        (web.name.clone(), web.vm.clone()),
        (db.name.clone(), db.vm.clone()),
    ];
    for round in 0..opts.moves {
        for (name, vm) in places.iter_mut() {
            let to = other_vm(vm);
            let called = t0.elapsed().as_secs_f64();
            match migrate::migrate(&session, name, to) {
                Ok(r) => {
                    let from_s = called + r.freeze_offset_ms / 1000.0;
                    bands.push(plot::Band {
                        label: format!("{name} {}→{}", r.from, r.to),
                        from_s,
                        to_s: from_s + r.downtime_ms / 1000.0,
                        // The series are kv (0) and http (1).
                        series: Some(usize::from(*name == web.name)),
                    });
                    eprintln!(
                        "demo: move {}: {name} {} -> {}: downtime {:.1} ms, image {} KiB",
                        round + 1,
                        r.from,
                        r.to,
                        r.downtime_ms,
                        r.image_bytes / 1024
                    );
                    *vm = to.to_string();
                    migrations.push(r);
                }
                Err(e) => errors.push(format!("migrating {name} to {to}: {e:#}")),
            }
            thread::sleep(BETWEEN_MOVES);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let kv = kv.join().unwrap_or_else(|_| ClientReport {
        errors: vec!["kv client panicked".into()],
        ..Default::default()
    });
    let http = http.join().unwrap_or_else(|_| ClientReport {
        errors: vec!["http client panicked".into()],
        ..Default::default()
    });
    let total_errors = errors.len() + kv.errors.len() + http.errors.len();
    for e in &errors {
        eprintln!("demo: error: {e}");
    }
    let mut report = DemoReport {
        lab: opts.lab.clone(),
        accelerator: accel.to_string(),
        migrations,
        kv,
        http,
        errors: total_errors,
        plot: None,
    };
    if let Some(path) = &opts.plot {
        plot::write_svg(&figure(&report, bands), path)?;
        report.plot = Some(path.clone());
    }
    Ok(report)
}

/// The `--plot` picture of a demo run: both clients' latency, each move shaded.
pub fn figure(report: &DemoReport, bands: Vec<plot::Band>) -> plot::Figure {
    plot::Figure {
        title: "Capsules demo: request latency while the capsules move".into(),
        subtitle: format!(
            "lab '{}', accelerator {}; {} moves, each shaded from freeze to running again",
            report.lab,
            report.accelerator,
            bands.len()
        ),
        series: vec![
            plot::Series {
                label: "kv: INCR on one connection (demo-kv)".into(),
                points: report.kv.latencies.clone(),
            },
            plot::Series {
                label: format!(
                    "http: GET {} KiB, kept-alive connection (demo-http)",
                    HTTP_BODY / 1024
                ),
                points: report.http.latencies.clone(),
            },
        ],
        bands,
    }
}

pub fn render(report: &DemoReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Capsules demo (lab '{}', accelerator {})",
        report.lab, report.accelerator
    );
    let _ = writeln!(out, "migrations: {}", report.migrations.len());
    for (i, m) in report.migrations.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {:>2}. {:<10} {} -> {}  downtime {:>6.1} ms  image {:>5} KiB  transfer {:>6.1} MiB/s",
            i + 1,
            m.name,
            m.from,
            m.to,
            m.downtime_ms,
            m.image_bytes / 1024,
            m.transfer_mib_s
        );
    }
    if !report.migrations.is_empty() {
        let mut d: Vec<f64> = report.migrations.iter().map(|m| m.downtime_ms).collect();
        d.sort_by(|a, b| a.total_cmp(b));
        let _ = writeln!(
            out,
            "downtime: median {:.1} ms, max {:.1} ms",
            d[d.len() / 2],
            d[d.len() - 1]
        );
    }
    let _ = writeln!(
        out,
        "kv client:   {} INCR replies, each exactly one more than the last; longest pause {:.1} ms",
        report.kv.replies, report.kv.longest_pause_ms
    );
    let _ = writeln!(
        out,
        "http client: {} responses, {} MiB verified byte for byte; longest pause {:.1} ms",
        report.http.replies,
        report.http.bytes_verified >> 20,
        report.http.longest_pause_ms
    );
    for e in report.kv.errors.iter().chain(&report.http.errors) {
        let _ = writeln!(out, "error: {e}");
    }
    if let Some(p) = &report.plot {
        let _ = writeln!(
            out,
            "plot: {} (latency of every reply, {} moves shaded)",
            p.display(),
            report.migrations.len()
        );
    }
    let _ = writeln!(out, "errors: {}", report.errors);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_counts_replies_without_dumping_latencies_and_the_figure_has_every_move() {
        let client = |n: u64| ClientReport {
            replies: n,
            latencies: (0..n).map(|i| (i as f64 * 0.01, 0.2)).collect(),
            ..Default::default()
        };
        let report = DemoReport {
            lab: "demo".into(),
            accelerator: "tcg".into(),
            migrations: Vec::new(),
            kv: client(300),
            http: client(20),
            errors: 0,
            plot: Some("/tmp/x.svg".into()),
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["kv"]["replies"], 300);
        assert!(json["kv"].get("latencies").is_none(), "{json}");
        assert_eq!(json["plot"], "/tmp/x.svg");
        let band = |label: &str, from_s: f64, series| plot::Band {
            label: label.into(),
            from_s,
            to_s: from_s + 0.005,
            series: Some(series),
        };
        let fig = figure(
            &report,
            vec![
                band("demo-http vm1→vm2", 0.4, 1),
                band("demo-kv vm2→vm1", 0.8, 0),
            ],
        );
        assert_eq!(fig.series[0].points.len(), 300);
        assert_eq!(fig.series[1].points.len(), 20);
        let svg = plot::svg(&fig).unwrap();
        assert_eq!(svg.matches("<rect class=\"move\"").count(), 2);
    }
}
