//! One VM's life within a lab: `capsulectl vm restart VM` boots a VM again
//! under the same identity (name, address, MAC, tap, control port), after it
//! died or to replace a running one.
//!
//! A VM that dies takes the copies it held with it. Restarting it makes that
//! final in the directory: each capsule recorded there is marked lost (with
//! the reason), unless another VM runs it. A VM that answers and still runs
//! capsules is only restarted with `--force`, since that ends those capsules.
//! Open intents that name the VM are settled once its QEMU is gone, with the
//! VM dead, before it boots again (`crate::recover::settle_intents_naming`).

use std::fs;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use capsules_wire::control::{CapsuleInfo, CapsuleState, Request, Response};
use serde::Serialize;

use crate::capsules::LabSession;
use crate::directory;
use crate::lab;
use crate::netns;
use crate::qemu::{self, Accel};
use crate::recover::Env;
use crate::state::{self, VmRecord};

/// What `vm restart` did.
#[derive(Debug, Clone, Serialize)]
pub struct Restarted {
    pub vm: String,
    /// "dead", "running" or "unreachable": the VM as it was found.
    pub was: String,
    pub pid: u32,
    /// Capsules the directory recorded on this VM that are now lost.
    pub lost: Vec<String>,
    /// Where the previous boot's serial log was kept, for a post-mortem.
    pub previous_serial_log: Option<String>,
    pub boot_ms: f64,
}

/// `capsulectl vm restart VM [--force]`.
pub fn restart(lab_name: &str, vm_name: &str, force: bool) -> Result<Restarted> {
    let s = LabSession::open(lab_name)?;
    let vm = s.vm(vm_name)?.clone();
    let build_id = recorded_kernel(&s.lab, &vm.name)?;
    // Held throughout: no move can pick this VM while it reboots, and open
    // intents are settled first (they may concern copies on this VM).
    let held_before: Vec<String> = s
        .load_map()?
        .capsules
        .values()
        .filter(|r| r.lost.is_none())
        .filter(|r| {
            r.vm == vm.name
                || r.intent.as_ref().is_some_and(|i| {
                    i.from.as_deref() == Some(&vm.name) || i.to.as_deref() == Some(&vm.name)
                })
        })
        .map(|r| r.name.clone())
        .collect();
    let (_lock, mut map) = s.lock_map(None)?;
    let alive = lab::vm_alive(&vm);
    let was = if !alive {
        "dead"
    } else {
        match s.list_capsules(&vm) {
            Ok(running) if !running.is_empty() && !force => bail!(
                "{vm_name} runs {}: move them away first (`capsulectl migrate NAME --to VM`), \
                 or restart with --force to end them; nothing changed",
                describe(&running)
            ),
            Ok(_) => "running",
            Err(_) if !force => bail!(
                "{vm_name} is alive but does not answer; restart it with --force to end whatever \
                 it runs; nothing changed"
            ),
            Err(_) => "unreachable",
        }
    };
    // An open intent that names this VM (left open because the VM hung, say)
    // is settled with the VM dead, before it boots again: a fresh boot
    // answers with no copy, which must not pass for "the commit never took"
    // (the old boot may have run the capsule). If one could not be settled
    // even then, nothing is done.
    crate::recover::decidable_without(&s, &map, &vm.name)
        .with_context(|| format!("{vm_name} is not restarted; nothing changed"))?;
    if alive {
        let stopped = lab::stop_vms(std::slice::from_ref(&vm), &s.key, true)?;
        lab::wait_reaped(stopped.into_iter());
    }
    crate::recover::settle_intents_naming(&s, &mut map, &vm.name).with_context(|| {
        format!(
            "{vm_name} is stopped and not booted again while a move that names it is open: \
             `capsulectl recover --lab {lab_name}` once the other VMs answer, then \
             `capsulectl vm restart {vm_name}`"
        )
    })?;
    // What the VM held is gone for good now: record it, before anything else
    // can run, so that `ps` never shows these capsules as merely missing —
    // or, when another VM runs a copy, point the record there.
    // (A dead VM's capsules were marked when the map was locked.)
    let why = restart_reason(&vm.name, was, force);
    settle_records_on_dead_vms(&s, &mut map, &|rec| {
        if rec.vm == vm.name {
            why.clone()
        } else {
            format!("{} died holding the only copy", rec.vm)
        }
    })?;
    let lost = held_before
        .into_iter()
        .filter(|n| map.get(n).is_some_and(|r| r.lost.is_some()))
        .collect();
    debug_assert!(crate::recover::intents_naming(&map, &vm.name).is_empty());
    let previous_serial_log = keep_previous_log(&vm)?;
    let (pid, boot) = boot(&s, &vm, &build_id)?;
    Ok(Restarted {
        vm: vm.name,
        was: was.into(),
        pid,
        lost,
        previous_serial_log,
        boot_ms: boot.as_secs_f64() * 1000.0,
    })
}

fn describe(running: &[CapsuleInfo]) -> String {
    let names: Vec<&str> = running.iter().map(|c| c.name.as_str()).collect();
    format!(
        "{} capsule{} ({})",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        names.join(", ")
    )
}

/// The build id `vm` must boot with: the one the lab recorded for its
/// kernel at `lab up`. A kernel file rebuilt since would make a lab of mixed
/// builds (moves between them are refused), so it is an error, found before
/// anything changes.
fn recorded_kernel(lab: &state::LabState, vm: &str) -> Result<Vec<u8>> {
    let (kernel, recorded) = lab.kernel_of(vm);
    let now = crate::elf::read_build_id(kernel)?;
    let now_hex = capsules_wire::bootcfg::encode_hex(&now);
    if now_hex != recorded {
        bail!(
            "{} now has build id {now_hex}, but lab '{}' was brought up with build {recorded}: \
             {vm} would boot another build than the other VMs (and moves between them are \
             refused). Put the lab's kernel back, or bring the lab down and up again with the \
             new one; nothing changed",
            kernel.display(),
            lab.name
        );
    }
    Ok(now)
}

/// Why the copies a restarted VM held are lost, from how it was found:
/// `was` is "dead", "running" or "unreachable" (see [`Restarted::was`]).
fn restart_reason(vm: &str, was: &str, force: bool) -> String {
    match (was, force) {
        ("dead", _) => format!("{vm} died holding the only copy"),
        ("running", true) => format!("{vm} was restarted with --force, ending the only copy"),
        // It answered and listed no capsule: the copy was gone already.
        ("running", false) => {
            format!("{vm} was restarted; it no longer held the copy, and no other VM runs one")
        }
        _ => {
            format!("{vm} was restarted with --force while it did not answer, ending the only copy")
        }
    }
}

/// Running copies of capsules on the live VMs of the lab, as (capsule, VM,
/// epoch). Dead VMs are not asked (they hold nothing; a connection attempt
/// would only wait for its timeout), nor are silent ones counted.
fn running_copies(s: &dyn Env) -> Vec<(String, String, u64)> {
    s.vms()
        .iter()
        .filter(|vm| s.is_alive(vm))
        .filter_map(
            |vm| match s.connect(vm).ok()?.call(&Request::ListCapsules) {
                Ok(Response::Capsules(list)) => Some((vm.name.clone(), list)),
                _ => None,
            },
        )
        .flat_map(|(vm, list)| {
            list.into_iter()
                .filter(|c| c.state == CapsuleState::Running)
                .map(move |c| (c.name, vm.clone(), c.epoch))
        })
        .collect()
}

/// Moves the last boot's serial log aside (`vmN.serial.log.previous`).
fn keep_previous_log(vm: &VmRecord) -> Result<Option<String>> {
    if !vm.serial_log.exists() {
        return Ok(None);
    }
    let mut name = vm.serial_log.file_name().unwrap_or_default().to_os_string();
    name.push(".previous");
    let kept = vm.serial_log.with_file_name(name);
    fs::rename(&vm.serial_log, &kept)
        .with_context(|| format!("cannot keep {}", vm.serial_log.display()))?;
    Ok(Some(kept.display().to_string()))
}

/// Boots `vm` again and waits until its control service answers with the
/// expected build. Returns its pid and how long the boot took.
fn boot(s: &LabSession, vm: &VmRecord, build_id: &[u8]) -> Result<(u32, Duration)> {
    let started = std::time::Instant::now();
    let accel = Accel::parse(&s.lab.accel)
        .ok_or_else(|| anyhow!("lab state names an unknown accelerator '{}'", s.lab.accel))?;
    let key_file = state::write_key_file(&s.dir, &s.key)?;
    // The session runs inside the lab namespace, where the VM's tap is.
    debug_assert!(netns::exists(&s.lab.netns));
    let mut child = {
        // A VM of another subnet (routed labs) has its tap in that subnet's
        // namespace.
        let _there = vm
            .netns
            .as_deref()
            .map(crate::netns::NetnsGuard::enter)
            .transpose()?;
        qemu::spawn_detached(&lab::vm_spec(&s.lab, vm, &key_file, accel), &vm.qemu_log)?
    };
    let pid = child.id();
    // Saved at once, so `lab down` stops it whatever happens next.
    let (mut current, dir) = lab::load_lab(&s.lab.name)?;
    current.vm_mut(&vm.name)?.pid = Some(pid);
    state::save(&dir, &current)?;
    let mut only = current.clone();
    only.vms.retain(|v| v.name == vm.name);
    lab::wait_ready(
        &only,
        std::slice::from_mut(&mut child),
        &s.key,
        build_id,
        lab::READY_TIMEOUT,
    )?;
    Ok((pid, started.elapsed()))
}

/// Settles every capsule whose recorded VM is dead (its QEMU process is
/// gone, so no copy is left there), and saves the map if anything changed.
/// When a live VM runs a copy at the record's epoch or later, the record
/// points there (the newest) and every other VM is fenced at its epoch;
/// else the capsule is marked lost ("VM died holding the only copy").
/// Records with an open intent are left to `recover`, which decides them
/// from every VM's view. Returns what it did, in `recover`'s terms.
pub fn mark_lost_on_dead_vms(
    s: &dyn Env,
    map: &mut directory::DirectoryMap,
) -> Result<Vec<crate::recover::Recovered>> {
    settle_records_on_dead_vms(s, map, &|rec| {
        format!("{} died holding the only copy", rec.vm)
    })
}

/// [`mark_lost_on_dead_vms`], with `why` saying why a record's copy is lost.
fn settle_records_on_dead_vms(
    s: &dyn Env,
    map: &mut directory::DirectoryMap,
    why: &dyn Fn(&directory::CapsuleRecord) -> String,
) -> Result<Vec<crate::recover::Recovered>> {
    let dead: Vec<&str> = s
        .vms()
        .iter()
        .filter(|vm| !s.is_alive(vm))
        .map(|vm| vm.name.as_str())
        .collect();
    let orphaned: Vec<String> = map
        .capsules
        .values()
        .filter(|rec| rec.lost.is_none() && rec.intent.is_none() && dead.contains(&rec.vm.as_str()))
        .map(|rec| rec.name.clone())
        .collect();
    if orphaned.is_empty() {
        return Ok(Vec::new());
    }
    let running = running_copies(s);
    let mut done = Vec::new();
    for name in orphaned {
        let rec = map.get_mut(&name).expect("listed above");
        let newest = running
            .iter()
            .filter(|(n, _, epoch)| *n == name && *epoch >= rec.epoch)
            .max_by_key(|(_, _, epoch)| *epoch);
        if let Some((_, vm, epoch)) = newest {
            eprintln!(
                "capsulectl: '{name}' runs on {vm} (epoch {epoch}), not on {} (dead): the \
                 directory names {vm} now",
                rec.vm
            );
            rec.vm = vm.clone();
            rec.epoch = *epoch;
            let locator = rec.locator;
            crate::recover::fence_others(s, &name, locator, *epoch, Some(vm));
            done.push(crate::recover::Recovered {
                name,
                intent: "none".into(),
                outcome: "found running".into(),
                vm: Some(vm.clone()),
                epoch: Some(*epoch),
            });
        } else {
            let why = why(rec);
            eprintln!("capsulectl: '{name}' is lost: {why}");
            rec.lost = Some(why);
            done.push(crate::recover::Recovered {
                name,
                intent: "none".into(),
                outcome: "lost".into(),
                vm: None,
                epoch: Some(rec.epoch),
            });
        }
    }
    s.save_map(map)?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_boots_only_the_build_the_lab_was_brought_up_with() {
        let dir = std::env::temp_dir().join(format!("capsules-vm-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("capsules-kernel");
        let notes = crate::elf::tests::note(b"GNU\0", 3, &[0xab, 0xcd]);
        fs::write(&kernel, crate::elf::tests::synthetic_elf(&notes, true)).unwrap();
        let mut lab = crate::state::tests::sample_state(&dir);
        lab.kernel = kernel.clone();
        lab.kernel_build_id = "abcd".into();
        assert_eq!(recorded_kernel(&lab, "vm1").unwrap(), [0xab, 0xcd]);
        // Rebuilt since `lab up`: refused.
        lab.kernel_build_id = "1234".into();
        let e = recorded_kernel(&lab, "vm1").unwrap_err();
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            format!("{e:#}").contains("brought up with build 1234"),
            "{e:#}"
        );
    }

    #[test]
    fn the_reason_a_restart_gives_says_what_happened() {
        let r = restart_reason("vm2", "running", false);
        assert!(
            !r.contains("--force") && r.contains("no longer held"),
            "{r}"
        );
        let r = restart_reason("vm2", "running", true);
        assert!(
            r.contains("--force") && r.contains("ending the only copy"),
            "{r}"
        );
        let r = restart_reason("vm2", "unreachable", true);
        assert!(r.contains("did not answer"), "{r}");
        assert_eq!(
            restart_reason("vm2", "dead", false),
            "vm2 died holding the only copy"
        );
    }
}
