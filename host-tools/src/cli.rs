//! Command-line interface: argument definitions and dispatch.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{Result, bail};
use capsules_wire::control::{ClientError, MAX_FRAME_LEN, Request, Response, frame};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::capsules::{self, LabSession, RunOptions};
use crate::directory::{self, CapsuleRange};
use crate::lab::{self, UpOptions};
use crate::netns::{self, NetnsGuard};
use crate::qemu::AccelChoice;
use crate::render;

#[derive(Debug, Parser)]
#[command(name = "capsulectl", version, about = "Run and inspect Capsules VMs")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
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
        #[arg(long, default_value = "default")]
        lab: String,
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
        #[arg(long, default_value = "default")]
        lab: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop a capsule and remove it from the directory.
    Kill {
        name: String,
        #[arg(long, default_value = "default")]
        lab: String,
        /// Forget the capsule even when its VM does not answer.
        #[arg(long)]
        force: bool,
    },
    /// Resume a capsule that an interrupted move left frozen on its VM (only
    /// when it surely does not run on the other VM: `migrate` says so).
    Thaw {
        name: String,
        #[arg(long, default_value = "default")]
        lab: String,
    },
    /// Print a capsule's log.
    Logs {
        name: String,
        /// Keep printing until the capsule ends.
        #[arg(short, long)]
        follow: bool,
        #[arg(long, default_value = "default")]
        lab: String,
    },
    /// Programs the lab's kernel can run.
    Programs {
        #[arg(long, default_value = "default")]
        lab: String,
        #[arg(long)]
        json: bool,
    },
    /// Move a running capsule to another VM, with its open connections.
    Migrate {
        name: String,
        /// Destination VM.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "default")]
        lab: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop a capsule and save it to a file (revive it with `resume`).
    Suspend {
        name: String,
        /// Image file to write.
        #[arg(short, long)]
        output: std::path::PathBuf,
        #[arg(long, default_value = "default")]
        lab: String,
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
        #[arg(long, default_value = "default")]
        lab: String,
    },
    /// Show a capsule image file or a running capsule: metadata, tasks, memory, sockets.
    Inspect {
        /// An image file, or the name of a capsule in the lab.
        target: String,
        #[arg(long, default_value = "default")]
        lab: String,
        #[arg(long)]
        json: bool,
    },
    /// Bring up a two-VM lab, run http and kv under real client load, move
    /// them back and forth, and report downtime, client pauses and errors.
    Demo {
        #[arg(long, default_value = "demo")]
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
    /// Protocol checks against a VM's control service (for tests).
    #[command(subcommand, hide = true)]
    Debug(DebugCommand),
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create the lab namespace and boot its VMs.
    Up {
        #[arg(long, default_value = "default")]
        name: String,
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
    },
    /// Stop the VMs and delete the lab namespace.
    Down {
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Run a command inside the lab namespace.
    Exec {
        #[arg(long, default_value = "default")]
        name: String,
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
        #[arg(long, default_value = "default")]
        lab: String,
        /// Address to answer on (default: the lab bridge, port 53).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Start the lab's directory server in the background (after a crash or stop).
    Start {
        #[arg(long, default_value = "default")]
        lab: String,
    },
    /// Stop the lab's directory server (the map stays on disk).
    Stop {
        #[arg(long, default_value = "default")]
        lab: String,
    },
    /// Whether the directory server runs, its pid, address and map size.
    Status {
        #[arg(long, default_value = "default")]
        lab: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List the lab's VMs with what their control services report.
    Ls {
        #[arg(long, default_value = "default")]
        name: String,
        /// JSON array instead of a table.
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
        #[arg(long, default_value = "default")]
        name: String,
        #[arg(long)]
        vm: String,
        #[arg(long, value_enum)]
        check: Check,
    },
    /// What one VM itself says it runs (name and state per line), whatever
    /// the directory records.
    Capsules {
        #[arg(long = "lab", default_value = "default")]
        name: String,
        #[arg(long)]
        vm: String,
    },
    /// Run a QEMU monitor command (e.g. `info registers`) on a lab VM: a
    /// post-mortem of a VM that stopped answering on the network.
    Monitor {
        #[arg(long = "lab", default_value = "default")]
        name: String,
        #[arg(long)]
        vm: String,
        /// The monitor command, e.g. `info registers`.
        #[arg(required = true, num_args = 1..)]
        command: Vec<String>,
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

/// Runs a parsed command line; returns the process exit status.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Lab(LabCommand::Up {
            name,
            vms,
            mem,
            accel,
            kernel,
            capsule_range,
            kernel_for,
        }) => {
            let report = lab::up_with_overrides(
                &UpOptions {
                    name,
                    vms,
                    mem_mib: mem,
                    accel,
                    kernel,
                    capsule_range,
                },
                &kernel_for,
            )?;
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
            println!(
                "directory: DNS on {} (pid {}), capsule locators from {}",
                lab::directory_addr(&report.state),
                report.state.directory_pid.unwrap_or_default(),
                report.state.capsule_range
            );
            Ok(0)
        }
        Command::Lab(LabCommand::Down { name }) => {
            lab::down(&name)?;
            println!("lab '{name}' is down");
            Ok(0)
        }
        Command::Lab(LabCommand::Exec { name, command }) => {
            lab::validate_lab_name(&name)?;
            netns::require_root_and_ip()?;
            let ns = netns::netns_name(&name);
            if !netns::exists(&ns) {
                bail!("no lab named '{name}' (namespace {ns} does not exist)");
            }
            // exec replaces this process, so the command's exit status is ours.
            let err = netns::exec_command(&ns, &command).exec();
            bail!(
                "cannot run 'ip netns exec {ns} {}': {err}",
                command.join(" ")
            )
        }
        Command::Vm(VmCommand::Ls { name, json }) => {
            let vms = lab::list(&name)?;
            if json {
                println!("{}", render::vm_json(&vms));
            } else {
                print!("{}", render::vm_table(&vms));
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
            let session = LabSession::open(&lab)?;
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
                println!("{}", serde_json::to_string(&started)?);
            } else {
                println!(
                    "started {} ({}) at {} on {} — DNS name {}",
                    started.name, started.program, started.locator, started.vm, started.dns
                );
            }
            Ok(0)
        }
        Command::Ps { lab, json } => {
            let rows = capsules::ps(&LabSession::open(&lab)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", render::ps_table(&rows));
            }
            Ok(0)
        }
        Command::Kill { name, lab, force } => {
            let rec = capsules::kill(&LabSession::open(&lab)?, &name, force)?;
            println!("killed {} ({} on {})", rec.name, rec.locator, rec.vm);
            Ok(0)
        }
        Command::Thaw { name, lab } => {
            let vm = crate::migrate::thaw(&LabSession::open(&lab)?, &name)?;
            println!("thawed {name} on {vm}");
            Ok(0)
        }
        Command::Logs { name, follow, lab } => {
            let session = LabSession::open(&lab)?;
            let stdout = std::io::stdout();
            capsules::logs(
                &session,
                &name,
                follow,
                std::time::Duration::from_millis(200),
                &mut stdout.lock(),
            )?;
            Ok(0)
        }
        Command::Programs { lab, json } => {
            let list = capsules::programs(&LabSession::open(&lab)?)?;
            if json {
                let v: Vec<serde_json::Value> = list
                    .iter()
                    .map(|p| serde_json::json!({"name": p.name, "description": p.description}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
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
            let report = crate::migrate::migrate(&LabSession::open(&lab)?, &name, &to)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
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
                    "downtime {:.1} ms (freeze -> running again), image {} bytes, total {:.1} ms",
                    report.downtime_ms, report.image_bytes, report.total_ms
                );
            }
            Ok(0)
        }
        Command::Suspend { name, output, lab } => {
            let (rec, bytes) = crate::migrate::suspend(&LabSession::open(&lab)?, &name, &output)?;
            println!(
                "suspended {} ({} at {}, slot {}) from {} to {} ({bytes} bytes)",
                rec.name,
                rec.program,
                rec.locator,
                rec.slot,
                rec.vm,
                output.display()
            );
            Ok(0)
        }
        Command::Resume {
            file,
            on,
            name,
            lab,
        } => {
            let rec = crate::migrate::resume(
                &LabSession::open(&lab)?,
                &file,
                on.as_deref(),
                name.as_deref(),
            )?;
            println!(
                "resumed {} ({} at {}) on {}",
                rec.name, rec.program, rec.locator, rec.vm
            );
            Ok(0)
        }
        Command::Inspect { target, lab, json } => {
            let path = std::path::Path::new(&target);
            let inspection = if path.exists() {
                crate::migrate::inspect_file(path)?
            } else {
                crate::migrate::inspect_capsule(&LabSession::open(&lab)?, &target)?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&inspection)?);
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
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::demo::render(&report));
            }
            Ok(if report.errors == 0 { 0 } else { 1 })
        }
        Command::Directory(cmd) => directory_command(cmd),
        Command::Debug(DebugCommand::Control { name, vm, check }) => {
            let report = debug_control(&name, &vm, check)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(0)
        }
        Command::Debug(DebugCommand::Capsules { name, vm }) => {
            let session = LabSession::open(&name)?;
            for info in session.list_capsules(session.vm(&vm)?)? {
                println!("{} {}", info.name, info.state.label());
            }
            Ok(0)
        }
        Command::Debug(DebugCommand::Monitor { name, vm, command }) => {
            let (lab, _) = lab::load_lab(&name)?;
            println!(
                "{}",
                lab::monitor_command(lab.vm(&vm)?, &command.join(" "))?
            );
            Ok(0)
        }
    }
}

fn directory_command(cmd: DirectoryCommand) -> Result<i32> {
    match cmd {
        DirectoryCommand::Serve { lab, listen } => {
            netns::require_root_and_ip()?;
            let (state, dir) = lab::load_lab(&lab)?;
            // Always inside the lab namespace, wherever it was started from:
            // the bridge address exists only there.
            let _inside = NetnsGuard::enter(&state.netns)?;
            let addr = listen.unwrap_or_else(|| lab::directory_addr(&state));
            directory::serve(&dir, addr, directory::DNS_ZONE, state.capsule_range)?;
            Ok(0)
        }
        DirectoryCommand::Start { lab } => {
            netns::require_root_and_ip()?;
            let (mut state, dir) = lab::load_lab(&lab)?;
            let _lock = directory::lock(&dir)?;
            lab::start_directory(&mut state, &dir)?;
            println!(
                "directory of lab '{lab}' serves DNS on {} (pid {})",
                lab::directory_addr(&state),
                state.directory_pid.unwrap_or_default()
            );
            Ok(0)
        }
        DirectoryCommand::Stop { lab } => {
            netns::require_root_and_ip()?;
            let (mut state, dir) = lab::load_lab(&lab)?;
            lab::stop_directory(&mut state, &dir)?;
            println!(
                "directory of lab '{lab}' stopped (its map stays in {})",
                dir.display()
            );
            Ok(0)
        }
        DirectoryCommand::Status { lab, json } => {
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
                println!("{}", serde_json::to_string_pretty(&report)?);
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
            name,
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
            (name.as_str(), vms, mem, accel, kernel),
            ("default", 2, 256, AccelChoice::Auto, None)
        );
        let Command::Lab(LabCommand::Up {
            name, vms, accel, ..
        }) = parse(&["lab", "up", "--name", "x", "--vms", "3", "--accel", "tcg"])
            .unwrap()
            .command
        else {
            panic!("not lab up");
        };
        assert_eq!((name.as_str(), vms, accel), ("x", 3, AccelChoice::Tcg));
    }

    #[test]
    fn exec_takes_everything_after_double_dash() {
        let Command::Lab(LabCommand::Exec { name, command }) =
            parse(&["lab", "exec", "--", "ping", "-c1", "192.0.2.11"])
                .unwrap()
                .command
        else {
            panic!("not lab exec");
        };
        assert_eq!(name, "default");
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
                lab.as_str()
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
}
