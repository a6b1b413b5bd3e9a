//! Moving capsules: `migrate` (VM to VM), `suspend` (VM to file), `resume`
//! (file to VM) and `inspect`.
//!
//! The order of a move (docs/control-protocol.md, "Moving a capsule"):
//! same build on both VMs → destination admits → the other VMs hold traffic
//! to the capsule → freeze at the source → the image streams through us to
//! the destination while it is still being read → commit at the destination
//! (the capsule runs there) → release at the source (held packets and
//! stragglers are forwarded) → the other VMs release their traffic → the
//! directory records the new VM. Any failure before the commit thaws the
//! capsule at the source: it runs in exactly one place at any time.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use capsules_wire::control::{
    CapsuleInfo, CapsuleState, MAX_IMAGE_CHUNK, PageBatch, Request, Response,
};
use capsules_wire::image::{self, CapsuleImage, SocketSummary, TaskSummary};
use serde::Serialize;

use crate::capsules::LabSession;
use crate::control::ControlClient;
use crate::directory::{self, CapsuleRecord};
use crate::progress::Progress;
use crate::state::VmRecord;

/// Test hook: milliseconds to wait between image chunks and pre-copy page
/// batches, so a test can kill the destination while the capsule is in
/// flight. Unset in normal use.
pub const CHUNK_DELAY_ENV: &str = "CAPSULES_MIGRATE_CHUNK_DELAY_MS";

/// Test hook: the commit's answer is "lost" (sent, never read), to check
/// that the move then completes instead of running the capsule twice.
pub const LOSE_COMMIT_ANSWER_ENV: &str = "CAPSULES_MIGRATE_LOSE_COMMIT_ANSWER";

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

/// The test hook's pause between image chunks and page batches, if set.
fn chunk_delay() -> Option<std::time::Duration> {
    std::env::var(CHUNK_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_millis)
}

/// Reads a frozen capsule's image from `client` and hands each chunk to `sink`
/// as it arrives.
fn read_image(
    client: &mut ControlClient,
    vm: &str,
    name: &str,
    len: u64,
    mut sink: impl FnMut(u64, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let delay = chunk_delay();
    let mut offset = 0;
    while offset < len {
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let resp = client.call(&Request::ReadImage {
            name: name.into(),
            offset,
            len: MAX_IMAGE_CHUNK as u32,
        })?;
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
    commit(client, vm, name)
}

fn commit(client: &mut ControlClient, vm: &str, name: &str) -> Result<CapsuleInfo> {
    match client.call(&Request::RestoreCommit { name: name.into() })? {
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
    let _lock = directory::lock(&s.dir)?;
    let mut map = s.load_map()?;
    let rec = record(s, &map, name)?;
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
            return Err(e.context(format!(
                "pre-copy failed; '{name}' keeps running on {}",
                src.name
            )));
        }
    };
    let precopy_ms = ms(precopy_started.elapsed());
    hold_traffic(s, &src.name, rec.locator, true);
    let started = Instant::now();
    let mut commit_sent = false;
    let outcome = move_frozen(
        &mut src_c,
        &mut dst_c,
        &src,
        &dst,
        &rec.name,
        &mut commit_sent,
    );
    let verdict = match &outcome {
        Ok(_) => None,
        // The destination never got the commit: it runs nothing; drop its
        // restore (on a new connection: the old one may be what failed).
        Err(_) if !commit_sent => {
            let _ = s.connect(&dst).and_then(|mut c| {
                c.call(&Request::RestoreAbort {
                    name: rec.name.clone(),
                })
            });
            Some(AtDestination::NotThere)
        }
        Err(_) => Some(resolve_commit(s, &dst, &rec)),
    };
    let (image_len, t_frozen, t_transferred, t_running) = match (outcome, verdict) {
        (Ok(times), _) => times,
        (Err(e), Some(AtDestination::Running)) => {
            // The commit took effect but its answer was lost: the move is
            // done, and thawing the source now would run the capsule twice.
            eprintln!(
                "capsulectl: warning: {} took '{name}' but its answer was lost ({e:#}); completing the move",
                dst.name
            );
            let t = started.elapsed();
            (0, t, t, t)
        }
        (Err(e), Some(AtDestination::Unknown)) => {
            // It may run there: thawing here could run it twice. Leave it
            // frozen (its packets are held) and say how to finish.
            hold_traffic(s, &src.name, rec.locator, false);
            return Err(e.context(format!(
                "'{name}' is left frozen on {src_vm}: {dst_vm} was sent the commit but has not said \
                 for {secs} s whether it took it. Look with `capsulectl debug capsules --lab {lab} \
                 --vm {dst_vm}`; if it does not run there, `capsulectl thaw {name} --lab {lab}` resumes \
                 it on {src_vm}",
                src_vm = src.name,
                dst_vm = dst.name,
                secs = RESOLVE_TIMEOUT.as_secs(),
                lab = s.lab.name,
            )));
        }
        (Err(e), _) => {
            // Nothing runs at the destination, and it dropped its restore:
            // resume at the source.
            let thawed = s.connect(&src).and_then(|mut c| {
                c.call(&Request::ThawCapsule {
                    name: rec.name.clone(),
                })
            });
            hold_traffic(s, &src.name, rec.locator, false);
            return Err(match thawed {
                Ok(Response::Done) => e.context(format!("'{name}' keeps running on {}", src.name)),
                Ok(Response::Error { message, .. }) if message.contains("not frozen") => {
                    e.context(format!("'{name}' keeps running on {}", src.name))
                }
                other => e.context(format!(
                    "and thawing it on {} failed too: {other:?}",
                    src.name
                )),
            });
        }
    };
    let released = src_c.call(&Request::ReleaseCapsule {
        name: rec.name.clone(),
        forward_to: dst.ip,
    });
    let t_released = started.elapsed();
    hold_traffic(s, &src.name, rec.locator, false);
    let mut moved = rec.clone();
    moved.vm = dst.name.clone();
    map.remove(&rec.name);
    map.insert(moved)?;
    directory::save(&s.dir, &map)?;
    if let Err(e) = released.and_then(|r| expect_done(r, "to release the capsule", &src.name)) {
        eprintln!(
            "capsulectl: warning: '{name}' runs on {} but {} did not release it: {e:#}",
            dst.name, src.name
        );
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

/// Whether a capsule whose commit was sent runs at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AtDestination {
    Running,
    NotThere,
    /// The destination is alive but did not say within [`RESOLVE_TIMEOUT`].
    Unknown,
}

/// How long to keep asking a destination that was sent a commit.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// After the commit was sent but its answer did not come: asks the
/// destination, on new connections, to drop any restore of the capsule still
/// in progress and whether the capsule runs there. Its control service
/// handles requests in order, so once the abort is answered an earlier commit
/// has taken effect, or never will (the abort removed what it needs). It must
/// be this capsule — same name, slot and locator — to count. A destination
/// whose QEMU is gone runs nothing. One that is alive and silent for
/// [`RESOLVE_TIMEOUT`] is `Unknown`: the caller must not thaw the source.
fn resolve_commit(s: &LabSession, dst: &VmRecord, rec: &CapsuleRecord) -> AtDestination {
    let deadline = Instant::now() + RESOLVE_TIMEOUT;
    loop {
        let answer = s.connect(dst).and_then(|mut c| {
            c.call(&Request::RestoreAbort {
                name: rec.name.clone(),
            })?;
            c.call(&Request::ListCapsules)
        });
        match answer {
            Ok(Response::Capsules(list)) => {
                let runs = list.iter().any(|i| {
                    i.name == rec.name
                        && i.slot == rec.slot
                        && i.locator == rec.locator
                        && i.state == CapsuleState::Running
                });
                return if runs {
                    AtDestination::Running
                } else {
                    AtDestination::NotThere
                };
            }
            _ if !dst.pid.is_some_and(|pid| crate::lab::is_our_qemu(pid, dst)) => {
                return AtDestination::NotThere;
            }
            _ if Instant::now() >= deadline => return AtDestination::Unknown,
            _ => std::thread::sleep(std::time::Duration::from_millis(500)),
        }
    }
}

/// `capsulectl thaw NAME`: resumes a capsule left frozen on its VM by an
/// interrupted move. Only for when it surely runs nowhere else.
pub fn thaw(s: &LabSession, name: &str) -> Result<String> {
    let _lock = directory::lock(&s.dir)?;
    let map = s.load_map()?;
    let rec = record(s, &map, name)?;
    let vm = s.vm(&rec.vm)?;
    expect_done(
        s.connect(vm)?.call(&Request::ThawCapsule {
            name: rec.name.clone(),
        })?,
        &format!("to thaw '{name}'"),
        &vm.name,
    )?;
    Ok(vm.name.clone())
}

type Phases = (
    u64,
    std::time::Duration,
    std::time::Duration,
    std::time::Duration,
);

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
) -> Result<()> {
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(8);
    std::thread::scope(|scope| -> Result<()> {
        // Owned by this closure: if writing to the destination fails, the
        // receiver goes away with it, the reader's next send fails, and the
        // scope can end (else the reader would wait forever on a full channel).
        let rx = rx;
        // The sender moves into the reader, so the channel closes when it ends.
        let reader = scope.spawn(move || {
            read_image(src_c, &src.name, name, len, |off, data| {
                tx.send((off, data))
                    .map_err(|_| anyhow!("the destination stopped taking the image"))
            })
        });
        for (offset, data) in rx.iter() {
            expect_done(
                dst_c.call(&Request::RestoreChunk {
                    name: name.into(),
                    offset,
                    data,
                })?,
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
    let base_len = match src_c.call(&Request::PrecopyCapsule { name: name.into() })? {
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
    stream_image(src_c, dst_c, src, dst, name, base_len)?;
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
            let delay = chunk_delay();
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

/// Freeze (only pages written since the pre-copy), stream, commit. Returns
/// the delta's length and the times (since the freeze request) when the
/// capsule was frozen, the image was across, and it ran at the destination.
fn move_frozen(
    src_c: &mut ControlClient,
    dst_c: &mut ControlClient,
    src: &VmRecord,
    dst: &VmRecord,
    name: &str,
    commit_sent: &mut bool,
) -> Result<Phases> {
    let start = Instant::now();
    let image_len = match src_c.call(&Request::FreezeDelta { name: name.into() })? {
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
    stream_image(src_c, dst_c, src, dst, name, image_len)?;
    let t_transferred = start.elapsed();
    // From here on the destination may run the capsule: a failure no longer
    // means the source can simply take it back.
    *commit_sent = true;
    if std::env::var_os(LOSE_COMMIT_ANSWER_ENV).is_some() {
        dst_c.send_only(&Request::RestoreCommit { name: name.into() })?;
        bail!("the answer to the commit was lost (test hook {LOSE_COMMIT_ANSWER_ENV})");
    }
    let info = commit(dst_c, &dst.name, name)
        .with_context(|| format!("the destination {} did not take the capsule", dst.name))?;
    let t_running = start.elapsed();
    if info.state != CapsuleState::Running {
        bail!(
            "{} restored '{name}' but it is {}",
            dst.name,
            info.state.label()
        );
    }
    Ok((image_len, t_frozen, t_transferred, t_running))
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
    let _lock = directory::lock(&s.dir)?;
    let mut map = s.load_map()?;
    let rec = record(s, &map, name)?;
    let vm = s.vm(&rec.vm)?.clone();
    let mut c = s.connect(&vm)?;
    let image_len = freeze(&mut c, &vm.name, &rec.name)?;
    let saved = (|| -> Result<()> {
        let progress = Progress::bytes(
            image_len,
            format!("suspend '{name}' {} -> {}", vm.name, out.display()),
        );
        let mut bytes = Vec::with_capacity(image_len as usize);
        read_image(&mut c, &vm.name, &rec.name, image_len, |_, data| {
            progress.inc(data.len() as u64);
            bytes.extend_from_slice(&data);
            Ok(())
        })?;
        progress.finish();
        let sealed = image::reseal(&bytes, &s.lab.key()?, &file_key)
            .map_err(|e| anyhow!("the image from {} does not verify: {e}", vm.name))?;
        crate::state::write_atomically(out, &sealed, 0o600)
    })();
    if let Err(e) = saved {
        let _ = c.call(&Request::ThawCapsule {
            name: rec.name.clone(),
        });
        return Err(e.context(format!("'{name}' keeps running on {}", vm.name)));
    }
    match c.call(&Request::KillCapsule {
        name: rec.name.clone(),
    })? {
        Response::Killed => {}
        other => eprintln!(
            "capsulectl: warning: saved, but {} did not end '{name}': {other:?}",
            vm.name
        ),
    }
    map.remove(&rec.name);
    directory::save(&s.dir, &map)?;
    Ok((rec, image_len))
}

/// Reads and verifies a suspended image file.
pub fn load_image_file(path: &Path) -> Result<(Vec<u8>, CapsuleImage)> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let image = CapsuleImage::decode(&bytes, &image_key()?)
        .map_err(|e| anyhow!("{} is not a usable capsule image: {e}", path.display()))?;
    Ok((bytes, image))
}

/// `capsulectl resume FILE [--on VM] [--name NAME]`.
pub fn resume(
    s: &LabSession,
    path: &Path,
    on: Option<&str>,
    rename: Option<&str>,
) -> Result<CapsuleRecord> {
    let (_, mut img) = load_image_file(path)?;
    if let Some(n) = rename {
        directory::validate_capsule_name(n)?;
        img.name = n.to_string();
    }
    let _lock = directory::lock(&s.dir)?;
    let mut map = s.load_map()?;
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
    let record = CapsuleRecord {
        name: img.name.clone(),
        program: img.program.clone(),
        args: img.args.clone(),
        locator: img.locator,
        slot: img.slot,
        vm: vm.name.clone(),
        memory_limit: img.memory_limit,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    // The locator and slot are the capsule's own (its connections and its
    // memory window): they must be free in this lab.
    let mut check = map.clone();
    check.insert(record.clone()).context("cannot resume here")?;
    let sealed = img.encode_for_transfer(&s.lab.key()?, &image_nonce()?);
    let progress = Progress::bytes(
        sealed.len() as u64,
        format!("resume '{}' {} -> {}", img.name, path.display(), vm.name),
    );
    let info = restore_image(&mut c, &vm.name, &img.name, &sealed, &progress)?;
    if info.state != CapsuleState::Running {
        bail!(
            "{} restored '{}' but it is {}",
            vm.name,
            img.name,
            info.state.label()
        );
    }
    map.insert(record.clone())?;
    directory::save(&s.dir, &map)?;
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
