//! Compute capsules: groups of tasks with a private arena, a network stack
//! with their own locator address, a clock and a log.
//!
//! Everything a capsule owns that must move with it lives in its arena and is
//! reached from its [`CapsuleRoot`] (tasks with their stacks and contexts, the
//! smoltcp interface and sockets). The kernel keeps a small [`Capsule`] record
//! per capsule: name, locator, slot, state, the inbound packet queue and the log.
//!
//! Only the kernel loop creates, polls, wakes and ends capsules; tasks reach
//! their own capsule through [`api`] with preemption disabled. Since the
//! kernel loop is never preempted and tasks are switched out only at safe
//! points, the two never touch a capsule at the same time.

pub mod api;
pub mod log;
pub mod migrate;
pub mod net;

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::net::Ipv4Addr;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use spin::{Mutex, Once};

use crate::arch::x86_64::trap::TrapFrame;
use crate::mm::arena;
use crate::net::Network;
use crate::net::switch::{LocalDelivery, MAX_QUEUED, QueueFull};
use crate::sched::{self, Task, TaskState};
use log::LogRing;
use net::{CapsuleStack, SocketIndex, SocketKind};

/// Most capsules one VM runs at once.
pub const MAX_CAPSULES: usize = 1024;
/// Most tasks in one capsule.
pub const MAX_TASKS: usize = 256;
/// Default arena limit (heap, stacks, socket buffers).
pub const DEFAULT_MEMORY_LIMIT: u64 = 64 << 20;
pub const MAX_NAME_LEN: usize = 63;

/// A program compiled into the kernel image.
pub struct Program {
    pub name: &'static str,
    pub description: &'static str,
    /// Runs as the capsule's first task.
    pub main: fn(&[String]) -> Result<(), String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapsuleState {
    Running,
    /// Every task returned; the capsule's memory is gone.
    Exited,
    /// A task panicked or faulted; the reason is kept.
    Faulted(String),
    /// Killed on request.
    Killed,
    /// Stopped at safe points for a move: tasks do not run, the stack is not
    /// polled, inbound packets are held.
    Frozen,
    /// Moved to another VM; the record goes once the move is released.
    Migrated,
}

impl CapsuleState {
    pub fn is_running(&self) -> bool {
        *self == CapsuleState::Running
    }

    /// Whether its memory can be released (a frozen capsule keeps it).
    pub fn has_ended(&self) -> bool {
        !matches!(self, CapsuleState::Running | CapsuleState::Frozen)
    }
}

/// The part of a capsule that lives in its arena.
pub struct CapsuleRoot {
    pub tasks: Vec<Box<Task>>,
    pub next_task_id: u32,
    pub stack: CapsuleStack,
    /// Closed streams whose sockets are removed once TCP is done with them.
    pub closing: Vec<smoltcp::iface::SocketHandle>,
    /// Ports with a `TcpListener`: a SYN for one of them that finds no free
    /// listening socket waits for the next `accept` instead of being reset.
    pub listen_ports: Vec<u16>,
    /// Round-robin position among the tasks.
    rr: usize,
    /// Tasks parked on one socket, by task id: only that socket's readiness
    /// wakes them, so a packet for one of a hundred connections wakes one
    /// task, not a hundred (each would dirty its stack for a pre-copy).
    pub net_waits: BTreeMap<u32, (SocketHandle, NetWant)>,
}

/// What a task parked on a socket waits for. Each matches the condition on
/// which the blocking call in `api` stops waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetWant {
    /// Bytes to read, or the end of the stream.
    TcpReadable,
    /// Room to write, or no more sending possible.
    TcpWritable,
    /// The handshake is over, one way or the other.
    TcpConnected,
    UdpSendable,
    UdpReceivable,
}

impl NetWant {
    /// Whether `handle`'s socket is ready; `None` if the handle names no
    /// socket of the right kind (checked in `index`, since `SocketSet::get`
    /// would panic, and this runs in the kernel loop).
    fn ready(
        self,
        index: &SocketIndex,
        sockets: &SocketSet<'static>,
        handle: SocketHandle,
    ) -> Option<bool> {
        let want_tcp = matches!(
            self,
            Self::TcpReadable | Self::TcpWritable | Self::TcpConnected
        );
        let kind = index.kind(handle)?;
        if (kind == SocketKind::Tcp) != want_tcp || kind == SocketKind::Other {
            return None;
        }
        Some(match self {
            Self::TcpReadable => {
                let s = sockets.get::<tcp::Socket>(handle);
                s.can_recv() || !s.may_recv()
            }
            Self::TcpWritable => {
                let s = sockets.get::<tcp::Socket>(handle);
                s.can_send() || !s.may_send()
            }
            Self::TcpConnected => !matches!(
                sockets.get::<tcp::Socket>(handle).state(),
                tcp::State::SynSent | tcp::State::SynReceived
            ),
            Self::UdpSendable => sockets.get::<udp::Socket>(handle).can_send(),
            Self::UdpReceivable => sockets.get::<udp::Socket>(handle).can_recv(),
        })
    }
}

/// The kernel's record of a capsule.
pub struct Capsule {
    pub name: String,
    pub program: &'static Program,
    pub args: Vec<String>,
    pub locator: Ipv4Addr,
    pub slot: u32,
    pub state: CapsuleState,
    /// This copy's epoch: bumped by every move, resume and thaw, so that a
    /// stale copy is known as one (see [`fence`]).
    pub epoch: u64,
    root: Option<*mut CapsuleRoot>,
    /// IP packets waiting for the capsule's stack.
    pub inbound: VecDeque<Vec<u8>>,
    /// Connection requests waiting for a free listening socket (a listen
    /// backlog: held, like a full accept queue, rather than refused).
    held_syns: VecDeque<Vec<u8>>,
    pub log: LogRing,
    /// Capsule time = kernel time − offset. Signed: a capsule restored on a
    /// VM that has been up for less time than the capsule has run gets a
    /// negative offset, and its clock resumes where it stopped instead of
    /// falling back to the kernel's uptime.
    clock_offset_ns: i64,
    /// A task changed socket state; poll the stack soon.
    net_dirty: bool,
    /// Capsule clock of the stack's last news (strictly increasing): tasks
    /// waiting on no socket in particular wake when it passes what they saw.
    net_event_ns: u64,
    poll_at_ns: Option<u64>,
    /// A pre-copy began when the arena was this long: its pages are being
    /// read (`migrate::read_pages`), and the next freeze sends only the pages
    /// written since it began.
    precopy_len: Option<u64>,
}

// SAFETY: the root pointer is only used on the one CPU under the rules above.
unsafe impl Send for Capsule {}

impl Capsule {
    pub fn clock_ns(&self) -> u64 {
        capsule_clock(crate::time::since_boot_ns(), self.clock_offset_ns)
    }

    /// Time the capsule has lived, across moves: its clock started at zero.
    pub fn uptime_ns(&self) -> u64 {
        self.clock_ns()
    }

    fn root(&mut self) -> Option<&mut CapsuleRoot> {
        // SAFETY: the root lives in the capsule's arena, which stays mapped
        // until `reap` clears this pointer; see the module rules on access.
        self.root.map(|r| unsafe { &mut *r })
    }
}

/// The offset that makes the capsule clock read `clock_ns` at kernel time
/// `now_ns`. Real clocks stay below 2^63 ns (292 years), where the difference
/// fits; beyond that (a forged image) it is clamped, never wrapped.
pub(crate) fn clock_offset(now_ns: u64, clock_ns: u64) -> i64 {
    (i128::from(now_ns) - i128::from(clock_ns)).clamp(i64::MIN.into(), i64::MAX.into()) as i64
}

/// Capsule time at kernel time `now_ns` (never below zero).
pub(crate) fn capsule_clock(now_ns: u64, offset_ns: i64) -> u64 {
    (i128::from(now_ns) - i128::from(offset_ns)).clamp(0, i128::from(u64::MAX)) as u64
}

/// What `list` reports per capsule.
#[derive(Debug, Clone)]
pub struct CapsuleInfo {
    pub name: String,
    pub program: &'static str,
    pub locator: Ipv4Addr,
    pub slot: u32,
    pub state: CapsuleState,
    pub tasks: u32,
    pub memory_bytes: u64,
    pub memory_limit: u64,
    pub sockets: u32,
    pub uptime_ns: u64,
    pub epoch: u64,
}

/// Why a capsule could not be started or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapsuleError {
    UnknownProgram(String),
    NameTaken(String),
    LocatorTaken(Ipv4Addr),
    /// Not a unicast host address (see [`valid_locator`]).
    BadLocator(Ipv4Addr),
    SlotTaken(u32),
    BadName,
    NotFound(String),
    LimitReached(&'static str),
    OutOfMemory,
    NotRunning(String),
    NotFrozen(String),
    BadImage(&'static str),
    /// A copy at `epoch` may not run: this VM knows of epoch `fence`.
    Stale {
        name: String,
        epoch: u64,
        fence: u64,
    },
}

impl core::fmt::Display for CapsuleError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::UnknownProgram(p) => write!(f, "unknown program '{p}'"),
            Self::NameTaken(n) => write!(f, "a capsule named '{n}' already exists on this VM"),
            Self::LocatorTaken(l) => write!(f, "locator {l} is already used on this VM"),
            Self::BadLocator(l) => write!(
                f,
                "locator {l} is not a unicast host address (zero, loopback, multicast, \
                 broadcast and reserved addresses cannot be a capsule's)"
            ),
            Self::SlotTaken(s) => write!(f, "arena slot {s} is already used on this VM"),
            Self::BadName => write!(
                f,
                "capsule names are 1-{MAX_NAME_LEN} characters of [A-Za-z0-9_.-]"
            ),
            Self::NotFound(n) => write!(f, "no capsule named '{n}' on this VM"),
            Self::LimitReached(what) => write!(f, "limit reached: {what}"),
            Self::OutOfMemory => write!(f, "out of memory for a new capsule"),
            Self::NotRunning(n) => write!(f, "capsule '{n}' is not running"),
            Self::NotFrozen(n) => write!(f, "capsule '{n}' is not frozen"),
            Self::BadImage(why) => write!(f, "bad image: {why}"),
            Self::Stale { name, epoch, fence } => write!(
                f,
                "copy of '{name}' at epoch {epoch} is stale: this VM was told of epoch {fence}"
            ),
        }
    }
}

struct Registry {
    capsules: BTreeMap<u32, Capsule>,
    /// Slot that ran last, for round robin between capsules.
    cursor: u32,
    /// Capsule name → the newest epoch this VM was told the directory
    /// committed: copies below it are stale and never run here.
    fences: BTreeMap<String, u64>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    capsules: BTreeMap::new(),
    cursor: 0,
    fences: BTreeMap::new(),
});

/// Fences kept per VM. Bounded, since names come from control requests; when
/// full, the fence with the lowest epoch goes (a copy that old is the least
/// likely to turn up).
const MAX_FENCES: usize = 1024;
// Set once at boot and read-only afterwards: capsule tasks read them without
// a lock, so a task switched out (or frozen, or killed) in the middle of a
// read can never leave a lock held behind it. A spin lock here once did: a
// `kv` task frozen inside `vm_name()` moved away, and the next capsule to
// arrive on that VM hung the kernel loop.
static PROGRAMS: Once<&'static [Program]> = Once::new();
static VM_NAME: Once<String> = Once::new();

/// Runs `f` on the registry with interrupts off (the scheduler reads it from
/// trap context). `f` runs in the kernel allocation domain.
fn registry<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    crate::arch::without_interrupts(|| {
        let prev = arena::set_domain(None);
        let r = f(&mut REGISTRY.lock());
        arena::set_domain(prev);
        r
    })
}

/// Sets up the capsule machinery: the scheduler hooks and the program table.
pub fn init(programs: &'static [Program], vm_name: &str) {
    PROGRAMS.call_once(|| programs);
    VM_NAME.call_once(|| vm_name.to_string());
    sched::init(pick_next, on_task_fault);
}

pub fn programs() -> &'static [Program] {
    PROGRAMS.get().copied().unwrap_or(&[])
}

pub fn vm_name() -> String {
    VM_NAME.get().cloned().unwrap_or_default()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Whether `addr` can be a capsule's own address: a unicast host address.
/// smoltcp takes any address for an interface but panics in the kernel loop
/// when it later handles traffic for an unspecified, multicast or broadcast
/// one; loopback and the reserved 240/4 cannot be reached on a LAN either.
pub fn valid_locator(addr: Ipv4Addr) -> bool {
    let first = addr.octets()[0];
    !(first == 0 || addr.is_loopback() || addr.is_multicast() || first >= 240)
}

/// What a new capsule is.
pub struct CapsuleConfig {
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
    pub locator: Ipv4Addr,
    pub slot: u32,
    pub memory_limit: u64,
    pub epoch: u64,
}

/// Refuses a copy of `name` at `epoch` when this VM was fenced above it.
pub fn check_fence(name: &str, epoch: u64) -> Result<(), CapsuleError> {
    registry(|r| match r.fences.get(name) {
        Some(&fence) if epoch < fence => Err(CapsuleError::Stale {
            name: name.to_string(),
            epoch,
            fence,
        }),
        _ => Ok(()),
    })
}

/// The directory committed epoch `epoch` of capsule `name`: every copy of it
/// here that is older — running or frozen — ends now (a frozen one with its
/// held packets), and older ones are refused from now on. Returns how many
/// copies ended. Kernel loop only.
pub fn fence(name: &str, epoch: u64, net: &mut Network) -> usize {
    let stale: Vec<u32> = registry(|r| {
        let fence = r.fences.entry(name.to_string()).or_insert(0);
        *fence = (*fence).max(epoch);
        if r.fences.len() > MAX_FENCES {
            let lowest = r
                .fences
                .iter()
                .filter(|(n, _)| n.as_str() != name)
                .min_by_key(|(_, e)| **e)
                .map(|(n, _)| n.clone());
            if let Some(lowest) = lowest {
                r.fences.remove(&lowest);
            }
        }
        r.capsules
            .values()
            .filter(|c| c.name == name && c.epoch < epoch)
            .map(|c| c.slot)
            .collect()
    });
    for slot in &stale {
        registry(|r| {
            if let Some(c) = r.capsules.get_mut(slot) {
                ::log::warn!(
                    "capsule {name}: copy at epoch {} dropped, epoch {epoch} runs elsewhere",
                    c.epoch
                );
                if !c.state.has_ended() {
                    c.state = CapsuleState::Killed;
                }
                let _ = writeln!(c.log, "stale copy dropped: epoch {epoch} runs elsewhere");
            }
        });
        reap(net);
        registry(|r| r.capsules.remove(slot));
    }
    stale.len()
}

/// Starts a capsule: arena, stack, first task; announces its locator.
/// Nothing is left behind when it fails.
pub fn start(config: CapsuleConfig, net: &mut Network) -> Result<(), CapsuleError> {
    let program = programs()
        .iter()
        .find(|p| p.name == config.program)
        .ok_or_else(|| CapsuleError::UnknownProgram(config.program.clone()))?;
    if !valid_name(&config.name) {
        return Err(CapsuleError::BadName);
    }
    if !valid_locator(config.locator) {
        return Err(CapsuleError::BadLocator(config.locator));
    }
    check_fence(&config.name, config.epoch)?;
    registry(|r| {
        if r.capsules.len() >= MAX_CAPSULES {
            return Err(CapsuleError::LimitReached("capsules per VM"));
        }
        if r.capsules.values().any(|c| c.name == config.name) {
            return Err(CapsuleError::NameTaken(config.name.clone()));
        }
        if r.capsules
            .values()
            .any(|c| c.locator == config.locator && c.state.is_running())
        {
            return Err(CapsuleError::LocatorTaken(config.locator));
        }
        if r.capsules.contains_key(&config.slot) {
            return Err(CapsuleError::SlotTaken(config.slot));
        }
        Ok(())
    })?;
    if net.switch.resident(config.locator).is_some() || config.locator == net.machine_addr() {
        return Err(CapsuleError::LocatorTaken(config.locator));
    }
    arena::create(config.slot, config.memory_limit).map_err(|e| match e {
        arena::ArenaError::SlotInUse => CapsuleError::SlotTaken(config.slot),
        arena::ArenaError::SlotOutOfRange => CapsuleError::LimitReached("arena slot number"),
        _ => CapsuleError::OutOfMemory,
    })?;
    let now = crate::time::since_boot_ns();
    let seed = u64::from_le_bytes(crate::random::bytes32()[..8].try_into().expect("8 bytes"));
    let main = program.main;
    let args = config.args.clone();
    let slot = config.slot;
    let root = arena::with_domain(slot, || {
        let first = Task::new(
            0,
            program.name.to_string(),
            sched::task::DEFAULT_STACK_SIZE,
            {
                let args: Vec<String> = args.clone();
                Box::new(move || api::run_main(main, &args))
            },
        );
        let mut tasks = Vec::with_capacity(4);
        tasks.push(first);
        Box::into_raw(Box::new(CapsuleRoot {
            tasks,
            next_task_id: 1,
            stack: CapsuleStack::new(config.locator, 0, seed),
            closing: Vec::new(),
            listen_ports: Vec::new(),
            rr: 0,
            net_waits: BTreeMap::new(),
        }))
    });
    arena::set_root(slot, root as usize);
    let mut capsule = Capsule {
        name: config.name,
        program,
        args: config.args,
        locator: config.locator,
        slot,
        state: CapsuleState::Running,
        epoch: config.epoch,
        root: Some(root),
        inbound: VecDeque::new(),
        held_syns: VecDeque::new(),
        log: LogRing::new(),
        clock_offset_ns: clock_offset(now, 0),
        net_dirty: true,
        net_event_ns: 0,
        poll_at_ns: None,
        precopy_len: None,
    };
    let _ = writeln!(
        capsule.log,
        "capsule {} started: program {} on {}",
        capsule.name,
        program.name,
        vm_name()
    );
    ::log::info!(
        "capsule {} ({}) started at {} in slot {slot}",
        capsule.name,
        program.name,
        capsule.locator
    );
    net.switch.attach(capsule.locator, slot);
    net.switch.announce(&mut net.nic, capsule.locator);
    registry(|r| r.capsules.insert(slot, capsule));
    Ok(())
}

fn find_slot(r: &Registry, name: &str) -> Option<u32> {
    r.capsules.values().find(|c| c.name == name).map(|c| c.slot)
}

/// Ends a capsule by name (kernel loop only). A capsule that already ended is
/// removed from the list.
pub fn kill(name: &str, net: &mut Network) -> Result<(), CapsuleError> {
    let slot =
        registry(|r| find_slot(r, name)).ok_or_else(|| CapsuleError::NotFound(name.to_string()))?;
    let running = registry(|r| {
        let c = r.capsules.get_mut(&slot).expect("slot just found");
        let running = !c.state.has_ended();
        if running {
            c.state = CapsuleState::Killed;
            let _ = writeln!(c.log, "capsule killed on request");
        }
        running
    });
    if running {
        reap(net);
    }
    registry(|r| r.capsules.remove(&slot));
    Ok(())
}

pub fn list() -> Vec<CapsuleInfo> {
    registry(|r| {
        r.capsules
            .values_mut()
            .map(|c| {
                let (memory_bytes, memory_limit) = arena::usage(c.slot)
                    .map(|(mapped, _, limit)| (mapped, limit))
                    .unwrap_or((0, 0));
                let uptime_ns = c.uptime_ns();
                let (tasks, sockets) = c
                    .root()
                    .map(|root| {
                        let live = root
                            .tasks
                            .iter()
                            .filter(|t| t.state != TaskState::Exited)
                            .count();
                        (live as u32, root.stack.sockets.iter().count() as u32)
                    })
                    .unwrap_or((0, 0));
                CapsuleInfo {
                    name: c.name.clone(),
                    program: c.program.name,
                    locator: c.locator,
                    slot: c.slot,
                    state: c.state.clone(),
                    tasks,
                    memory_bytes,
                    memory_limit,
                    sockets,
                    uptime_ns,
                    epoch: c.epoch,
                }
            })
            .collect()
    })
}

/// Whether a capsule named `name` is on this VM (in any state).
pub fn exists(name: &str) -> bool {
    registry(|r| find_slot(r, name).is_some())
}

/// Log bytes of capsule `name` from `offset`; see [`LogRing::read_from`].
pub fn read_log(name: &str, offset: u64, max: usize) -> Result<(Vec<u8>, u64), CapsuleError> {
    registry(|r| {
        let slot = find_slot(r, name).ok_or_else(|| CapsuleError::NotFound(name.to_string()))?;
        Ok(r.capsules[&slot].log.read_from(offset, max))
    })
}

/// Whether any task of any capsule can run now.
pub fn any_runnable() -> bool {
    registry(|r| {
        r.capsules.values_mut().any(|c| {
            c.state.is_running()
                && c.root()
                    .is_some_and(|root| root.tasks.iter().any(|t| t.state == TaskState::Runnable))
        })
    })
}

/// The kernel loop's capsule work: deliver queued packets, poll stacks that
/// need it, wake tasks, end capsules whose tasks are done. Returns whether
/// anything happened.
pub fn service(net: &mut Network) -> bool {
    let now = crate::time::since_boot_ns();
    let slots: Vec<u32> = registry(|r| r.capsules.keys().copied().collect());
    let mut busy = false;
    let mut local: Vec<LocalDelivery> = Vec::new();
    for slot in slots {
        busy |= poll_capsule(slot, now, net, &mut local);
    }
    // Packets between capsules of this VM: delivered now, polled next round.
    for delivery in local {
        if deliver(delivery).is_err() {
            net.switch.counters.capsule_queue_drops += 1;
        }
        busy = true;
    }
    busy |= wake();
    busy |= reap(net);
    busy
}

/// Queues an inbound packet for a capsule (from the switch). A full queue
/// refuses it, for the caller to count; a capsule that ended takes nothing.
pub fn deliver(delivery: LocalDelivery) -> Result<(), QueueFull> {
    registry(|r| {
        // A frozen capsule's packets are held for it (and forwarded after a move).
        if let Some(c) = r.capsules.get_mut(&delivery.slot)
            && matches!(c.state, CapsuleState::Running | CapsuleState::Frozen)
        {
            if c.inbound.len() >= MAX_QUEUED {
                return Err(QueueFull);
            }
            c.inbound.push_back(delivery.packet);
        }
        Ok(())
    })
}

fn poll_capsule(slot: u32, now: u64, net: &mut Network, local: &mut Vec<LocalDelivery>) -> bool {
    let taken = registry(|r| {
        let c = r.capsules.get_mut(&slot)?;
        if !c.state.is_running() {
            return None;
        }
        let due = c.net_dirty
            || !c.inbound.is_empty()
            || c.poll_at_ns.is_some_and(|at| at <= c.clock_ns());
        if !due {
            return None;
        }
        c.net_dirty = false;
        // Held connection requests get another chance at every poll.
        let mut inbound = core::mem::take(&mut c.held_syns);
        inbound.append(&mut c.inbound);
        Some((c.root?, inbound, c.clock_ns()))
    });
    let Some((root, mut inbound, clock)) = taken else {
        return false;
    };
    let had_packets = !inbound.is_empty();
    // SAFETY: see the module rules: no task of this capsule is inside the
    // stack now, and the arena stays mapped until `reap`, which runs later in
    // this same loop.
    let root = unsafe { &mut *root };
    let held = hold_syns_without_listener(root, &mut inbound, clock < STARTUP_GRACE_NS);
    let Network { nic, switch, .. } = net;
    let mut send = |packet: &[u8]| {
        // The switch's queues are kernel memory.
        let prev = arena::set_domain(None);
        if let Some(d) = switch.egress(packet, nic, now) {
            local.push(d);
        }
        arena::set_domain(prev);
    };
    let (changed, poll_at, bad) = arena::with_domain(slot, || {
        let changed = root.stack.poll(clock, &mut inbound, &mut send);
        // Closed streams whose TCP is done. Their handles come from the
        // arena: checked, not trusted (see `SocketIndex`).
        let mut bad = None;
        if !root.closing.is_empty() {
            let index = SocketIndex::new(&root.stack.sockets);
            let sockets = &mut root.stack.sockets;
            root.closing.retain(|h| {
                if index.kind(*h) != Some(SocketKind::Tcp) {
                    bad = Some(*h);
                    return false;
                }
                let done = !sockets.get::<tcp::Socket>(*h).is_open();
                if done {
                    sockets.remove(*h);
                }
                !done
            });
        }
        (changed, root.stack.poll_at_ns(clock), bad)
    });
    registry(|r| {
        if let Some(c) = r.capsules.get_mut(&slot) {
            if let Some(handle) = bad {
                end_damaged(
                    c,
                    alloc::format!("socket handle {handle} among its closing streams"),
                );
            }
            c.poll_at_ns = poll_at;
            if changed || had_packets {
                c.net_event_ns = c.clock_ns().max(c.net_event_ns + 1);
            }
            // Packets that arrived while we polled keep their order behind any
            // the stack did not take.
            inbound.extend(c.inbound.drain(..));
            c.inbound = inbound;
            c.held_syns = held;
        }
    });
    true
}

/// Most connection requests held per capsule; more are dropped (the peer
/// retransmits its SYN).
const MAX_HELD_SYNS: usize = 64;

/// For this long after it started (capsule clock), a capsule's program may not
/// have reached its `bind` yet: `capsulectl run` answers as soon as the
/// capsule exists, and a client connecting right away (under TCG, on a VM
/// whose translation cache is still cold) can beat the program to it.
const STARTUP_GRACE_NS: u64 = 2_000_000_000;

/// Takes out of `inbound` the TCP SYNs for a listening port that has no free
/// listening socket right now (every one is mid-handshake or accepted) and,
/// while the capsule is `starting`, for any port it does not listen on yet.
/// smoltcp would answer them with a reset, which clients report as
/// "connection refused"; held, they are retried at every poll (after the next
/// `accept` or `bind`).
fn hold_syns_without_listener(
    root: &CapsuleRoot,
    inbound: &mut VecDeque<Vec<u8>>,
    starting: bool,
) -> VecDeque<Vec<u8>> {
    use smoltcp::socket::{Socket, tcp};
    use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpPacket};
    let mut held = VecDeque::new();
    if root.listen_ports.is_empty() && !starting {
        return held;
    }
    let syn_port = |packet: &[u8]| -> Option<u16> {
        let ip = Ipv4Packet::new_checked(packet).ok()?;
        if ip.next_header() != IpProtocol::Tcp {
            return None;
        }
        let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
        (tcp.syn() && !tcp.ack()).then(|| tcp.dst_port())
    };
    let free_listeners = |port: u16| {
        root.stack
            .sockets
            .iter()
            .filter(|(_, s)| {
                matches!(s, Socket::Tcp(t) if t.state() == tcp::State::Listen && t.listen_endpoint().port == port)
            })
            .count()
    };
    // Each listening socket takes one SYN per poll; smoltcp resets the rest.
    let mut budget: alloc::collections::BTreeMap<u16, usize> = alloc::collections::BTreeMap::new();
    inbound.retain(|packet| match syn_port(packet) {
        Some(port) if root.listen_ports.contains(&port) => {
            let free = budget.entry(port).or_insert_with(|| free_listeners(port));
            if *free > 0 {
                *free -= 1;
                return true;
            }
            if held.len() < MAX_HELD_SYNS {
                held.push_back(packet.clone());
            }
            false
        }
        Some(_) if starting => {
            if held.len() < MAX_HELD_SYNS {
                held.push_back(packet.clone());
            }
            false
        }
        _ => true,
    });
    held
}

fn wake() -> bool {
    registry(|r| {
        let mut woke = false;
        for c in r.capsules.values_mut() {
            if !c.state.is_running() {
                continue;
            }
            let events = c.net_event_ns;
            let clock = c.clock_ns();
            let Some(root) = c.root() else { continue };
            let exited: Vec<u32> = root
                .tasks
                .iter()
                .filter(|t| t.state == TaskState::Exited)
                .map(|t| t.id)
                .collect();
            let all_exited = root.tasks.iter().all(|t| t.state == TaskState::Exited);
            let CapsuleRoot {
                tasks,
                net_waits,
                stack,
                ..
            } = root;
            // Handles of parked tasks come from the arena: checked, not
            // trusted (see `SocketIndex`).
            let index = tasks
                .iter()
                .any(|t| {
                    matches!(t.state, TaskState::WaitingNet { .. }) && net_waits.contains_key(&t.id)
                })
                .then(|| SocketIndex::new(&stack.sockets));
            let mut bad = None;
            for task in tasks.iter_mut() {
                let ready = match task.state {
                    TaskState::Sleeping { until_ns } => until_ns <= clock,
                    // Reading socket state writes nothing to the arena.
                    TaskState::WaitingNet { seen } => match net_waits.get(&task.id) {
                        Some((socket, want)) => index
                            .as_ref()
                            .and_then(|index| want.ready(index, &stack.sockets, *socket))
                            .unwrap_or_else(|| {
                                bad = Some((task.id, *socket, *want));
                                false
                            }),
                        None => events > seen,
                    },
                    TaskState::Joining { task } => exited.contains(&task),
                    TaskState::Runnable | TaskState::Exited => false,
                };
                if ready {
                    task.state = TaskState::Runnable;
                    woke = true;
                }
            }
            if let Some((task, socket, want)) = bad {
                end_damaged(
                    c,
                    alloc::format!("socket handle {socket} that task {task} waits on ({want:?})"),
                );
                continue;
            }
            if all_exited {
                c.state = CapsuleState::Exited;
                let _ = writeln!(c.log, "capsule exited: every task returned");
            }
        }
        woke
    })
}

/// Frees the memory and locator of capsules that ended.
pub(crate) fn reap(net: &mut Network) -> bool {
    let ended: Vec<(u32, Ipv4Addr, String)> = registry(|r| {
        r.capsules
            .values_mut()
            .filter(|c| c.state.has_ended() && c.root.is_some())
            .map(|c| {
                c.root = None;
                c.inbound.clear();
                (c.slot, c.locator, c.name.clone())
            })
            .collect()
    });
    for (slot, locator, name) in &ended {
        net.switch.detach(*locator);
        // Nothing in the arena is dropped one by one: unmapping it frees
        // everything at once, including what a crashed task left half-done.
        arena::destroy(*slot);
        ::log::info!("capsule {name}: memory and locator {locator} released");
    }
    !ended.is_empty()
}

/// Round robin over capsules, then over each capsule's tasks.
fn pick_next() -> Option<(u32, *mut Task)> {
    let mut r = REGISTRY.lock();
    let cursor = r.cursor;
    let order: Vec<u32> = {
        let after = r
            .capsules
            .range(cursor.saturating_add(1)..)
            .map(|(s, _)| *s);
        let before = r.capsules.range(..=cursor).map(|(s, _)| *s);
        after.chain(before).collect()
    };
    for slot in order {
        let c = r.capsules.get_mut(&slot).expect("slot listed");
        if !c.state.is_running() {
            continue;
        }
        let Some(root) = c.root() else { continue };
        let n = root.tasks.len();
        for i in 1..=n {
            let index = (root.rr + i) % n;
            if root.tasks[index].state == TaskState::Runnable {
                root.rr = index;
                let task: *mut Task = &mut *root.tasks[index];
                r.cursor = slot;
                return Some((slot, task));
            }
        }
    }
    None
}

/// A CPU exception in a task's code: the capsule dies, the kernel goes on.
/// Returns false when it cannot be contained: the task died inside the
/// kernel heap's allocator, whose state is then unknown.
fn on_task_fault(slot: u32, frame: &TrapFrame) -> bool {
    // Before anything allocates: the task may have died inside its arena's
    // allocator, whose lock it then still holds (the report below would wait
    // for it for ever, with interrupts off).
    arena::abandon(slot);
    if crate::mm::heap::lock_held() {
        return false;
    }
    // SAFETY: a fault while the registry lock was held can only come from the
    // faulting task itself (one CPU, tasks hold it with interrupts off);
    // that task will never run again.
    if REGISTRY.is_locked() {
        unsafe { REGISTRY.force_unlock() };
    }
    let mut report = String::new();
    let running = registry(|r| r.capsules.get(&slot).map(|c| c.name.clone())).unwrap_or_default();
    crate::arch::x86_64::trap::write_fault_report(
        &mut report,
        frame,
        &alloc::format!("capsule {running}"),
    );
    fail(slot, "CPU exception", &report);
    true
}

/// A panic in a task: the capsule dies, the kernel goes on, and this never
/// returns — unless the task panicked inside the kernel heap's allocator,
/// which leaves the kernel in an unknown state: then it returns at once and
/// the panic ends the VM.
pub fn on_task_panic(slot: u32, message: &str) {
    arena::abandon(slot);
    if crate::mm::heap::lock_held() {
        return;
    }
    if REGISTRY.is_locked() {
        // SAFETY: as in `on_task_fault`: only the panicking task can hold it.
        unsafe { REGISTRY.force_unlock() };
    }
    fail(slot, "panic", message);
    sched::reset_after_task_death();
    sched::yield_now();
    unreachable!("a dead capsule's task was scheduled");
}

/// Ends a capsule whose own memory holds something the kernel cannot use
/// (`what`, e.g. a socket handle that names no socket): the kernel loop found
/// it while serving the capsule, and it ends the capsule, not the VM.
fn end_damaged(c: &mut Capsule, what: String) {
    let reason = alloc::format!("bad state: the kernel found a bad {what}");
    let _ = writeln!(c.log, "capsule ended by {reason}");
    crate::println!(
        "*** capsule {} ended by {reason}; the kernel and other capsules go on",
        c.name
    );
    c.state = CapsuleState::Faulted(reason);
}

fn fail(slot: u32, kind: &str, detail: &str) {
    let name = registry(|r| {
        let c = r.capsules.get_mut(&slot)?;
        c.state = CapsuleState::Faulted(alloc::format!(
            "{kind}: {}",
            detail.lines().next().unwrap_or("")
        ));
        let _ = writeln!(c.log, "capsule ended by {kind}:\n{detail}");
        Some(c.name.clone())
    })
    .unwrap_or_default();
    crate::println!(
        "*** capsule {name} ended by {kind}; the kernel and other capsules go on:\n{detail}"
    );
}
