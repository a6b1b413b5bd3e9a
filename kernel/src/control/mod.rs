//! The control service: the VM's authenticated request port (TCP on the
//! machine address). Framing, authentication and message formats come from
//! `capsules_wire::control`; this module moves bytes between smoltcp sockets
//! and a `ServerSession` per connection and carries out the requests.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use capsules_wire::control::{
    CapsuleInfo, CapsuleState, ErrorCode, FrameDecoder, HANDSHAKE_DEADLINE_MS, Incoming,
    MAX_FRAME_LEN, MAX_IMAGE_CHUNK, PROTOCOL_VERSION, ProgramInfo, Request, Response,
    ServerSession, Status, frame,
};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

use crate::capsule;
use crate::net::Network;

/// Connections served at the same time; more wait in the peer's SYN retries.
const MAX_CONNECTIONS: usize = 8;
/// A connection with no request for this long is closed, so that silent
/// clients cannot hold every slot.
const IDLE_TIMEOUT_NS: u64 = 60_000_000_000;
/// A connection that has not proved the key this long after it left the
/// listening state (SYN received) is closed: without the key, nobody holds a
/// slot for longer.
const HANDSHAKE_DEADLINE_NS: u64 = HANDSHAKE_DEADLINE_MS * 1_000_000;
/// Room for a whole maximal frame, so an image chunk arrives in one window.
const RX_BUFFER: usize = MAX_FRAME_LEN + 16 * 1024;
const TX_BUFFER: usize = MAX_FRAME_LEN + 16 * 1024;

static READY_NS: AtomicU64 = AtomicU64::new(0);

/// Nanoseconds from the first instruction until the control port opened.
pub fn boot_ns() -> u64 {
    READY_NS.load(Ordering::Relaxed)
}

struct Connection {
    handle: SocketHandle,
    session: Option<ServerSession>,
    decoder: FrameDecoder,
    outbox: Vec<u8>,
    close_when_flushed: bool,
    last_activity_ns: u64,
    /// When the socket left the listening state: the handshake deadline
    /// counts from here until the session is open.
    since_ns: Option<u64>,
}

/// Images in flight: frozen capsules' images being read (source side) and
/// images being received (destination side).
#[derive(Default)]
struct Images {
    outgoing: BTreeMap<String, Vec<u8>>,
    incoming: BTreeMap<String, IncomingImage>,
    /// Pre-copied bases waiting for their delta.
    staged: BTreeMap<String, capsule::migrate::StagedBase>,
    /// When a request last named each incoming or staged image: one that
    /// nobody finishes (its orchestrator died) is dropped after
    /// [`STALE_IMAGE_NS`], freeing its memory and its arena window.
    touched: BTreeMap<String, u64>,
}

/// An image being received, or a staged base, with no request for this long
/// is dropped.
const STALE_IMAGE_NS: u64 = 60_000_000_000;

impl Images {
    fn touch(&mut self, name: &str) {
        self.touched
            .insert(name.into(), crate::time::since_boot_ns());
    }

    /// Keeps an image taken of capsule `name` for `ReadImage` and answers
    /// with its length.
    fn hand_out(&mut self, name: &str, taken: Result<Vec<u8>, capsule::CapsuleError>) -> Response {
        match taken {
            Ok(image) => {
                let image_len = image.len() as u64;
                self.outgoing.insert(name.into(), image);
                Response::Frozen { image_len }
            }
            Err(e) => capsule_error(e),
        }
    }

    /// Drops what no request has named for [`STALE_IMAGE_NS`], and images
    /// taken of capsules that are gone (ended, or suspended and killed).
    fn expire(&mut self) {
        if !self.outgoing.is_empty() {
            self.outgoing.retain(|name, _| capsule::exists(name));
        }
        if self.touched.is_empty() {
            return;
        }
        let now = crate::time::since_boot_ns();
        let stale: Vec<String> = self
            .touched
            .iter()
            .filter(|(name, at)| {
                now.saturating_sub(**at) > STALE_IMAGE_NS
                    || !(self.incoming.contains_key(*name) || self.staged.contains_key(*name))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.touched.remove(&name);
            let dropped = self.incoming.remove(&name).is_some();
            let staged = self.staged.remove(&name);
            if dropped || staged.is_some() {
                log::warn!("control: dropping the unfinished restore of '{name}'");
            }
            if let Some(staged) = staged {
                capsule::migrate::abort_staged(staged);
            }
        }
    }
}

struct IncomingImage {
    expected: u64,
    /// Allocated whole at admission, so that what was admitted is taken.
    bytes: Vec<u8>,
    /// Frames for the arena the image becomes, promised at admission and
    /// released (set to `None`) just before the restore maps it.
    arena: Option<crate::mm::frame::Reservation>,
}

/// Frames kept free beyond what an admitted image needs.
const ADMISSION_HEADROOM_FRAMES: u64 = 1024;

/// A hold on traffic to a moving capsule ends by itself after this long.
const HOLD_LIMIT_NS: u64 = 10_000_000_000;

/// Images received at once, at most.
const MAX_INCOMING: usize = 4;

pub struct ControlService {
    images: Images,
    /// The lab's cluster key: each session derives the control key from it.
    cluster_key: Vec<u8>,
    /// The key that seals and opens images, derived from the cluster key
    /// (never the control key).
    image_key: Vec<u8>,
    port: u16,
    vm_name: String,
    connections: Vec<Connection>,
    shutdown_requested: bool,
}

impl ControlService {
    pub fn new(net: &mut Network, key: &[u8], port: u16, vm_name: &str) -> Self {
        let connections = (0..MAX_CONNECTIONS)
            .map(|_| {
                let mut socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
                    tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
                );
                // Request/response traffic: a reply's last partial segment
                // must not wait for the peer's delayed ACK (Nagle), nor our
                // ACKs for a timer; migration downtime is made of these.
                socket.set_nagle_enabled(false);
                socket.set_ack_delay(None);
                Connection {
                    handle: net.machine.sockets.add(socket),
                    session: None,
                    decoder: FrameDecoder::new(),
                    outbox: Vec::new(),
                    close_when_flushed: false,
                    last_activity_ns: 0,
                    since_ns: None,
                }
            })
            .collect();
        READY_NS.store(crate::time::since_boot_ns(), Ordering::Relaxed);
        Self {
            images: Images::default(),
            cluster_key: key.to_vec(),
            image_key: capsules_wire::auth::image_key(key).to_vec(),
            port,
            vm_name: vm_name.into(),
            connections,
            shutdown_requested: false,
        }
    }

    /// Carries out one request that its session has already authenticated,
    /// as [`Self::poll`] does for each request it receives.
    pub fn serve(&mut self, request: &Request, net: &mut Network) -> Response {
        handle_request(
            request,
            &self.vm_name,
            net,
            &mut self.images,
            &self.image_key,
        )
    }

    pub fn shutdown_requested(&self) -> bool {
        self.shutdown_requested
    }

    /// Whether every reply has been handed to TCP and acknowledged.
    pub fn flushed(&self, net: &Network) -> bool {
        self.connections.iter().all(|c| {
            let socket = net.machine.sockets.get::<tcp::Socket>(c.handle);
            c.outbox.is_empty() && socket.send_queue() == 0
        })
    }

    /// Serves every connection once. Returns whether anything happened.
    pub fn poll(&mut self, net: &mut Network) -> bool {
        self.images.expire();
        let mut busy = false;
        for index in 0..self.connections.len() {
            busy |= self.poll_connection(index, net);
        }
        busy
    }

    fn poll_connection(&mut self, index: usize, net: &mut Network) -> bool {
        let mut busy = false;
        let handle = self.connections[index].handle;
        let socket = net.machine.sockets.get_mut::<tcp::Socket>(handle);
        let conn = &mut self.connections[index];
        if !socket.is_open() {
            conn.session = None;
            conn.decoder = FrameDecoder::new();
            conn.outbox.clear();
            conn.close_when_flushed = false;
            conn.since_ns = None;
            if let Err(e) = socket.listen(self.port) {
                log::error!("control: cannot listen on port {}: {e:?}", self.port);
            }
            return false;
        }
        let now = crate::time::since_boot_ns();
        if socket.state() == tcp::State::Listen {
            // Also after a reset in SYN-RECEIVED, which returns here.
            conn.since_ns = None;
            return false;
        }
        let since = *conn.since_ns.get_or_insert(now);
        if !conn.session.as_ref().is_some_and(ServerSession::is_open)
            && now.saturating_sub(since) > HANDSHAKE_DEADLINE_NS
        {
            // Half-open, silent or refused: the slot goes back to listening.
            log::info!(
                "control: closing a connection from {:?} that did not prove the key within {HANDSHAKE_DEADLINE_MS} ms",
                socket.remote_endpoint()
            );
            socket.abort();
            conn.session = None;
            return true;
        }
        if socket.state() == tcp::State::Established && conn.session.is_none() {
            let mut session = ServerSession::new(&self.cluster_key, crate::random::bytes32());
            conn.outbox
                .extend(frame(&session.hello(crate::build_id(), &self.vm_name)));
            conn.session = Some(session);
            conn.last_activity_ns = now;
            log::debug!("control: connection from {:?}", socket.remote_endpoint());
            busy = true;
        }
        if conn.session.is_some()
            && crate::time::since_boot_ns().saturating_sub(conn.last_activity_ns) > IDLE_TIMEOUT_NS
        {
            log::info!(
                "control: closing idle connection from {:?}",
                socket.remote_endpoint()
            );
            socket.abort();
            conn.session = None;
            return true;
        }
        if socket.can_recv() && !conn.close_when_flushed {
            conn.last_activity_ns = crate::time::since_boot_ns();
            let _ = socket.recv(|data| {
                conn.decoder.push(data);
                (data.len(), ())
            });
            busy = true;
        }
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let mut shutdown = false;
        if let Some(session) = conn.session.as_mut() {
            while !conn.close_when_flushed {
                match conn.decoder.next_frame() {
                    Ok(Some(payload)) => match session.handle(&payload) {
                        Incoming::Opened => {}
                        Incoming::Request { seq, request } => {
                            let response = handle_request(
                                &request,
                                &self.vm_name,
                                net,
                                &mut self.images,
                                &self.image_key,
                            );
                            shutdown |= request == Request::Shutdown;
                            replies.push(session.reply(seq, &response));
                        }
                        Incoming::Refused { reply, code } => {
                            log::warn!("control: refused a request ({})", code.as_str());
                            replies.push(reply);
                        }
                        Incoming::HandshakeFailed { reply, code } => {
                            log::warn!(
                                "control: refused a client hello ({}); closing",
                                code.as_str()
                            );
                            replies.push(reply);
                            conn.close_when_flushed = true;
                        }
                    },
                    Ok(None) => break,
                    Err(oversized) => {
                        log::warn!(
                            "control: oversized frame ({} bytes); closing",
                            oversized.declared
                        );
                        replies.push(session.oversized_reply(oversized.declared));
                        conn.close_when_flushed = true;
                    }
                }
            }
        }
        self.shutdown_requested |= shutdown;
        let socket = net.machine.sockets.get_mut::<tcp::Socket>(handle);
        let conn = &mut self.connections[index];
        for reply in replies {
            conn.outbox.extend(frame(&reply));
        }
        if !conn.outbox.is_empty()
            && socket.can_send()
            && let Ok(sent) = socket.send_slice(&conn.outbox)
        {
            conn.outbox.drain(..sent);
            busy |= sent > 0;
        }
        let peer_done = socket.state() == tcp::State::CloseWait && !socket.can_recv();
        if (conn.close_when_flushed && conn.outbox.is_empty())
            || (peer_done && conn.outbox.is_empty())
        {
            socket.close();
        }
        busy
    }
}

fn handle_request(
    request: &Request,
    vm_name: &str,
    net: &mut Network,
    images: &mut Images,
    key: &[u8],
) -> Response {
    if let Request::RestoreBegin { name, .. }
    | Request::RestoreChunk { name, .. }
    | Request::RestoreStage { name }
    | Request::StagePages { name, .. } = request
    {
        images.touch(name);
    }
    // The router runs no capsules: it serves only its own requests.
    if net.router.is_some()
        && !matches!(
            request,
            Request::Version
                | Request::Status
                | Request::Shutdown
                | Request::UpdateTranslations { .. }
        )
    {
        return Response::error(
            ErrorCode::UnknownRequest,
            "this kernel runs as the router: it runs no capsules",
        );
    }
    match request {
        Request::Version => Response::Version {
            protocol_version: PROTOCOL_VERSION,
            build_id: crate::build_id().to_vec(),
            vm_name: vm_name.into(),
        },
        Request::Status => {
            let mem = crate::mm::stats();
            Response::Status(Status {
                uptime_ns: crate::time::since_boot_ns(),
                boot_ns: boot_ns(),
                mem_total_bytes: mem.total_bytes,
                mem_used_bytes: mem.used_bytes,
                heap_size_bytes: mem.heap_size_bytes,
                heap_used_bytes: mem.heap_used_bytes,
                nic: net.nic.counters(),
                tsc_hz: crate::time::tsc_hz(),
                switch: match net.router.as_ref() {
                    Some(plane) => plane.core.status(),
                    None => net.switch.status(),
                },
            })
        }
        Request::Shutdown => {
            log::info!("control: shutdown requested");
            Response::ShuttingDown
        }
        Request::RunCapsule(run) => {
            let config = capsule::CapsuleConfig {
                name: run.name.clone(),
                program: run.program.clone(),
                args: run.args.clone(),
                locator: run.locator,
                slot: run.slot,
                memory_limit: if run.memory_limit == 0 {
                    capsule::DEFAULT_MEMORY_LIMIT
                } else {
                    run.memory_limit
                },
                epoch: run.epoch,
            };
            match capsule::start(config, net) {
                Ok(()) => capsule::list()
                    .into_iter()
                    .find(|c| c.name == run.name)
                    .map(|c| Response::CapsuleStarted(wire_info(c)))
                    .unwrap_or_else(|| {
                        Response::error(ErrorCode::Internal, "capsule vanished after start")
                    }),
                Err(e) => capsule_error(e),
            }
        }
        Request::ListCapsules => {
            Response::Capsules(capsule::list().into_iter().map(wire_info).collect())
        }
        Request::KillCapsule { name } => {
            // The end of a suspend: its image has been read.
            images.outgoing.remove(name);
            match capsule::kill(name, net) {
                Ok(()) => Response::Killed,
                Err(e) => capsule_error(e),
            }
        }
        Request::CapsuleLogs { name, offset, max } => {
            let max = (*max as usize).min(MAX_LOG_CHUNK);
            match capsule::read_log(name, *offset, max) {
                Ok((data, next_offset)) => Response::Logs { data, next_offset },
                Err(e) => capsule_error(e),
            }
        }
        Request::FreezeCapsule { name } => {
            images.hand_out(name, capsule::migrate::freeze(name, key, net))
        }
        Request::ReadImage { name, offset, len } => match images.outgoing.get(name) {
            Some(image) => {
                let start = (*offset).min(image.len() as u64) as usize;
                let end = (start + (*len as usize).min(MAX_IMAGE_CHUNK)).min(image.len());
                Response::ImageChunk {
                    data: image[start..end].to_vec(),
                }
            }
            None => Response::error(
                ErrorCode::NotFound,
                alloc::format!("no frozen image of '{name}' here"),
            ),
        },
        Request::PrecopyCapsule { name } => {
            images.hand_out(name, capsule::migrate::precopy(name, key))
        }
        Request::FreezeDelta { name } => {
            images.hand_out(name, capsule::migrate::freeze_delta(name, key, net))
        }
        Request::RestoreStage { name } => match images.incoming.remove(name) {
            Some(mut incoming) => {
                // Staging maps the arena itself, after its own memory check.
                incoming.arena = None;
                // Verified and decoded now, before the freeze, so none of
                // it lengthens the pause.
                if let Some(old) = images.staged.remove(name) {
                    capsule::migrate::abort_staged(old);
                }
                match capsule::migrate::stage_base(&incoming.bytes, key, net) {
                    Ok(base) => {
                        images.staged.insert(name.clone(), base);
                        Response::Done
                    }
                    Err(e) => Response::error(
                        restore_error_code(&e),
                        alloc::format!("base image refused: {e}"),
                    ),
                }
            }
            None => Response::error(
                ErrorCode::NotFound,
                alloc::format!("no restore of '{name}' in progress"),
            ),
        },
        Request::ReadPages { name, from } => match capsule::migrate::read_pages(name, *from) {
            Ok(batch) => Response::Pages(batch),
            Err(e) => capsule_error(e),
        },
        Request::StagePages { name, batch } => match images.staged.get(name) {
            Some(staged) => match capsule::migrate::stage_pages(staged, batch) {
                Ok(()) => Response::Done,
                Err(e) => {
                    Response::error(restore_error_code(&e), alloc::format!("pages refused: {e}"))
                }
            },
            None => Response::error(
                ErrorCode::NotFound,
                alloc::format!("no pre-copy of '{name}' staged here"),
            ),
        },
        Request::ThawCapsule { name, epoch } => {
            images.outgoing.remove(name);
            match capsule::migrate::thaw(name, *epoch, net) {
                Ok(()) => Response::Done,
                Err(e) => capsule_error(e),
            }
        }
        Request::ReleaseCapsule { name, forward_to } => {
            images.outgoing.remove(name);
            match capsule::migrate::release(name, *forward_to, net) {
                Ok(()) => Response::Done,
                Err(e) => capsule_error(e),
            }
        }
        Request::RestoreBegin { name, image_len } => {
            // A new transfer of the same name replaces the old one.
            images.incoming.remove(name);
            // Room for the image itself and the arena it becomes; after a
            // pre-copy the arena is mapped already, and only the delta comes.
            // Both are taken now — the image's buffer allocated, the arena's
            // frames reserved — so that concurrent admissions cannot each be
            // granted the same free memory.
            let image_frames = image_len.div_ceil(crate::mm::PAGE_SIZE);
            let arena_frames = if images.staged.contains_key(name) {
                0
            } else {
                image_frames
            };
            let too_big = || {
                Response::error(
                    ErrorCode::LimitReached,
                    alloc::format!("not enough memory for a {} KiB image", image_len / 1024),
                )
            };
            if images.incoming.len() >= MAX_INCOMING {
                Response::error(ErrorCode::LimitReached, "too many images being received")
            } else if capsule::list().iter().any(|c| &c.name == name) {
                Response::error(
                    ErrorCode::AlreadyExists,
                    alloc::format!("a capsule named '{name}' already exists here"),
                )
            } else if crate::mm::frame::available()
                < image_frames
                    .saturating_add(arena_frames)
                    .saturating_add(ADMISSION_HEADROOM_FRAMES)
            {
                too_big()
            } else {
                let mut bytes = Vec::new();
                let arena = crate::mm::frame::reserve(arena_frames, ADMISSION_HEADROOM_FRAMES);
                match (
                    usize::try_from(*image_len)
                        .ok()
                        .and_then(|len| bytes.try_reserve_exact(len).ok()),
                    arena,
                ) {
                    (Some(()), Some(arena)) => {
                        images.incoming.insert(
                            name.clone(),
                            IncomingImage {
                                expected: *image_len,
                                bytes,
                                arena: Some(arena),
                            },
                        );
                        Response::Done
                    }
                    _ => too_big(),
                }
            }
        }
        Request::RestoreChunk { name, offset, data } => match images.incoming.get_mut(name) {
            Some(incoming) if *offset == incoming.bytes.len() as u64 => {
                if incoming.bytes.len() as u64 + data.len() as u64 > incoming.expected {
                    images.incoming.remove(name);
                    Response::error(
                        ErrorCode::InvalidArgument,
                        "image longer than announced; transfer dropped",
                    )
                } else {
                    incoming.bytes.extend_from_slice(data);
                    Response::Done
                }
            }
            Some(incoming) => Response::error(
                ErrorCode::InvalidArgument,
                alloc::format!("chunk at {offset}, expected {}", incoming.bytes.len()),
            ),
            None => Response::error(
                ErrorCode::NotFound,
                alloc::format!("no restore of '{name}' in progress"),
            ),
        },
        Request::RestoreCommit { name, epoch } => match images.incoming.remove(name) {
            // The announced length is an upper bound (admission happens
            // before the image exists); the image's own header says how long
            // it must be, and decoding checks that.
            Some(mut incoming) if incoming.bytes.len() as u64 <= incoming.expected => {
                // The restore checks memory itself, for the arena's real length.
                incoming.arena = None;
                let delta = capsules_wire::image::peek_kind(&incoming.bytes)
                    == Some(capsules_wire::image::ImageKind::Delta);
                match match images.staged.remove(name) {
                    Some(base) if delta => {
                        capsule::migrate::restore_merged(base, &incoming.bytes, key, *epoch, net)
                    }
                    // A whole image (a resume) replaces a forgotten pre-copy.
                    Some(base) => {
                        capsule::migrate::abort_staged(base);
                        capsule::migrate::restore(&incoming.bytes, key, *epoch, net)
                    }
                    None => capsule::migrate::restore(&incoming.bytes, key, *epoch, net),
                } {
                    Ok(info) => Response::CapsuleStarted(wire_info(info)),
                    Err(e) => Response::error(
                        restore_error_code(&e),
                        alloc::format!("image refused: {e}"),
                    ),
                }
            }
            Some(incoming) => Response::error(
                ErrorCode::InvalidArgument,
                alloc::format!(
                    "image of {} bytes exceeds the announced {}",
                    incoming.bytes.len(),
                    incoming.expected
                ),
            ),
            None => Response::error(
                ErrorCode::NotFound,
                alloc::format!("no restore of '{name}' in progress"),
            ),
        },
        Request::RestoreAbort { name } => {
            images.incoming.remove(name);
            if let Some(staged) = images.staged.remove(name) {
                capsule::migrate::abort_staged(staged);
            }
            Response::Done
        }
        Request::Fence { name, epoch } => {
            // A restore in progress here would become an older copy too: the
            // directory only fences once the move it belonged to is over.
            images.incoming.remove(name);
            images.outgoing.remove(name);
            if let Some(staged) = images.staged.remove(name) {
                capsule::migrate::abort_staged(staged);
            }
            let dropped = capsule::fence(name, *epoch, net);
            log::info!("control: fenced {name} at epoch {epoch}: {dropped} stale copies dropped");
            Response::Done
        }
        Request::HoldTraffic { locator } => {
            let until = crate::time::since_boot_ns() + HOLD_LIMIT_NS;
            net.switch.hold(*locator, until);
            Response::Done
        }
        Request::ReleaseTraffic { locator } => {
            let now = crate::time::since_boot_ns();
            let Network { switch, nic, .. } = net;
            let sent = switch.release_held(*locator, nic, now);
            log::debug!("control: released {sent} packets held for {locator}");
            Response::Done
        }
        Request::UpdateTranslations { replace, entries } => match net.router.as_mut() {
            Some(plane) => {
                let ignored = plane.core.update(*replace, entries);
                log::info!(
                    "router: translation update ({} entries{}, {ignored} ignored as older); {} held",
                    entries.len(),
                    if *replace { ", whole table" } else { "" },
                    plane.core.translations()
                );
                Response::Done
            }
            // VMs keep no translation table yet (IP-in-IP is a later slice).
            None => Response::error(
                ErrorCode::UnknownRequest,
                "translation tables are kept by the router only",
            ),
        },
        Request::InspectCapsule { name } => match capsule::migrate::inspect(name) {
            Ok((tasks, sockets)) => Response::Inspection { tasks, sockets },
            Err(e) => capsule_error(e),
        },
        Request::ListPrograms => Response::Programs(
            capsule::programs()
                .iter()
                .map(|p| ProgramInfo {
                    name: p.name.into(),
                    description: p.description.into(),
                })
                .collect(),
        ),
    }
}

/// Largest log chunk in one reply (well inside a frame).
const MAX_LOG_CHUNK: usize = 32 * 1024;

fn wire_info(c: capsule::CapsuleInfo) -> CapsuleInfo {
    CapsuleInfo {
        name: c.name,
        program: c.program.into(),
        locator: c.locator,
        slot: c.slot,
        state: match c.state {
            capsule::CapsuleState::Running => CapsuleState::Running,
            capsule::CapsuleState::Exited => CapsuleState::Exited,
            capsule::CapsuleState::Faulted(reason) => CapsuleState::Faulted { reason },
            capsule::CapsuleState::Killed => CapsuleState::Killed,
            capsule::CapsuleState::Frozen => CapsuleState::Frozen,
            capsule::CapsuleState::Migrated => CapsuleState::Migrated,
        },
        tasks: c.tasks,
        memory_bytes: c.memory_bytes,
        memory_limit: c.memory_limit,
        sockets: c.sockets,
        uptime_ns: c.uptime_ns,
        epoch: c.epoch,
    }
}

fn capsule_error(e: capsule::CapsuleError) -> Response {
    use capsule::CapsuleError as E;
    let code = match &e {
        E::UnknownProgram(_) | E::BadName | E::BadLocator(_) => ErrorCode::InvalidArgument,
        E::NameTaken(_) | E::LocatorTaken(_) | E::SlotTaken(_) => ErrorCode::AlreadyExists,
        E::NotFound(_) => ErrorCode::NotFound,
        E::LimitReached(_) | E::OutOfMemory => ErrorCode::LimitReached,
        E::NotRunning(_) | E::NotFrozen(_) | E::BadImage(_) => ErrorCode::InvalidArgument,
        E::Stale { .. } => ErrorCode::Stale,
    };
    Response::error(code, alloc::format!("{e}"))
}

fn restore_error_code(e: &capsule::migrate::RestoreError) -> ErrorCode {
    use capsule::CapsuleError as C;
    use capsule::migrate::RestoreError as R;
    match e {
        R::Capsule(C::NameTaken(_) | C::SlotTaken(_) | C::LocatorTaken(_)) => {
            ErrorCode::AlreadyExists
        }
        R::Capsule(C::OutOfMemory | C::LimitReached(_)) => ErrorCode::LimitReached,
        R::Capsule(C::Stale { .. }) => ErrorCode::Stale,
        _ => ErrorCode::InvalidArgument,
    }
}
