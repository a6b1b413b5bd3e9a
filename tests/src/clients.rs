//! Clients and background processes shared by the system tests: a RESP
//! client that keeps one connection (`Redis`), a loop of INCRs that checks
//! every reply (`IncrClient`), background processes killed by pid when
//! dropped (`Bg`), and lab helpers for migrations, faults and counters.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::host::netns::NetnsGuard;
use crate::{Lab, capsulectl_bin, describe, text, wait_for};

/// A background process this test started; killed by its pid (and reaped)
/// when dropped, also when the test panics.
pub struct Bg {
    what: String,
    child: Option<Child>,
}

impl Bg {
    pub fn spawn(what: &str, mut cmd: Command) -> Bg {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Bg {
            what: what.to_string(),
            child: Some(child),
        }
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child().try_wait(), Ok(None))
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} to end", self.what);
        let child = self.child.as_mut().expect("child present until drop");
        wait_for(timeout, &what, || child.try_wait().expect("try_wait"))
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                // SIGKILL to this child's pid only.
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// A TCP connection made from inside the lab namespace (the socket stays in
/// the namespace it was created in, whatever thread uses it later).
pub fn connect_in_lab(lab: &Lab, addr: SocketAddr) -> TcpStream {
    connect_in_netns(&lab.netns(), addr)
}

/// A TCP connection made from inside namespace `ns` (a routed lab's client
/// host, say).
pub fn connect_in_netns(ns: &str, addr: SocketAddr) -> TcpStream {
    let ns = ns.to_string();
    let stream = std::thread::spawn(move || -> anyhow::Result<TcpStream> {
        let _inside = NetnsGuard::enter(&ns)?;
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?)
    })
    .join()
    .expect("connect thread panicked")
    .unwrap_or_else(|e| panic!("cannot connect to {addr} from the lab: {e:#}"));
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// One Redis connection, kept for the whole test.
pub struct Redis {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Redis {
    pub fn connect(lab: &Lab, locator: &str) -> Redis {
        let addr: SocketAddr = format!("{locator}:6379").parse().unwrap();
        let w = connect_in_lab(lab, addr);
        let r = BufReader::new(w.try_clone().unwrap());
        Redis { w, r }
    }

    /// A connection from namespace `ns` (e.g. a routed lab's client host).
    pub fn connect_from(ns: &str, locator: &str) -> Redis {
        let addr: SocketAddr = format!("{locator}:6379").parse().unwrap();
        let w = connect_in_netns(ns, addr);
        let r = BufReader::new(w.try_clone().unwrap());
        Redis { w, r }
    }

    pub fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&req)?;
        self.read_reply()
    }

    pub fn cmd(&mut self, args: &[&str]) -> Reply {
        let raw: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.call(&raw)
            .unwrap_or_else(|e| panic!("redis {args:?} failed on the kept connection: {e}"))
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        let n = self.r.read_line(&mut line)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            ));
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    pub fn read_reply(&mut self) -> std::io::Result<Reply> {
        let line = self.line()?;
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        let (kind, rest) = line.split_at(line.len().min(1));
        Ok(match kind {
            "+" => Reply::Simple(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(rest.parse().map_err(|_| bad(&line))?),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad(&line))?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut body = vec![0; n as usize + 2];
                    self.r.read_exact(&mut body)?;
                    body.truncate(n as usize);
                    Reply::Bulk(Some(body))
                }
            }
            "*" => {
                let n: i64 = rest.parse().map_err(|_| bad(&line))?;
                let mut items = Vec::new();
                for _ in 0..n.max(0) {
                    items.push(self.read_reply()?);
                }
                Reply::Array(items)
            }
            _ => return Err(bad(&format!("not a RESP reply: {line:?}"))),
        })
    }
}

/// What a loop of INCRs on one connection saw.
pub struct IncrReport {
    pub redis: Redis,
    pub replies: u64,
    pub errors: Vec<String>,
}

/// One redis connection INCRing `counter` in a loop on its own thread:
/// every reply must be exactly one more than the one before, from 1 on.
pub struct IncrClient {
    stop: Arc<AtomicBool>,
    /// The latest reply.
    last: Arc<AtomicU64>,
    worker: std::thread::JoinHandle<IncrReport>,
    /// The loop's connection, to cut it when the capsule is gone for good.
    socket: TcpStream,
}

impl IncrClient {
    /// Starts the loop and waits for its first replies; returns the client
    /// and the latest reply seen.
    pub fn start(mut redis: Redis) -> (Self, u64) {
        let socket = redis.w.try_clone().expect("cannot clone the redis socket");
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(0));
        let worker = {
            let (stop, last) = (stop.clone(), last.clone());
            std::thread::spawn(move || {
                let mut expected = 1;
                let mut replies = 0;
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match redis.call(&[b"INCR", b"counter"]) {
                        Ok(Reply::Int(n)) if n == expected => {
                            replies += 1;
                            expected += 1;
                            last.store(n as u64, Ordering::Relaxed);
                        }
                        Ok(other) => {
                            errors.push(format!("INCR reply {other:?}, expected {expected}"));
                            break;
                        }
                        Err(e) => {
                            errors.push(format!("INCR after {replies} replies: {e}"));
                            break;
                        }
                    }
                }
                IncrReport {
                    redis,
                    replies,
                    errors,
                }
            })
        };
        let client = IncrClient {
            stop,
            last,
            worker,
            socket,
        };
        let seen = client.wait(0, "the first INCR replies");
        (client, seen)
    }

    /// Waits (at most 20 s) until the latest reply is above `from`; returns it.
    pub fn wait(&self, from: u64, what: &str) -> u64 {
        wait_for(Duration::from_secs(20), what, || {
            let now = self.last.load(Ordering::Relaxed);
            (now > from).then_some(now)
        })
    }

    pub fn latest(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }

    /// Stops the loop without judging it, for a capsule that was lost: the
    /// connection is shut down so that a read waiting on it ends at once.
    pub fn abandon(self) -> IncrReport {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        self.worker.join().expect("INCR loop panicked")
    }

    /// Stops the loop, failing the test if any reply was wrong or missing.
    pub fn finish(self) -> IncrReport {
        self.stop.store(true, Ordering::Relaxed);
        let report = self.worker.join().expect("INCR loop panicked");
        assert!(report.errors.is_empty(), "INCR loop: {:?}", report.errors);
        report
    }
}

/// The other VM of a two-VM lab.
pub fn other_vm(vm: &str) -> &'static str {
    if vm == "vm1" { "vm2" } else { "vm1" }
}

/// Clients and checks run against a lab.
impl Lab {
    /// A command run directly inside the lab namespace (`ip netns exec` execs
    /// the program, so the child's pid is the client's own).
    pub fn command_in(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns()])
            .args(argv)
            .stdin(Stdio::null());
        cmd
    }

    /// `capsulectl ARGS… --lab NAME` with extra environment variables.
    pub fn ctl_env(&self, envs: &[(&str, &Path)], args: &[&str]) -> Output {
        let mut cmd = Command::new(capsulectl_bin());
        cmd.args(args)
            .args(["--lab", &self.name])
            .stdin(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().expect("cannot run capsulectl")
    }

    /// `capsulectl migrate NAME --to VM --json`, asserting success and that
    /// `ps` then shows it running there; the report.
    pub fn migrate_ok(&self, name: &str, to: &str) -> Value {
        let out = self.ctl_ok(&["migrate", name, "--to", to, "--json"]);
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("migrate --json: {e}: {out}"));
        assert_eq!(v["name"], name, "{v}");
        assert_eq!(v["to"], to, "{v}");
        for key in [
            "from",
            "image_bytes",
            "downtime_ms",
            "freeze_ms",
            "transfer_ms",
            "restore_ms",
            "release_ms",
            "total_ms",
            "transfer_mib_s",
        ] {
            assert!(!v[key].is_null(), "migrate --json lacks {key}: {v}");
        }
        let row = self
            .ps_row(name)
            .unwrap_or_else(|| panic!("{name} not in ps after migrating"));
        assert_eq!(row["vm"], to, "ps after migrate: {row}");
        assert_eq!(row["state"], "running", "ps after migrate: {row}");
        eprintln!(
            "migrated {name} {} -> {to}: downtime {:.1} ms, image {} bytes, total {:.1} ms",
            v["from"].as_str().unwrap_or("?"),
            v["downtime_ms"].as_f64().unwrap_or(0.0),
            v["image_bytes"],
            v["total_ms"].as_f64().unwrap_or(0.0)
        );
        v
    }

    /// `TcpExtTCPTimeouts` of the lab namespace (retransmission timeouts seen
    /// by the Linux side of every connection in it).
    pub fn tcp_timeouts(&self) -> u64 {
        let out = self.exec(&["nstat", "-azs", "TcpExtTCPTimeouts"]);
        assert!(out.status.success(), "nstat: {}", describe(&out));
        text(&out.stdout)
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some("TcpExtTCPTimeouts")).then(|| f.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no TcpExtTCPTimeouts in nstat output: {}", describe(&out)))
    }

    /// `redis-cli -h LOCATOR ARGS…` in the lab, asserting success; its
    /// output without the final newline.
    pub fn redis_cli(&self, locator: &str, args: &[&str]) -> String {
        let mut argv = vec!["redis-cli", "-h", locator];
        argv.extend_from_slice(args);
        let out = self.exec(&argv);
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            describe(&out)
        );
        text(&out.stdout).trim_end_matches('\n').to_string()
    }

    /// The latest count `sink: NAME N` in the sink capsule's log, and the
    /// whole log.
    pub fn sink_count(&self, sink: &str, ticker: &str) -> (u64, String) {
        let log = self.ctl_ok(&["logs", sink]);
        let prefix = format!("sink: {ticker} ");
        let n = log
            .lines()
            .filter_map(|l| {
                let at = l.find(&prefix)?;
                l[at + prefix.len()..].trim().parse::<u64>().ok()
            })
            .max()
            .unwrap_or(0);
        (n, log)
    }
}
