//! The control service: the VM's authenticated request port (TCP on the
//! machine address). Framing, authentication and message formats come from
//! `capsules_wire::control`; this module moves bytes between smoltcp sockets
//! and a `ServerSession` per connection and carries out the requests.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use capsules_wire::control::{
    CapsuleInfo, CapsuleState, ErrorCode, FrameDecoder, Incoming, MAX_FRAME_LEN, PROTOCOL_VERSION,
    ProgramInfo, Request, Response, ServerSession, Status, frame,
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
const RX_BUFFER: usize = 16 * 1024;
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
}

pub struct ControlService {
    key: Vec<u8>,
    port: u16,
    vm_name: String,
    connections: Vec<Connection>,
    shutdown_requested: bool,
}

impl ControlService {
    pub fn new(net: &mut Network, key: &[u8], port: u16, vm_name: &str) -> Self {
        let connections = (0..MAX_CONNECTIONS)
            .map(|_| {
                let socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
                    tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
                );
                Connection {
                    handle: net.machine.sockets.add(socket),
                    session: None,
                    decoder: FrameDecoder::new(),
                    outbox: Vec::new(),
                    close_when_flushed: false,
                    last_activity_ns: 0,
                }
            })
            .collect();
        READY_NS.store(crate::time::since_boot_ns(), Ordering::Relaxed);
        Self {
            key: key.to_vec(),
            port,
            vm_name: vm_name.into(),
            connections,
            shutdown_requested: false,
        }
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
            if let Err(e) = socket.listen(self.port) {
                log::error!("control: cannot listen on port {}: {e:?}", self.port);
            }
            return false;
        }
        if socket.state() == tcp::State::Established && conn.session.is_none() {
            let session = ServerSession::new(&self.key, crate::random::bytes32());
            conn.outbox
                .extend(frame(&session.hello(crate::build_id(), &self.vm_name)));
            conn.session = Some(session);
            conn.last_activity_ns = crate::time::since_boot_ns();
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
                        Incoming::Request { seq, request } => {
                            let response = handle_request(&request, &self.vm_name, net);
                            shutdown |= request == Request::Shutdown;
                            replies.push(session.reply(seq, &response));
                        }
                        Incoming::Refused { reply, code } => {
                            log::warn!("control: refused a request ({})", code.as_str());
                            replies.push(reply);
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

fn handle_request(request: &Request, vm_name: &str, net: &mut Network) -> Response {
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
        Request::KillCapsule { name } => match capsule::kill(name, net) {
            Ok(()) => Response::Killed,
            Err(e) => capsule_error(e),
        },
        Request::CapsuleLogs { name, offset, max } => {
            let max = (*max as usize).min(MAX_LOG_CHUNK);
            match capsule::read_log(name, *offset, max) {
                Ok((data, next_offset)) => Response::Logs { data, next_offset },
                Err(e) => capsule_error(e),
            }
        }
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
        },
        tasks: c.tasks,
        memory_bytes: c.memory_bytes,
        memory_limit: c.memory_limit,
        sockets: c.sockets,
        uptime_ns: c.uptime_ns,
    }
}

fn capsule_error(e: capsule::CapsuleError) -> Response {
    use capsule::CapsuleError as E;
    let code = match &e {
        E::UnknownProgram(_) | E::BadName => ErrorCode::InvalidArgument,
        E::NameTaken(_) | E::LocatorTaken(_) | E::SlotTaken(_) => ErrorCode::AlreadyExists,
        E::NotFound(_) => ErrorCode::NotFound,
        E::LimitReached(_) | E::OutOfMemory => ErrorCode::LimitReached,
    };
    Response::error(code, alloc::format!("{e}"))
}
