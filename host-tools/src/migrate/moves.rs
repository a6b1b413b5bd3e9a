//! The move of a capsule from one VM to another, as a state machine.
//!
//! A [`Move`] passes explicit [`Stage`]s, one [`Move::step`] each:
//!
//! | stage         | reached when                                             | a failure on the way there          |
//! |---------------|----------------------------------------------------------|-------------------------------------|
//! | `Admitted`    | same builds, the destination admitted, intent on record  | nothing changed (no intent written) |
//! | `Precopied`   | base image and pages at the destination, still running   | settle: kept at the source          |
//! | `Frozen`      | intent at `freeze`, traffic held, frozen at the source   | settle: kept or thawed at source    |
//! | `Transferred` | the delta is at the destination (staged, not running)    | settle: thawed at the source        |
//! | `Committed`   | destination alive, `commit-sent` on record, commit taken | settle: see below                   |
//! | `Released`    | the source let go of its copy (held packets forwarded)   | never fails: asked again, or fenced |
//! | `Recorded`    | the directory names the destination, intent closed       | settle: completed from the VMs      |
//!
//! Every failure goes through one path, [`Move::settle`]: the destination's
//! restore is aborted (on a new connection, ordered after a commit still
//! queued there), every VM is asked what it holds, and `crate::recover`
//! decides. VMs that do not answer are asked again for up to
//! [`SETTLE_TIMEOUT`]; if they stay silent the intent stays open for
//! `capsulectl recover`. Before `commit-sent` is on record the source keeps
//! (or thaws) its copy — unless the source itself died, and with it the
//! only copy; after it, the move
//! completes if the destination runs the capsule, and if the destination
//! died the capsule is lost: the source's frozen copy may be out of date (the
//! destination may have run and answered clients), so it is fenced, never
//! thawed.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use capsules_wire::control::{CapsuleState, ErrorCode, Request, Response};
use serde::Serialize;

use super::stream::{self, stream_image};
use super::{build_id_hex, call_at, close_intent, expect_done, ms, record, write_intent};
use crate::capsules::LabSession;
use crate::directory::{CapsuleRecord, DirectoryMap};
use crate::fault;
use crate::journal::{Intent, IntentKind, Phase};
use crate::recover::{self, Conn, Decision, Env};
use crate::state::VmRecord;

/// What a move took, for people and scripts.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    pub name: String,
    pub from: String,
    pub to: String,
    /// Bytes that moved while the capsule stood still (the delta).
    pub image_bytes: u64,
    /// Bytes of the pre-copied base, sent while the capsule kept running.
    pub base_bytes: u64,
    pub precopy_ms: f64,
    /// When the freeze was requested, in ms since `migrate` was called: with
    /// the caller's clock at the call, places the downtime on its timeline
    /// (the demo's and the benchmark's latency plots).
    pub freeze_offset_ms: f64,
    /// Freeze requested → the capsule runs at the destination.
    pub downtime_ms: f64,
    pub freeze_ms: f64,
    pub transfer_ms: f64,
    pub restore_ms: f64,
    pub release_ms: f64,
    /// Freeze requested → the source released its copy (pre-copy before and
    /// the directory write after are not in it).
    pub total_ms: f64,
    pub transfer_mib_s: f64,
}

/// How long a move that failed keeps asking VMs that do not answer before
/// it leaves its intent open for `capsulectl recover`.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// How far a move got. Each stage is reached by one [`Move::step`] from the
/// one before; the order is the order of the variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Same build on both VMs, the destination admitted the capsule, and the
    /// intent (phase `precopy`) is on record. It runs at the source.
    Admitted,
    /// The base image and the pages are at the destination; the capsule
    /// still runs at the source.
    Precopied,
    /// The intent says `freeze`, the other VMs hold the capsule's traffic,
    /// and the source froze it.
    Frozen,
    /// The delta is at the destination, staged; nothing runs.
    Transferred,
    /// The destination answered right before `commit-sent` went on record,
    /// then took the commit: the capsule runs there at the new epoch.
    Committed,
    /// The source let go of its frozen copy (or was fenced).
    Released,
    /// The directory names the destination at the new epoch; the intent is
    /// closed. The move is over.
    Recorded,
}

/// Times of a move, for its report.
#[derive(Debug, Default)]
struct Times {
    base_bytes: u64,
    precopy_ms: f64,
    image_len: u64,
    /// When the freeze was requested.
    freeze_requested: Option<Instant>,
    t_frozen: Duration,
    t_transferred: Duration,
    /// Since the freeze request; `None` when the commit's answer was lost.
    t_running: Option<Duration>,
    t_released: Option<Duration>,
}

/// One move of one capsule (the caller holds the directory lock and passes
/// the map it loaded under it).
pub struct Move<'a> {
    env: &'a dyn Env,
    map: &'a mut DirectoryMap,
    rec: CapsuleRecord,
    src: VmRecord,
    dst: VmRecord,
    src_c: Conn,
    dst_c: Conn,
    intent: Intent,
    admission_len: u64,
    stage: Stage,
    settle_timeout: Duration,
    called: Instant,
    times: Times,
}

impl<'a> Move<'a> {
    /// Checks that the capsule can move, has the destination admit it, and
    /// puts the intent on record: [`Stage::Admitted`]. A failure here
    /// changes nothing.
    pub fn admit(
        env: &'a dyn Env,
        map: &'a mut DirectoryMap,
        name: &str,
        to: &str,
        called: Instant,
    ) -> Result<Self> {
        let rec = record(env, map, name)?;
        if let Some(why) = &rec.lost {
            bail!("'{name}' is lost ({why}): no copy is left to move");
        }
        let src = env.vm(&rec.vm)?.clone();
        let dst = env.vm(to)?.clone();
        if src.name == dst.name {
            bail!("'{name}' already runs on {to}");
        }
        let mut src_c = env.connect(&src)?;
        let mut dst_c = env.connect(&dst)?;
        let (src_build, dst_build) = (src_c.build_id(), dst_c.build_id());
        if src_build != dst_build {
            bail!(
                "refused before freezing: {} runs kernel build {} but {} runs {}; a capsule only moves between identical builds",
                src.name,
                build_id_hex(&src_build),
                dst.name,
                build_id_hex(&dst_build)
            );
        }
        let info = match src_c.call(&Request::ListCapsules)? {
            Response::Capsules(list) => list
                .into_iter()
                .find(|c| c.name == rec.name && c.state != CapsuleState::Migrated)
                .ok_or_else(|| {
                    anyhow!(
                        "{} does not run '{name}' (the directory is out of date)",
                        src.name
                    )
                })?,
            other => bail!(
                "unexpected answer to ListCapsules from {}: {other:?}",
                src.name
            ),
        };
        if info.state != CapsuleState::Running {
            bail!(
                "'{name}' is {} on {}, not running",
                info.state.label(),
                src.name
            );
        }
        // Admission before anything stops: memory and name at the
        // destination. The delta cannot be longer than the mapped arena plus
        // metadata; the bound leaves room for the capsule to grow until it is
        // frozen (a quarter, at least 1 MiB). The destination wants free
        // memory for twice this: the arena, and the delta while it arrives.
        let admission_len = info.memory_bytes + (info.memory_bytes / 4).max(1 << 20);
        expect_done(
            dst_c.call(&Request::RestoreBegin {
                name: rec.name.clone(),
                image_len: admission_len,
            })?,
            "to admit the capsule",
            &dst.name,
        )?;
        // The intent goes on record before anything moves: if this process
        // dies from here on, the next capsule command finishes or undoes it.
        let intent = Intent::new(
            IntentKind::Move,
            Some(&src.name),
            Some(&dst.name),
            info.epoch,
        );
        if let Err(e) = write_intent(env, map, &rec.name, &intent) {
            // Nothing has stopped; the admission would otherwise hold the
            // destination's memory until it goes stale.
            if let Some(r) = map.get_mut(&rec.name) {
                r.intent = None;
            }
            let _ = dst_c.call(&Request::RestoreAbort {
                name: rec.name.clone(),
            });
            return Err(e);
        }
        Ok(Self {
            env,
            map,
            rec,
            src,
            dst,
            src_c,
            dst_c,
            intent,
            admission_len,
            stage: Stage::Admitted,
            settle_timeout: SETTLE_TIMEOUT,
            called,
            times: Times::default(),
        })
    }

    /// How long [`Self::settle`] keeps asking silent VMs.
    pub fn with_settle_timeout(mut self, timeout: Duration) -> Self {
        self.settle_timeout = timeout;
        self
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The intent as it is on record.
    pub fn intent(&self) -> &Intent {
        &self.intent
    }

    /// Advances to the next stage. On an error the stage stays where it
    /// was, and [`Self::settle`] is the way on.
    pub fn step(&mut self) -> Result<Stage> {
        let next = match self.stage {
            Stage::Admitted => {
                self.precopy()?;
                Stage::Precopied
            }
            Stage::Precopied => {
                self.freeze()?;
                Stage::Frozen
            }
            Stage::Frozen => {
                self.transfer()?;
                Stage::Transferred
            }
            Stage::Transferred => {
                self.commit()?;
                Stage::Committed
            }
            Stage::Committed => {
                self.release();
                Stage::Released
            }
            Stage::Released => {
                self.record()?;
                Stage::Recorded
            }
            Stage::Recorded => bail!("the move of '{}' is over already", self.rec.name),
        };
        self.stage = next;
        Ok(next)
    }

    /// Every stage in turn; after a failure, [`Self::settle`]. `Ok` when the
    /// capsule runs at the destination and the directory says so.
    pub fn run(mut self) -> Result<MigrationReport> {
        while self.stage != Stage::Recorded {
            if let Err(e) = self.step() {
                self.settle(e)?;
            }
        }
        Ok(self.report())
    }

    /// Admitted → Precopied: the base image and the pages go to the
    /// destination while the capsule runs on.
    fn precopy(&mut self) -> Result<()> {
        fault::point("precopy");
        let started = Instant::now();
        self.times.base_bytes = stream::precopy(
            &mut *self.src_c,
            &mut *self.dst_c,
            &self.src.name,
            &self.dst.name,
            &self.rec.name,
            self.admission_len,
        )
        .context("pre-copy failed")?;
        self.times.precopy_ms = ms(started.elapsed());
        Ok(())
    }

    /// Precopied → Frozen: the intent says `freeze`, the other VMs hold the
    /// capsule's traffic, the source freezes it (only pages written since
    /// the pre-copy remain to be sent).
    fn freeze(&mut self) -> Result<()> {
        self.set_phase(Phase::Freeze)?;
        hold_traffic(self.env, &self.src.name, self.rec.locator, true);
        fault::point("freeze");
        let started = Instant::now();
        self.times.freeze_requested = Some(started);
        let (src, name) = (&self.src.name, &self.rec.name);
        self.times.image_len = match call_at(
            &mut *self.src_c,
            Some("freeze"),
            "FreezeDelta",
            &Request::FreezeDelta { name: name.clone() },
        )? {
            Response::Frozen { image_len } => image_len,
            Response::Error { code, message } => bail!(
                "{src} refused to freeze '{name}': {message} ({})",
                code.as_str()
            ),
            other => bail!("unexpected answer to FreezeDelta from {src}: {other:?}"),
        };
        self.times.t_frozen = started.elapsed();
        Ok(())
    }

    /// Frozen → Transferred: the delta streams through us to the
    /// destination.
    fn transfer(&mut self) -> Result<()> {
        fault::point("transfer");
        stream_image(
            &mut *self.src_c,
            &mut *self.dst_c,
            &self.src.name,
            &self.dst.name,
            &self.rec.name,
            self.times.image_len,
            true,
        )?;
        self.times.t_transferred = self.since_freeze();
        Ok(())
    }

    /// Transferred → Committed. The commit rule: the destination must be
    /// alive and answer right before `commit-sent` goes on record (if it is
    /// dead already the move rolls back, which is safe: no commit was sent);
    /// once on record (saved and fsync'd), the commit is sent, and a
    /// destination that dies from then on makes the capsule lost, never
    /// thawed at the source.
    fn commit(&mut self) -> Result<()> {
        fault::point("restore");
        self.destination_answers().with_context(|| {
            format!(
                "the destination {} does not answer before the commit",
                self.dst.name
            )
        })?;
        // Which boot of the destination gets the commit: one booted later
        // never had it (`recover::views_of`).
        self.intent.to_boot = self.dst.pid;
        self.set_phase(Phase::CommitSent)?;
        let (dst, name) = (&self.dst.name, &self.rec.name);
        let request = Request::RestoreCommit {
            name: name.clone(),
            epoch: self.intent.next_epoch,
        };
        if fault::action("commit-sent").is_some() {
            // Sent, and then: this process dies, or pauses while a test kills
            // a VM, or the answer is lost. In every case it is never read.
            self.dst_c.send_only(&request)?;
            fault::point("commit-sent");
            bail!("the answer to the commit was lost (fault injection)");
        }
        let info = match self.dst_c.call(&request) {
            Ok(Response::CapsuleStarted(info)) => info,
            Ok(Response::Error { code, message }) => {
                bail!("{dst} refused the image: {message} ({})", code.as_str())
            }
            Ok(other) => bail!("unexpected answer to RestoreCommit from {dst}: {other:?}"),
            Err(e) => {
                return Err(e.context(format!("the destination {dst} did not answer the commit")));
            }
        };
        fault::point("commit-answered");
        if info.state != CapsuleState::Running {
            bail!("{dst} restored '{name}' but it is {}", info.state.label());
        }
        // The router (routed labs) sends the capsule's traffic to the
        // destination from now on: across subnets no gratuitous ARP reaches
        // the peers behind it. (The zero-window hold of those peers during
        // the move is a later slice; it would end here.)
        self.env
            .committed(self.rec.locator, &self.dst, self.intent.next_epoch);
        self.times.t_running = Some(self.since_freeze());
        Ok(())
    }

    /// Committed → Released: the source forwards what it held to the
    /// destination and drops its frozen copy. A lost answer is asked again
    /// on a new connection (a copy already released is gone: `NotFound`
    /// means done); if the source still does not confirm, it is fenced at
    /// the new epoch, which ends its old copy, and a warning says so.
    fn release(&mut self) {
        fault::point("release");
        let (src, name) = (&self.src, &self.rec.name);
        let request = Request::ReleaseCapsule {
            name: name.clone(),
            forward_to: self.dst.ip,
        };
        // The first request after the commit's answer.
        let lose = ["commit-answered", "release"]
            .into_iter()
            .find(|p| fault::action(p) == Some(fault::Action::DropAnswer));
        let first = call_at(&mut *self.src_c, lose, "ReleaseCapsule", &request)
            .and_then(|r| expect_done(r, "to release the capsule", &src.name));
        if let Err(first) = first {
            // A dead source holds nothing: no connection attempt to wait for.
            if !self.env.is_alive(src) {
                eprintln!(
                    "capsulectl: warning: '{name}' runs on {} but {} died before it confirmed the release ({first:#})",
                    self.dst.name, src.name
                );
                self.times.t_released = Some(self.since_freeze());
                return;
            }
            let again = self
                .env
                .connect(src)
                .and_then(|mut c| match c.call(&request)? {
                    Response::Done
                    | Response::Error {
                        code: ErrorCode::NotFound,
                        ..
                    } => Ok(()),
                    other => expect_done(other, "to release the capsule", &src.name),
                });
            if again.is_ok() {
                eprintln!(
                    "capsulectl: warning: the answer of {} to the release of '{name}' was lost ({first:#}); asked again: released",
                    src.name
                );
            } else {
                let epoch = self.intent.next_epoch;
                let fenced = self.env.connect(src).and_then(|mut c| {
                    c.call(&Request::Fence {
                        name: name.clone(),
                        epoch,
                    })
                });
                eprintln!(
                    "capsulectl: warning: '{name}' runs on {} but {} did not release it ({first:#}); {}",
                    self.dst.name,
                    src.name,
                    match fenced {
                        Ok(_) => format!("its old copy is fenced at epoch {epoch}"),
                        Err(e) => format!(
                            "fencing it failed too ({e:#}); its next fence ends the old copy"
                        ),
                    }
                );
            }
        }
        self.times.t_released = Some(self.since_freeze());
    }

    /// Released → Recorded: the other VMs send what they held, and the
    /// directory records the destination at the new epoch.
    fn record(&mut self) -> Result<()> {
        hold_traffic(self.env, &self.src.name, self.rec.locator, false);
        fault::point("directory");
        if fault::action("directory") == Some(fault::Action::DropAnswer) {
            bail!("the directory write failed (fault injection at directory)");
        }
        let moved = Decision::Complete {
            vm: self.dst.name.clone(),
            epoch: self.intent.next_epoch,
            release_from: None,
        };
        close_intent(self.env, self.map, &self.rec, &self.intent, moved)
    }

    /// After any failure: aborts the destination's restore (first, on a new
    /// connection: a commit still queued there takes effect before it, or
    /// never), asks every VM what it holds, and lets `crate::recover` decide
    /// — asking silent VMs again for up to the settle timeout. `Ok` when the
    /// move took effect (the capsule runs at the destination and the
    /// directory says so); else the error `e`, saying where the capsule is:
    /// kept or thawed at the source, lost, or left with its intent open.
    pub fn settle(&mut self, e: anyhow::Error) -> Result<()> {
        let deadline = Instant::now() + self.settle_timeout;
        let name = self.rec.name.clone();
        loop {
            let views = recover::views_of(self.env, &name, &self.intent);
            let decision = recover::decide(&self.intent, &views, None);
            if let Decision::Undecided { why } = &decision {
                if Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(500).min(self.settle_timeout));
                    continue;
                }
                return Err(e.context(format!(
                    "'{name}' is left as it is ({}) with its move on record: {why}. Once the \
                     VMs answer, `capsulectl recover {name} --lab {}` (or any capsule command) \
                     finishes or undoes it",
                    self.intent.describe(),
                    self.env.lab_name()
                )));
            }
            let settled = match &decision {
                Decision::Complete { vm, .. } => {
                    if self.stage < Stage::Committed {
                        eprintln!(
                            "capsulectl: warning: {vm} took '{name}' but its answer was lost ({e:#}); completing the move"
                        );
                    }
                    String::new()
                }
                Decision::Lost { why } => format!("'{name}' is lost: {why}"),
                Decision::Ended { vm, state, .. } => format!(
                    "'{name}' moved to {vm} but is {} there now (the old copy is not thawed)",
                    state.label()
                ),
                Decision::Thaw { vm, .. } | Decision::Keep { vm, .. } => {
                    format!("'{name}' keeps running on {vm}")
                }
                other => format!("'{name}': {other:?}"),
            };
            let complete = matches!(decision, Decision::Complete { .. });
            return match close_intent(self.env, self.map, &self.rec, &self.intent, decision) {
                Ok(()) if complete => {
                    self.stage = Stage::Recorded;
                    Ok(())
                }
                Ok(()) => Err(e.context(settled)),
                Err(left) => Err(e.context(format!(
                    "'{name}' is left as it is with its move on record: {left:#}"
                ))),
            };
        }
    }

    /// Puts the intent at `phase` on record.
    fn set_phase(&mut self, phase: Phase) -> Result<()> {
        let mut next = self.intent.clone();
        next.phase = phase;
        write_intent(self.env, self.map, &self.rec.name, &next)?;
        self.intent = next;
        Ok(())
    }

    /// The destination's QEMU runs and it answers on our connection.
    fn destination_answers(&mut self) -> Result<()> {
        if !self.env.is_alive(&self.dst) {
            bail!("{} is dead (its QEMU is gone)", self.dst.name);
        }
        match self.dst_c.call(&Request::Version)? {
            Response::Version { .. } => Ok(()),
            other => bail!(
                "unexpected answer to Version from {}: {other:?}",
                self.dst.name
            ),
        }
    }

    fn since_freeze(&self) -> Duration {
        self.times
            .freeze_requested
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    fn report(&self) -> MigrationReport {
        let t = &self.times;
        let now = self.since_freeze();
        let t_running = t.t_running.unwrap_or(now);
        let t_released = t.t_released.unwrap_or(now);
        let transfer = t.t_transferred.saturating_sub(t.t_frozen);
        let freeze_offset = t
            .freeze_requested
            .map(|f| f.duration_since(self.called))
            .unwrap_or_default();
        MigrationReport {
            name: self.rec.name.clone(),
            from: self.src.name.clone(),
            to: self.dst.name.clone(),
            image_bytes: t.image_len,
            base_bytes: t.base_bytes,
            precopy_ms: t.precopy_ms,
            freeze_offset_ms: ms(freeze_offset),
            downtime_ms: ms(t_running),
            freeze_ms: ms(t.t_frozen),
            transfer_ms: ms(transfer),
            restore_ms: ms(t_running.saturating_sub(t.t_transferred)),
            release_ms: ms(t_released.saturating_sub(t_running)),
            total_ms: ms(t_released),
            transfer_mib_s: match t.t_running {
                Some(_) => t.image_len as f64 / (1 << 20) as f64 / transfer.as_secs_f64().max(1e-6),
                None => 0.0,
            },
        }
    }
}

/// The other VMs hold (or release) what their capsules send to `locator`.
/// Best effort: a VM that does not answer cannot send anything anyway; dead
/// VMs are skipped.
fn hold_traffic(env: &dyn Env, skip: &str, locator: Ipv4Addr, hold: bool) {
    for vm in env
        .vms()
        .iter()
        .filter(|v| v.name != skip && env.is_alive(v))
    {
        let request = if hold {
            Request::HoldTraffic { locator }
        } else {
            Request::ReleaseTraffic { locator }
        };
        let _ = env.connect(vm).and_then(|mut c| c.call(&request));
    }
}

/// `capsulectl migrate NAME --to VM`.
pub fn migrate(s: &LabSession, name: &str, to: &str) -> Result<MigrationReport> {
    let called = Instant::now();
    let (_lock, mut map) = s.lock_map(Some(name))?;
    Move::admit(s, &mut map, name, to, called)?.run()
}

/// `capsulectl thaw NAME`: resumes a capsule left frozen by an interrupted
/// operation — after asking every VM of the lab, so that it never runs in
/// two places — at a new epoch. Returns the VM it runs on.
pub fn thaw(s: &LabSession, name: &str) -> Result<String> {
    let (_lock, mut map) = s.lock_map(Some(name))?;
    let rec = record(s, &map, name)?;
    if let Some(why) = &rec.lost {
        bail!("'{name}' is lost ({why}): no copy is left to thaw");
    }
    let views = recover::views(s, &rec.name, None);
    // As if a move away from its VM had stopped half way: the same rules
    // decide (a running copy anywhere wins; silence decides nothing).
    let intent = Intent::new(IntentKind::Move, Some(&rec.vm), None, rec.epoch);
    let decision = recover::decide(&intent, &views, None);
    match &decision {
        Decision::Lost { why } => {
            bail!("no VM holds a copy of '{name}' to thaw ({why}); nothing changed")
        }
        Decision::Keep { vm, epoch } => {
            bail!("'{name}' is not frozen: it runs on {vm} (epoch {epoch}); nothing changed")
        }
        Decision::Ended {
            vm, epoch, state, ..
        } => {
            let (vm, epoch, state) = (vm.clone(), *epoch, state.label());
            let mut current = rec.clone();
            current.intent = Some(intent.clone());
            recover::apply(s, &mut map, &current, &intent, decision, "thaw")?;
            bail!(
                "'{name}' is not frozen: its newest copy (epoch {epoch}) is {state} on {vm}; \
                 the directory now names it, and older copies were fenced"
            )
        }
        _ => {}
    }
    let mut current = rec.clone();
    current.intent = Some(intent.clone());
    let done = recover::apply(s, &mut map, &current, &intent, decision, "thaw")?;
    done.vm
        .ok_or_else(|| anyhow!("'{name}' did not come back: {}", done.outcome))
}
