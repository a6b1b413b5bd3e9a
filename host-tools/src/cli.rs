//! Command-line interface: argument definitions and dispatch.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use capsules_wire::control::{ClientError, MAX_FRAME_LEN, Request, Response, frame};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::capsules::{self, LabSession, RunOptions};
use crate::directory::{self, CapsuleRange};
use crate::lab::{self, UpOptions};
use crate::netns::{self, NetnsGuard};
use crate::qemu::AccelChoice;
use crate::render;

#[derive(Debug, Parser)]
#[command(
    name = "capsulectl",
    version,
    about = "Run compute capsules in QEMU VMs and move them, open connections and all",
    after_help = "Every command works on one lab: --lab LAB, else $CAPSULES_LAB, else 'default'."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The environment variable that names the lab when `--lab` is not given.
pub const LAB_ENV: &str = "CAPSULES_LAB";
pub const DEFAULT_LAB: &str = "default";

/// The lab a command works on.
#[derive(Debug, Clone, Args)]
pub struct LabArg {
    /// Lab to work on.
    #[arg(
        id = "lab",
        long = "lab",
        env = LAB_ENV,
        default_value = DEFAULT_LAB,
        value_name = "LAB"
    )]
    pub name: String,
}

/// The lab a lab command works on. `--name` was these commands' spelling
/// before every command took `--lab`; it stays, hidden, for older scripts.
#[derive(Debug, Clone, Args)]
pub struct LabNameArg {
    /// Lab to work on.
    #[arg(
        id = "lab",
        long = "lab",
        alias = "name",
        env = LAB_ENV,
        default_value = DEFAULT_LAB,
        value_name = "LAB"
    )]
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Labs: a network namespace with a bridge and VMs.
    #[command(subcommand)]
    Lab(LabCommand),
    /// The VMs of a lab.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Start a capsule: `capsulectl run echo --name web -- --port 7`.
    Run {
        /// Program to run (`capsulectl programs` lists them).
        program: String,
        /// Capsule name (a DNS label; default PROGRAM-N).
        #[arg(long)]
        name: Option<String>,
        /// VM to run on (default: the running VM with the fewest capsules).
        #[arg(long)]
        on: Option<String>,
        #[command(flatten)]
        lab: LabArg,
        /// Memory limit in MiB (default: the VM's, 64 MiB).
        #[arg(long)]
        memory: Option<u64>,
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Program arguments, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// List the lab's capsules with their state on their VMs.
    Ps {
        #[command(flatten)]
        lab: LabArg,
        #[arg(long)]
        json: bool,
    },
    /// Stop a capsule and remove it from the directory.
    Kill {
        name: String,
        #[command(flatten)]
        lab: LabArg,
        /// Forget the capsule even when its VM does not answer.
        #[arg(long)]
        force: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Finish or roll back moves, suspends and resumes that a dead process
    /// left half done (every capsule command does this first by itself).
    Recover {
        /// Only this capsule (default: every one with an open intent).
        name: Option<String>,
        #[command(flatten)]
        lab: LabArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Resume a capsule left frozen on its VM, after asking every VM of the
    /// lab that no other copy runs (it then runs at a new epoch).
    Thaw {
        name: String,
        #[command(flatten)]
        lab: LabArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a capsule's log.
    Logs {
        name: String,
        /// Keep printing until the capsule ends.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        lab: LabArg,
        /// One JSON object per log line: {"capsule": NAME, "line": TEXT}.
        #[arg(long)]
        json: bool,
    },
    /// Programs the lab's kernel can run.
    Programs {
        #[command(flatten)]
        lab: LabArg,
        #[arg(long)]
        json: bool,
    },
    /// Move a running capsule to another VM, with its open connections.
    Migrate {
        name: String,
        /// Destination VM.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        lab: LabArg,
        #[arg(long)]
        json: bool,
    },
    /// Stop a capsule and save it to a file (revive it with `resume`).
    Suspend {
        name: String,
        /// Image file to write.
        #[arg(short, long)]
        output: std::path::PathBuf,
        #[command(flatten)]
        lab: LabArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revive a suspended capsule on a VM of the same kernel build.
    Resume {
        file: std::path::PathBuf,
        /// VM to run on (default: the first).
        #[arg(long)]
        on: Option<String>,
        /// New capsule name (default: the saved one).
        #[arg(long)]
        name: Option<String>,
        /// Resume even an image older than the directory's epoch for its
        /// name (a stale copy: the capsule ran on after it was saved).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        lab: LabArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show a capsule image file or a running capsule: metadata, tasks, memory, sockets.
    Inspect {
        /// An image file, or the name of a capsule in the lab.
        target: String,
        #[command(flatten)]
        lab: LabArg,
        #[arg(long)]
        json: bool,
    },
    /// Bring up a two-VM lab, run http and kv under real client load, move
    /// them back and forth, and report downtime, client pauses and errors.
    Demo {
        /// The demo's own lab, cleared first if it exists ($CAPSULES_LAB is
        /// not read here: the demo must never take down a lab in use).
        #[arg(long, default_value = "demo", value_name = "LAB")]
        lab: String,
        /// Moves per capsule.
        #[arg(long, default_value_t = 3)]
        moves: usize,
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        /// Leave the lab up afterwards.
        #[arg(long)]
        keep: bool,
        /// Draw the clients' request latency over time, each move marked
        /// from freeze to running again, into this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The lab's directory (locator map and DNS server).
    #[command(subcommand)]
    Directory(DirectoryCommand),
    /// Print a shell completion script: `capsulectl completions bash >
    /// /etc/bash_completion.d/capsulectl`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per command into a
    /// directory: `capsulectl man | man -l -`.
    Man {
        /// Write capsulectl.1 and a page per subcommand here instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// Protocol checks against a VM's control service (for tests).
    #[command(subcommand, hide = true)]
    Debug(DebugCommand),
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create the lab namespace and boot its VMs.
    Up {
        #[command(flatten)]
        lab: LabNameArg,
        /// Number of VMs.
        #[arg(long, default_value_t = 2)]
        vms: usize,
        /// Memory per VM in MiB.
        #[arg(long, default_value_t = 256)]
        mem: u32,
        /// Accelerator: auto uses KVM only if a probe boot works.
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        /// Kernel ELF (default: $CAPSULES_KERNEL or the repository's release build).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Where capsule locators come from.
        #[arg(long, default_value = crate::directory::DEFAULT_CAPSULE_RANGE)]
        capsule_range: CapsuleRange,
        /// Boot one VM with another kernel, as VM=PATH (repeatable): to check
        /// that capsules never move between different builds.
        #[arg(long, value_parser = parse_kernel_for)]
        kernel_for: Vec<(String, PathBuf)>,
        /// VM subnets. 1 (the default) is one LAN; 2 or more make a routed
        /// lab: each subnet its own namespace and bridge, VMs spread over
        /// them round-robin, a client subnet (203.0.113.0/24) with a plain
        /// Linux host, and a router VM that alone joins them.
        #[arg(long, default_value_t = 1)]
        subnets: usize,
        /// The VM subnets' networks, comma-separated /24s in order (default:
        /// 192.0.2.0/24,198.51.100.0/24, then 10.99.K.0/24).
        #[arg(long, value_delimiter = ',', value_parser = parse_subnet)]
        subnet_list: Vec<capsules_wire::bootcfg::Ipv4Cidr>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop the VMs and delete the lab namespace; returns once no process of
    /// the lab is left.
    Down {
        #[command(flatten)]
        lab: LabNameArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside the lab namespace (subnet 1's host side), or on
    /// the client host or another subnet's host side of a routed lab.
    Exec {
        #[command(flatten)]
        lab: LabNameArg,
        /// Run it on the client host (routed labs).
        #[arg(long, conflicts_with = "subnet")]
        client: bool,
        /// Run it on subnet K's host side (routed labs; 1 is the lab
        /// namespace).
        #[arg(long)]
        subnet: Option<usize>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DirectoryCommand {
    /// Serve DNS for the lab's map in the foreground (inside the lab
    /// namespace; `lab up` starts this in the background).
    Serve {
        #[command(flatten)]
        lab: LabArg,
        /// Address to answer on (default: the lab bridge, port 53).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Start the lab's directory server in the background (after a crash or stop).
    Start {
        #[command(flatten)]
        lab: LabArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop the lab's directory server (the map stays on disk).
    Stop {
        #[command(flatten)]
        lab: LabArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Whether the directory server runs, its pid, address and map size.
    Status {
        #[command(flatten)]
        lab: LabArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List the lab's VMs with what their control services report.
    Ls {
        #[command(flatten)]
        lab: LabNameArg,
        /// JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Boot a VM again under the same name, address and MAC: after it died,
    /// or to replace it. Capsules whose only copy it held are then recorded
    /// as lost.
    Restart {
        /// The VM, e.g. vm2.
        vm: String,
        #[command(flatten)]
        lab: LabArg,
        /// Also restart a VM that still runs capsules (they end) or does not
        /// answer.
        #[arg(long)]
        force: bool,
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Check {
    /// An authenticated Version request.
    Version,
    /// A request sealed with a random key.
    WrongKey,
    /// A frame that is not an envelope.
    Malformed,
    /// A length prefix above the protocol limit.
    Oversized,
}

#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Send one kind of request and report the answer as JSON, then check
    /// that the VM still serves an authenticated client.
    Control {
        #[command(flatten)]
        lab: LabNameArg,
        #[arg(long)]
        vm: String,
        #[arg(long, value_enum)]
        check: Check,
    },
    /// What one VM itself says it runs (name and state per line), whatever
    /// the directory records.
    Capsules {
        #[command(flatten)]
        lab: LabArg,
        #[arg(long)]
        vm: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a QEMU monitor command (e.g. `info registers`) on a lab VM: a
    /// post-mortem of a VM that stopped answering on the network.
    Monitor {
        #[command(flatten)]
        lab: LabArg,
        #[arg(long)]
        vm: String,
        /// The monitor command, e.g. `info registers`.
        #[arg(required = true, num_args = 1..)]
        command: Vec<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn parse_kernel_for(s: &str) -> std::result::Result<(String, PathBuf), String> {
    let (vm, path) = s
        .split_once('=')
        .ok_or_else(|| format!("expected VM=PATH, got '{s}'"))?;
    if vm.is_empty() || path.is_empty() {
        return Err(format!("expected VM=PATH, got '{s}'"));
    }
    Ok((vm.to_string(), PathBuf::from(path)))
}

/// Prints `value` as pretty JSON (for `--json`).
fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Whether this command line asks for JSON: progress bars stay off then, so
/// that stderr carries nothing but errors.
fn wants_json(command: &Command) -> bool {
    match command {
        Command::Lab(LabCommand::Up { json, .. } | LabCommand::Down { json, .. })
        | Command::Vm(VmCommand::Ls { json, .. } | VmCommand::Restart { json, .. })
        | Command::Run { json, .. }
        | Command::Ps { json, .. }
        | Command::Kill { json, .. }
        | Command::Thaw { json, .. }
        | Command::Recover { json, .. }
        | Command::Logs { json, .. }
        | Command::Programs { json, .. }
        | Command::Migrate { json, .. }
        | Command::Suspend { json, .. }
        | Command::Resume { json, .. }
        | Command::Inspect { json, .. }
        | Command::Demo { json, .. }
        | Command::Directory(
            DirectoryCommand::Start { json, .. }
            | DirectoryCommand::Stop { json, .. }
            | DirectoryCommand::Status { json, .. },
        )
        | Command::Debug(
            DebugCommand::Capsules { json, .. } | DebugCommand::Monitor { json, .. },
        ) => *json,
        _ => false,
    }
}

fn parse_subnet(s: &str) -> Result<capsules_wire::bootcfg::Ipv4Cidr, String> {
    capsules_wire::bootcfg::Ipv4Cidr::parse(s)
        .ok_or_else(|| format!("'{s}' is not a network like 192.0.2.0/24"))
}

/// What `lab up --json` prints: the lab without its key.
fn lab_json(report: &lab::UpReport) -> serde_json::Value {
    let state = &report.state;
    serde_json::json!({
        "lab": report.lab,
        "netns": state.netns,
        "accelerator": state.accel,
        "accelerator_reason": report.accel_reason,
        "kernel": state.kernel,
        "build_id": state.kernel_build_id,
        "mem_mib": state.mem_mib,
        "vms": state.vms.iter().map(|vm| serde_json::json!({
            "name": vm.name,
            "ip": vm.ip,
            "subnet": vm.subnet,
            "mac": vm.mac,
            "pid": vm.pid,
        })).collect::<Vec<_>>(),
        "directory": lab::directory_addr(state).to_string(),
        "directory_pid": state.directory_pid,
        "capsule_range": state.capsule_range.to_string(),
        "router": state.routed.as_ref().map(|r| serde_json::json!({
            "pid": r.router.pid,
            "addresses": r.router_nics.iter().map(|n| n.addr).collect::<Vec<_>>(),
            "client": r.client,
            "client_netns": r.client_netns,
            "subnets": r.subnets.iter().map(|s| serde_json::json!({
                "subnet": s.index,
                "network": format!("{}/{}", s.network, s.prefix),
                "netns": s.netns,
                "host": s.host,
                "router": s.router,
            })).collect::<Vec<_>>(),
        })),
    })
}

/// Runs a parsed command line; returns the process exit status.
pub fn run(cli: Cli) -> Result<i32> {
    if wants_json(&cli.command) {
        crate::progress::set_quiet(true);
    }
    match cli.command {
        Command::Lab(cmd) => lab_command(cmd),
        Command::Vm(VmCommand::Ls { lab, json }) => {
            let vms = lab::list(&lab.name)?;
            if json {
                println!("{}", render::vm_json(&vms));
            } else {
                print!("{}", render::vm_table(&vms));
            }
            Ok(0)
        }
        Command::Vm(VmCommand::Restart {
            vm,
            lab,
            force,
            json,
        }) => {
            let done = crate::vm::restart(&lab.name, &vm, force)?;
            if json {
                print_json(&done)?;
                return Ok(0);
            }
            println!(
                "{} restarted (was {}): pid {}, answering after {:.0} ms",
                done.vm, done.was, done.pid, done.boot_ms
            );
            if !done.lost.is_empty() {
                println!("lost with its previous run: {}", done.lost.join(", "));
            }
            if let Some(log) = &done.previous_serial_log {
                println!("previous serial log: {log}");
            }
            Ok(0)
        }
        Command::Run {
            program,
            name,
            on,
            lab,
            memory,
            json,
            args,
        } => {
            let session = LabSession::open(&lab.name)?;
            let started = capsules::run(
                &session,
                &RunOptions {
                    program,
                    name,
                    on,
                    memory_mib: memory,
                    args,
                },
            )?;
            if json {
                print_json(&started)?;
            } else {
                println!(
                    "started {} ({}) at {} on {} — DNS name {}",
                    started.name, started.program, started.locator, started.vm, started.dns
                );
            }
            Ok(0)
        }
        Command::Ps { lab, json } => {
            let rows = capsules::ps(&LabSession::open(&lab.name)?)?;
            if json {
                print_json(&rows)?;
            } else {
                print!("{}", render::ps_table(&rows));
            }
            Ok(0)
        }
        Command::Kill {
            name,
            lab,
            force,
            json,
        } => {
            let rec = capsules::kill(&LabSession::open(&lab.name)?, &name, force)?;
            if json {
                print_json(&rec)?;
            } else {
                println!("killed {} ({} on {})", rec.name, rec.locator, rec.vm);
            }
            Ok(0)
        }
        Command::Recover { name, lab, json } => {
            let session = LabSession::open(&lab.name)?;
            let _lock = crate::directory::lock(&session.dir)?;
            let mut map = session.load_map()?;
            if let Some(n) = &name
                && map.get(n).is_none()
            {
                bail!("no capsule named '{n}' in lab '{}'", lab.name);
            }
            let mut done = crate::recover::recover_all(&session, &mut map, name.as_deref())?;
            done.extend(
                crate::vm::mark_lost_on_dead_vms(&session, &mut map)?
                    .into_iter()
                    .filter(|r| name.as_deref().is_none_or(|n| n == r.name)),
            );
            if json {
                print_json(&done)?;
            } else if done.is_empty() {
                println!("nothing to recover: no move, suspend or resume was left half done");
            } else {
                for r in &done {
                    println!(
                        "{}: {} -> {}{}",
                        r.name,
                        r.intent,
                        r.outcome,
                        r.vm.as_deref()
                            .map(|vm| format!(" on {vm}"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(0)
        }
        Command::Thaw { name, lab, json } => {
            let vm = crate::migrate::thaw(&LabSession::open(&lab.name)?, &name)?;
            if json {
                print_json(&serde_json::json!({"name": name, "vm": vm, "state": "running"}))?;
            } else {
                println!("thawed {name} on {vm}");
            }
            Ok(0)
        }
        Command::Logs {
            name,
            follow,
            lab,
            json,
        } => {
            let session = LabSession::open(&lab.name)?;
            let logs = |out: &mut dyn std::io::Write| {
                let poll = std::time::Duration::from_millis(200);
                capsules::logs(&session, &name, follow, poll, out)
            };
            let stdout = std::io::stdout();
            if json {
                let mut lines = render::JsonLines::new(&name, stdout.lock());
                logs(&mut lines)?;
                lines.finish()?;
            } else {
                logs(&mut stdout.lock())?;
            }
            Ok(0)
        }
        Command::Programs { lab, json } => {
            let list = capsules::programs(&LabSession::open(&lab.name)?)?;
            if json {
                let v: Vec<serde_json::Value> = list
                    .iter()
                    .map(|p| serde_json::json!({"name": p.name, "description": p.description}))
                    .collect();
                print_json(&v)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|p| vec![p.name.clone(), p.description.clone()])
                    .collect();
                print!("{}", render::table(&["PROGRAM", "DESCRIPTION"], &rows));
            }
            Ok(0)
        }
        Command::Migrate {
            name,
            to,
            lab,
            json,
        } => {
            let report = crate::migrate::migrate(&LabSession::open(&lab.name)?, &name, &to)?;
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "migrated {} {} -> {}: freeze {:.1} ms, transfer {:.1} ms ({:.1} MiB/s), restore {:.1} ms, release {:.1} ms",
                    report.name,
                    report.from,
                    report.to,
                    report.freeze_ms,
                    report.transfer_ms,
                    report.transfer_mib_s,
                    report.restore_ms,
                    report.release_ms
                );
                println!(
                    "downtime {:.1} ms (freeze -> running again), image {} bytes, freeze -> released {:.1} ms",
                    report.downtime_ms, report.image_bytes, report.total_ms
                );
            }
            Ok(0)
        }
        Command::Suspend {
            name,
            output,
            lab,
            json,
        } => {
            let (rec, bytes) =
                crate::migrate::suspend(&LabSession::open(&lab.name)?, &name, &output)?;
            if json {
                print_json(&serde_json::json!({
                    "capsule": rec,
                    "file": output,
                    "bytes": bytes,
                }))?;
            } else {
                println!(
                    "suspended {} ({} at {}, slot {}) from {} to {} ({bytes} bytes)",
                    rec.name,
                    rec.program,
                    rec.locator,
                    rec.slot,
                    rec.vm,
                    output.display()
                );
            }
            Ok(0)
        }
        Command::Resume {
            file,
            on,
            name,
            force,
            lab,
            json,
        } => {
            let rec = crate::migrate::resume(
                &LabSession::open(&lab.name)?,
                &file,
                on.as_deref(),
                name.as_deref(),
                force,
            )?;
            if json {
                print_json(&rec)?;
            } else {
                println!(
                    "resumed {} ({} at {}) on {}",
                    rec.name, rec.program, rec.locator, rec.vm
                );
            }
            Ok(0)
        }
        Command::Inspect { target, lab, json } => {
            let path = std::path::Path::new(&target);
            let inspection = if path.exists() {
                crate::migrate::inspect_file(path)?
            } else {
                crate::migrate::inspect_capsule(&LabSession::open(&lab.name)?, &target)?
            };
            if json {
                print_json(&inspection)?;
            } else {
                print!("{}", crate::migrate::render_inspection(&inspection));
            }
            Ok(0)
        }
        Command::Demo {
            lab,
            moves,
            accel,
            keep,
            plot,
            json,
        } => {
            let report = crate::demo::demo(&crate::demo::DemoOptions {
                lab,
                moves,
                accel,
                keep,
                plot,
            })?;
            if json {
                print_json(&report)?;
            } else {
                print!("{}", crate::demo::render(&report));
            }
            Ok(if report.errors == 0 { 0 } else { 1 })
        }
        Command::Directory(cmd) => directory_command(cmd),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "capsulectl",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Command::Man { out_dir } => {
            let command = Cli::command();
            match out_dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    clap_mangen::generate_to(command, &dir).with_context(|| {
                        format!("cannot write man pages into {}", dir.display())
                    })?;
                    println!("man pages written to {}", dir.display());
                }
                None => clap_mangen::Man::new(command).render(&mut std::io::stdout())?,
            }
            Ok(0)
        }
        Command::Debug(cmd) => debug_command(cmd),
    }
}

fn lab_command(cmd: LabCommand) -> Result<i32> {
    match cmd {
        LabCommand::Up {
            lab,
            vms,
            mem,
            accel,
            kernel,
            capsule_range,
            kernel_for,
            subnets,
            subnet_list,
            json,
        } => {
            let report = lab::up_with_overrides(
                &UpOptions {
                    name: lab.name,
                    vms,
                    mem_mib: mem,
                    accel,
                    kernel,
                    capsule_range,
                    subnets,
                    subnet_list,
                },
                &kernel_for,
            )?;
            if json {
                print_json(&lab_json(&report))?;
                return Ok(0);
            }
            println!(
                "lab '{}' is up in namespace {} (accelerator: {})",
                report.lab, report.state.netns, report.accel_reason
            );
            println!(
                "kernel {} (build id {})",
                report.state.kernel.display(),
                report.state.kernel_build_id
            );
            print!("{}", render::lab_table(&report.state));
            if let Some(routed) = &report.state.routed {
                let addrs: Vec<String> = routed
                    .router_nics
                    .iter()
                    .map(|n| format!("{}/{}", n.addr, n.prefix))
                    .collect();
                println!(
                    "router: {} (pid {}); client host {} in namespace {}",
                    addrs.join(", "),
                    routed.router.pid.unwrap_or_default(),
                    routed.client,
                    routed.client_netns
                );
            }
            println!(
                "directory: DNS on {} (pid {}), capsule locators from {}",
                lab::directory_addr(&report.state),
                report.state.directory_pid.unwrap_or_default(),
                report.state.capsule_range
            );
            Ok(0)
        }
        LabCommand::Down { lab, json } => {
            lab::down(&lab.name)?;
            if json {
                print_json(&serde_json::json!({"lab": lab.name, "state": "down"}))?;
            } else {
                println!("lab '{}' is down", lab.name);
            }
            Ok(0)
        }
        LabCommand::Exec {
            lab,
            client,
            subnet,
            command,
        } => {
            let name = lab.name;
            lab::validate_lab_name(&name)?;
            netns::require_root_and_ip()?;
            let mut ns = netns::netns_name(&name);
            if !netns::exists(&ns) {
                bail!("no lab named '{name}' (namespace {ns} does not exist)");
            }
            if client || subnet.is_some_and(|k| k != 1) {
                let (state, _) = lab::load_lab(&name)?;
                let Some(routed) = state.routed else {
                    bail!(
                        "lab '{name}' has one subnet and no client host: --client and --subnet need `lab up --subnets 2` or more"
                    );
                };
                ns = match subnet {
                    Some(k) => match routed.subnets.iter().find(|s| s.index == k) {
                        Some(s) => s.netns.clone(),
                        None => bail!(
                            "lab '{name}' has subnets 1..{}, not {k}",
                            routed.subnets.len()
                        ),
                    },
                    None => routed.client_netns,
                };
            }
            // exec replaces this process, so the command's exit status is ours.
            let err = netns::exec_command(&ns, &command).exec();
            bail!(
                "cannot run 'ip netns exec {ns} {}': {err}",
                command.join(" ")
            )
        }
    }
}

fn debug_command(cmd: DebugCommand) -> Result<i32> {
    match cmd {
        DebugCommand::Control { lab, vm, check } => {
            let report = debug_control(&lab.name, &vm, check)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(0)
        }
        DebugCommand::Capsules { lab, vm, json } => {
            let session = LabSession::open(&lab.name)?;
            let list = session.list_capsules(session.vm(&vm)?)?;
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|c| serde_json::json!({"name": c.name, "state": c.state.label()}))
                    .collect();
                print_json(&v)?;
            } else {
                for info in list {
                    println!("{} {}", info.name, info.state.label());
                }
            }
            Ok(0)
        }
        DebugCommand::Monitor {
            lab,
            vm,
            command,
            json,
        } => {
            let (state, _) = lab::load_lab(&lab.name)?;
            let output = lab::monitor_command(state.vm(&vm)?, &command.join(" "))?;
            if json {
                print_json(&serde_json::json!({"vm": vm, "output": output}))?;
            } else {
                println!("{output}");
            }
            Ok(0)
        }
    }
}

fn directory_command(cmd: DirectoryCommand) -> Result<i32> {
    match cmd {
        DirectoryCommand::Serve { lab, listen } => {
            netns::require_root_and_ip()?;
            let (state, dir) = lab::load_lab(&lab.name)?;
            // Always inside the lab namespace, wherever it was started from:
            // the bridge address exists only there.
            let _inside = NetnsGuard::enter(&state.netns)?;
            let addr = listen.unwrap_or_else(|| lab::directory_addr(&state));
            directory::serve(&dir, addr, directory::DNS_ZONE, state.capsule_range)?;
            Ok(0)
        }
        DirectoryCommand::Start { lab, json } => {
            let lab = lab.name;
            netns::require_root_and_ip()?;
            let (mut state, dir) = lab::load_lab(&lab)?;
            let _lock = directory::lock(&dir)?;
            lab::start_directory(&mut state, &dir)?;
            if json {
                print_json(&serde_json::json!({
                    "lab": lab,
                    "running": true,
                    "pid": state.directory_pid,
                    "listen": lab::directory_addr(&state).to_string(),
                }))?;
            } else {
                println!(
                    "directory of lab '{lab}' serves DNS on {} (pid {})",
                    lab::directory_addr(&state),
                    state.directory_pid.unwrap_or_default()
                );
            }
            Ok(0)
        }
        DirectoryCommand::Stop { lab, json } => {
            let lab = lab.name;
            netns::require_root_and_ip()?;
            let (mut state, dir) = lab::load_lab(&lab)?;
            lab::stop_directory(&mut state, &dir)?;
            if json {
                print_json(&serde_json::json!({
                    "lab": lab,
                    "running": false,
                    "map": directory::map_path(&dir),
                }))?;
            } else {
                println!(
                    "directory of lab '{lab}' stopped (its map stays in {})",
                    dir.display()
                );
            }
            Ok(0)
        }
        DirectoryCommand::Status { lab, json } => {
            let lab = lab.name;
            netns::require_root_and_ip()?;
            let (state, dir) = lab::load_lab(&lab)?;
            let map = directory::load(&dir, state.capsule_range)?;
            let running = lab::directory_running(&state);
            let report = serde_json::json!({
                "lab": lab,
                "pid": state.directory_pid,
                "running": running,
                "listen": lab::directory_addr(&state).to_string(),
                "zone": directory::DNS_ZONE,
                "capsule_range": state.capsule_range.to_string(),
                "capsules": map.capsules.len(),
                "map": directory::map_path(&dir),
            });
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "directory of lab '{lab}': {} (pid {}), DNS on {}, {} capsule(s), range {}",
                    if running { "running" } else { "not running" },
                    state
                        .directory_pid
                        .map_or_else(|| "-".to_string(), |p| p.to_string()),
                    lab::directory_addr(&state),
                    map.capsules.len(),
                    state.capsule_range
                );
            }
            Ok(if running { 0 } else { 3 })
        }
    }
}

/// What a debug check observed.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// "ok" (a verified answer), "refused" (an error reply) or "failed" (no
    /// usable reply at all).
    pub outcome: String,
    /// The error class of a refusal, e.g. "unauthenticated".
    pub code: Option<String>,
    pub detail: String,
    /// Whether a fresh authenticated client is served afterwards.
    pub still_serving: bool,
}

fn debug_control(lab_name: &str, vm_name: &str, check: Check) -> Result<CheckReport> {
    netns::require_root_and_ip()?;
    let (lab, _) = lab::load_lab(lab_name)?;
    let vm = lab.vm(vm_name)?;
    let key = lab.key()?;
    let _inside = NetnsGuard::enter(&lab.netns)?;
    let answer = match check {
        Check::Version => lab::connect(vm, &key)?.try_call(&Request::Version),
        Check::WrongKey => {
            let mut wrong = vec![0u8; key.len()];
            getrandom::fill(&mut wrong).map_err(|e| anyhow::anyhow!("{e}"))?;
            lab::connect(vm, &wrong)?.try_call(&Request::Version)
        }
        Check::Malformed => lab::connect(vm, &key)?.send_raw(&frame(b"\x01not an envelope")),
        Check::Oversized => {
            lab::connect(vm, &key)?.send_raw(&((MAX_FRAME_LEN as u32) + 1).to_le_bytes())
        }
    };
    let (outcome, code, detail) = match answer {
        Ok(Ok(Response::Error { code, message })) => {
            ("refused", Some(code.as_str().to_string()), message)
        }
        Ok(Ok(resp)) => ("ok", None, format!("{resp:?}")),
        Ok(Err(ClientError::Refused { code, message })) => {
            ("refused", Some(code.as_str().to_string()), message)
        }
        Ok(Err(e)) => ("failed", None, e.to_string()),
        Err(e) => ("failed", None, format!("{e:#}")),
    };
    let still_serving = lab::connect(vm, &key).and_then(|mut c| c.version()).is_ok();
    Ok(CheckReport {
        outcome: outcome.into(),
        code,
        detail,
        still_serving,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("capsulectl").chain(args.iter().copied()))
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn lab_up_defaults_and_flags() {
        let Command::Lab(LabCommand::Up {
            lab,
            vms,
            mem,
            accel,
            kernel,
            ..
        }) = parse(&["lab", "up"]).unwrap().command
        else {
            panic!("not lab up");
        };
        assert_eq!(
            (lab.name.as_str(), vms, mem, accel, kernel),
            ("default", 2, 256, AccelChoice::Auto, None)
        );
        let Command::Lab(LabCommand::Up {
            lab, vms, accel, ..
        }) = parse(&["lab", "up", "--lab", "x", "--vms", "3", "--accel", "tcg"])
            .unwrap()
            .command
        else {
            panic!("not lab up");
        };
        assert_eq!((lab.name.as_str(), vms, accel), ("x", 3, AccelChoice::Tcg));
    }

    #[test]
    fn exec_takes_everything_after_double_dash() {
        let Command::Lab(LabCommand::Exec { lab, command, .. }) =
            parse(&["lab", "exec", "--", "ping", "-c1", "192.0.2.11"])
                .unwrap()
                .command
        else {
            panic!("not lab exec");
        };
        assert_eq!(lab.name, "default");
        assert_eq!(command, ["ping", "-c1", "192.0.2.11"]);
        assert!(parse(&["lab", "exec"]).is_err());
    }

    #[test]
    fn capsule_commands_parse() {
        let Command::Run {
            program,
            name,
            on,
            lab,
            memory,
            json,
            args,
        } = parse(&[
            "run", "echo", "--name", "web", "--on", "vm2", "--memory", "8", "--", "--port", "9",
        ])
        .unwrap()
        .command
        else {
            panic!("not run");
        };
        assert_eq!(
            (
                program.as_str(),
                name.as_deref(),
                on.as_deref(),
                lab.name.as_str()
            ),
            ("echo", Some("web"), Some("vm2"), "default")
        );
        assert_eq!((memory, json), (Some(8), false));
        assert_eq!(args, ["--port", "9"]);
        let Command::Logs { follow, name, .. } =
            parse(&["logs", "-f", "web", "--lab", "x"]).unwrap().command
        else {
            panic!("not logs");
        };
        assert!(follow);
        assert_eq!(name, "web");
        assert!(parse(&["kill"]).is_err());
        assert!(parse(&["run"]).is_err());
        assert!(parse(&["lab", "up", "--capsule-range", "10.1.0.0/33"]).is_err());
        assert!(parse(&["lab", "up", "--capsule-range", "10.1.0.0/16"]).is_ok());
        assert!(parse(&["directory", "serve", "--lab", "x"]).is_ok());
    }

    #[test]
    fn bad_input_is_a_clap_error() {
        assert!(parse(&["lab", "sideways"]).is_err());
        assert!(parse(&["lab", "up", "--accel", "warp"]).is_err());
        assert!(parse(&["lab", "up", "--vms", "many"]).is_err());
        assert!(parse(&["vm", "ls", "--colour"]).is_err());
        let Command::Vm(VmCommand::Ls { json, .. }) =
            parse(&["vm", "ls", "--json"]).unwrap().command
        else {
            panic!("not vm ls");
        };
        assert!(json);
    }

    /// Every leaf command of the tree with its path, e.g. ["lab", "up"].
    fn leaves(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, clap::Command)>) {
        if cmd.get_subcommands().next().is_none() {
            out.push((path, cmd.clone()));
            return;
        }
        for sub in cmd.get_subcommands() {
            let mut p = path.clone();
            p.push(sub.get_name().to_string());
            leaves(sub, p, out);
        }
    }

    fn all_leaves() -> Vec<(Vec<String>, clap::Command)> {
        let mut out = Vec::new();
        leaves(&Cli::command(), Vec::new(), &mut out);
        out
    }

    /// Commands that work on no lab: they print what capsulectl itself is.
    const LABLESS: [&str; 2] = ["completions", "man"];

    #[test]
    fn every_command_takes_lab_and_honours_capsules_lab() {
        let leaves = all_leaves();
        assert!(leaves.len() > 20, "{} commands", leaves.len());
        for (path, cmd) in leaves {
            if LABLESS.contains(&path[0].as_str()) {
                continue;
            }
            let lab = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some("lab"))
                .unwrap_or_else(|| panic!("`{}` has no --lab", path.join(" ")));
            let env = lab.get_env().map(|e| e.to_string_lossy().into_owned());
            if path == ["demo"] {
                // The demo clears its lab first: an inherited name must not
                // point it at a lab in use.
                assert_eq!(env, None);
            } else {
                assert_eq!(env.as_deref(), Some(LAB_ENV), "`{}`", path.join(" "));
            }
        }
    }

    #[test]
    fn every_command_that_prints_a_result_takes_json() {
        // lab exec runs another program; debug control always prints JSON;
        // completions and man print files for other programs.
        let without: [&[&str]; 5] = [
            &["lab", "exec"],
            &["debug", "control"],
            &["directory", "serve"],
            &["completions"],
            &["man"],
        ];
        for (path, cmd) in all_leaves() {
            if without.iter().any(|w| *w == path.as_slice()) {
                continue;
            }
            assert!(
                cmd.get_arguments().any(|a| a.get_long() == Some("json")),
                "`{}` has no --json",
                path.join(" ")
            );
        }
    }

    fn lab_of(args: &[&str]) -> String {
        match parse(args).unwrap().command {
            Command::Lab(LabCommand::Up { lab, .. })
            | Command::Lab(LabCommand::Down { lab, .. })
            | Command::Lab(LabCommand::Exec { lab, .. })
            | Command::Vm(VmCommand::Ls { lab, .. }) => lab.name,
            Command::Ps { lab, .. } | Command::Migrate { lab, .. } => lab.name,
            Command::Demo { lab, .. } => lab,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn name_stays_a_hidden_alias_of_lab_on_lab_commands() {
        for cmd in [&["lab", "up"][..], &["lab", "down"], &["vm", "ls"]] {
            let mut args = cmd.to_vec();
            args.extend(["--name", "old"]);
            assert_eq!(lab_of(&args), "old", "{args:?}");
            let mut args = cmd.to_vec();
            args.extend(["--lab", "new"]);
            assert_eq!(lab_of(&args), "new", "{args:?}");
        }
        assert_eq!(
            lab_of(&["lab", "exec", "--name", "old", "--", "true"]),
            "old"
        );
        // Hidden: help names only --lab.
        let help = Cli::command()
            .find_subcommand_mut("lab")
            .unwrap()
            .find_subcommand_mut("down")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("--lab <LAB>"), "{help}");
        assert!(!help.contains("--name"), "{help}");
        // Capsule commands keep --name for the capsule's name.
        assert!(parse(&["ps", "--name", "x"]).is_err());
    }

    #[test]
    fn the_flag_names_the_lab() {
        // $CAPSULES_LAB is checked on the binary (tests/cli.rs): setting it
        // here would race with the other tests of this process.
        assert_eq!(
            lab_of(&["migrate", "x", "--to", "vm2", "--lab", "flag"]),
            "flag"
        );
        assert_eq!(lab_of(&["demo"]), "demo");
    }

    #[test]
    fn completions_and_man_are_generated_from_the_definitions() {
        for shell in ["bash", "zsh", "fish"] {
            assert!(parse(&["completions", shell]).is_ok());
        }
        assert!(parse(&["completions", "cmd.exe"]).is_err());
        let mut roff = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut roff)
            .unwrap();
        let roff = String::from_utf8(roff).unwrap();
        assert!(roff.contains(".TH capsulectl"), "{roff}");
        assert!(roff.contains("migrate"), "{roff}");
    }
}
