//! Finishing or rolling back what a dead process left half done.
//!
//! A move, suspend or resume writes an intent into the capsule's directory
//! record first (`crate::journal`). If its process dies — killed, or its
//! machine gone — the intent stays. `recover` then asks every VM of the lab
//! which copies of the capsule it holds, at which epoch and in which state,
//! and decides from that alone ([`decide`], a pure function, unit-tested
//! below for every case):
//!
//! - a copy runs at the intent's new epoch: the move took effect; finish it
//!   (the source forwards what it held, older copies are fenced);
//! - a copy at the new epoch that is not running (it ran, then exited or
//!   faulted: the kernel keeps ended copies' records) took effect too: it
//!   may have served clients, so the source's frozen copy is out of date:
//!   recorded on that VM, the source fenced, never thawed;
//! - the copy runs where it was: nothing moved; just clear the intent;
//! - the copy is frozen where it was, and the destination answered (so it
//!   has dropped any restore: the abort is ordered after a pending commit)
//!   or is dead: thaw it there at a new epoch and fence everyone else;
//! - no copy anywhere, and the VM that held it is dead: the capsule is lost,
//!   and the directory says so;
//! - the commit was sent (the intent is at `commit-sent`) and the
//!   destination is dead — or runs another boot than the one the commit
//!   went to (the intent records its QEMU pid): lost too — the destination may have run the
//!   capsule, so the source's frozen copy is out of date; it is fenced, never
//!   thawed;
//! - a VM that matters is alive but silent: nothing is decided; try again.
//!
//! Whatever it decides, no VM is ever told to run a copy while another copy
//! might run: a thaw or commit happens only once every other VM that could
//! hold the capsule has answered or is dead.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use capsules_wire::control::{CapsuleInfo, CapsuleState, ErrorCode, Request, Response};
use serde::Serialize;

use crate::control::Transport;
use crate::directory::{CapsuleRecord, DirectoryMap};
use crate::journal::{Intent, IntentKind, Outcome, Phase};
use crate::state::VmRecord;

/// A control connection to one VM, as an [`Env`] opens it.
pub type Conn = Box<dyn Transport>;

/// What a move and its recovery need from the lab: its VMs (to connect to,
/// and to know whether their QEMU still runs), and the directory and
/// journal (to write intents and outcomes). The real one is
/// `crate::capsules::LabSession`; unit tests use a fake lab
/// (`crate::migrate::fake`).
pub trait Env {
    /// The lab's name, for messages.
    fn lab_name(&self) -> &str;
    /// Every VM of the lab.
    fn vms(&self) -> &[VmRecord];
    /// Opens a control connection to `vm`.
    fn connect(&self, vm: &VmRecord) -> Result<Conn>;
    /// Whether `vm`'s QEMU still runs (a dead VM holds nothing, and is not
    /// worth a connection attempt).
    fn is_alive(&self, vm: &VmRecord) -> bool;
    /// Saves the directory map (atomically, fsync'd).
    fn save_map(&self, map: &DirectoryMap) -> Result<()>;
    /// Appends an intent to the journal.
    fn log_intent(&self, capsule: &str, intent: &Intent) -> Result<()>;
    /// Appends an outcome to the journal.
    fn log_outcome(&self, capsule: &str, outcome: &Outcome, by: &str) -> Result<()>;

    /// A move committed: the capsule at `locator` runs on `vm` at `epoch`
    /// from now on. Routed labs tell their router at once (the directory's
    /// record follows later); others have nothing to do.
    fn committed(&self, _locator: std::net::Ipv4Addr, _vm: &VmRecord, _epoch: u64) {}

    /// The VM called `name`.
    fn vm(&self, name: &str) -> Result<&VmRecord> {
        self.vms()
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| anyhow::anyhow!("unknown VM '{name}' in lab '{}'", self.lab_name()))
    }
}

/// One copy of a capsule as a VM reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub state: CapsuleState,
    pub epoch: u64,
}

/// What one VM said about the capsule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmView {
    /// It answered; its copies of the capsule (usually none or one).
    Answered(Vec<Copy>),
    /// Its QEMU process is gone: it holds nothing and never will.
    Dead,
    /// Alive (or unknown) but it did not answer.
    Silent,
}

/// What to do about an open intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The new copy runs on `vm` at `epoch`: record it there. `release_from`
    /// still holds the frozen source copy, whose held packets go to `vm`.
    Complete {
        vm: String,
        epoch: u64,
        release_from: Option<String>,
    },
    /// The new copy took the commit on `vm` at `epoch` (so it may have
    /// served clients), and has ended there since (exited, faulted,
    /// killed) or is in `state` otherwise not running. The operation took
    /// effect: record it there, as any capsule that ended; the source's
    /// frozen copy is out of date (released from `release_from`, fenced
    /// everywhere), never thawed.
    Ended {
        vm: String,
        epoch: u64,
        state: CapsuleState,
        release_from: Option<String>,
    },
    /// The copy runs on `vm` at `epoch`, where it was: nothing moved.
    Keep { vm: String, epoch: u64 },
    /// Thaw the frozen copy on `vm` at `epoch` (above every epoch the
    /// interrupted operation could have given out).
    Thaw { vm: String, epoch: u64 },
    /// A suspend finished its file and ended the copy on its VM; only the
    /// directory was not told.
    Suspended,
    /// A resume that never started the capsule: drop the record.
    Abandon,
    /// No copy survived.
    Lost { why: String },
    /// Not decidable now (a VM that may hold a copy does not answer).
    Undecided { why: String },
}

/// Decides from the VMs' views alone. `suspend_file_epoch` is the epoch of
/// a suspend's image file when that file exists and verifies.
pub fn decide(
    intent: &Intent,
    views: &BTreeMap<String, VmView>,
    suspend_file_epoch: Option<u64>,
) -> Decision {
    let copies = |vm: &str| match views.get(vm) {
        Some(VmView::Answered(c)) => Some(c.as_slice()),
        _ => None,
    };
    let silent: Vec<&str> = views
        .iter()
        .filter(|(_, v)| **v == VmView::Silent)
        .map(|(n, _)| n.as_str())
        .collect();
    // 1. A running copy at (or past) the new epoch: the operation took effect.
    let newest_running = views
        .iter()
        .filter_map(|(vm, v)| match v {
            VmView::Answered(c) => c
                .iter()
                .filter(|c| c.state == CapsuleState::Running && c.epoch >= intent.next_epoch)
                .map(|c| (c.epoch, vm.clone()))
                .max(),
            _ => None,
        })
        .max();
    let release_from = |vm: &str| {
        intent.from.clone().filter(|from| {
            from != vm
                && copies(from).is_some_and(|c| c.iter().any(|c| c.state == CapsuleState::Frozen))
        })
    };
    if let Some((epoch, vm)) = newest_running {
        let release_from = release_from(&vm);
        return Decision::Complete {
            vm,
            epoch,
            release_from,
        };
    }
    // 1b. A copy in any other state at (or past) the new epoch: the commit
    // took (a kernel lists no staged restore, only committed copies), the
    // capsule may have served clients there before it ended. The frozen
    // source is out of date whatever happened since.
    let newest_other = views
        .iter()
        .filter_map(|(vm, v)| match v {
            VmView::Answered(c) => c
                .iter()
                .filter(|c| c.epoch >= intent.next_epoch)
                .map(|c| (c.epoch, vm.clone(), c.state.clone()))
                .max_by_key(|(epoch, _, _)| *epoch),
            _ => None,
        })
        .max_by_key(|(epoch, _, _)| *epoch);
    if let Some((epoch, vm, state)) = newest_other {
        let release_from = release_from(&vm);
        return Decision::Ended {
            vm,
            epoch,
            state,
            release_from,
        };
    }
    let Some(from) = intent.from.as_deref() else {
        // A resume: its only copy would be the one at the new epoch.
        return match intent.to.as_deref().map(|to| views.get(to)) {
            Some(Some(VmView::Silent)) => Decision::Undecided {
                why: format!(
                    "{} does not answer: it may be starting the capsule",
                    intent.to.as_deref().unwrap_or("?")
                ),
            },
            _ => Decision::Abandon,
        };
    };
    // 2. The copy still runs where it was.
    if let Some(c) = copies(from).and_then(|c| c.iter().find(|c| c.state == CapsuleState::Running))
    {
        return Decision::Keep {
            vm: from.to_string(),
            epoch: c.epoch,
        };
    }
    // The commit went out and the destination died: it may have run the
    // capsule and answered its clients, so the frozen source copy is out of
    // date and must never run. Nothing current survived.
    if intent.phase == Phase::CommitSent
        && let Some(to) = intent.to.as_deref()
        && views.get(to) == Some(&VmView::Dead)
    {
        return Decision::Lost {
            why: format!(
                "{to} died (or was restarted) after the commit was sent to it (it may have run the capsule, so \
                 the frozen copy on {from} is out of date)"
            ),
        };
    }
    // Whoever is silent might run a new copy, or be about to: wait for them.
    if !silent.is_empty() {
        return Decision::Undecided {
            why: format!(
                "{} {} not answer, and may hold a copy",
                silent.join(", "),
                if silent.len() == 1 { "does" } else { "do" }
            ),
        };
    }
    // Past every epoch the operation could have handed out.
    let thaw_epoch = intent.next_epoch + 1;
    // 3. The copy is frozen where it was.
    // (For a suspend too: its file holds the same copy, which is stale once
    // the thaw gives out a newer epoch.)
    if copies(from).is_some_and(|c| c.iter().any(|c| c.state == CapsuleState::Frozen)) {
        return Decision::Thaw {
            vm: from.to_string(),
            epoch: thaw_epoch,
        };
    }
    // 4. No copy where it was.
    if intent.kind == IntentKind::Suspend && suspend_file_epoch == Some(intent.epoch) {
        return Decision::Suspended;
    }
    match views.get(from) {
        Some(VmView::Dead) => Decision::Lost {
            why: format!("{from} died holding the only copy"),
        },
        _ => Decision::Lost {
            why: format!("no VM holds a copy (not even {from})"),
        },
    }
}

/// What `recover` did for one capsule.
#[derive(Debug, Clone, Serialize)]
pub struct Recovered {
    pub name: String,
    pub intent: String,
    /// "moved", "kept", "rolled back", "suspended", "abandoned", "lost".
    pub outcome: String,
    pub vm: Option<String>,
    pub epoch: Option<u64>,
}

/// What one VM holds of `name`; a RestoreAbort goes first on `to`, so that a
/// commit still queued there has taken effect, or never will, before it is
/// asked (its control service handles requests in order).
fn view(s: &dyn Env, vm: &str, name: &str, abort_first: bool) -> VmView {
    let Ok(rec) = s.vm(vm) else {
        return VmView::Dead;
    };
    if !s.is_alive(rec) {
        return VmView::Dead;
    }
    let answer = s.connect(rec).and_then(|mut c| {
        if abort_first {
            c.call(&Request::RestoreAbort { name: name.into() })?;
        }
        c.call(&Request::ListCapsules)
    });
    match answer {
        Ok(Response::Capsules(list)) => VmView::Answered(copies_of(&list, name)),
        _ if !s.is_alive(rec) => VmView::Dead,
        _ => VmView::Silent,
    }
}

fn copies_of(list: &[CapsuleInfo], name: &str) -> Vec<Copy> {
    list.iter()
        .filter(|i| i.name == name)
        .map(|i| Copy {
            state: i.state.clone(),
            epoch: i.epoch,
        })
        .collect()
}

/// Every VM's view of `name`.
pub fn views(s: &dyn Env, name: &str, abort_on: Option<&str>) -> BTreeMap<String, VmView> {
    s.vms()
        .iter()
        .map(|vm| {
            let abort = abort_on == Some(vm.name.as_str());
            (vm.name.clone(), view(s, &vm.name, name, abort))
        })
        .collect()
}

/// Every VM's view of `name` for `intent`: [`views`], with the restore at
/// its destination aborted first, and the destination taken as dead when
/// it runs another boot than the one the commit was sent to (restarted
/// since: whatever that boot ran is gone).
pub fn views_of(s: &dyn Env, name: &str, intent: &Intent) -> BTreeMap<String, VmView> {
    let mut views = views(s, name, intent.to.as_deref());
    rebooted_is_dead(s, intent, &mut views);
    views
}

/// Takes the destination as dead when it runs another boot than the one
/// the intent's commit was sent to.
fn rebooted_is_dead(s: &dyn Env, intent: &Intent, views: &mut BTreeMap<String, VmView>) {
    if let (Some(to), Some(boot)) = (intent.to.as_deref(), intent.to_boot)
        && s.vm(to).is_ok_and(|vm| vm.pid != Some(boot))
    {
        views.insert(to.to_string(), VmView::Dead);
    }
}

/// The epoch of a suspend's image file, when it exists and verifies.
fn file_epoch(intent: &Intent) -> Option<u64> {
    intent.file.as_deref().and_then(|f| {
        crate::migrate::load_image_file(f)
            .ok()
            .map(|(_, image)| image.epoch)
    })
}

/// Capsules whose open intent names `vm`, as source or destination.
pub fn intents_naming(map: &DirectoryMap, vm: &str) -> Vec<String> {
    map.capsules
        .values()
        .filter(|r| {
            r.intent
                .as_ref()
                .is_some_and(|i| i.from.as_deref() == Some(vm) || i.to.as_deref() == Some(vm))
        })
        .map(|r| r.name.clone())
        .collect()
}

/// Checks, before `vm` is stopped for a reboot, that every open intent
/// naming it can be decided once it is dead: asks the other VMs what they
/// hold (and sends nothing that changes anything). An error names the
/// first intent that would stay open.
pub fn decidable_without(s: &dyn Env, map: &DirectoryMap, vm: &str) -> Result<()> {
    for name in intents_naming(map, vm) {
        let Some(intent) = map.get(&name).and_then(|r| r.intent.clone()) else {
            continue;
        };
        let mut v = views(s, &name, None);
        rebooted_is_dead(s, &intent, &mut v);
        v.insert(vm.to_string(), VmView::Dead);
        if let Decision::Undecided { why } = decide(&intent, &v, file_epoch(&intent)) {
            bail!(
                "'{name}' has an open {} that cannot be finished or undone even with {vm} \
                 gone: {why}",
                intent.describe()
            );
        }
    }
    Ok(())
}

/// Settles every open intent naming `vm`, whose QEMU is gone now (stopped
/// for a reboot): once booted again it would answer with no copy, which
/// must not pass for "the commit never took". Fails on the first intent
/// that stays open.
pub fn settle_intents_naming(
    s: &dyn Env,
    map: &mut DirectoryMap,
    vm: &str,
) -> Result<Vec<Recovered>> {
    let mut done = Vec::new();
    for name in intents_naming(map, vm) {
        let r = recover_one(s, map, &name)?;
        announce(&r);
        done.push(r);
    }
    Ok(done)
}

fn announce(r: &Recovered) {
    eprintln!(
        "capsulectl: recovered '{}' from an interrupted {}: {}{}",
        r.name,
        r.intent,
        r.outcome,
        r.vm.as_deref()
            .map(|vm| format!(" on {vm}"))
            .unwrap_or_default()
    );
}

/// Tells every answering VM but `keep` that epoch `epoch` of `name` is the
/// committed one (older copies end there), and lets them send what they
/// held for the locator. Best effort: a VM that does not answer learns it
/// at its next fence, and refuses nothing it should not meanwhile. Dead VMs
/// are skipped (a connection attempt would only wait for its timeout).
pub fn fence_others(s: &dyn Env, name: &str, locator: Ipv4Addr, epoch: u64, keep: Option<&str>) {
    for vm in s.vms().iter().filter(|vm| s.is_alive(vm)) {
        let _ = s.connect(vm).and_then(|mut c| {
            if Some(vm.name.as_str()) != keep {
                c.call(&Request::Fence {
                    name: name.into(),
                    epoch,
                })?;
            }
            c.call(&Request::ReleaseTraffic { locator })
        });
    }
}

/// Finishes or rolls back the open intent of `name` (the caller holds the
/// directory lock and passes the map it loaded under it). Saves the map.
pub fn recover_one(s: &dyn Env, map: &mut DirectoryMap, name: &str) -> Result<Recovered> {
    let Some(rec) = map.get(name).cloned() else {
        bail!("no capsule named '{name}' in lab '{}'", s.lab_name());
    };
    let Some(intent) = rec.intent.clone() else {
        return Ok(Recovered {
            name: rec.name.clone(),
            intent: "none".into(),
            outcome: "nothing to do".into(),
            vm: Some(rec.vm.clone()),
            epoch: Some(rec.epoch),
        });
    };
    let views = views_of(s, name, &intent);
    let decision = decide(&intent, &views, file_epoch(&intent));
    apply(s, map, &rec, &intent, decision, "recover")
}

/// Asks `from` to release its frozen copy of `name`, forwarding what it
/// held to `to`. Best effort: a copy not released is fenced next. A dead
/// `from` is skipped with a warning (it holds nothing; a connection attempt
/// would only wait for its timeout).
fn release(s: &dyn Env, name: &str, from: &str, to: &str) {
    let (Ok(to_ip), Ok(f)) = (s.vm(to).map(|v| v.ip), s.vm(from)) else {
        return;
    };
    if !s.is_alive(f) {
        eprintln!(
            "capsulectl: warning: {from} died before it released '{name}': what it held for \
             the capsule is lost with it"
        );
        return;
    }
    let _ = s.connect(f).and_then(|mut c| {
        c.call(&Request::ReleaseCapsule {
            name: name.into(),
            forward_to: to_ip,
        })
    });
}

/// Carries out a decision and records its outcome.
pub fn apply(
    s: &dyn Env,
    map: &mut DirectoryMap,
    rec: &CapsuleRecord,
    intent: &Intent,
    decision: Decision,
    by: &str,
) -> Result<Recovered> {
    let name = rec.name.as_str();
    let report = |outcome: &str, vm: Option<&str>, epoch: Option<u64>| Recovered {
        name: name.to_string(),
        intent: intent.describe(),
        outcome: outcome.to_string(),
        vm: vm.map(str::to_string),
        epoch,
    };
    let (outcome, result) = match decision {
        Decision::Undecided { why } => {
            bail!(
                "cannot finish or roll back '{name}' ({}) yet: {why}; the capsule stays as it is, \
                 try `capsulectl recover {name} --lab {}` again",
                intent.describe(),
                s.lab_name()
            )
        }
        Decision::Complete {
            vm,
            epoch,
            release_from,
        } => {
            if let Some(from) = &release_from {
                release(s, name, from, &vm);
            }
            fence_others(s, name, rec.locator, epoch, Some(&vm));
            let r = map.get_mut(name).expect("record exists");
            r.vm = vm.clone();
            r.epoch = epoch;
            r.intent = None;
            r.lost = None;
            (
                Outcome::Moved {
                    vm: vm.clone(),
                    epoch,
                },
                report("moved", Some(&vm), Some(epoch)),
            )
        }
        Decision::Ended {
            vm,
            epoch,
            state,
            release_from,
        } => {
            // The frozen source lets go (its held packets go to where the
            // capsule was last); everyone but `vm` is fenced at `epoch`,
            // which ends the stale source copy and keeps the ended one on
            // `vm` (its state and log stay visible in `ps` and `logs`).
            if let Some(from) = &release_from {
                release(s, name, from, &vm);
            }
            fence_others(s, name, rec.locator, epoch, Some(&vm));
            eprintln!(
                "capsulectl: '{name}' moved to {vm} (epoch {epoch}) and has {} there since; \
                 the out-of-date copy on {} is not thawed",
                match &state {
                    CapsuleState::Faulted { reason } => format!("faulted ({reason})"),
                    other => other.label().to_string(),
                },
                intent.from.as_deref().unwrap_or("the source")
            );
            let r = map.get_mut(name).expect("record exists");
            r.vm = vm.clone();
            r.epoch = epoch;
            r.intent = None;
            r.lost = None;
            (
                Outcome::Moved {
                    vm: vm.clone(),
                    epoch,
                },
                report(
                    &format!("moved, then {}", state.label()),
                    Some(&vm),
                    Some(epoch),
                ),
            )
        }
        Decision::Keep { vm, epoch } => {
            // A restore left at the destination is dropped by the abort
            // `views` sent; the others let go of what they held.
            fence_others(s, name, rec.locator, epoch, Some(&vm));
            let r = map.get_mut(name).expect("record exists");
            r.vm = vm.clone();
            r.epoch = epoch;
            r.intent = None;
            (
                Outcome::RolledBack {
                    vm: vm.clone(),
                    epoch,
                },
                report("kept", Some(&vm), Some(epoch)),
            )
        }
        Decision::Thaw { vm, epoch } => {
            let target = s.vm(&vm)?;
            match s.connect(target)?.call(&Request::ThawCapsule {
                name: name.into(),
                epoch,
            })? {
                Response::Done => {}
                Response::Error { code, message } => bail!(
                    "{vm} refused to thaw '{name}': {message} ({}); the intent stays",
                    code.as_str()
                ),
                other => bail!("unexpected answer to ThawCapsule from {vm}: {other:?}"),
            }
            fence_others(s, name, rec.locator, epoch, Some(&vm));
            let r = map.get_mut(name).expect("record exists");
            r.vm = vm.clone();
            r.epoch = epoch;
            r.intent = None;
            (
                Outcome::RolledBack {
                    vm: vm.clone(),
                    epoch,
                },
                report("rolled back", Some(&vm), Some(epoch)),
            )
        }
        Decision::Suspended => {
            let file = intent.file.clone().unwrap_or_default();
            fence_others(s, name, rec.locator, intent.epoch, None);
            map.remove(name);
            (
                Outcome::Suspended { file },
                report("suspended", None, Some(intent.epoch)),
            )
        }
        Decision::Abandon => {
            // Above the epoch the resume would have started it at, so a
            // commit still on its way anywhere is refused.
            let past = intent.next_epoch + 1;
            fence_others(s, name, rec.locator, past, None);
            map.remove(name);
            map.note_epoch(name, past);
            (Outcome::Abandoned, report("abandoned", None, None))
        }
        Decision::Lost { why } => {
            // Past anything that might still surface (a VM restarted with a
            // copy from an older image, say). A frozen copy left behind (the
            // source of a move whose commit went out) is fenced there too: it
            // is out of date and must never run.
            fence_others(s, name, rec.locator, intent.next_epoch + 1, None);
            map.note_epoch(name, intent.next_epoch + 1);
            let r = map.get_mut(name).expect("record exists");
            r.intent = None;
            r.lost = Some(why.clone());
            (
                Outcome::Lost { why: why.clone() },
                report("lost", None, None),
            )
        }
    };
    s.save_map(map)?;
    s.log_outcome(name, &outcome, by)?;
    Ok(result)
}

/// Recovers every capsule with an open intent (or just `only`). The caller
/// holds the directory lock.
pub fn recover_all(
    s: &dyn Env,
    map: &mut DirectoryMap,
    only: Option<&str>,
) -> Result<Vec<Recovered>> {
    let open: Vec<String> = map
        .capsules
        .values()
        .filter(|r| r.intent.is_some())
        .filter(|r| only.is_none_or(|n| n == r.name))
        .map(|r| r.name.clone())
        .collect();
    let mut done = Vec::new();
    for name in open {
        let r = recover_one(s, map, &name)?;
        announce(&r);
        done.push(r);
    }
    Ok(done)
}

/// Whether an error answer means the copy is stale there.
pub fn is_stale(resp: &Response) -> bool {
    matches!(
        resp,
        Response::Error {
            code: ErrorCode::Stale,
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent(kind: IntentKind, from: Option<&str>, to: Option<&str>) -> Intent {
        Intent::new(kind, from, to, 3)
    }

    fn answered(copies: &[(CapsuleState, u64)]) -> VmView {
        VmView::Answered(
            copies
                .iter()
                .map(|(state, epoch)| Copy {
                    state: state.clone(),
                    epoch: *epoch,
                })
                .collect(),
        )
    }

    fn views(list: &[(&str, VmView)]) -> BTreeMap<String, VmView> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect()
    }

    use CapsuleState::{Frozen, Running};

    #[test]
    fn a_committed_move_is_finished_and_the_frozen_source_released() {
        let i = intent(IntentKind::Move, Some("vm1"), Some("vm2"));
        let v = views(&[
            ("vm1", answered(&[(Frozen, 3)])),
            ("vm2", answered(&[(Running, 4)])),
        ]);
        assert_eq!(
            decide(&i, &v, None),
            Decision::Complete {
                vm: "vm2".into(),
                epoch: 4,
                release_from: Some("vm1".into())
            }
        );
        // Even with the source dead or silent: the new copy runs.
        for from in [VmView::Dead, VmView::Silent] {
            let v = views(&[("vm1", from), ("vm2", answered(&[(Running, 4)]))]);
            assert_eq!(
                decide(&i, &v, None),
                Decision::Complete {
                    vm: "vm2".into(),
                    epoch: 4,
                    release_from: None
                }
            );
        }
    }

    #[test]
    fn a_move_that_never_froze_keeps_the_capsule_where_it_runs() {
        let i = intent(IntentKind::Move, Some("vm1"), Some("vm2"));
        for dst in [answered(&[]), VmView::Dead, VmView::Silent] {
            let v = views(&[("vm1", answered(&[(Running, 3)])), ("vm2", dst)]);
            assert_eq!(
                decide(&i, &v, None),
                Decision::Keep {
                    vm: "vm1".into(),
                    epoch: 3
                }
            );
        }
    }

    #[test]
    fn a_frozen_source_thaws_only_once_the_destination_answered_or_died() {
        let i = intent(IntentKind::Move, Some("vm1"), Some("vm2"));
        for dst in [answered(&[]), VmView::Dead] {
            let v = views(&[("vm1", answered(&[(Frozen, 3)])), ("vm2", dst)]);
            assert_eq!(
                decide(&i, &v, None),
                Decision::Thaw {
                    vm: "vm1".into(),
                    epoch: 5
                }
            );
        }
        let v = views(&[("vm1", answered(&[(Frozen, 3)])), ("vm2", VmView::Silent)]);
        assert!(matches!(decide(&i, &v, None), Decision::Undecided { .. }));
        // A third VM that is silent may hold a copy too.
        let v = views(&[
            ("vm1", answered(&[(Frozen, 3)])),
            ("vm2", answered(&[])),
            ("vm3", VmView::Silent),
        ]);
        assert!(matches!(decide(&i, &v, None), Decision::Undecided { .. }));
    }

    #[test]
    fn a_restored_but_uncommitted_copy_does_not_count() {
        // A staged restore is not listed (the kernel lists committed copies
        // only), so the destination answers with nothing: the source's
        // frozen copy is the one.
        let i = intent(IntentKind::Move, Some("vm1"), Some("vm2"));
        let v = views(&[("vm1", answered(&[(Frozen, 3)])), ("vm2", answered(&[]))]);
        assert_eq!(
            decide(&i, &v, None),
            Decision::Thaw {
                vm: "vm1".into(),
                epoch: 5
            }
        );
    }

    #[test]
    fn a_dead_source_with_no_new_copy_means_the_capsule_is_lost() {
        let i = intent(IntentKind::Move, Some("vm1"), Some("vm2"));
        let v = views(&[("vm1", VmView::Dead), ("vm2", answered(&[]))]);
        assert!(matches!(decide(&i, &v, None), Decision::Lost { why } if why.contains("vm1 died")));
        // Both dead: lost as well.
        let v = views(&[("vm1", VmView::Dead), ("vm2", VmView::Dead)]);
        assert!(matches!(decide(&i, &v, None), Decision::Lost { .. }));
        // Source dead, destination silent: it may have committed.
        let v = views(&[("vm1", VmView::Dead), ("vm2", VmView::Silent)]);
        assert!(matches!(decide(&i, &v, None), Decision::Undecided { .. }));
    }

    #[test]
    fn suspends_roll_back_or_finish() {
        let i = intent(IntentKind::Suspend, Some("vm1"), None);
        let v = views(&[("vm1", answered(&[(Frozen, 3)]))]);
        assert_eq!(
            decide(&i, &v, Some(3)),
            Decision::Thaw {
                vm: "vm1".into(),
                epoch: 5
            }
        );
        // The VM ended the copy after the file was written.
        let v = views(&[("vm1", answered(&[]))]);
        assert_eq!(decide(&i, &v, Some(3)), Decision::Suspended);
        // ... but without that file, nothing holds the capsule.
        assert!(matches!(decide(&i, &v, None), Decision::Lost { .. }));
        let v = views(&[("vm1", answered(&[(Running, 3)]))]);
        assert_eq!(
            decide(&i, &v, Some(3)),
            Decision::Keep {
                vm: "vm1".into(),
                epoch: 3
            }
        );
    }

    #[test]
    fn resumes_complete_or_are_abandoned() {
        let i = intent(IntentKind::Resume, None, Some("vm2"));
        let v = views(&[("vm1", answered(&[])), ("vm2", answered(&[(Running, 4)]))]);
        assert_eq!(
            decide(&i, &v, None),
            Decision::Complete {
                vm: "vm2".into(),
                epoch: 4,
                release_from: None
            }
        );
        for dst in [answered(&[]), VmView::Dead] {
            let v = views(&[("vm2", dst)]);
            assert_eq!(decide(&i, &v, None), Decision::Abandon);
        }
        let v = views(&[("vm2", VmView::Silent)]);
        assert!(matches!(decide(&i, &v, None), Decision::Undecided { .. }));
    }

    #[test]
    fn a_dead_destination_after_commit_sent_means_lost_never_a_thaw() {
        let mut i = intent(IntentKind::Move, Some("vm1"), Some("vm2"));
        i.phase = Phase::CommitSent;
        let v = views(&[("vm1", answered(&[(Frozen, 3)])), ("vm2", VmView::Dead)]);
        assert!(matches!(decide(&i, &v, None), Decision::Lost { why } if why.contains("vm2")));
        // It answered with no copy: the commit never took; thawing is safe.
        let v = views(&[("vm1", answered(&[(Frozen, 3)])), ("vm2", answered(&[]))]);
        assert_eq!(
            decide(&i, &v, None),
            Decision::Thaw {
                vm: "vm1".into(),
                epoch: 5
            }
        );
        // Silent: it may still run it; nothing is decided.
        let v = views(&[("vm1", answered(&[(Frozen, 3)])), ("vm2", VmView::Silent)]);
        assert!(matches!(decide(&i, &v, None), Decision::Undecided { .. }));
        // It runs the new copy: the move completes, dead source or not.
        let v = views(&[("vm1", VmView::Dead), ("vm2", answered(&[(Running, 4)]))]);
        assert!(matches!(decide(&i, &v, None), Decision::Complete { vm, .. } if vm == "vm2"));
    }

    #[test]
    fn a_copy_that_ended_at_the_new_epoch_proves_the_commit_and_the_source_never_thaws() {
        // vm2 took the commit at epoch 4, ran (and served), then faulted or
        // exited; the commit's answer was lost. The kernel keeps the ended
        // copy's record: the move took effect, the frozen source is stale.
        let i = intent(IntentKind::Move, Some("vm1"), Some("vm2"));
        let faulted = CapsuleState::Faulted {
            reason: "page fault".into(),
        };
        for ended in [CapsuleState::Exited, faulted, CapsuleState::Killed] {
            let v = views(&[
                ("vm1", answered(&[(Frozen, 3)])),
                ("vm2", answered(&[(ended.clone(), 4)])),
            ]);
            assert_eq!(
                decide(&i, &v, None),
                Decision::Ended {
                    vm: "vm2".into(),
                    epoch: 4,
                    state: ended.clone(),
                    release_from: Some("vm1".into()),
                },
                "{ended:?}"
            );
        }
        // A running copy at the new epoch still wins over an ended one.
        let v = views(&[
            ("vm1", answered(&[(Frozen, 3)])),
            ("vm2", answered(&[(CapsuleState::Exited, 4)])),
            ("vm3", answered(&[(Running, 4)])),
        ]);
        assert!(matches!(decide(&i, &v, None), Decision::Complete { vm, .. } if vm == "vm3"));
    }

    #[test]
    fn an_old_running_copy_elsewhere_never_wins_over_the_new_epoch() {
        let i = intent(IntentKind::Move, Some("vm1"), Some("vm2"));
        let v = views(&[
            ("vm1", answered(&[(Frozen, 3)])),
            ("vm2", answered(&[(Running, 4)])),
            ("vm3", answered(&[(Running, 2)])),
        ]);
        assert!(matches!(
            decide(&i, &v, None),
            Decision::Complete { vm, epoch: 4, .. } if vm == "vm2"
        ));
    }
}
