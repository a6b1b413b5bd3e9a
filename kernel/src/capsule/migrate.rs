//! Moving a capsule: freeze it at safe points and serialise it into an image
//! (source), revive an image at the same arena window (destination), and —
//! once it runs there — forward what the source held and release it.
//!
//! Everything the capsule owns that must move is in its arena (tasks with
//! their registers and stacks, the smoltcp interface with every TCP control
//! block and buffer), so the image is the arena's non-zero pages plus the
//! kernel record's few fields; nothing reaches into smoltcp's private state.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::net::Ipv4Addr;

use capsules_wire::control::{MAX_BATCH_PAGES, PageBatch};
use capsules_wire::image::{
    CapsuleImage, ImageError, ImageKind, Segment, SocketSummary, TaskSummary, segments_from_pages,
};
use smoltcp::socket::{Socket, tcp};

use super::log::LogRing;
use super::{
    Capsule, CapsuleError, CapsuleInfo, CapsuleRoot, CapsuleState, Program, find_slot, programs,
    registry,
};
use crate::mm::arena;
use crate::net::Network;
use crate::sched::TaskState;

/// How long the old VM keeps forwarding packets for a moved capsule.
pub const FORWARD_GRACE_NS: u64 = 30_000_000_000;

/// Why an image could not be revived here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreError {
    Image(ImageError),
    WrongBuild,
    Capsule(CapsuleError),
    UnknownProgram(String),
    RootOutsideArena,
}

impl core::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Image(e) => write!(f, "{e}"),
            Self::WrongBuild => f.write_str("the image comes from another kernel build"),
            Self::Capsule(e) => write!(f, "{e}"),
            Self::UnknownProgram(p) => write!(
                f,
                "the image runs program '{p}', which this kernel does not have"
            ),
            Self::RootOutsideArena => f.write_str("the image's root object lies outside its arena"),
        }
    }
}

fn task_state(state: TaskState) -> String {
    match state {
        TaskState::Runnable => "runnable".into(),
        TaskState::Sleeping { until_ns } => {
            alloc::format!("sleeping until {} ms", until_ns / 1_000_000)
        }
        TaskState::WaitingNet { .. } => "waiting for network".into(),
        TaskState::Joining { task } => alloc::format!("joining task {task}"),
        TaskState::Exited => "exited".into(),
    }
}

fn endpoint(e: Option<smoltcp::wire::IpEndpoint>) -> String {
    e.map(|e| alloc::format!("{e}"))
        .unwrap_or_else(|| "-".into())
}

/// Readable summaries of a capsule's tasks and sockets.
fn summarise(root: &CapsuleRoot) -> (Vec<TaskSummary>, Vec<SocketSummary>) {
    let tasks = root
        .tasks
        .iter()
        .map(|t| TaskSummary {
            id: t.id,
            name: t.name.clone(),
            state: task_state(t.state),
            rip: t.context.frame.rip,
            rsp: t.context.frame.rsp,
        })
        .collect();
    let sockets = root
        .stack
        .sockets
        .iter()
        .map(|(_, s)| match s {
            Socket::Tcp(t) => SocketSummary {
                protocol: "tcp".into(),
                local: if t.state() == tcp::State::Listen {
                    alloc::format!("*:{}", t.listen_endpoint().port)
                } else {
                    endpoint(t.local_endpoint())
                },
                remote: endpoint(t.remote_endpoint()),
                state: alloc::format!("{}", t.state()),
                send_queue: t.send_queue() as u32,
                recv_queue: t.recv_queue() as u32,
            },
            Socket::Udp(u) => SocketSummary {
                protocol: "udp".into(),
                local: alloc::format!("*:{}", u.endpoint().port),
                remote: "-".into(),
                state: "bound".into(),
                send_queue: 0,
                recv_queue: 0,
            },
            #[allow(unreachable_patterns)]
            _ => SocketSummary {
                protocol: "other".into(),
                local: "-".into(),
                remote: "-".into(),
                state: "-".into(),
                send_queue: 0,
                recv_queue: 0,
            },
        })
        .collect();
    (tasks, sockets)
}

/// Tasks and sockets of a running or frozen capsule.
pub fn inspect(name: &str) -> Result<(Vec<TaskSummary>, Vec<SocketSummary>), CapsuleError> {
    registry(|r| {
        let slot = find_slot(r, name).ok_or_else(|| CapsuleError::NotFound(name.to_string()))?;
        let c = r.capsules.get_mut(&slot).expect("slot just found");
        c.root()
            .map(|root| summarise(root))
            .ok_or(CapsuleError::NotFound(name.to_string()))
    })
}

/// Starts pre-copy of a running capsule without stopping it: hands out a base
/// image (identity and arena length, no pages: those are read in batches with
/// `ReadPages` while it runs) and starts tracking the pages it writes from
/// here on. Kernel loop only: no task of the capsule is running meanwhile, so
/// the dirty bits are cleared at one consistent moment.
pub fn precopy(name: &str, key: &[u8]) -> Result<Vec<u8>, CapsuleError> {
    snapshot(name, key, ImageKind::Base)
}

/// Pages scanned per `read_pages` call at most: each call is one kernel loop
/// round, and the capsule's tasks and network run between calls.
const SCAN_PAGES_PER_READ: u64 = 256;

/// Pre-copy, source side: the next non-zero pages at or after `from` of the
/// arena as it is now (the capsule keeps running). A page written after the
/// pre-copy began is dirty and goes again with the delta, so reading it at
/// any moment is right. Kernel loop only.
pub fn read_pages(name: &str, from: u64) -> Result<PageBatch, CapsuleError> {
    let page = crate::mm::PAGE_SIZE;
    let (slot, end) = registry(|r| {
        let slot = find_slot(r, name).ok_or_else(|| CapsuleError::NotFound(name.to_string()))?;
        let c = r.capsules.get(&slot).expect("slot just found");
        match (c.state.is_running(), c.precopy_len) {
            (true, Some(len)) => Ok((slot, len)),
            (false, _) => Err(CapsuleError::NotRunning(name.to_string())),
            (true, None) => Err(CapsuleError::BadImage(
                "no pre-copy of this capsule is in progress",
            )),
        }
    })?;
    if !from.is_multiple_of(page) || from > end {
        return Err(CapsuleError::BadImage("page offset outside the pre-copy"));
    }
    // SAFETY: the kernel loop (us) runs, so no task of the capsule does.
    let bytes = unsafe { arena::mapped_bytes(slot) }.expect("capsule keeps its arena");
    let stop = end.min(from + SCAN_PAGES_PER_READ * page);
    let mut batch = PageBatch {
        next: stop,
        end,
        ..PageBatch::default()
    };
    // The arena never shrinks while the capsule lives; were it shorter, the
    // missing pages would count as zero.
    for offset in (from..stop.min(bytes.len() as u64)).step_by(page as usize) {
        let data = &bytes[offset as usize..(offset + page) as usize];
        if capsules_wire::image::is_zero_page(data) {
            continue;
        }
        if batch.offsets.len() == MAX_BATCH_PAGES {
            batch.next = offset;
            break;
        }
        batch.offsets.push(offset);
        batch.data.extend_from_slice(data);
    }
    Ok(batch)
}

/// Stops a running capsule at its safe points and returns its full image,
/// sealed with `key`. Its packets are held from now on, and its locator is
/// marked in the switch: this VM stops answering ARP for it once another
/// MAC claims it (the destination, at the commit). Kernel loop only: every
/// task is switched out, so none is inside kernel code.
pub fn freeze(name: &str, key: &[u8], net: &mut Network) -> Result<Vec<u8>, CapsuleError> {
    let image = snapshot(name, key, ImageKind::Full)?;
    mark_frozen(name, net);
    Ok(image)
}

/// Marks a frozen capsule's locator in the switch (see [`freeze`]).
fn mark_frozen(name: &str, net: &mut Network) {
    let locator = registry(|r| {
        find_slot(r, name)
            .and_then(|slot| r.capsules.get(&slot))
            .map(|c| c.locator)
    });
    if let Some(locator) = locator {
        net.switch.mark_frozen(locator);
    }
}

/// Like [`freeze`], but the image holds only the pages written since
/// [`precopy`] (a delta to complete the base the destination already has).
pub fn freeze_delta(name: &str, key: &[u8], net: &mut Network) -> Result<Vec<u8>, CapsuleError> {
    let precopied = registry(|r| {
        find_slot(r, name)
            .and_then(|slot| r.capsules.get(&slot))
            .map(|c| c.precopy_len.is_some())
    })
    .ok_or_else(|| CapsuleError::NotFound(name.to_string()))?;
    if !precopied {
        return Err(CapsuleError::BadImage(
            "no pre-copy was taken of this capsule",
        ));
    }
    let image = snapshot(name, key, ImageKind::Delta)?;
    mark_frozen(name, net);
    Ok(image)
}

fn snapshot(name: &str, key: &[u8], kind: ImageKind) -> Result<Vec<u8>, CapsuleError> {
    let started = crate::time::since_boot_ns();
    let (slot, image) = registry(|r| {
        let slot = find_slot(r, name).ok_or_else(|| CapsuleError::NotFound(name.to_string()))?;
        let c = r.capsules.get_mut(&slot).expect("slot just found");
        if !c.state.is_running() {
            return Err(CapsuleError::NotRunning(name.to_string()));
        }
        match kind {
            // Set below, once the length is known.
            ImageKind::Base => {}
            ImageKind::Full | ImageKind::Delta => {
                c.state = CapsuleState::Frozen;
                c.precopy_len = None;
            }
        }
        let clock_ns = c.clock_ns();
        let (log_tail, _) = c.log.read_from(0, super::log::LOG_CAPACITY);
        let log_written = c.log.written();
        let root_addr = c.root.expect("running capsule has a root") as u64;
        let (tasks, sockets) = summarise(c.root().expect("running capsule has a root"));
        let image = CapsuleImage {
            kind,
            build_id: crate::build_id().to_vec(),
            name: c.name.clone(),
            program: c.program.name.into(),
            args: c.args.clone(),
            locator: c.locator,
            slot,
            epoch: c.epoch,
            memory_limit: arena::usage(slot).map(|(_, _, limit)| limit).unwrap_or(0),
            clock_ns,
            arena_len: 0,
            segments: Vec::new(),
            root: root_addr,
            log_written,
            log_tail,
            tasks,
            sockets,
        };
        Ok((slot, image))
    })?;
    let mut image = image;
    // Dirty bits: cleared for a base (tracking starts now), read and cleared
    // for a delta (what changed since the base). A full image ignores them.
    let dirty = arena::take_dirty(slot).expect("capsule keeps its arena");
    // SAFETY: no task of the capsule runs while the kernel loop (us) copies
    // its arena: it is frozen, or (for a base) simply not scheduled now.
    let bytes = unsafe { arena::mapped_bytes(slot) }.expect("capsule keeps its arena");
    image.arena_len = bytes.len() as u64;
    if kind == ImageKind::Base {
        registry(|r| {
            if let Some(c) = r.capsules.get_mut(&slot) {
                c.precopy_len = Some(image.arena_len);
            }
        });
    }
    image.segments = match kind {
        ImageKind::Full => segments_from_pages(bytes),
        // The pages follow through `read_pages`, a few at a time.
        ImageKind::Base => Vec::new(),
        // Every written page goes, zero or not: a page cleared since the base
        // must overwrite the base's copy.
        ImageKind::Delta => dirty
            .iter()
            .map(|&offset| {
                let page = offset as usize;
                Segment {
                    offset,
                    data: bytes[page..page + crate::mm::PAGE_SIZE as usize].to_vec(),
                }
            })
            .collect(),
    };
    let copied = crate::time::since_boot_ns();
    let nonce: [u8; 16] = crate::random::bytes32()[..16]
        .try_into()
        .expect("16 of 32 bytes");
    let sealed = image.encode_for_transfer(key, &nonce);
    let done = crate::time::since_boot_ns();
    ::log::info!(
        "capsule {name}: {:?} image, {} KiB mapped, {} KiB in image; copied in {} us, sealed in {} us",
        kind,
        image.arena_len / 1024,
        image.segments.iter().map(|s| s.data.len()).sum::<usize>() / 1024,
        (copied - started) / 1000,
        (done - copied) / 1000
    );
    Ok(sealed)
}

/// Resumes a frozen capsule where it is (a move failed or was abandoned), as
/// epoch `epoch`: above the frozen copy's, and not below this VM's fence.
/// Its locator is claimed back with a gratuitous ARP (another VM may have
/// announced it meanwhile) and answered for here again.
pub fn thaw(name: &str, epoch: u64, net: &mut Network) -> Result<(), CapsuleError> {
    super::check_fence(name, epoch)?;
    let locator = registry(|r| {
        let slot = find_slot(r, name).ok_or_else(|| CapsuleError::NotFound(name.to_string()))?;
        let c = r.capsules.get_mut(&slot).expect("slot just found");
        if c.state != CapsuleState::Frozen {
            return Err(CapsuleError::NotFrozen(name.to_string()));
        }
        if epoch <= c.epoch {
            return Err(CapsuleError::Stale {
                name: name.to_string(),
                epoch,
                fence: c.epoch + 1,
            });
        }
        c.epoch = epoch;
        c.state = CapsuleState::Running;
        c.precopy_len = None;
        c.net_dirty = true;
        let _ = writeln!(
            c.log,
            "capsule thawed on {}: the move did not happen",
            super::vm_name()
        );
        Ok(c.locator)
    })?;
    net.switch.reclaim(&mut net.nic, locator);
    Ok(())
}

/// The capsule runs on the VM at `via` now: forward the packets held for it
/// (and, for a grace period, stragglers), then free it here.
pub fn release(name: &str, via: Ipv4Addr, net: &mut Network) -> Result<(), CapsuleError> {
    let (slot, locator, held) = registry(|r| {
        let slot = find_slot(r, name).ok_or_else(|| CapsuleError::NotFound(name.to_string()))?;
        let c = r.capsules.get_mut(&slot).expect("slot just found");
        if c.state != CapsuleState::Frozen {
            return Err(CapsuleError::NotFrozen(name.to_string()));
        }
        c.state = CapsuleState::Migrated;
        let mut held: Vec<Vec<u8>> = c.held_syns.drain(..).collect();
        held.extend(c.inbound.drain(..));
        Ok((slot, c.locator, held))
    })?;
    let now = crate::time::since_boot_ns();
    let count = held.len();
    super::reap(net);
    net.switch
        .forward_locator(locator, via, now + FORWARD_GRACE_NS);
    for packet in &held {
        net.switch.forward(packet, via, &mut net.nic, now);
    }
    registry(|r| r.capsules.remove(&slot));
    ::log::info!("capsule {name} released to {via}: {count} held packets forwarded");
    Ok(())
}

/// Revives a capsule from `bytes` (sealed with `key`) at its own arena
/// window, with its clock continuing from the freeze, as epoch `epoch`.
/// Everything is checked before anything is mapped; on error nothing changes.
pub fn restore(
    bytes: &[u8],
    key: &[u8],
    epoch: u64,
    net: &mut Network,
) -> Result<CapsuleInfo, RestoreError> {
    let image = CapsuleImage::decode(bytes, key).map_err(RestoreError::Image)?;
    if image.kind != ImageKind::Full {
        return Err(RestoreError::Image(ImageError::Inconsistent(
            "a pre-copy part cannot be restored alone",
        )));
    }
    check_epoch(&image, epoch)?;
    restore_image(image, epoch, net)
}

/// A restored copy runs at a newer epoch than the image it came from, and
/// never below what this VM was fenced at.
fn check_epoch(image: &CapsuleImage, epoch: u64) -> Result<(), RestoreError> {
    if epoch <= image.epoch {
        return Err(RestoreError::Capsule(CapsuleError::Stale {
            name: image.name.clone(),
            epoch,
            fence: image.epoch + 1,
        }));
    }
    super::check_fence(&image.name, epoch).map_err(RestoreError::Capsule)
}

/// A pre-copied base that arrived: verified, and already laid out in its
/// arena window, so that the commit only patches the delta's pages in.
pub struct StagedBase {
    /// The base's metadata (its pages are in the window now).
    meta: CapsuleImage,
}

/// Checks a pre-copied base as it arrives and maps it into its arena window —
/// all before the capsule is frozen, so none of it lengthens the pause.
pub fn stage_base(bytes: &[u8], key: &[u8], net: &Network) -> Result<StagedBase, RestoreError> {
    let base = CapsuleImage::decode(bytes, key).map_err(RestoreError::Image)?;
    if base.kind != ImageKind::Base || !base.segments.is_empty() {
        return Err(RestoreError::Image(ImageError::Inconsistent(
            "a staged image must be a pre-copy base",
        )));
    }
    admit(&base, net, true)?;
    arena::reserve(base.slot, base.arena_len).map_err(|e| {
        RestoreError::Capsule(match e {
            arena::ArenaError::SlotInUse => CapsuleError::SlotTaken(base.slot),
            _ => CapsuleError::OutOfMemory,
        })
    })?;
    Ok(StagedBase { meta: base })
}

/// Lays pre-copied pages into a staged base's window. Offsets were checked
/// for order and alignment by the wire decoder; here they must also lie in
/// this base's arena. Nothing is written unless every page fits.
pub fn stage_pages(staged: &StagedBase, batch: &PageBatch) -> Result<(), RestoreError> {
    let page = crate::mm::PAGE_SIZE;
    if batch.end != staged.meta.arena_len
        || batch
            .offsets
            .last()
            .is_some_and(|o| o + page > staged.meta.arena_len)
    {
        return Err(RestoreError::Image(ImageError::Inconsistent(
            "pages outside the staged arena",
        )));
    }
    for (offset, data) in batch.pages() {
        if !arena::write_reserved(staged.meta.slot, offset, data) {
            return Err(RestoreError::Image(ImageError::Inconsistent(
                "pages outside the staged arena",
            )));
        }
    }
    Ok(())
}

/// Drops a staged base that will not be completed.
pub fn abort_staged(staged: StagedBase) {
    arena::discard(staged.meta.slot);
}

/// Revives a capsule from a staged base and the delta taken at its freeze:
/// the delta's pages (every page written since the base, zero ones too) are
/// written over the window, which grows first if the capsule did. On error
/// the window is unmapped again and nothing remains.
pub fn restore_merged(
    staged: StagedBase,
    delta: &[u8],
    key: &[u8],
    epoch: u64,
    net: &mut Network,
) -> Result<CapsuleInfo, RestoreError> {
    let slot = staged.meta.slot;
    let started = crate::time::since_boot_ns();
    let result = (|| {
        let delta = CapsuleImage::decode(delta, key).map_err(RestoreError::Image)?;
        ::log::info!(
            "capsule {}: delta verified in {} us",
            delta.name,
            (crate::time::since_boot_ns() - started) / 1000
        );
        let base = &staged.meta;
        if delta.kind != ImageKind::Delta
            || delta.build_id != base.build_id
            || delta.name != base.name
            || delta.slot != base.slot
            || delta.locator != base.locator
            || delta.arena_len < base.arena_len
        {
            return Err(RestoreError::Image(ImageError::Inconsistent(
                "the delta is not of the staged base",
            )));
        }
        check_epoch(&delta, epoch)?;
        let program = admit(&delta, net, false)?;
        arena::extend_reserved(slot, delta.arena_len)
            .map_err(|_| RestoreError::Capsule(CapsuleError::OutOfMemory))?;
        for seg in &delta.segments {
            // Segment bounds were checked against the arena length by decode.
            if !arena::write_reserved(slot, seg.offset, &seg.data) {
                return Err(RestoreError::Image(ImageError::Inconsistent(
                    "delta pages outside the arena",
                )));
            }
        }
        arena::adopt(slot).map_err(|_| {
            RestoreError::Capsule(CapsuleError::BadImage(
                "the arena header does not match its slot",
            ))
        })?;
        register(&delta, program, epoch, net)
    })();
    if result.is_err() {
        // Whichever it is by now: a reservation or an adopted arena.
        arena::discard(slot);
        arena::destroy(slot);
    }
    result
}

/// Checks that `image` may be revived here; changes nothing.
fn admit(
    image: &CapsuleImage,
    net: &Network,
    need_memory: bool,
) -> Result<&'static Program, RestoreError> {
    if image.build_id != crate::build_id() {
        return Err(RestoreError::WrongBuild);
    }
    let program = programs()
        .iter()
        .find(|p| p.name == image.program)
        .ok_or_else(|| RestoreError::UnknownProgram(image.program.clone()))?;
    if !super::valid_locator(image.locator) {
        return Err(RestoreError::Capsule(CapsuleError::BadLocator(
            image.locator,
        )));
    }
    let window = arena::window_base(image.slot);
    if image.root < window + arena::HEADER_SIZE || image.root >= window + image.arena_len {
        return Err(RestoreError::RootOutsideArena);
    }
    registry(|r| {
        if r.capsules.len() >= super::MAX_CAPSULES {
            return Err(CapsuleError::LimitReached("capsules per VM"));
        }
        if r.capsules.values().any(|c| c.name == image.name) {
            return Err(CapsuleError::NameTaken(image.name.clone()));
        }
        if r.capsules.contains_key(&image.slot) {
            return Err(CapsuleError::SlotTaken(image.slot));
        }
        Ok(())
    })
    .map_err(RestoreError::Capsule)?;
    if net.switch.resident(image.locator).is_some() || image.locator == net.machine_addr() {
        return Err(RestoreError::Capsule(CapsuleError::LocatorTaken(
            image.locator,
        )));
    }
    // Frames promised to other images being received are not free for this one.
    if need_memory && crate::mm::frame::available() < image.arena_len / crate::mm::PAGE_SIZE + 256 {
        return Err(RestoreError::Capsule(CapsuleError::OutOfMemory));
    }
    Ok(program)
}

/// Maps the image's arena window and fills it.
fn map_arena(image: &CapsuleImage) -> Result<(), RestoreError> {
    let segments: Vec<(u64, &[u8])> = image
        .segments
        .iter()
        .map(|s| (s.offset, s.data.as_slice()))
        .collect();
    arena::restore(image.slot, image.arena_len, &segments).map_err(|e| {
        RestoreError::Capsule(match e {
            arena::ArenaError::SlotInUse => CapsuleError::SlotTaken(image.slot),
            arena::ArenaError::OutOfMemory => CapsuleError::OutOfMemory,
            _ => CapsuleError::BadImage("the arena header does not match its slot"),
        })
    })
}

fn restore_image(
    image: CapsuleImage,
    epoch: u64,
    net: &mut Network,
) -> Result<CapsuleInfo, RestoreError> {
    let program = admit(&image, net, true)?;
    map_arena(&image)?;
    register(&image, program, epoch, net).inspect_err(|_| arena::destroy(image.slot))
}

/// Creates the kernel record of a capsule whose arena is in place, attaches
/// its locator and announces it; its tasks resume where they stopped.
fn register(
    image: &CapsuleImage,
    program: &'static Program,
    epoch: u64,
    net: &mut Network,
) -> Result<CapsuleInfo, RestoreError> {
    if arena::root(image.slot) != Some(image.root as usize) {
        return Err(RestoreError::Capsule(CapsuleError::BadImage(
            "the arena's root pointer does not match the image",
        )));
    }
    let now = crate::time::since_boot_ns();
    let mut log = LogRing::new();
    log.restore(image.log_written, &image.log_tail);
    let mut capsule = Capsule {
        name: image.name.clone(),
        program,
        args: image.args.clone(),
        locator: image.locator,
        slot: image.slot,
        state: CapsuleState::Running,
        epoch,
        root: Some(image.root as *mut CapsuleRoot),
        inbound: Default::default(),
        held_syns: Default::default(),
        log,
        // The capsule clock continues from the freeze, also on a VM that
        // has been up for less time than the capsule has run.
        clock_offset_ns: super::clock_offset(now, image.clock_ns),
        net_dirty: true,
        // Past every stamp its tasks saw at the source: tasks waiting for
        // news in general look again once (spurious wakeups are harmless).
        net_event_ns: image.clock_ns + 1,
        poll_at_ns: None,
        precopy_len: None,
    };
    let _ = writeln!(capsule.log, "capsule restored on {}", super::vm_name());
    let slot = capsule.slot;
    let locator = capsule.locator;
    registry(|r| r.capsules.insert(slot, capsule));
    net.switch.attach(locator, slot);
    net.switch.announce(&mut net.nic, locator);
    ::log::info!(
        "capsule {} restored at {locator} in slot {slot}",
        image.name
    );
    super::list()
        .into_iter()
        .find(|c| c.slot == slot)
        .ok_or(RestoreError::Capsule(CapsuleError::NotFound(
            image.name.clone(),
        )))
}
