//! What capsule programs call: a small, blocking, std::net-like API. Every
//! call reaches the program's own capsule only, with preemption disabled while
//! kernel-side state is borrowed; waits park the task until the kernel loop
//! wakes it. Errors are values, never panics.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::net::Ipv4Addr;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{IpAddress, IpEndpoint, IpListenEndpoint};

use super::{Capsule, CapsuleRoot, MAX_TASKS, NetWant, REGISTRY};
use crate::sched::{self, Task, TaskState};

/// Sockets one capsule may hold.
pub const MAX_SOCKETS: usize = 256;
/// Listening sockets kept ready per listener (connections accepted at once).
const BACKLOG: usize = 4;
const TCP_BUFFER: usize = 32 * 1024;
const UDP_PACKETS: usize = 32;
const UDP_BUFFER: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetError {
    AddrInUse,
    ConnectionRefused,
    ConnectionReset,
    NotConnected,
    TooManySockets,
    InvalidInput,
    /// The peer closed its side; nothing more can be written.
    BrokenPipe,
}

impl core::fmt::Display for NetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::AddrInUse => "address in use",
            Self::ConnectionRefused => "connection refused",
            Self::ConnectionReset => "connection reset",
            Self::NotConnected => "not connected",
            Self::TooManySockets => "too many sockets",
            Self::InvalidInput => "invalid input",
            Self::BrokenPipe => "broken pipe",
        })
    }
}

/// Runs `f` on the running task's capsule with preemption disabled.
fn with_current<R>(f: impl FnOnce(&mut Capsule, &mut CapsuleRoot) -> R) -> R {
    let slot = sched::current_slot().expect("capsule API called outside a capsule task");
    let _guard = sched::preempt_disable();
    crate::arch::without_interrupts(|| {
        let mut registry = REGISTRY.lock();
        let capsule = registry
            .capsules
            .get_mut(&slot)
            .expect("running capsule is registered");
        let root = capsule.root.expect("running capsule has its arena");
        // SAFETY: this task's capsule is live while the task runs; nothing
        // else touches it now (preemption is off, the kernel loop is parked).
        f(capsule, unsafe { &mut *root })
    })
}

pub(super) fn run_main(main: fn(&[String]) -> Result<(), String>, args: &[String]) {
    if let Err(e) = main(args) {
        log(format_args!("program ended with an error: {e}"));
    }
}

/// Writes a line to the capsule's log (and the serial console).
pub fn log(args: core::fmt::Arguments) {
    with_current(|c, _| {
        let _ = writeln!(c.log, "{args}");
        crate::println!("[capsule {}] {args}", c.name);
    });
}

#[macro_export]
macro_rules! capsule_log {
    ($($arg:tt)*) => { $crate::capsule::api::log(format_args!($($arg)*)) };
}

pub fn name() -> String {
    with_current(|c, _| c.name.clone())
}

pub fn locator() -> Ipv4Addr {
    with_current(|c, _| c.locator)
}

/// The VM the capsule runs on now.
pub fn vm_name() -> String {
    super::vm_name()
}

/// Capsule clock: continues across moves between VMs.
pub fn now_ns() -> u64 {
    with_current(|c, _| c.clock_ns())
}

pub fn uptime_ms() -> u64 {
    now_ns() / 1_000_000
}

pub fn sleep_ms(ms: u64) {
    // On the capsule clock, so that a sleep spans a move between VMs.
    let until_ns = now_ns().saturating_add(ms.saturating_mul(1_000_000));
    sched::block(TaskState::Sleeping { until_ns });
}

pub fn yield_now() {
    sched::yield_now();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskId(pub u32);

/// Starts another task of this capsule.
pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<TaskId, &'static str> {
    let name = String::from(name);
    let entry: Box<dyn FnOnce() + Send> = Box::new(f);
    with_current(move |_, root| {
        let live = root
            .tasks
            .iter()
            .filter(|t| t.state != TaskState::Exited)
            .count();
        if live >= MAX_TASKS {
            return Err("too many tasks in this capsule");
        }
        // Exited tasks' slots are reused so a long-lived server does not grow.
        root.tasks
            .retain(|t| t.state != TaskState::Exited || is_current(t));
        let id = root.next_task_id;
        root.next_task_id += 1;
        root.tasks
            .push(Task::new(id, name, sched::task::DEFAULT_STACK_SIZE, entry));
        Ok(TaskId(id))
    })
}

fn is_current(task: &Task) -> bool {
    sched::current_task() == Some(task as *const Task as *mut Task)
}

/// Waits until task `id` has returned.
pub fn join(id: TaskId) {
    loop {
        let done = with_current(|_, root| {
            root.tasks
                .iter()
                .find(|t| t.id == id.0)
                .is_none_or(|t| t.state == TaskState::Exited)
        });
        if done {
            return;
        }
        sched::block(TaskState::Joining { task: id.0 });
    }
}

/// The capsule's network event stamp: read it *before* looking at a socket,
/// and pass it to [`wait_net`], so news in between wakes the task.
fn net_seen() -> u64 {
    with_current(|c, _| c.net_event_ns)
}

/// Parks the task until `socket` is ready for `want`, or, with no socket,
/// until the capsule's network has news after `seen`.
fn wait_net(seen: u64, on: Option<(SocketHandle, NetWant)>) {
    let Some(task) = sched::current_task() else {
        return;
    };
    // SAFETY: the running task's control block is live while it runs.
    let id = unsafe { (*task).id };
    if let Some(wait) = on {
        with_current(|_, root| root.net_waits.insert(id, wait));
    }
    sched::block(TaskState::WaitingNet { seen });
    if on.is_some() {
        with_current(|_, root| root.net_waits.remove(&id));
    }
}

fn new_tcp_socket(root: &mut CapsuleRoot) -> Result<SocketHandle, NetError> {
    if root.stack.sockets.iter().count() >= MAX_SOCKETS {
        return Err(NetError::TooManySockets);
    }
    let socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
    );
    Ok(root.stack.sockets.add(socket))
}

/// A listening TCP port.
pub struct TcpListener {
    port: u16,
    ready: Vec<SocketHandle>,
}

impl TcpListener {
    pub fn bind(port: u16) -> Result<Self, NetError> {
        if port == 0 {
            return Err(NetError::InvalidInput);
        }
        with_current(|c, root| {
            let in_use = root.stack.sockets.iter().any(|(_, s)| match s {
                smoltcp::socket::Socket::Tcp(t) => {
                    t.state() == tcp::State::Listen && t.listen_endpoint().port == port
                }
                _ => false,
            });
            if in_use {
                return Err(NetError::AddrInUse);
            }
            let mut ready = Vec::with_capacity(BACKLOG);
            for _ in 0..BACKLOG {
                let handle = match new_tcp_socket(root) {
                    Ok(h) => h,
                    Err(e) => {
                        for h in ready {
                            root.stack.sockets.remove(h);
                        }
                        return Err(e);
                    }
                };
                root.stack
                    .sockets
                    .get_mut::<tcp::Socket>(handle)
                    .listen(port)
                    .map_err(|_| NetError::AddrInUse)?;
                ready.push(handle);
            }
            root.listen_ports.push(port);
            c.net_dirty = true;
            Ok(TcpListener { port, ready })
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits for the next connection.
    pub fn accept(&mut self) -> Result<TcpStream, NetError> {
        loop {
            let seen = net_seen();
            let port = self.port;
            let accepted = with_current(|c, root| {
                let index = self.ready.iter().position(|h| {
                    let s = root.stack.sockets.get::<tcp::Socket>(*h);
                    !matches!(s.state(), tcp::State::Listen | tcp::State::SynReceived)
                })?;
                let handle = self.ready.swap_remove(index);
                // Keep the backlog full; if that fails the port just has fewer
                // ready sockets until a later accept.
                if let Ok(fresh) = new_tcp_socket(root) {
                    if root
                        .stack
                        .sockets
                        .get_mut::<tcp::Socket>(fresh)
                        .listen(port)
                        .is_ok()
                    {
                        self.ready.push(fresh);
                    } else {
                        root.stack.sockets.remove(fresh);
                    }
                }
                c.net_dirty = true;
                Some(handle)
            });
            match accepted {
                Some(handle) => {
                    return Ok(TcpStream {
                        handle: Some(handle),
                    });
                }
                // Any of the ready sockets may complete: wait for any news.
                None => wait_net(seen, None),
            }
        }
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        let ready = core::mem::take(&mut self.ready);
        let port = self.port;
        with_current(|_, root| {
            for h in ready {
                root.stack.sockets.remove(h);
            }
            root.listen_ports.retain(|p| *p != port);
        });
    }
}

/// A TCP connection.
pub struct TcpStream {
    handle: Option<SocketHandle>,
}

impl TcpStream {
    pub fn connect(addr: Ipv4Addr, port: u16) -> Result<TcpStream, NetError> {
        let handle = with_current(|c, root| {
            let handle = new_tcp_socket(root)?;
            let local = root.stack.ephemeral_port();
            let remote = IpEndpoint::new(IpAddress::Ipv4(addr), port);
            let cx = root.stack.iface.context();
            let result = root.stack.sockets.get_mut::<tcp::Socket>(handle).connect(
                cx,
                remote,
                IpListenEndpoint::from(local),
            );
            if result.is_err() {
                root.stack.sockets.remove(handle);
                return Err(NetError::InvalidInput);
            }
            c.net_dirty = true;
            Ok(handle)
        })?;
        let stream = TcpStream {
            handle: Some(handle),
        };
        loop {
            let state = stream.with_socket(|s| s.state());
            match state {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    wait_net(0, Some((handle, NetWant::TcpConnected)))
                }
                tcp::State::Established | tcp::State::CloseWait => return Ok(stream),
                _ => return Err(NetError::ConnectionRefused),
            }
        }
    }

    fn socket(&self) -> SocketHandle {
        self.handle.expect("stream is open")
    }

    fn with_socket<R>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> R) -> R {
        let handle = self.handle.expect("stream is open");
        with_current(|c, root| {
            let r = f(root.stack.sockets.get_mut::<tcp::Socket>(handle));
            // Reads open the window and writes queue data: either way the
            // stack has something to send.
            c.net_dirty = true;
            r
        })
    }

    /// Reads what has arrived, waiting for at least one byte. `Ok(0)` means
    /// the peer closed its side.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, NetError> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let r = self.with_socket(|s| {
                if s.can_recv() {
                    return Some(s.recv_slice(buf).map_err(|_| NetError::ConnectionReset));
                }
                if !s.may_recv() {
                    return Some(if s.state() == tcp::State::Closed {
                        Err(NetError::ConnectionReset)
                    } else {
                        Ok(0)
                    });
                }
                None
            });
            match r {
                Some(r) => return r,
                None => wait_net(0, Some((self.socket(), NetWant::TcpReadable))),
            }
        }
    }

    /// Queues some of `buf`, waiting for room. Returns how much was queued.
    pub fn write(&mut self, buf: &[u8]) -> Result<usize, NetError> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let r = self.with_socket(|s| {
                if !s.may_send() {
                    return Some(Err(if s.state() == tcp::State::Closed {
                        NetError::ConnectionReset
                    } else {
                        NetError::BrokenPipe
                    }));
                }
                if s.can_send() {
                    return Some(s.send_slice(buf).map_err(|_| NetError::ConnectionReset));
                }
                None
            });
            match r {
                Some(r) => return r,
                None => wait_net(0, Some((self.socket(), NetWant::TcpWritable))),
            }
        }
    }

    pub fn write_all(&mut self, mut buf: &[u8]) -> Result<(), NetError> {
        while !buf.is_empty() {
            let n = self.write(buf)?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Sends FIN after the queued data; reading stays possible.
    pub fn shutdown(&mut self) {
        self.with_socket(|s| s.close());
    }

    pub fn peer(&self) -> Option<(Ipv4Addr, u16)> {
        self.with_socket(|s| {
            s.remote_endpoint().map(|e| match e.addr {
                IpAddress::Ipv4(a) => (a, e.port),
            })
        })
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        with_current(|c, root| {
            let socket = root.stack.sockets.get_mut::<tcp::Socket>(handle);
            socket.close();
            root.closing.push(handle);
            c.net_dirty = true;
        });
    }
}

/// A bound UDP port.
pub struct UdpSocket {
    handle: SocketHandle,
}

impl UdpSocket {
    pub fn bind(port: u16) -> Result<Self, NetError> {
        with_current(|c, root| {
            if root.stack.sockets.iter().count() >= MAX_SOCKETS {
                return Err(NetError::TooManySockets);
            }
            let port = if port == 0 {
                root.stack.ephemeral_port()
            } else {
                port
            };
            let socket = udp::Socket::new(
                udp::PacketBuffer::new(
                    vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                    vec![0; UDP_BUFFER],
                ),
                udp::PacketBuffer::new(
                    vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                    vec![0; UDP_BUFFER],
                ),
            );
            let handle = root.stack.sockets.add(socket);
            if root
                .stack
                .sockets
                .get_mut::<udp::Socket>(handle)
                .bind(port)
                .is_err()
            {
                root.stack.sockets.remove(handle);
                return Err(NetError::AddrInUse);
            }
            c.net_dirty = true;
            Ok(UdpSocket { handle })
        })
    }

    pub fn send_to(&self, buf: &[u8], addr: Ipv4Addr, port: u16) -> Result<(), NetError> {
        let handle = self.handle;
        loop {
            let r = with_current(|c, root| {
                let s = root.stack.sockets.get_mut::<udp::Socket>(handle);
                if !s.can_send() {
                    return None;
                }
                c.net_dirty = true;
                Some(
                    s.send_slice(buf, IpEndpoint::new(IpAddress::Ipv4(addr), port))
                        .map_err(|_| NetError::InvalidInput),
                )
            });
            match r {
                Some(r) => return r,
                None => wait_net(0, Some((handle, NetWant::UdpSendable))),
            }
        }
    }

    /// Waits for a datagram; returns its length and sender.
    pub fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, Ipv4Addr, u16), NetError> {
        let handle = self.handle;
        loop {
            let r = with_current(|_, root| {
                let s = root.stack.sockets.get_mut::<udp::Socket>(handle);
                if !s.can_recv() {
                    return None;
                }
                Some(s.recv_slice(buf).map(|(n, meta)| {
                    let IpAddress::Ipv4(a) = meta.endpoint.addr;
                    (n, a, meta.endpoint.port)
                }))
            });
            match r {
                Some(Ok(r)) => return Ok(r),
                Some(Err(_)) => return Err(NetError::InvalidInput),
                None => wait_net(0, Some((handle, NetWant::UdpReceivable))),
            }
        }
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        let handle = self.handle;
        with_current(|_, root| {
            root.stack.sockets.remove(handle);
        });
    }
}
