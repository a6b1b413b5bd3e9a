//! Moving capsules: `migrate` (VM to VM), `suspend` (VM to file), `resume`
//! (file to VM) and `inspect`.
//!
//! The order of a move (docs/control-protocol.md, "Moving a capsule"):
//! same build on both VMs → destination admits → the intent goes on record
//! in the directory (`crate::journal`) → pre-copy: the pages stream to the
//! destination while the capsule runs → the other VMs hold traffic to the
//! capsule → freeze at the source → the delta streams through us to the
//! destination → commit at the destination at the next epoch (the capsule
//! runs there) → release at the source (held packets and stragglers are
//! forwarded) → the other VMs release their traffic → the directory records
//! the new VM and epoch and drops the intent. Any failure before the commit
//! thaws the capsule at the source at a newer epoch still; after it, every
//! VM is asked what it holds (`crate::recover`). The capsule runs in exactly
//! one place at any time, also when this process dies half way.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use capsules_wire::control::{
    CapsuleInfo, CapsuleState, ErrorCode, MAX_IMAGE_CHUNK, PageBatch, Request, Response,
};
use capsules_wire::image::{self, CapsuleImage, SocketSummary, TaskSummary};
use serde::Serialize;

use crate::capsules::LabSession;
use crate::control::ControlClient;
use crate::directory::{self, CapsuleRecord};
use crate::fault;
use crate::journal::{self, Intent, IntentKind, Phase};
use crate::progress::Progress;
use crate::recover::{self, Decision};
use crate::state::VmRecord;

/// Where the key that seals suspended images on disk lives (created on first use).
pub const IMAGE_KEY_ENV: &str = "CAPSULES_IMAGE_KEY_FILE";
const DEFAULT_IMAGE_KEY_FILE: &str = "/var/lib/capsules/image.key";

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
    pub total_ms: f64,
    pub transfer_mib_s: f64,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn expect_done(resp: Response, what: &str, vm: &str) -> Result<()> {
    match resp {
        Response::Done => Ok(()),
        Response::Error { code, message } => {
            bail!("{vm} refused {what}: {message} ({})", code.as_str())
        }
        other => bail!("unexpected answer to {what} from {vm}: {other:?}"),
    }
}

fn build_id_hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// `client.call(request)`; but when a test configured `drop-answer` at
/// `phase` (`crate::fault`), the request is sent and carried out, and its
/// answer lost: read and thrown away, and an error returned as if it had
/// never come. The connection is of no further use then.
fn call_at(
    client: &mut ControlClient,
    phase: Option<&str>,
    what: &str,
    request: &Request,
) -> Result<Response> {
    if phase.is_some_and(|p| fault::action(p) == Some(fault::Action::DropAnswer)) {
        let _ = client.call(request);
        bail!(
            "the answer to {what} was lost (fault injection at {})",
            phase.unwrap_or("?")
        );
    }
    client.call(request)
}

/// Reads a frozen capsule's image from `client` and hands each chunk to `sink`
/// as it arrives.
fn read_image(
    client: &mut ControlClient,
    vm: &str,
    name: &str,
    len: u64,
    fault_phase: Option<&str>,
    mut sink: impl FnMut(u64, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let delay = fault::chunk_delay();
    let mut offset = 0;
    while offset < len {
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        // Only the first request of the stream may lose its answer.
        let phase = fault_phase.filter(|_| offset == 0);
        let resp = call_at(
            client,
            phase,
            "ReadImage",
            &Request::ReadImage {
                name: name.into(),
                offset,
                len: MAX_IMAGE_CHUNK as u32,
            },
        )?;
        let data = match resp {
            Response::ImageChunk { data } if !data.is_empty() => data,
            Response::ImageChunk { .. } => bail!("{vm} ended the image at {offset} of {len} bytes"),
            Response::Error { code, message } => bail!(
                "{vm} refused to send the image: {message} ({})",
                code.as_str()
            ),
            other => bail!("unexpected answer to ReadImage from {vm}: {other:?}"),
        };
        let n = data.len() as u64;
        sink(offset, data)?;
        offset += n;
    }
    Ok(())
}

/// The directory's record of capsule `name`.
fn record(s: &LabSession, map: &directory::DirectoryMap, name: &str) -> Result<CapsuleRecord> {
    map.get(name)
        .cloned()
        .ok_or_else(|| anyhow!("no capsule named '{name}' in lab '{}'", s.lab.name))
}

/// Freezes capsule `name` on the VM behind `client`; returns its image length.
fn freeze(client: &mut ControlClient, vm: &str, name: &str) -> Result<u64> {
    match client.call(&Request::FreezeCapsule { name: name.into() })? {
        Response::Frozen { image_len } => Ok(image_len),
        Response::Error { code, message } => {
            bail!(
                "{vm} refused to freeze '{name}': {message} ({})",
                code.as_str()
            )
        }
        other => bail!("unexpected answer to FreezeCapsule from {vm}: {other:?}"),
    }
}

/// Sends an image to `client` in chunks and commits it, counting the bytes
/// sent on `progress`.
fn restore_image(
    client: &mut ControlClient,
    vm: &str,
    name: &str,
    bytes: &[u8],
    epoch: u64,
    progress: &Progress,
) -> Result<CapsuleInfo> {
    expect_done(
        client.call(&Request::RestoreBegin {
            name: name.into(),
            image_len: bytes.len() as u64,
        })?,
        "the image",
        vm,
    )?;
    for (i, chunk) in bytes.chunks(MAX_IMAGE_CHUNK).enumerate() {
        let offset = (i * MAX_IMAGE_CHUNK) as u64;
        expect_done(
            client.call(&Request::RestoreChunk {
                name: name.into(),
                offset,
                data: chunk.to_vec(),
            })?,
            "an image chunk",
            vm,
        )?;
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    commit(
        client,
        vm,
        &Request::RestoreCommit {
            name: name.into(),
            epoch,
        },
    )
}

fn commit(client: &mut ControlClient, vm: &str, request: &Request) -> Result<CapsuleInfo> {
    match client.call(request)? {
        Response::CapsuleStarted(info) => Ok(info),
        Response::Error { code, message } => {
            bail!("{vm} refused the image: {message} ({})", code.as_str())
        }
        other => bail!("unexpected answer to RestoreCommit from {vm}: {other:?}"),
    }
}

/// The other VMs hold (or release) what their capsules send to `locator`.
/// Best effort: a VM that does not answer cannot send anything anyway.
fn hold_traffic(s: &LabSession, skip: &str, locator: std::net::Ipv4Addr, hold: bool) {
    for vm in s.lab.vms.iter().filter(|v| v.name != skip) {
        let request = if hold {
            Request::HoldTraffic { locator }
        } else {
            Request::ReleaseTraffic { locator }
        };
        let _ = s.connect(vm).and_then(|mut c| c.call(&request));
    }
}

/// `capsulectl migrate NAME --to VM`.
pub fn migrate(s: &LabSession, name: &str, to: &str) -> Result<MigrationReport> {
    let called = Instant::now();
    let (_lock, mut map) = s.lock_map(Some(name))?;
    let rec = record(s, &map, name)?;
    if let Some(why) = &rec.lost {
        bail!("'{name}' is lost ({why}): no copy is left to move");
    }
    let src = s.vm(&rec.vm)?.clone();
    let dst = s.vm(to)?.clone();
    if src.name == dst.name {
        bail!("'{name}' already runs on {to}");
    }
    let mut src_c = s.connect(&src)?;
    let mut dst_c = s.connect(&dst)?;
    let (src_build, dst_build) = (
        src_c.hello().build_id.clone(),
        dst_c.hello().build_id.clone(),
    );
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
        Response::Capsules(list) => {
            list.into_iter()
                .find(|c| c.name == rec.name)
                .ok_or_else(|| {
                    anyhow!(
                        "{} does not run '{name}' (the directory is out of date)",
                        src.name
                    )
                })?
        }
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
    // Admission before anything stops: memory and name at the destination.
    // The delta cannot be longer than the mapped arena plus metadata; the
    // bound leaves room for the capsule to grow until it is frozen (a quarter,
    // at least 1 MiB). The destination wants free memory for twice this: the
    // arena, and the delta while it arrives.
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
    let mut intent = Intent::new(
        IntentKind::Move,
        Some(&src.name),
        Some(&dst.name),
        info.epoch,
    );
    write_intent(s, &mut map, &rec.name, &intent)?;
    let next_epoch = intent.next_epoch;
    fault::point("precopy");
    let precopy_started = Instant::now();
    let base_bytes = match precopy(&mut src_c, &mut dst_c, &src, &dst, &rec.name, admission_len) {
        Ok(len) => len,
        Err(e) => {
            // The capsule never stopped; only the destination has something
            // to drop (asked on a new connection: the old one may be what
            // failed; else the destination drops it by itself after a minute).
            let _ = s.connect(&dst).and_then(|mut c| {
                c.call(&Request::RestoreAbort {
                    name: rec.name.clone(),
                })
            });
            close_intent(
                s,
                &mut map,
                &rec,
                &intent,
                Decision::Keep {
                    vm: src.name.clone(),
                    epoch: info.epoch,
                },
            )?;
            return Err(e.context(format!(
                "pre-copy failed; '{name}' keeps running on {}",
                src.name
            )));
        }
    };
    let precopy_ms = ms(precopy_started.elapsed());
    intent.phase = Phase::Freeze;
    write_intent(s, &mut map, &rec.name, &intent)?;
    hold_traffic(s, &src.name, rec.locator, true);
    fault::point("freeze");
    let started = Instant::now();
    let frozen = freeze_and_stream(&mut src_c, &mut dst_c, &src, &dst, &rec.name, started)
        .and_then(|times| {
            // The commit rule: the destination must be alive right before
            // `commit-sent` goes on record (if it is dead already the move
            // rolls back, which is safe: no commit was sent); once on record
            // (saved and fsync'd), a destination that dies makes the
            // capsule lost, never thawed at the source.
            answers(&mut dst_c, &dst).with_context(|| {
                format!(
                    "the destination {} does not answer before the commit",
                    dst.name
                )
            })?;
            let mut sent = intent.clone();
            sent.phase = Phase::CommitSent;
            write_intent(s, &mut map, &rec.name, &sent)?;
            intent = sent;
            Ok(times)
        });
    let (image_len, t_frozen, t_transferred) = match frozen {
        Ok(times) => times,
        Err(e) => {
            // The destination never got the commit: it runs nothing. Drop its
            // restore (on a new connection: the old one may be what failed),
            // then resume the capsule at the source.
            let _ = s.connect(&dst).and_then(|mut c| {
                c.call(&Request::RestoreAbort {
                    name: rec.name.clone(),
                })
            });
            return Err(roll_back(s, &mut map, &rec, &intent, e));
        }
    };
    let t_running = match send_commit(&mut dst_c, &dst, &rec.name, next_epoch) {
        Ok(_) => started.elapsed(),
        Err(e) => {
            // The commit was sent: the destination may run the capsule now.
            // Ask every VM what it holds, and finish or settle from that.
            settle_after_commit(s, &mut map, &rec, &intent, e)?;
            started.elapsed()
        }
    };
    if map.get(&rec.name).is_some_and(|r| r.intent.is_none()) {
        // Settled above: the source was released and the move recorded.
        let t = started.elapsed();
        return Ok(MigrationReport {
            name: rec.name,
            from: src.name,
            to: dst.name,
            image_bytes: image_len,
            base_bytes,
            precopy_ms,
            freeze_offset_ms: ms(started.duration_since(called)),
            downtime_ms: ms(t_running),
            freeze_ms: ms(t_frozen),
            transfer_ms: ms(t_transferred - t_frozen),
            restore_ms: ms(t_running - t_transferred),
            release_ms: ms(t - t_running),
            total_ms: ms(t),
            transfer_mib_s: 0.0,
        });
    }
    fault::point("release");
    release_source(s, &mut src_c, &src, &dst, &rec.name, next_epoch);
    let t_released = started.elapsed();
    hold_traffic(s, &src.name, rec.locator, false);
    fault::point("directory");
    let moved = Decision::Complete {
        vm: dst.name.clone(),
        epoch: next_epoch,
        release_from: None,
    };
    let recorded = if fault::action("directory") == Some(fault::Action::DropAnswer) {
        Err(anyhow!(
            "the directory write failed (fault injection at directory)"
        ))
    } else {
        close_intent(s, &mut map, &rec, &intent, moved)
    };
    if let Err(e) = recorded {
        // Whatever the VMs hold decides, as `recover` would.
        settle_after_commit(s, &mut map, &rec, &intent, e)?;
    }
    let transfer = t_transferred - t_frozen;
    Ok(MigrationReport {
        name: rec.name,
        from: src.name,
        to: dst.name,
        image_bytes: image_len,
        base_bytes,
        precopy_ms,
        freeze_offset_ms: ms(started.duration_since(called)),
        downtime_ms: ms(t_running),
        freeze_ms: ms(t_frozen),
        transfer_ms: ms(transfer),
        restore_ms: ms(t_running - t_transferred),
        release_ms: ms(t_released - t_running),
        total_ms: ms(t_released),
        transfer_mib_s: image_len as f64 / (1 << 20) as f64 / transfer.as_secs_f64().max(1e-6),
    })
}

/// Puts `intent` on the capsule's record (saved, and appended to the
/// journal file).
fn write_intent(
    s: &LabSession,
    map: &mut directory::DirectoryMap,
    name: &str,
    intent: &Intent,
) -> Result<()> {
    let rec = map
        .get_mut(name)
        .ok_or_else(|| anyhow!("'{name}' left the directory"))?;
    rec.intent = Some(intent.clone());
    directory::save(&s.dir, map)?;
    journal::log_intent(&s.dir, name, intent)
}

/// Records how the operation ended (and carries out what the decision still
/// asks: fences, a thaw). The intent is gone from the record afterwards.
fn close_intent(
    s: &LabSession,
    map: &mut directory::DirectoryMap,
    rec: &CapsuleRecord,
    intent: &Intent,
    decision: Decision,
) -> Result<()> {
    let mut current = map.get(&rec.name).cloned().unwrap_or_else(|| rec.clone());
    current.intent = Some(intent.clone());
    recover::apply(s, map, &current, intent, decision, "migrate").map(|_| ())
}

/// A move failed before the commit was sent: the source's frozen copy (if
/// it froze) resumes at an epoch above anything the move gave out, and the
/// other VMs let go of what they held. Returns the error to report.
fn roll_back(
    s: &LabSession,
    map: &mut directory::DirectoryMap,
    rec: &CapsuleRecord,
    intent: &Intent,
    e: anyhow::Error,
) -> anyhow::Error {
    let src = intent.from.clone().unwrap_or_default();
    let views = recover::views(s, &rec.name, None);
    let decision = recover::decide(intent, &views, None);
    match close_intent(s, map, rec, intent, decision) {
        Ok(()) => e.context(format!("'{}' keeps running on {src}", rec.name)),
        Err(undone) => e.context(format!("and resuming it failed too: {undone:#}")),
    }
}

/// The commit was sent but its answer did not come. Whatever the VMs hold
/// now decides (see `crate::recover`): `Ok` when the capsule runs at the
/// destination (the move is recorded, and the source released). A
/// destination that stays silent for [`RESOLVE_TIMEOUT`] leaves the capsule
/// frozen, the intent open, and `capsulectl recover` to finish the job once
/// it answers.
fn settle_after_commit(
    s: &LabSession,
    map: &mut directory::DirectoryMap,
    rec: &CapsuleRecord,
    intent: &Intent,
    e: anyhow::Error,
) -> Result<()> {
    let deadline = Instant::now() + RESOLVE_TIMEOUT;
    loop {
        let views = recover::views(s, &rec.name, intent.to.as_deref());
        let decision = recover::decide(intent, &views, None);
        if let Decision::Undecided { why } = &decision {
            if Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(500));
                continue;
            }
            return Err(e.context(format!(
                "'{}' is left frozen on {} with its move on record: {why}. Once the VMs answer, \
                 `capsulectl recover {} --lab {}` (or any capsule command) finishes or undoes it",
                rec.name,
                intent.from.as_deref().unwrap_or("?"),
                rec.name,
                s.lab.name
            )));
        }
        let complete = matches!(decision, Decision::Complete { .. });
        if let Decision::Complete { vm, .. } = &decision {
            eprintln!(
                "capsulectl: warning: {vm} took '{}' but its answer was lost ({e:#}); completing the move",
                rec.name
            );
        }
        let settled = match &decision {
            Decision::Lost { why } => format!("'{}' is lost: {why}", rec.name),
            Decision::Thaw { vm, .. } | Decision::Keep { vm, .. } => {
                format!("'{}' keeps running on {vm}", rec.name)
            }
            _ => format!("'{}' was settled", rec.name),
        };
        return match close_intent(s, map, rec, intent, decision) {
            Ok(()) if complete => Ok(()),
            Ok(()) => Err(e.context(settled)),
            Err(left) => Err(e.context(format!(
                "'{}' is left as it is with its move on record: {left:#}",
                rec.name
            ))),
        };
    }
}

/// How long to keep asking a destination that was sent a commit.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

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
        _ => {}
    }
    let mut current = rec.clone();
    current.intent = Some(intent.clone());
    let done = recover::apply(s, &mut map, &current, &intent, decision, "thaw")?;
    done.vm
        .ok_or_else(|| anyhow!("'{name}' did not come back: {}", done.outcome))
}

/// Streams the image of `name` that the source holds (`len` bytes) to the
/// destination: one thread reads chunks from the source while this one
/// writes them, so neither waits for the whole image.
fn stream_image(
    src_c: &mut ControlClient,
    dst_c: &mut ControlClient,
    src: &VmRecord,
    dst: &VmRecord,
    name: &str,
    len: u64,
    faults: bool,
) -> Result<()> {
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(8);
    std::thread::scope(|scope| -> Result<()> {
        // Owned by this closure: if writing to the destination fails, the
        // receiver goes away with it, the reader's next send fails, and the
        // scope can end (else the reader would wait forever on a full channel).
        let rx = rx;
        // The sender moves into the reader, so the channel closes when it ends.
        let reader = scope.spawn(move || {
            let phase = faults.then_some("transfer");
            read_image(src_c, &src.name, name, len, phase, |off, data| {
                tx.send((off, data))
                    .map_err(|_| anyhow!("the destination stopped taking the image"))
            })
        });
        for (offset, data) in rx.iter() {
            // The last chunk is where a test may lose the answer at `restore`.
            let last = offset + data.len() as u64 >= len;
            let phase = (faults && last).then_some("restore");
            expect_done(
                call_at(
                    dst_c,
                    phase,
                    "the last RestoreChunk",
                    &Request::RestoreChunk {
                        name: name.into(),
                        offset,
                        data,
                    },
                )?,
                "an image chunk",
                &dst.name,
            )?;
        }
        reader
            .join()
            .map_err(|_| anyhow!("image reader panicked"))?
            .with_context(|| format!("reading the image from the source {}", src.name))
    })
}

/// Pre-copy: the whole capsule goes to the destination while it keeps
/// running; returns the base image's length. Afterwards only the pages it
/// writes until the freeze need to move while it stands still.
fn precopy(
    src_c: &mut ControlClient,
    dst_c: &mut ControlClient,
    src: &VmRecord,
    dst: &VmRecord,
    name: &str,
    admission_len: u64,
) -> Result<u64> {
    let base_len = match call_at(
        src_c,
        Some("precopy"),
        "PrecopyCapsule",
        &Request::PrecopyCapsule { name: name.into() },
    )? {
        Response::Frozen { image_len } => image_len,
        Response::Error { code, message } => bail!(
            "{} refused to pre-copy '{name}': {message} ({})",
            src.name,
            code.as_str()
        ),
        other => bail!(
            "unexpected answer to PrecopyCapsule from {}: {other:?}",
            src.name
        ),
    };
    // The base is the capsule's identity: the destination admits it and
    // maps its window, then the pages follow while the capsule runs on.
    stream_image(src_c, dst_c, src, dst, name, base_len, false)?;
    expect_done(
        dst_c.call(&Request::RestoreStage { name: name.into() })?,
        "the base image",
        &dst.name,
    )?;
    let progress = Progress::bytes(
        0,
        format!("pre-copy of '{name}' {} -> {}", src.name, dst.name),
    );
    let page_bytes = stream_pages(src_c, dst_c, src, dst, name, &progress)?;
    progress.finish();
    // The delta comes as a second image of the same name.
    expect_done(
        dst_c.call(&Request::RestoreBegin {
            name: name.into(),
            image_len: admission_len,
        })?,
        "the delta image",
        &dst.name,
    )?;
    Ok(base_len + page_bytes)
}

/// Pre-copy of the pages: one thread asks the source for batch after batch
/// (each answer is a short kernel-loop round there, so the capsule keeps
/// serving) while this one lays them into the destination's window.
/// Returns the bytes of page data moved. `progress` follows the source's
/// scan through the arena (zero pages are scanned, not sent).
fn stream_pages(
    src_c: &mut ControlClient,
    dst_c: &mut ControlClient,
    src: &VmRecord,
    dst: &VmRecord,
    name: &str,
    progress: &Progress,
) -> Result<u64> {
    let (tx, rx) = mpsc::sync_channel::<PageBatch>(4);
    std::thread::scope(|scope| -> Result<u64> {
        let rx = rx;
        let reader = scope.spawn(move || -> Result<()> {
            let delay = fault::chunk_delay();
            let mut from = 0;
            loop {
                if let Some(d) = delay {
                    std::thread::sleep(d);
                }
                let batch = match src_c.call(&Request::ReadPages {
                    name: name.into(),
                    from,
                })? {
                    Response::Pages(batch) => batch,
                    Response::Error { code, message } => bail!(
                        "{} refused to read pages of '{name}': {message} ({})",
                        src.name,
                        code.as_str()
                    ),
                    other => bail!(
                        "unexpected answer to ReadPages from {}: {other:?}",
                        src.name
                    ),
                };
                if batch.next <= from && batch.next < batch.end {
                    bail!("{} did not advance its page scan at {from}", src.name);
                }
                from = batch.next;
                let done = batch.next >= batch.end;
                if !batch.offsets.is_empty() {
                    tx.send(batch)
                        .map_err(|_| anyhow!("the destination stopped taking pages"))?;
                }
                if done {
                    return Ok(());
                }
            }
        });
        let mut bytes = 0;
        for batch in rx.iter() {
            bytes += batch.data.len() as u64;
            let (next, end) = (batch.next, batch.end);
            expect_done(
                dst_c.call(&Request::StagePages {
                    name: name.into(),
                    batch,
                })?,
                "pre-copied pages",
                &dst.name,
            )?;
            progress.set_length(end);
            progress.set_position(next);
        }
        reader
            .join()
            .map_err(|_| anyhow!("page reader panicked"))?
            .with_context(|| format!("reading pages from the source {}", src.name))?;
        Ok(bytes)
    })
}

/// Freeze (only pages written since the pre-copy) and stream the delta to
/// the destination. Returns the delta's length and the times (since
/// `start`) when the capsule was frozen and the image was across.
fn freeze_and_stream(
    src_c: &mut ControlClient,
    dst_c: &mut ControlClient,
    src: &VmRecord,
    dst: &VmRecord,
    name: &str,
    start: Instant,
) -> Result<(u64, std::time::Duration, std::time::Duration)> {
    let image_len = match call_at(
        src_c,
        Some("freeze"),
        "FreezeDelta",
        &Request::FreezeDelta { name: name.into() },
    )? {
        Response::Frozen { image_len } => image_len,
        Response::Error { code, message } => bail!(
            "{} refused to freeze '{name}': {message} ({})",
            src.name,
            code.as_str()
        ),
        other => bail!(
            "unexpected answer to FreezeDelta from {}: {other:?}",
            src.name
        ),
    };
    let t_frozen = start.elapsed();
    fault::point("transfer");
    stream_image(src_c, dst_c, src, dst, name, image_len, true)?;
    let t_transferred = start.elapsed();
    fault::point("restore");
    Ok((image_len, t_frozen, t_transferred))
}

/// Whether the destination is alive and answers, asked right before the
/// commit is put on record: its QEMU runs and it answers on `c`.
fn answers(c: &mut ControlClient, vm: &VmRecord) -> Result<()> {
    if !vm.pid.is_some_and(|pid| crate::lab::is_our_qemu(pid, vm)) {
        bail!("{} is dead (its QEMU is gone)", vm.name);
    }
    match c.call(&Request::Version)? {
        Response::Version { .. } => Ok(()),
        other => bail!("unexpected answer to Version from {}: {other:?}", vm.name),
    }
}

/// Sends the commit to the destination (the intent says `commit-sent`
/// already) and reads its answer.
fn send_commit(
    dst_c: &mut ControlClient,
    dst: &VmRecord,
    name: &str,
    epoch: u64,
) -> Result<CapsuleInfo> {
    let request = Request::RestoreCommit {
        name: name.into(),
        epoch,
    };
    if fault::action("commit-sent").is_some() {
        // Sent, and then: this process dies, or pauses while a test kills a
        // VM, or the answer is lost. In every case the answer is never read.
        dst_c.send_only(&request)?;
        fault::point("commit-sent");
        bail!("the answer to the commit was lost (fault injection)");
    }
    let info = commit(dst_c, &dst.name, &request)
        .with_context(|| format!("the destination {} did not take the capsule", dst.name))?;
    fault::point("commit-answered");
    if info.state != CapsuleState::Running {
        bail!(
            "{} restored '{name}' but it is {}",
            dst.name,
            info.state.label()
        );
    }
    Ok(info)
}

/// Releases the source's frozen copy once the destination runs the
/// capsule: its held packets go to the destination. A lost answer is asked
/// again on a new connection (a copy already released is gone: `NotFound`
/// means done); if the source still does not confirm, it is fenced at
/// `epoch`, which ends its old copy, and a warning says so.
fn release_source(
    s: &LabSession,
    src_c: &mut ControlClient,
    src: &VmRecord,
    dst: &VmRecord,
    name: &str,
    epoch: u64,
) {
    let request = Request::ReleaseCapsule {
        name: name.into(),
        forward_to: dst.ip,
    };
    let lose = ["commit-answered", "release"]
        .into_iter()
        .find(|p| fault::action(p) == Some(fault::Action::DropAnswer));
    let first = call_at(src_c, lose, "ReleaseCapsule", &request)
        .and_then(|r| expect_done(r, "to release the capsule", &src.name));
    let Err(first) = first else { return };
    let again = s.connect(src).and_then(|mut c| match c.call(&request)? {
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
        return;
    }
    let fenced = s.connect(src).and_then(|mut c| {
        c.call(&Request::Fence {
            name: name.into(),
            epoch,
        })
    });
    eprintln!(
        "capsulectl: warning: '{name}' runs on {} but {} did not release it ({first:#}); {}",
        dst.name,
        src.name,
        match fenced {
            Ok(_) => format!("its old copy is fenced at epoch {epoch}"),
            Err(e) => format!("fencing it failed too ({e:#}); its next fence ends the old copy"),
        }
    );
}

/// A fresh random nonce for sealing an image.
fn image_nonce() -> Result<image::ImageNonce> {
    let mut nonce = image::ImageNonce::default();
    getrandom::fill(&mut nonce).map_err(|e| anyhow!("no randomness for an image nonce: {e}"))?;
    Ok(nonce)
}

/// The key that seals images on disk: 32 random bytes in a 0600 file,
/// created on first use. Survives labs, so a capsule suspended in one lab
/// can be resumed in a later one.
pub fn image_key() -> Result<Vec<u8>> {
    let path = PathBuf::from(
        std::env::var_os(IMAGE_KEY_ENV).unwrap_or_else(|| DEFAULT_IMAGE_KEY_FILE.into()),
    );
    match fs::read(&path) {
        Ok(key) if key.len() == 32 => return Ok(key),
        Ok(_) => bail!(
            "image key file {} is damaged (not 32 bytes)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read image key {}", path.display()));
        }
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut key = vec![0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow!("no randomness for the image key: {e}"))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create image key {}", path.display()))?;
    f.write_all(&key)?;
    Ok(key)
}

/// `capsulectl suspend NAME -o FILE`: freeze, save, end it on its VM.
pub fn suspend(s: &LabSession, name: &str, out: &Path) -> Result<(CapsuleRecord, u64)> {
    let file_key = image_key()?;
    let (_lock, mut map) = s.lock_map(Some(name))?;
    let rec = record(s, &map, name)?;
    if let Some(why) = &rec.lost {
        bail!("'{name}' is lost ({why}): no copy is left to suspend");
    }
    let vm = s.vm(&rec.vm)?.clone();
    let mut c = s.connect(&vm)?;
    let mut intent = Intent::new(IntentKind::Suspend, Some(&vm.name), None, rec.epoch);
    // Absolute: `recover` may run from another directory.
    intent.file = Some(std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf()));
    write_intent(s, &mut map, &rec.name, &intent)?;
    fault::point("freeze");
    let saved = (|| -> Result<u64> {
        let image_len = freeze(&mut c, &vm.name, &rec.name)?;
        fault::point("transfer");
        let progress = Progress::bytes(
            image_len,
            format!("suspend '{name}' {} -> {}", vm.name, out.display()),
        );
        let mut bytes = Vec::with_capacity(image_len as usize);
        read_image(&mut c, &vm.name, &rec.name, image_len, None, |_, data| {
            progress.inc(data.len() as u64);
            bytes.extend_from_slice(&data);
            Ok(())
        })?;
        progress.finish();
        let sealed = image::reseal(&bytes, &s.lab.image_key()?, &file_key)
            .map_err(|e| anyhow!("the image from {} does not verify: {e}", vm.name))?;
        crate::state::write_atomically(out, &sealed, 0o600)?;
        Ok(image_len)
    })();
    let image_len = match saved {
        Ok(len) => len,
        Err(e) => {
            // Nothing was written: the copy on the VM is the capsule still.
            let views = recover::views(s, &rec.name, None);
            let decision = recover::decide(&intent, &views, None);
            return Err(match close_intent(s, &mut map, &rec, &intent, decision) {
                Ok(()) => e.context(format!("'{name}' keeps running on {}", vm.name)),
                Err(left) => e.context(format!("and resuming it failed too: {left:#}")),
            });
        }
    };
    fault::point("commit-sent");
    match c.call(&Request::KillCapsule {
        name: rec.name.clone(),
    })? {
        Response::Killed => {}
        other => eprintln!(
            "capsulectl: warning: saved, but {} did not end '{name}': {other:?}",
            vm.name
        ),
    }
    fault::point("directory");
    close_intent(s, &mut map, &rec, &intent, Decision::Suspended)?;
    Ok((rec, image_len))
}

/// Reads and verifies a suspended image file.
pub fn load_image_file(path: &Path) -> Result<(Vec<u8>, CapsuleImage)> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let image = CapsuleImage::decode(&bytes, &image_key()?)
        .map_err(|e| anyhow!("{} is not a usable capsule image: {e}", path.display()))?;
    Ok((bytes, image))
}

/// `capsulectl resume FILE [--on VM] [--name NAME] [--force]`. An image
/// older than the directory's epoch for its name is a stale copy (the
/// capsule went on running, or was resumed, after it was saved): refused
/// unless `force`.
pub fn resume(
    s: &LabSession,
    path: &Path,
    on: Option<&str>,
    rename: Option<&str>,
    force: bool,
) -> Result<CapsuleRecord> {
    let (_, mut img) = load_image_file(path)?;
    if let Some(n) = rename {
        directory::validate_capsule_name(n)?;
        img.name = n.to_string();
    }
    let (_lock, mut map) = s.lock_map(Some(&img.name))?;
    let known = map.last_epoch(&img.name);
    if known > img.epoch && !force {
        bail!(
            "{} holds epoch {} of '{}', but the lab's directory has seen epoch {known}: the \
             capsule ran (or was resumed) after this image was saved. Resuming it would bring \
             back an old copy; --force does it anyway",
            path.display(),
            img.epoch,
            img.name
        );
    }
    let vm = match on {
        Some(v) => s.vm(v)?.clone(),
        None => s
            .lab
            .vms
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("lab '{}' has no VMs", s.lab.name))?,
    };
    let mut c = s.connect(&vm)?;
    if c.hello().build_id != img.build_id {
        bail!(
            "{} runs kernel build {} but the image comes from build {}; it only revives on the same build",
            vm.name,
            build_id_hex(&c.hello().build_id),
            build_id_hex(&img.build_id)
        );
    }
    let intent = Intent::new(
        IntentKind::Resume,
        None,
        Some(&vm.name),
        known.max(img.epoch),
    );
    let epoch = intent.next_epoch;
    let record = CapsuleRecord {
        name: img.name.clone(),
        program: img.program.clone(),
        args: img.args.clone(),
        locator: img.locator,
        slot: img.slot,
        vm: vm.name.clone(),
        memory_limit: img.memory_limit,
        created_unix: journal::unix_now(),
        epoch,
        intent: Some(intent.clone()),
        lost: None,
    };
    // The locator and slot are the capsule's own (its connections and its
    // memory window): they must be free in this lab. The record goes in with
    // the intent, so a resume cut short is found and undone.
    map.insert(record.clone()).context("cannot resume here")?;
    directory::save(&s.dir, &map)?;
    journal::log_intent(&s.dir, &record.name, &intent)?;
    let sealed = img.encode_for_transfer(&s.lab.image_key()?, &image_nonce()?);
    let progress = Progress::bytes(
        sealed.len() as u64,
        format!("resume '{}' {} -> {}", img.name, path.display(), vm.name),
    );
    fault::point("transfer");
    let restored = restore_image(&mut c, &vm.name, &img.name, &sealed, epoch, &progress);
    fault::point("directory");
    let decision = match &restored {
        Ok(info) if info.state == CapsuleState::Running => Decision::Complete {
            vm: vm.name.clone(),
            epoch,
            release_from: None,
        },
        _ => {
            let views = recover::views(s, &record.name, Some(&vm.name));
            recover::decide(&intent, &views, None)
        }
    };
    close_intent(s, &mut map, &record, &intent, decision)?;
    match restored {
        Ok(info) if info.state == CapsuleState::Running => {}
        Ok(info) => bail!(
            "{} restored '{}' but it is {}",
            vm.name,
            img.name,
            info.state.label()
        ),
        Err(e) => return Err(e),
    }
    let mut record = record;
    record.intent = None;
    Ok(record)
}

/// What `inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
    pub locator: String,
    pub slot: u32,
    pub vm: Option<String>,
    pub build_id: Option<String>,
    pub state: Option<String>,
    pub memory_mapped_bytes: Option<u64>,
    pub memory_in_image_bytes: Option<u64>,
    pub segments: Option<usize>,
    pub clock_ms: Option<u64>,
    pub image_bytes: Option<u64>,
    pub tasks: Vec<TaskView>,
    pub sockets: Vec<SocketView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    pub id: u32,
    pub name: String,
    pub state: String,
    pub rip: String,
    pub rsp: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SocketView {
    pub protocol: String,
    pub local: String,
    pub remote: String,
    pub state: String,
    pub send_queue: u32,
    pub recv_queue: u32,
}

fn task_views(tasks: &[TaskSummary]) -> Vec<TaskView> {
    tasks
        .iter()
        .map(|t| TaskView {
            id: t.id,
            name: t.name.clone(),
            state: t.state.clone(),
            rip: format!("{:#x}", t.rip),
            rsp: format!("{:#x}", t.rsp),
        })
        .collect()
}

fn socket_views(sockets: &[SocketSummary]) -> Vec<SocketView> {
    sockets
        .iter()
        .map(|s| SocketView {
            protocol: s.protocol.clone(),
            local: s.local.clone(),
            remote: s.remote.clone(),
            state: s.state.clone(),
            send_queue: s.send_queue,
            recv_queue: s.recv_queue,
        })
        .collect()
}

/// `capsulectl inspect FILE`.
pub fn inspect_file(path: &Path) -> Result<Inspection> {
    let (bytes, img) = load_image_file(path)?;
    Ok(Inspection {
        name: img.name.clone(),
        program: img.program.clone(),
        args: img.args.clone(),
        locator: img.locator.to_string(),
        slot: img.slot,
        vm: None,
        build_id: Some(build_id_hex(&img.build_id)),
        state: Some("suspended".into()),
        memory_mapped_bytes: Some(img.arena_len),
        memory_in_image_bytes: Some(img.segments.iter().map(|s| s.data.len() as u64).sum()),
        segments: Some(img.segments.len()),
        clock_ms: Some(img.clock_ns / 1_000_000),
        image_bytes: Some(bytes.len() as u64),
        tasks: task_views(&img.tasks),
        sockets: socket_views(&img.sockets),
    })
}

/// `capsulectl inspect NAME` (a capsule in the lab).
pub fn inspect_capsule(s: &LabSession, name: &str) -> Result<Inspection> {
    let map = s.load_map()?;
    let rec = map.get(name).cloned().ok_or_else(|| {
        anyhow!(
            "no capsule named '{name}' in lab '{}' and no such file",
            s.lab.name
        )
    })?;
    let vm = s.vm(&rec.vm)?.clone();
    let mut c = s.connect(&vm)?;
    let build_id = Some(build_id_hex(&c.hello().build_id));
    let info = match c.call(&Request::ListCapsules)? {
        Response::Capsules(list) => list.into_iter().find(|i| i.name == rec.name),
        _ => None,
    };
    let (tasks, sockets) = match c.call(&Request::InspectCapsule {
        name: rec.name.clone(),
    })? {
        Response::Inspection { tasks, sockets } => (tasks, sockets),
        Response::Error { message, .. } => bail!("{} cannot inspect '{name}': {message}", vm.name),
        other => bail!("unexpected answer to InspectCapsule: {other:?}"),
    };
    Ok(Inspection {
        name: rec.name.clone(),
        program: rec.program.clone(),
        args: rec.args.clone(),
        locator: rec.locator.to_string(),
        slot: rec.slot,
        vm: Some(vm.name.clone()),
        build_id,
        state: info.as_ref().map(|i| i.state.label().to_string()),
        memory_mapped_bytes: info.as_ref().map(|i| i.memory_bytes),
        memory_in_image_bytes: None,
        segments: None,
        clock_ms: info.as_ref().map(|i| i.uptime_ns / 1_000_000),
        image_bytes: None,
        tasks: task_views(&tasks),
        sockets: socket_views(&sockets),
    })
}

/// Human-readable rendering of an inspection.
pub fn render_inspection(i: &Inspection) -> String {
    let mut out = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "capsule   {} ({} {})",
        i.name,
        i.program,
        i.args.join(" ")
    );
    let _ = writeln!(out, "locator   {}   slot {}", i.locator, i.slot);
    if let Some(vm) = &i.vm {
        let _ = writeln!(out, "vm        {vm}");
    }
    if let Some(state) = &i.state {
        let _ = writeln!(out, "state     {state}");
    }
    if let Some(b) = &i.build_id {
        let _ = writeln!(out, "build     {b}");
    }
    if let Some(m) = i.memory_mapped_bytes {
        let _ = write!(out, "memory    {} KiB mapped", m / 1024);
        if let (Some(img), Some(segs)) = (i.memory_in_image_bytes, i.segments) {
            let _ = write!(
                out,
                ", {} KiB in {segs} segments (zero pages skipped)",
                img / 1024
            );
        }
        let _ = writeln!(out);
    }
    if let Some(c) = i.clock_ms {
        let _ = writeln!(out, "clock     {c} ms");
    }
    if let Some(b) = i.image_bytes {
        let _ = writeln!(out, "image     {b} bytes");
    }
    let _ = writeln!(out, "tasks ({}):", i.tasks.len());
    for t in &i.tasks {
        let _ = writeln!(
            out,
            "  {:>3} {:<12} {:<24} rip {} rsp {}",
            t.id, t.name, t.state, t.rip, t.rsp
        );
    }
    let _ = writeln!(out, "sockets ({}):", i.sockets.len());
    for s in &i.sockets {
        let _ = writeln!(
            out,
            "  {:<4} {:<22} {:<22} {:<12} send {} recv {}",
            s.protocol, s.local, s.remote, s.state, s.send_queue, s.recv_queue
        );
    }
    out
}
