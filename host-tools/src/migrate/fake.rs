//! A fake lab for the move's unit tests: VMs that speak enough of the
//! control protocol (in memory, no QEMU) for a whole move, with faults on
//! demand — a request refused, its answer lost, a VM that dies or falls
//! silent when a request arrives — and a directory and journal in memory.
//! The tests below run every stage of [`super::Move`] and every stage's
//! failure against it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow, bail};
use capsules_wire::control::{CapsuleInfo, CapsuleState, ErrorCode, PageBatch, Request, Response};

use crate::control::Transport;
use crate::directory::{CapsuleRange, CapsuleRecord, DirectoryMap};
use crate::journal::{Intent, Outcome};
use crate::recover::{Conn, Env};
use crate::state::VmRecord;

/// How a VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    /// Its QEMU is gone.
    Dead,
    /// Alive, but nothing it sends arrives.
    Silent,
}

/// What happens when a VM gets the `nth` request (counted from 0) of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answered with an error; nothing done.
    Refuse,
    /// Done, but the answer never arrives.
    LoseAnswer,
    /// The VM dies before it reads the request.
    DieBefore,
    /// The VM falls silent before it reads the request.
    SilentBefore,
    /// The VM carries the request out, then falls silent: its answer and
    /// everything after it are lost.
    SilentAfter,
}

/// A copy of a capsule on a fake VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeCopy {
    pub state: CapsuleState,
    pub epoch: u64,
}

#[derive(Debug, Clone)]
pub struct FakeVm {
    pub health: Health,
    pub build: Vec<u8>,
    pub copies: BTreeMap<String, FakeCopy>,
    /// A restore under way (admitted, or its delta arriving).
    pub incoming: Option<String>,
    /// A pre-copied base staged here.
    pub staged: Option<String>,
    /// Locators whose traffic it holds.
    pub holding: Vec<Ipv4Addr>,
}

#[derive(Debug, Default)]
pub struct World {
    pub vms: BTreeMap<String, FakeVm>,
    /// (vm, request kind, nth) → fault.
    pub faults: Vec<(String, &'static str, usize, Fault)>,
    /// Requests each VM read, in order: (vm, kind).
    pub log: Vec<(String, &'static str)>,
}

/// The kind of a request: its variant's name.
pub fn kind(request: &Request) -> &'static str {
    match request {
        Request::Version => "Version",
        Request::ListCapsules => "ListCapsules",
        Request::RestoreBegin { .. } => "RestoreBegin",
        Request::RestoreChunk { .. } => "RestoreChunk",
        Request::RestoreStage { .. } => "RestoreStage",
        Request::RestoreCommit { .. } => "RestoreCommit",
        Request::RestoreAbort { .. } => "RestoreAbort",
        Request::PrecopyCapsule { .. } => "PrecopyCapsule",
        Request::ReadImage { .. } => "ReadImage",
        Request::ReadPages { .. } => "ReadPages",
        Request::StagePages { .. } => "StagePages",
        Request::FreezeDelta { .. } => "FreezeDelta",
        Request::ReleaseCapsule { .. } => "ReleaseCapsule",
        Request::ThawCapsule { .. } => "ThawCapsule",
        Request::Fence { .. } => "Fence",
        Request::HoldTraffic { .. } => "HoldTraffic",
        Request::ReleaseTraffic { .. } => "ReleaseTraffic",
        _ => "other",
    }
}

/// Length of every fake image (three chunks of the protocol's maximum
/// would be slow; the streams only need a few).
const IMAGE_LEN: u64 = 3 * 1000;
const CHUNK: u64 = 1000;

fn info(name: &str, copy: &FakeCopy) -> CapsuleInfo {
    CapsuleInfo {
        name: name.into(),
        program: "kv".into(),
        locator: Ipv4Addr::new(198, 18, 0, 1),
        slot: 1,
        state: copy.state.clone(),
        tasks: 1,
        memory_bytes: 1 << 20,
        memory_limit: 0,
        sockets: 0,
        uptime_ns: 0,
        epoch: copy.epoch,
    }
}

fn done() -> Response {
    Response::Done
}

fn not_found(name: &str) -> Response {
    Response::error(ErrorCode::NotFound, format!("no '{name}' here"))
}

impl FakeVm {
    /// What the VM does with `request` (the kernel's rules, much simplified).
    fn handle(&mut self, vm: &str, request: &Request) -> Response {
        match request {
            Request::Version => Response::Version {
                protocol_version: 3,
                build_id: self.build.clone(),
                vm_name: vm.into(),
            },
            Request::ListCapsules => {
                Response::Capsules(self.copies.iter().map(|(n, c)| info(n, c)).collect())
            }
            Request::RestoreBegin { name, .. } => {
                self.incoming = Some(name.clone());
                done()
            }
            Request::RestoreChunk { name, .. } | Request::StagePages { name, .. } => {
                if self.incoming.as_ref() == Some(name) || self.staged.as_ref() == Some(name) {
                    done()
                } else {
                    not_found(name)
                }
            }
            Request::RestoreStage { name } => {
                self.staged = Some(name.clone());
                self.incoming = None;
                done()
            }
            Request::RestoreCommit { name, epoch } => {
                if self.incoming.as_ref() != Some(name) {
                    return not_found(name);
                }
                self.incoming = None;
                self.staged = None;
                let copy = FakeCopy {
                    state: CapsuleState::Running,
                    epoch: *epoch,
                };
                let answer = Response::CapsuleStarted(info(name, &copy));
                self.copies.insert(name.clone(), copy);
                answer
            }
            Request::RestoreAbort { name } => {
                if self.incoming.as_ref() == Some(name) {
                    self.incoming = None;
                }
                if self.staged.as_ref() == Some(name) {
                    self.staged = None;
                }
                done()
            }
            Request::PrecopyCapsule { name } => match self.copies.get(name) {
                Some(c) if c.state == CapsuleState::Running => Response::Frozen {
                    image_len: IMAGE_LEN,
                },
                _ => not_found(name),
            },
            Request::ReadImage { name, offset, .. } => match self.copies.get(name) {
                Some(_) => Response::ImageChunk {
                    data: vec![7; CHUNK.min(IMAGE_LEN.saturating_sub(*offset)) as usize],
                },
                None => not_found(name),
            },
            Request::ReadPages { name, from } => match self.copies.get(name) {
                Some(_) => Response::Pages(PageBatch {
                    next: from + 4096,
                    end: 2 * 4096,
                    offsets: vec![*from],
                    data: vec![1; 4096],
                }),
                None => not_found(name),
            },
            Request::FreezeDelta { name } => match self.copies.get_mut(name) {
                Some(c) if c.state == CapsuleState::Running => {
                    c.state = CapsuleState::Frozen;
                    Response::Frozen {
                        image_len: IMAGE_LEN,
                    }
                }
                _ => not_found(name),
            },
            Request::ReleaseCapsule { name, .. } => match self.copies.get(name) {
                Some(c) if c.state == CapsuleState::Frozen => {
                    self.copies.remove(name);
                    done()
                }
                Some(_) => Response::error(ErrorCode::InvalidArgument, "not frozen"),
                None => not_found(name),
            },
            Request::ThawCapsule { name, epoch } => match self.copies.get_mut(name) {
                Some(c) if c.state == CapsuleState::Frozen => {
                    c.state = CapsuleState::Running;
                    c.epoch = *epoch;
                    done()
                }
                _ => not_found(name),
            },
            Request::Fence { name, epoch } => {
                if self.copies.get(name).is_some_and(|c| c.epoch < *epoch) {
                    self.copies.remove(name);
                }
                self.incoming = None;
                self.staged = None;
                done()
            }
            Request::HoldTraffic { locator } => {
                self.holding.push(*locator);
                done()
            }
            Request::ReleaseTraffic { locator } => {
                self.holding.retain(|l| l != locator);
                done()
            }
            other => Response::error(ErrorCode::UnknownRequest, format!("{other:?}")),
        }
    }
}

/// A connection to one fake VM.
struct FakeConn {
    world: Arc<Mutex<World>>,
    vm: String,
    build: Vec<u8>,
    /// An answer went missing on it: nothing more arrives.
    broken: bool,
}

impl FakeConn {
    fn exchange(&mut self, request: &Request, want_answer: bool) -> Result<Response> {
        if self.broken {
            bail!("{}: the connection is of no further use", self.vm);
        }
        let mut w = self.world.lock().unwrap();
        let k = kind(request);
        let nth = w
            .log
            .iter()
            .filter(|(vm, kk)| *vm == self.vm && *kk == k)
            .count();
        let fault = w
            .faults
            .iter()
            .find(|(vm, kk, n, _)| *vm == self.vm && *kk == k && *n == nth)
            .map(|f| f.3);
        let vm = w.vms.get_mut(&self.vm).expect("a fake VM");
        match (vm.health, fault) {
            (Health::Dead, _) => bail!("{}: connection refused", self.vm),
            (Health::Silent, _) => bail!("{}: no answer", self.vm),
            (_, Some(Fault::DieBefore)) => {
                vm.health = Health::Dead;
                self.broken = true;
                bail!("{}: connection reset", self.vm)
            }
            (_, Some(Fault::SilentBefore)) => {
                vm.health = Health::Silent;
                self.broken = true;
                bail!("{}: no answer", self.vm)
            }
            _ => {}
        }
        let answer = match fault {
            Some(Fault::Refuse) => Response::error(ErrorCode::Internal, "refused (fake)"),
            _ => vm.handle(&self.vm, request),
        };
        w.log.push((self.vm.clone(), k));
        if fault == Some(Fault::SilentAfter) {
            w.vms.get_mut(&self.vm).expect("a fake VM").health = Health::Silent;
            self.broken = true;
            bail!("{}: no answer", self.vm);
        }
        if fault == Some(Fault::LoseAnswer) || !want_answer {
            self.broken = true;
            bail!("{}: no answer (lost)", self.vm);
        }
        Ok(answer)
    }
}

impl Transport for FakeConn {
    fn call(&mut self, request: &Request) -> Result<Response> {
        self.exchange(request, true)
    }

    fn send_only(&mut self, request: &Request) -> Result<()> {
        let _ = self.exchange(request, false);
        Ok(())
    }

    fn build_id(&self) -> Vec<u8> {
        self.build.clone()
    }
}

/// A fake lab: VMs vm1..vmN, a directory map and a journal in memory.
pub struct FakeLab {
    pub world: Arc<Mutex<World>>,
    vms: Vec<VmRecord>,
    /// Directory saves that fail before one succeeds.
    pub failing_saves: Mutex<u32>,
    /// The map as last saved.
    pub saved: Mutex<Option<DirectoryMap>>,
    /// Journal lines: "intent PHASE" or "outcome OUTCOME by".
    pub journal: Mutex<Vec<String>>,
    /// Every connection attempt, by VM name (a real one to a dead VM waits
    /// for its timeout).
    pub connects: Mutex<Vec<String>>,
}

impl FakeLab {
    /// `n` VMs, all up on the same build; capsule `kv` runs on vm1 at
    /// epoch 3. Returns the lab and its directory map.
    pub fn new(n: usize) -> (Self, DirectoryMap) {
        let mut world = World::default();
        let mut vms = Vec::new();
        for i in 1..=n {
            let name = format!("vm{i}");
            vms.push(VmRecord {
                name: name.clone(),
                ip: Ipv4Addr::new(10, 0, 0, 10 + i as u8),
                prefix: 24,
                mac: String::new(),
                tap: String::new(),
                control_port: 7000,
                pid: Some(1000 + i as u32),
                serial_log: PathBuf::new(),
                qemu_log: PathBuf::new(),
                subnet: 1,
                netns: None,
            });
            world.vms.insert(
                name,
                FakeVm {
                    health: Health::Up,
                    build: vec![1, 2, 3],
                    copies: BTreeMap::new(),
                    incoming: None,
                    staged: None,
                    holding: Vec::new(),
                },
            );
        }
        world.vms.get_mut("vm1").unwrap().copies.insert(
            "kv".into(),
            FakeCopy {
                state: CapsuleState::Running,
                epoch: 3,
            },
        );
        let mut map = DirectoryMap::new(CapsuleRange::default());
        map.insert(CapsuleRecord {
            name: "kv".into(),
            program: "kv".into(),
            args: vec![],
            locator: Ipv4Addr::new(198, 18, 0, 1),
            slot: 1,
            vm: "vm1".into(),
            memory_limit: 0,
            created_unix: 0,
            epoch: 3,
            intent: None,
            lost: None,
        })
        .unwrap();
        let lab = Self {
            world: Arc::new(Mutex::new(world)),
            vms,
            failing_saves: Mutex::new(0),
            saved: Mutex::new(None),
            journal: Mutex::new(Vec::new()),
            connects: Mutex::new(Vec::new()),
        };
        (lab, map)
    }

    /// `vm` gets `fault` at its `nth` request of `kind`.
    pub fn fault(&self, vm: &str, kind: &'static str, nth: usize, fault: Fault) {
        self.world
            .lock()
            .unwrap()
            .faults
            .push((vm.into(), kind, nth, fault));
    }

    /// `vm` is booted again: a new QEMU (another pid), up, holding nothing.
    pub fn reboot(&mut self, vm: &str) {
        let rec = self.vms.iter_mut().find(|v| v.name == vm).unwrap();
        rec.pid = rec.pid.map(|p| p + 1000);
        let mut w = self.world.lock().unwrap();
        let v = w.vms.get_mut(vm).unwrap();
        v.health = Health::Up;
        v.copies.clear();
        v.incoming = None;
        v.staged = None;
        v.holding.clear();
    }

    pub fn set_health(&self, vm: &str, health: Health) {
        self.world.lock().unwrap().vms.get_mut(vm).unwrap().health = health;
    }

    /// The copies of `kv` on each VM (whatever its health).
    pub fn copies(&self) -> Vec<(String, CapsuleState, u64)> {
        let w = self.world.lock().unwrap();
        w.vms
            .iter()
            .filter_map(|(vm, v)| {
                v.copies
                    .get("kv")
                    .map(|c| (vm.clone(), c.state.clone(), c.epoch))
            })
            .collect()
    }

    /// The kinds of the requests `vm` read, in order.
    pub fn requests(&self, vm: &str) -> Vec<&'static str> {
        let w = self.world.lock().unwrap();
        w.log
            .iter()
            .filter(|(v, _)| v == vm)
            .map(|(_, k)| *k)
            .collect()
    }

    pub fn journal(&self) -> Vec<String> {
        self.journal.lock().unwrap().clone()
    }

    /// The record of `kv` as last saved.
    pub fn saved_record(&self) -> Option<CapsuleRecord> {
        self.saved
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|m| m.get("kv").cloned())
    }
}

impl Env for FakeLab {
    fn lab_name(&self) -> &str {
        "fake"
    }

    fn vms(&self) -> &[VmRecord] {
        &self.vms
    }

    fn connect(&self, vm: &VmRecord) -> Result<Conn> {
        self.connects.lock().unwrap().push(vm.name.clone());
        let w = self.world.lock().unwrap();
        let v = w
            .vms
            .get(&vm.name)
            .ok_or_else(|| anyhow!("no VM {}", vm.name))?;
        match v.health {
            Health::Up => Ok(Box::new(FakeConn {
                world: self.world.clone(),
                vm: vm.name.clone(),
                build: v.build.clone(),
                broken: false,
            })),
            Health::Dead => bail!("{}: connection refused", vm.name),
            Health::Silent => bail!("{}: connection timed out", vm.name),
        }
    }

    fn is_alive(&self, vm: &VmRecord) -> bool {
        self.world.lock().unwrap().vms[&vm.name].health != Health::Dead
    }

    fn save_map(&self, map: &DirectoryMap) -> Result<()> {
        let mut failing = self.failing_saves.lock().unwrap();
        if *failing > 0 {
            *failing -= 1;
            bail!("the directory write failed (fake)");
        }
        *self.saved.lock().unwrap() = Some(map.clone());
        Ok(())
    }

    fn log_intent(&self, capsule: &str, intent: &Intent) -> Result<()> {
        let phase = serde_json::to_value(intent.phase)?;
        self.journal.lock().unwrap().push(format!(
            "intent {capsule} {}",
            phase.as_str().unwrap_or("?")
        ));
        Ok(())
    }

    fn log_outcome(&self, capsule: &str, outcome: &Outcome, by: &str) -> Result<()> {
        let o = serde_json::to_value(outcome)?;
        let what = o
            .as_object()
            .and_then(|m| m.keys().next().cloned())
            .or_else(|| o.as_str().map(str::to_string))
            .unwrap_or_default();
        self.journal
            .lock()
            .unwrap()
            .push(format!("outcome {capsule} {what} by {by}"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::journal::Phase;
    use crate::migrate::{Move, Stage};

    use CapsuleState::{Frozen, Running};

    /// A move of `kv` from vm1 to vm2 in `lab`, run to its end (settled
    /// after a failure with a short settle timeout). Returns its result.
    fn run(lab: &FakeLab, map: &mut DirectoryMap) -> Result<()> {
        Move::admit(lab, map, "kv", "vm2", Instant::now())?
            .with_settle_timeout(Duration::from_millis(50))
            .run()
            .map(|_| ())
    }

    fn count(lab: &FakeLab, vm: &str, kind: &str) -> usize {
        lab.requests(vm).iter().filter(|k| **k == kind).count()
    }

    fn copy(vm: &str, state: CapsuleState, epoch: u64) -> (String, CapsuleState, u64) {
        (vm.to_string(), state, epoch)
    }

    /// The move took effect: the capsule runs on vm2 at epoch 4 and nowhere
    /// else, and the directory (in memory and on disk) says so.
    fn assert_moved(lab: &FakeLab, map: &DirectoryMap) {
        assert_eq!(lab.copies(), [copy("vm2", Running, 4)]);
        for rec in [map.get("kv").cloned(), lab.saved_record()] {
            let rec = rec.expect("a record");
            assert_eq!((rec.vm.as_str(), rec.epoch), ("vm2", 4), "{rec:?}");
            assert!(rec.intent.is_none() && rec.lost.is_none(), "{rec:?}");
        }
        // Nobody holds the capsule's traffic any longer.
        let w = lab.world.lock().unwrap();
        assert!(w.vms.values().all(|v| v.holding.is_empty()));
    }

    /// The move rolled back: the capsule runs on vm1 only (at `epoch`), vm2
    /// keeps no restore, and the directory says vm1.
    fn assert_at_source(lab: &FakeLab, map: &DirectoryMap, epoch: u64) {
        assert_eq!(lab.copies(), [copy("vm1", Running, epoch)]);
        let rec = map.get("kv").unwrap();
        assert_eq!((rec.vm.as_str(), rec.epoch), ("vm1", epoch), "{rec:?}");
        assert!(rec.intent.is_none() && rec.lost.is_none(), "{rec:?}");
        assert_eq!(lab.saved_record().as_ref(), Some(rec));
        let w = lab.world.lock().unwrap();
        assert!(w.vms["vm2"].incoming.is_none() && w.vms["vm2"].staged.is_none());
        assert!(w.vms.values().all(|v| v.holding.is_empty()));
    }

    #[test]
    fn a_move_passes_every_stage_in_order() {
        let (lab, mut map) = FakeLab::new(3);
        let mut m = Move::admit(&lab, &mut map, "kv", "vm2", Instant::now()).unwrap();
        assert_eq!(m.stage(), Stage::Admitted);
        let mut stages = vec![];
        while m.stage() != Stage::Recorded {
            stages.push(m.step().unwrap());
            if m.stage() == Stage::Frozen {
                // The third VM holds the capsule's traffic while it is frozen.
                let w = lab.world.lock().unwrap();
                assert_eq!(w.vms["vm3"].holding.len(), 1);
            }
        }
        assert_eq!(
            stages,
            [
                Stage::Precopied,
                Stage::Frozen,
                Stage::Transferred,
                Stage::Committed,
                Stage::Released,
                Stage::Recorded
            ]
        );
        assert!(m.step().is_err(), "no stage after Recorded");
        drop(m);
        assert_moved(&lab, &map);
        assert_eq!(
            lab.journal(),
            [
                "intent kv precopy",
                "intent kv freeze",
                "intent kv commit-sent",
                "outcome kv moved by migrate"
            ]
        );
    }

    #[test]
    fn each_stage_is_on_the_vms_when_it_is_reached() {
        let (lab, mut map) = FakeLab::new(2);
        let mut m = Move::admit(&lab, &mut map, "kv", "vm2", Instant::now()).unwrap();
        assert_eq!(m.intent().phase, Phase::Precopy);
        m.step().unwrap();
        assert_eq!(lab.copies(), [copy("vm1", Running, 3)]);
        m.step().unwrap();
        assert_eq!(lab.copies(), [copy("vm1", Frozen, 3)]);
        assert_eq!(m.intent().phase, Phase::Freeze);
        m.step().unwrap();
        assert_eq!(lab.copies(), [copy("vm1", Frozen, 3)]);
        m.step().unwrap();
        assert_eq!(m.intent().phase, Phase::CommitSent);
        assert_eq!(
            lab.copies(),
            [copy("vm1", Frozen, 3), copy("vm2", Running, 4)]
        );
        m.step().unwrap();
        assert_eq!(lab.copies(), [copy("vm2", Running, 4)]);
        // The directory still has the intent until the last stage.
        assert!(lab.saved_record().unwrap().intent.is_some());
        m.step().unwrap();
        drop(m);
        assert_moved(&lab, &map);
    }

    #[test]
    fn different_builds_are_refused_before_anything_is_on_record() {
        let (lab, mut map) = FakeLab::new(2);
        lab.world.lock().unwrap().vms.get_mut("vm2").unwrap().build = vec![9];
        let e = run(&lab, &mut map).unwrap_err();
        assert!(format!("{e:#}").contains("identical builds"), "{e:#}");
        assert!(lab.journal().is_empty());
        assert!(map.get("kv").unwrap().intent.is_none());
        assert_eq!(lab.copies(), [copy("vm1", Running, 3)]);
    }

    #[test]
    fn a_refused_admission_changes_nothing() {
        let (lab, mut map) = FakeLab::new(2);
        lab.fault("vm2", "RestoreBegin", 0, Fault::Refuse);
        let e = run(&lab, &mut map).unwrap_err();
        assert!(format!("{e:#}").contains("to admit"), "{e:#}");
        assert!(lab.journal().is_empty());
        assert_eq!(lab.copies(), [copy("vm1", Running, 3)]);
    }

    #[test]
    fn an_intent_that_cannot_be_written_gives_the_admission_back() {
        let (lab, mut map) = FakeLab::new(2);
        *lab.failing_saves.lock().unwrap() = 1;
        let e = run(&lab, &mut map).unwrap_err();
        assert!(format!("{e:#}").contains("directory write failed"), "{e:#}");
        assert_eq!(lab.requests("vm2"), ["RestoreBegin", "RestoreAbort"]);
        assert!(lab.world.lock().unwrap().vms["vm2"].incoming.is_none());
        assert!(map.get("kv").unwrap().intent.is_none());
        assert_eq!(lab.copies(), [copy("vm1", Running, 3)]);
    }

    #[test]
    fn a_failed_precopy_keeps_the_capsule_at_the_source() {
        for fault in [Fault::Refuse, Fault::LoseAnswer] {
            let (lab, mut map) = FakeLab::new(2);
            lab.fault("vm1", "PrecopyCapsule", 0, fault);
            let e = run(&lab, &mut map).unwrap_err();
            assert!(format!("{e:#}").contains("keeps running on vm1"), "{e:#}");
            // It never stopped: same epoch.
            assert_at_source(&lab, &map, 3);
            assert_eq!(
                lab.journal().last().unwrap(),
                "outcome kv rolled-back by migrate"
            );
        }
    }

    #[test]
    fn a_lost_answer_to_the_freeze_thaws_the_source_at_a_newer_epoch() {
        let (lab, mut map) = FakeLab::new(2);
        lab.fault("vm1", "FreezeDelta", 0, Fault::LoseAnswer);
        run(&lab, &mut map).unwrap_err();
        // Frozen, answer lost: thawed above every epoch the move gave out.
        assert_at_source(&lab, &map, 5);
        assert!(!lab.requests("vm2").contains(&"RestoreCommit"));
    }

    #[test]
    fn a_refused_freeze_keeps_the_capsule_running() {
        let (lab, mut map) = FakeLab::new(2);
        lab.fault("vm1", "FreezeDelta", 0, Fault::Refuse);
        run(&lab, &mut map).unwrap_err();
        assert_at_source(&lab, &map, 3);
    }

    #[test]
    fn a_lost_answer_in_the_transfer_thaws_the_source() {
        let (lab, mut map) = FakeLab::new(2);
        // The base image is read first (ReadImage 0..2): the third read is
        // the delta's first.
        lab.fault("vm1", "ReadImage", 3, Fault::LoseAnswer);
        run(&lab, &mut map).unwrap_err();
        assert_at_source(&lab, &map, 5);
    }

    #[test]
    fn a_lost_answer_to_the_last_chunk_thaws_the_source() {
        let (lab, mut map) = FakeLab::new(2);
        // Three chunks of base, three of delta: the sixth is the last.
        lab.fault("vm2", "RestoreChunk", 5, Fault::LoseAnswer);
        run(&lab, &mut map).unwrap_err();
        assert_at_source(&lab, &map, 5);
        // The destination was told to drop the restore, never to commit.
        let reqs = lab.requests("vm2");
        assert!(reqs.contains(&"RestoreAbort") && !reqs.contains(&"RestoreCommit"));
    }

    #[test]
    fn a_destination_dead_before_commit_sent_rolls_back_to_the_source() {
        let (lab, mut map) = FakeLab::new(2);
        // It dies when asked whether it is alive, right before the commit.
        lab.fault("vm2", "Version", 0, Fault::DieBefore);
        let e = run(&lab, &mut map).unwrap_err();
        assert!(format!("{e:#}").contains("keeps running on vm1"), "{e:#}");
        assert_eq!(lab.copies(), [copy("vm1", Running, 5)]);
        assert!(!lab.journal().iter().any(|l| l.contains("commit-sent")));
        assert!(!lab.requests("vm2").contains(&"RestoreCommit"));
    }

    #[test]
    fn a_destination_dead_after_commit_sent_means_the_capsule_is_lost() {
        let (lab, mut map) = FakeLab::new(2);
        lab.fault("vm2", "RestoreCommit", 0, Fault::DieBefore);
        let e = run(&lab, &mut map).unwrap_err();
        assert!(format!("{e:#}").contains("is lost"), "{e:#}");
        // The source's frozen copy is fenced away, never thawed.
        assert!(lab.copies().is_empty(), "{:?}", lab.copies());
        assert!(!lab.requests("vm1").contains(&"ThawCapsule"));
        let rec = map.get("kv").unwrap();
        assert!(rec.intent.is_none());
        assert!(rec.lost.as_deref().unwrap().contains("vm2"), "{rec:?}");
        assert_eq!(map.last_epoch("kv"), 5);
        assert_eq!(
            lab.journal()[2..],
            ["intent kv commit-sent", "outcome kv lost by migrate"]
        );
    }

    #[test]
    fn a_lost_commit_answer_completes_the_move() {
        let (lab, mut map) = FakeLab::new(2);
        lab.fault("vm2", "RestoreCommit", 0, Fault::LoseAnswer);
        run(&lab, &mut map).unwrap();
        assert_moved(&lab, &map);
        // The frozen source was released by the settling, not thawed.
        assert!(lab.requests("vm1").contains(&"ReleaseCapsule"));
        assert!(!lab.requests("vm1").contains(&"ThawCapsule"));
    }

    #[test]
    fn a_refused_commit_thaws_the_source() {
        let (lab, mut map) = FakeLab::new(2);
        lab.fault("vm2", "RestoreCommit", 0, Fault::Refuse);
        run(&lab, &mut map).unwrap_err();
        // It answered with no copy: the commit did not take; thaw is safe.
        assert_at_source(&lab, &map, 5);
    }

    #[test]
    fn a_silent_destination_after_commit_sent_leaves_the_intent_open() {
        let (lab, mut map) = FakeLab::new(2);
        lab.fault("vm2", "RestoreCommit", 0, Fault::SilentBefore);
        let e = run(&lab, &mut map).unwrap_err();
        assert!(format!("{e:#}").contains("capsulectl recover"), "{e:#}");
        // Nothing decided: frozen at the source, the intent open at commit-sent.
        assert_eq!(lab.copies(), [copy("vm1", Frozen, 3)]);
        let rec = lab.saved_record().unwrap();
        assert_eq!(rec.intent.unwrap().phase, Phase::CommitSent);
        // Once it answers, recover decides (here: it never got the commit).
        lab.set_health("vm2", Health::Up);
        crate::recover::recover_one(&lab, &mut map, "kv").unwrap();
        assert_eq!(lab.copies(), [copy("vm1", Running, 5)]);
    }

    /// An intent of a move of `kv` vm1 → vm2 left open at commit-sent (its
    /// writer died), with vm1 holding the frozen copy at epoch 3.
    fn left_at_commit_sent(lab: &FakeLab, map: &mut DirectoryMap) {
        let mut i = Intent::new(
            crate::journal::IntentKind::Move,
            Some("vm1"),
            Some("vm2"),
            3,
        );
        i.phase = Phase::CommitSent;
        map.get_mut("kv").unwrap().intent = Some(i);
        let mut w = lab.world.lock().unwrap();
        w.vms
            .get_mut("vm1")
            .unwrap()
            .copies
            .get_mut("kv")
            .unwrap()
            .state = Frozen;
    }

    #[test]
    fn a_destination_copy_that_ended_after_the_commit_is_never_undone_by_a_thaw() {
        let faulted = CapsuleState::Faulted {
            reason: "page fault".into(),
        };
        for ended in [CapsuleState::Exited, faulted] {
            let (lab, mut map) = FakeLab::new(2);
            left_at_commit_sent(&lab, &mut map);
            // vm2 ran the capsule at epoch 4, then it ended there.
            lab.world
                .lock()
                .unwrap()
                .vms
                .get_mut("vm2")
                .unwrap()
                .copies
                .insert(
                    "kv".into(),
                    FakeCopy {
                        state: ended.clone(),
                        epoch: 4,
                    },
                );
            crate::recover::recover_one(&lab, &mut map, "kv").unwrap();
            assert!(!lab.requests("vm1").contains(&"ThawCapsule"));
            // The stale source is gone; the ended copy stays for `ps`/`logs`.
            assert_eq!(lab.copies(), [copy("vm2", ended.clone(), 4)]);
            let rec = map.get("kv").unwrap();
            assert_eq!((rec.vm.as_str(), rec.epoch), ("vm2", 4), "{rec:?}");
            assert!(rec.intent.is_none());
        }
    }

    #[test]
    fn a_destination_rebooted_after_commit_sent_is_dead_to_the_move() {
        // vm2 takes the commit (and may serve clients), then hangs; the
        // move cannot settle and leaves its intent at commit-sent.
        let (mut lab, mut map) = FakeLab::new(2);
        lab.fault("vm2", "RestoreCommit", 0, Fault::SilentAfter);
        run(&lab, &mut map).unwrap_err();
        assert_eq!(
            lab.saved_record().unwrap().intent.unwrap().phase,
            Phase::CommitSent
        );
        // vm2 is booted again (a new QEMU), and answers with nothing.
        lab.reboot("vm2");
        crate::recover::recover_one(&lab, &mut map, "kv").unwrap();
        // The boot that got the commit is gone: lost, never thawed at vm1.
        assert!(!lab.requests("vm1").contains(&"ThawCapsule"));
        assert!(lab.copies().is_empty(), "{:?}", lab.copies());
        let rec = map.get("kv").unwrap();
        assert!(rec.intent.is_none());
        assert!(rec.lost.as_deref().unwrap().contains("vm2"), "{rec:?}");
    }

    #[test]
    fn a_restart_settles_the_open_intents_naming_its_vm_with_the_vm_dead() {
        // As `vm restart vm2 --force` does for a destination that hung after
        // the commit: check, stop it, settle, boot it.
        let (mut lab, mut map) = FakeLab::new(3);
        lab.fault("vm2", "RestoreCommit", 0, Fault::SilentAfter);
        run(&lab, &mut map).unwrap_err();
        assert_eq!(crate::recover::intents_naming(&map, "vm2"), ["kv"]);
        assert!(crate::recover::intents_naming(&map, "vm3").is_empty());
        crate::recover::decidable_without(&lab, &map, "vm2").unwrap();
        lab.set_health("vm2", Health::Dead);
        let done = crate::recover::settle_intents_naming(&lab, &mut map, "vm2").unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].outcome, "lost");
        lab.reboot("vm2");
        assert!(!lab.requests("vm1").contains(&"ThawCapsule"));
        assert!(lab.copies().is_empty(), "{:?}", lab.copies());
        let rec = lab.saved_record().unwrap();
        assert!(rec.intent.is_none() && rec.lost.is_some(), "{rec:?}");
    }

    #[test]
    fn a_restart_is_refused_while_an_intent_naming_its_vm_stays_undecidable() {
        // A move from vm1 left frozen (answer lost), its destination silent:
        // with vm1 gone too, vm2 may still have taken it. Restarting vm1
        // must not be allowed to settle anything.
        let (lab, mut map) = FakeLab::new(2);
        let mut m = Move::admit(&lab, &mut map, "kv", "vm2", Instant::now()).unwrap();
        m.step().unwrap();
        m.step().unwrap();
        drop(m);
        lab.set_health("vm2", Health::Silent);
        let before = lab.world.lock().unwrap().log.len();
        let e = crate::recover::decidable_without(&lab, &map, "vm1").unwrap_err();
        assert!(format!("{e:#}").contains("vm2 does not answer"), "{e:#}");
        // Only asked: nothing was sent that changes anything.
        let w = lab.world.lock().unwrap();
        assert!(
            w.log[before..].iter().all(|(_, k)| *k == "ListCapsules"),
            "{:?}",
            &w.log[before..]
        );
    }

    #[test]
    fn recovery_does_not_try_to_release_from_a_dead_source() {
        let (lab, mut map) = FakeLab::new(2);
        left_at_commit_sent(&lab, &mut map);
        lab.world
            .lock()
            .unwrap()
            .vms
            .get_mut("vm2")
            .unwrap()
            .copies
            .insert(
                "kv".into(),
                FakeCopy {
                    state: Running,
                    epoch: 4,
                },
            );
        lab.set_health("vm1", Health::Dead);
        let rec = map.get("kv").cloned().unwrap();
        let intent = rec.intent.clone().unwrap();
        let complete = crate::recover::Decision::Complete {
            vm: "vm2".into(),
            epoch: 4,
            release_from: Some("vm1".into()),
        };
        crate::recover::apply(&lab, &mut map, &rec, &intent, complete, "test").unwrap();
        assert!(!lab.connects.lock().unwrap().contains(&"vm1".to_string()));
        assert_eq!(map.get("kv").unwrap().vm, "vm2");
    }

    #[test]
    fn a_record_on_a_dead_vm_is_lost_unless_a_live_vm_runs_a_copy() {
        // kv is recorded on vm1, which died; vm2 holds only a frozen copy,
        // and the dead vm3 is not asked at all.
        let (lab, mut map) = FakeLab::new(3);
        lab.set_health("vm1", Health::Dead);
        lab.set_health("vm3", Health::Dead);
        lab.world
            .lock()
            .unwrap()
            .vms
            .get_mut("vm2")
            .unwrap()
            .copies
            .insert(
                "kv".into(),
                FakeCopy {
                    state: Frozen,
                    epoch: 3,
                },
            );
        let done = crate::vm::mark_lost_on_dead_vms(&lab, &mut map).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].outcome, "lost");
        let rec = lab.saved_record().unwrap();
        assert_eq!(rec.lost.as_deref(), Some("vm1 died holding the only copy"));
        let connects = lab.connects.lock().unwrap().clone();
        assert!(
            !connects.iter().any(|vm| vm == "vm1" || vm == "vm3"),
            "{connects:?}"
        );
    }

    #[test]
    fn a_record_on_a_dead_vm_follows_the_copy_that_runs_elsewhere() {
        let (lab, mut map) = FakeLab::new(3);
        lab.set_health("vm1", Health::Dead);
        {
            let mut w = lab.world.lock().unwrap();
            let mut put = |vm: &str, state, epoch| {
                w.vms
                    .get_mut(vm)
                    .unwrap()
                    .copies
                    .insert("kv".into(), FakeCopy { state, epoch });
            };
            put("vm2", Running, 5);
            put("vm3", Running, 2); // older than the record: never chosen
        }
        let done = crate::vm::mark_lost_on_dead_vms(&lab, &mut map).unwrap();
        assert_eq!(done[0].outcome, "found running");
        let rec = lab.saved_record().unwrap();
        assert_eq!((rec.vm.as_str(), rec.epoch), ("vm2", 5));
        assert!(rec.lost.is_none());
        // The stale copy on vm3 was fenced away (vm1's copy died with it).
        assert_eq!(
            lab.copies(),
            [copy("vm1", Running, 3), copy("vm2", Running, 5)]
        );
        assert!(lab.requests("vm3").contains(&"Fence"));
    }

    #[test]
    fn a_source_dead_after_commit_sent_completes_at_the_destination() {
        let (lab, mut map) = FakeLab::new(2);
        let mut m = Move::admit(&lab, &mut map, "kv", "vm2", Instant::now())
            .unwrap()
            .with_settle_timeout(Duration::from_millis(50));
        for _ in 0..4 {
            m.step().unwrap();
        }
        lab.set_health("vm1", Health::Dead);
        // The release fails on every connection; the move is recorded still.
        m.step().unwrap();
        m.step().unwrap();
        drop(m);
        let rec = map.get("kv").unwrap();
        assert_eq!((rec.vm.as_str(), rec.epoch), ("vm2", 4));
    }

    #[test]
    fn a_lost_release_answer_is_asked_again_on_a_new_connection() {
        let (lab, mut map) = FakeLab::new(2);
        lab.fault("vm1", "ReleaseCapsule", 0, Fault::LoseAnswer);
        run(&lab, &mut map).unwrap();
        assert_moved(&lab, &map);
        // Asked twice; the second found it released (NotFound) and was done.
        let releases = count(&lab, "vm1", "ReleaseCapsule");
        assert_eq!(releases, 2);
        // Fenced once only: when the move was recorded (as every move is).
        assert_eq!(count(&lab, "vm1", "Fence"), 1);
    }

    #[test]
    fn a_release_never_confirmed_fences_the_source() {
        let (lab, mut map) = FakeLab::new(2);
        lab.fault("vm1", "ReleaseCapsule", 0, Fault::Refuse);
        lab.fault("vm1", "ReleaseCapsule", 1, Fault::Refuse);
        run(&lab, &mut map).unwrap();
        // The fence at the new epoch ended the old frozen copy.
        assert_moved(&lab, &map);
        // Once by the release step, once when the move was recorded.
        assert_eq!(count(&lab, "vm1", "Fence"), 2);
    }

    #[test]
    fn a_failed_directory_write_is_settled_from_what_the_vms_hold() {
        let (lab, mut map) = FakeLab::new(2);
        let mut m = Move::admit(&lab, &mut map, "kv", "vm2", Instant::now()).unwrap();
        for _ in 0..5 {
            m.step().unwrap();
        }
        *lab.failing_saves.lock().unwrap() = 1;
        let e = m.step().unwrap_err();
        assert_eq!(m.stage(), Stage::Released);
        m.settle(e).unwrap();
        assert_eq!(m.stage(), Stage::Recorded);
        drop(m);
        assert_moved(&lab, &map);
    }

    #[test]
    fn a_failed_journal_write_before_the_freeze_settles_at_the_source() {
        let (lab, mut map) = FakeLab::new(2);
        let mut m = Move::admit(&lab, &mut map, "kv", "vm2", Instant::now()).unwrap();
        m.step().unwrap();
        // The intent cannot move on to `freeze`: nothing is frozen.
        *lab.failing_saves.lock().unwrap() = 1;
        let e = m.step().unwrap_err();
        assert_eq!(m.stage(), Stage::Precopied);
        assert!(m.settle(e).is_err());
        drop(m);
        assert_at_source(&lab, &map, 3);
    }

    #[test]
    fn dead_vms_are_not_asked_to_hold_or_fence() {
        let (lab, mut map) = FakeLab::new(3);
        lab.set_health("vm3", Health::Dead);
        run(&lab, &mut map).unwrap();
        assert_moved(&lab, &map);
        assert!(lab.requests("vm3").is_empty());
    }

    #[test]
    fn a_lost_capsule_cannot_move() {
        let (lab, mut map) = FakeLab::new(2);
        map.get_mut("kv").unwrap().lost = Some("vm1 died".into());
        let e = run(&lab, &mut map).unwrap_err();
        assert!(format!("{e:#}").contains("lost"), "{e:#}");
        assert!(lab.requests("vm1").is_empty());
    }

    #[test]
    fn stages_are_ordered_as_a_move_passes_them() {
        use Stage::*;
        let all = [
            Admitted,
            Precopied,
            Frozen,
            Transferred,
            Committed,
            Released,
            Recorded,
        ];
        assert!(all.windows(2).all(|w| w[0] < w[1]));
    }
}
