//! Capsules benchmarks: boot time and ping round trip of a lab VM; memory,
//! density and request rates of capsules (module `capsules`).
//!
//! `capsules-bench [boot|ping|all] [--boots N] [--pings N] [--accel auto|kvm|tcg] [--kernel PATH]`
//! `capsules-bench [capsule-mem|density|kv|http|capsules] [--runs N] [--per-round N] [--cap N] [--vm-mem MIB]`
//! `capsules-bench migration [--moves N] [--only LABEL,…] [--plot FILE.svg]` (module `migration`)
//! `capsules-bench soak --moves N [--sample-every N]` (module `soak`)
//!
//! Each run creates its own network namespace (`capsules-bench<pid>`) with a
//! bridge and one tap, boots VMs there with the same QEMU command line as
//! `capsulectl lab up`, and removes everything at the end. Run as root.
//! Method and recorded figures: docs/performance.md.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsulectl::control::ControlClient;
use capsulectl::lab::{self, LAB_GATEWAY, LAB_PREFIX};
use capsulectl::netns::{self, NetnsGuard};
use capsulectl::qemu::{self, Accel, AccelChoice, Nic, VmSpec};
use capsulectl::render::table;
use capsulectl::state::VmRecord;
use clap::{Parser, ValueEnum};

mod capsules;
mod migration;
mod soak;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Boot,
    Ping,
    /// boot + ping
    All,
    /// Memory per idle echo capsule.
    CapsuleMem,
    /// How many echo capsules one VM holds.
    Density,
    /// kv requests per second (redis-benchmark).
    Kv,
    /// http requests per second.
    Http,
    /// capsule-mem + density + kv + http
    Capsules,
    /// Downtime and client pause per migration (idle, 1 MiB, 16 MiB heap; 1 and 100 connections).
    Migration,
    /// A kv and an http capsule under client load, each moved `--moves` times:
    /// lost or repeated replies, RTOs, memory of the VMs.
    Soak,
}

#[derive(Debug, Parser)]
#[command(
    about = "Capsules benchmarks (boot, ping, capsule memory and density, kv and http rates)"
)]
struct Args {
    #[arg(value_enum, default_value_t = Which::All)]
    which: Which,
    /// Number of boots measured.
    #[arg(long, default_value_t = 10)]
    boots: usize,
    /// Number of pings sent.
    #[arg(long, default_value_t = 200)]
    pings: usize,
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Rounds of the memory, kv and http benchmarks (median reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Capsules per round of the memory benchmark.
    #[arg(long, default_value_t = 20)]
    per_round: usize,
    /// Most capsules the density benchmark tries to start.
    #[arg(long, default_value_t = 2000)]
    cap: usize,
    /// Migrations per scenario of the migration benchmark; moves per capsule
    /// of the soak.
    #[arg(long, default_value_t = 20)]
    moves: usize,
    /// Soak: rounds (one move of each capsule) between memory samples; even.
    #[arg(long, default_value_t = 100)]
    sample_every: usize,
    /// Migration scenarios to run, by label (`idle-1c`, `1m-1c`, `16m-1c`,
    /// `idle-100c`, `1m-100c`, `16m-100c`); all when not given.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Migration benchmark: draw the first scenario's client latency over
    /// time, each move shaded from freeze to running again, to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// VM memory of the capsule benchmarks, MiB.
    #[arg(long, default_value_t = 512)]
    vm_mem: u32,
}

/// A namespace with one tap, deleted (with the VM killed) on drop.
struct BenchLab {
    ns: String,
    dir: PathBuf,
    vm: VmRecord,
    key: Vec<u8>,
    kernel: PathBuf,
    accel: Accel,
    child: Option<Child>,
}

impl BenchLab {
    fn create(kernel: PathBuf, accel: Accel) -> Result<Self> {
        let ns = format!("{}bench{}", netns::NETNS_PREFIX, std::process::id());
        let dir = std::env::temp_dir().join(format!("capsules-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let (name, ip, mac) = lab::vm_identity(1);
        let vm = VmRecord {
            serial_log: dir.join("vm1.serial.log"),
            qemu_log: dir.join("vm1.qemu.log"),
            name,
            ip,
            prefix: LAB_PREFIX,
            mac: mac.clone(),
            tap: netns::tap_name(1),
            control_port: capsules_wire::bootcfg::DEFAULT_CONTROL_PORT,
            pid: None,
            subnet: 1,
            netns: None,
        };
        let lab = Self {
            ns: ns.clone(),
            dir,
            vm,
            key: vec![0x5a; 32],
            kernel,
            accel,
            child: None,
        };
        netns::create_lab_network(&ns, LAB_GATEWAY, LAB_PREFIX)?;
        netns::add_tap(&ns, &lab.vm.tap)?;
        // A permanent neighbour entry: without it the first connection
        // attempt waits for ARP retries (1 s apart) and the boot figure would
        // measure Linux's ARP timer instead of the guest.
        netns::ip(&[
            "-n",
            &ns,
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &mac,
            "dev",
            netns::BRIDGE_NAME,
            "nud",
            "permanent",
        ])?;
        Ok(lab)
    }

    /// Boots the VM (caller is inside the namespace); returns the wall time
    /// until the control service answered an authenticated Version.
    fn boot(&mut self) -> Result<Duration> {
        let spec = VmSpec {
            kernel: self.kernel.clone(),
            cmdline: lab::vm_cmdline(&self.vm, LAB_GATEWAY, Default::default()),
            key_file: Some(capsulectl::state::write_key_file(&self.dir, &self.key)?),
            mem_mib: 256,
            accel: self.accel,
            serial_log: self.vm.serial_log.clone(),
            monitor: None,
            nic: Nic::Tap {
                ifname: self.vm.tap.clone(),
                mac: self.vm.mac.clone(),
            },
        };
        let start = Instant::now();
        self.child = Some(qemu::spawn_detached(&spec, &self.vm.qemu_log)?);
        let addr = SocketAddr::V4(SocketAddrV4::new(self.vm.ip, self.vm.control_port));
        loop {
            let attempt = ControlClient::connect_with(
                addr,
                &self.key,
                Duration::from_millis(20),
                Duration::from_secs(2),
            );
            if let Ok(mut c) = attempt
                && c.version().is_ok()
            {
                return Ok(start.elapsed());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "QEMU exited with {status} during boot; serial log:\n{}",
                    lab::tail(&self.vm.serial_log, 20)
                );
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "VM did not answer within 60 s; serial log:\n{}",
                    lab::tail(&self.vm.serial_log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn client(&self) -> Result<ControlClient> {
        let addr = SocketAddr::V4(SocketAddrV4::new(self.vm.ip, self.vm.control_port));
        ControlClient::connect(addr, &self.key, Duration::from_secs(2))
    }

    /// Shuts the VM down through the control service, killing it if needed.
    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = self.client().and_then(|mut c| c.shutdown());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Our own child, killed through its handle.
        child.kill()?;
        child.wait()?;
        Ok(())
    }
}

impl Drop for BenchLab {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = netns::delete_lab_network(&self.ns, std::slice::from_ref(&self.vm.tap)) {
            eprintln!("cannot delete namespace {}: {e:#}", self.ns);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value at quantile `q` (0..=1) of sorted samples (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    assert!(!sorted.is_empty());
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Round-trip times in ms from ping's per-reply lines (`… time=0.123 ms`).
fn parse_ping_times(output: &str) -> Vec<f64> {
    output
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|t| t.parse().ok())
        .collect()
}

fn bench_boot(lab: &mut BenchLab, boots: usize, rows: &mut Vec<Vec<String>>) -> Result<()> {
    let mut wall = Vec::new();
    let mut guest = Vec::new();
    for i in 0..boots {
        let elapsed = lab.boot().with_context(|| format!("boot {}", i + 1))?;
        let status = lab.client()?.status()?;
        wall.push(elapsed.as_secs_f64() * 1e3);
        guest.push(status.boot_ns as f64 / 1e6);
        lab.stop()?;
        eprintln!(
            "boot {}: wall {:.1} ms, guest {:.1} ms",
            i + 1,
            wall[i],
            guest[i]
        );
    }
    let (wall, guest) = (sorted(wall), sorted(guest));
    let accel = lab.accel.as_str();
    rows.push(vec![
        "boot: QEMU spawn -> control answers (wall)".into(),
        accel.into(),
        boots.to_string(),
        format!("median {:.1} ms", median(&wall)),
        format!("max {:.1} ms", wall[wall.len() - 1]),
    ]);
    rows.push(vec![
        "boot: first instruction -> ready (guest)".into(),
        accel.into(),
        boots.to_string(),
        format!("median {:.1} ms", median(&guest)),
        format!("max {:.1} ms", guest[guest.len() - 1]),
    ]);
    Ok(())
}

fn bench_ping(lab: &mut BenchLab, pings: usize, rows: &mut Vec<Vec<String>>) -> Result<()> {
    lab.boot()?;
    // We are inside the namespace, so ping's packets stay in it.
    let out = Command::new("ping")
        .args(["-n", "-c", &pings.to_string(), "-i", "0.01", "-W", "2"])
        .arg(lab.vm.ip.to_string())
        .output()
        .context("cannot run ping (apt-get install iputils-ping)")?;
    lab.stop()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let times = sorted(parse_ping_times(&text));
    if times.is_empty() {
        bail!("ping got no replies:\n{text}");
    }
    rows.push(vec![
        "ping round trip (lab namespace -> VM)".into(),
        lab.accel.as_str().into(),
        format!("{}/{pings} replies", times.len()),
        format!("median {:.3} ms", median(&times)),
        format!("p99 {:.3} ms", quantile(&times, 0.99)),
    ]);
    Ok(())
}

fn capsule_benches(args: &Args) -> Result<()> {
    use capsules::CapsuleLab;
    let mut rows = Vec::new();
    let w = args.which;
    let mut failures = Vec::new();
    let mut step = |tag: &str, f: &dyn Fn(&CapsuleLab) -> Result<Vec<Vec<String>>>| {
        let outcome = CapsuleLab::up(tag, args.vm_mem, args.accel, args.kernel.clone())
            .and_then(|lab| f(&lab));
        match outcome {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("{tag}: {e:#}");
                failures.push(format!("{tag}: {e:#}"));
            }
        }
    };
    if matches!(w, Which::CapsuleMem | Which::Capsules) {
        step("mem", &|lab| {
            capsules::memory(lab, args.runs, args.per_round)
        });
    }
    if matches!(w, Which::Density | Which::Capsules) {
        step("density", &|lab| {
            capsules::density(lab, args.cap, args.vm_mem)
        });
    }
    if matches!(w, Which::Kv | Which::Capsules) {
        step("kv", &|lab| capsules::kv(lab, args.runs));
    }
    if matches!(w, Which::Http | Which::Capsules) {
        step("http", &|lab| capsules::http(lab, args.runs));
    }
    print!(
        "{}",
        table(&["BENCHMARK", "ACCEL", "SAMPLES", "CENTRE", "TAIL"], &rows)
    );
    if !failures.is_empty() {
        bail!(
            "{} benchmark(s) failed: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    netns::require_root_and_ip()?;
    if args.which == Which::Migration {
        return migration::bench_migration(
            args.accel,
            args.kernel.clone(),
            args.moves,
            &args.only,
            args.plot.as_deref(),
        );
    }
    if args.which == Which::Soak {
        return soak::bench_soak(
            args.accel,
            args.kernel.clone(),
            args.moves,
            args.sample_every,
        );
    }
    if !matches!(args.which, Which::Boot | Which::Ping | Which::All) {
        return capsule_benches(&args);
    }
    let kernel = lab::resolve_kernel(args.kernel.as_deref())?;
    let (accel, why) = qemu::choose_accel(&kernel, args.accel)?;
    eprintln!("kernel {}; accelerator {why}", kernel.display());
    let mut lab = BenchLab::create(kernel, accel)?;
    let mut rows = Vec::new();
    {
        let _inside = NetnsGuard::enter(&lab.ns)?;
        if matches!(args.which, Which::Boot | Which::All) {
            bench_boot(&mut lab, args.boots, &mut rows)?;
        }
        if matches!(args.which, Which::Ping | Which::All) {
            bench_ping(&mut lab, args.pings, &mut rows)?;
        }
    }
    print!(
        "{}",
        table(&["BENCHMARK", "ACCEL", "SAMPLES", "CENTRE", "TAIL"], &rows)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        let v = sorted(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(median(&v), 3.0);
        assert_eq!(median(&[1.0, 2.0]), 1.5);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&hundred, 0.99), 99.0);
        assert_eq!(quantile(&hundred, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn ping_output_is_parsed() {
        let out = "PING 192.0.2.10 (192.0.2.10) 56(84) bytes of data.\n\
                   64 bytes from 192.0.2.10: icmp_seq=1 ttl=64 time=0.412 ms\n\
                   64 bytes from 192.0.2.10: icmp_seq=2 ttl=64 time=1.05 ms\n\
                   \n--- 192.0.2.10 ping statistics ---\n\
                   rtt min/avg/max/mdev = 0.412/0.731/1.050/0.319 ms\n";
        assert_eq!(parse_ping_times(out), [0.412, 1.05]);
    }
}
