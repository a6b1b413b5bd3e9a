//! The control protocol spoken on each VM's control port (TCP).
//!
//! Framing: every frame is a `u32` little-endian payload length followed by the
//! payload; a length above [`MAX_FRAME_LEN`] is refused. The server speaks
//! first with a [`Hello`] (protocol version, kernel build id, VM name and a
//! fresh server nonce); the client answers with a [`ClientHello`] (its own
//! fresh nonce and a tag proving it holds the key), within
//! [`HANDSHAKE_DEADLINE_MS`]. After that the client sends request envelopes
//! and the server answers each with a response envelope carrying the same
//! sequence number. Envelopes are authenticated with Poly1305 under one-time
//! keys derived with HMAC-SHA256 from a session key that depends on both
//! hellos; a response's key also covers the tag of the request it answers
//! (see [`crate::auth`]). The full description is in docs/control-protocol.md.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::net::Ipv4Addr;

use crate::auth::{self, Direction, MAC_LEN, NONCE_LEN, Nonce, Tag};
use crate::codec::{DecodeError, Reader, Writer};

/// Version of this protocol. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest payload a frame may carry.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Bytes of the length prefix in front of every frame.
pub const FRAME_HEADER_LEN: usize = 4;
/// First bytes of a [`Hello`], so a client can tell it reached a Capsules VM.
pub const HELLO_MAGIC: [u8; 4] = *b"CPSL";
/// First bytes of a [`ClientHello`].
pub const CLIENT_HELLO_MAGIC: [u8; 4] = *b"CPSC";
/// A server closes a connection whose client has not sent an authentic
/// client hello this long after the connection was accepted, so that
/// connections without the key cannot hold its slots.
pub const HANDSHAKE_DEADLINE_MS: u64 = 2_000;
/// The all-zero tag marks a response the server could not authenticate
/// (because the request itself was not authentic).
pub const UNAUTHENTICATED_TAG: Tag = [0u8; MAC_LEN];

/// Prepends the length prefix to a payload.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Why the byte stream cannot be split into frames any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OversizedFrame {
    pub declared: usize,
}

/// Splits a byte stream into frame payloads.
///
/// Bytes are pushed as they arrive; complete payloads are popped. After an
/// oversized length prefix the stream cannot be resynchronised, so the decoder
/// stays failed and the connection should be closed after an error reply.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    failed: Option<OversizedFrame>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete payload, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, OversizedFrame> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let mut len = [0u8; FRAME_HEADER_LEN];
        len.copy_from_slice(&self.buf[..FRAME_HEADER_LEN]);
        let declared = u32::from_le_bytes(len) as usize;
        if declared > MAX_FRAME_LEN {
            let e = OversizedFrame { declared };
            self.failed = Some(e);
            self.buf = Vec::new();
            return Err(e);
        }
        if self.buf.len() < FRAME_HEADER_LEN + declared {
            return Ok(None);
        }
        let payload = self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + declared].to_vec();
        self.buf.drain(..FRAME_HEADER_LEN + declared);
        Ok(Some(payload))
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// The server's greeting, sent unauthenticated as the first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u16,
    pub build_id: Vec<u8>,
    pub vm_name: String,
    pub nonce: Nonce,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.raw(&HELLO_MAGIC)
            .u16(self.protocol_version)
            .bytes(&self.build_id)
            .str(&self.vm_name)
            .raw(&self.nonce);
        w.finish()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        if r.array::<4>("hello magic")? != HELLO_MAGIC {
            return Err(DecodeError::Invalid("hello magic"));
        }
        let hello = Self {
            protocol_version: r.u16("protocol version")?,
            build_id: r.bytes("build id")?.to_vec(),
            vm_name: r.string("vm name")?,
            nonce: r.array::<NONCE_LEN>("nonce")?,
        };
        r.finish()?;
        Ok(hello)
    }
}

/// What a capsule should be, for `RunCapsule`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCapsule {
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
    /// The capsule's own IPv4 address, assigned by the directory.
    pub locator: Ipv4Addr,
    /// Arena slot: fixes the capsule's memory window, the same on every VM.
    pub slot: u32,
    /// Most memory the capsule may use, in bytes (0: the VM's default).
    pub memory_limit: u64,
    /// The copy's epoch, assigned by the directory (docs/architecture.md,
    /// "Exactly one copy"); refused if the VM was fenced at a higher one.
    pub epoch: u64,
}

/// What a client asks of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Version,
    Status,
    Shutdown,
    RunCapsule(RunCapsule),
    ListCapsules,
    KillCapsule {
        name: String,
    },
    /// Log bytes of a capsule from `offset` (bytes written since it started), at most `max`.
    CapsuleLogs {
        name: String,
        offset: u64,
        max: u32,
    },
    ListPrograms,
    /// Migration, source side: stop the capsule at safe points, hold its
    /// packets and serialise it; answered with the image length.
    FreezeCapsule {
        name: String,
    },
    /// A chunk of the frozen capsule's image.
    ReadImage {
        name: String,
        offset: u64,
        len: u32,
    },
    /// Resume a frozen capsule here (the move failed or was abandoned), at
    /// `epoch`, which must be above the frozen copy's and the VM's fence.
    ThawCapsule {
        name: String,
        epoch: u64,
    },
    /// The capsule runs elsewhere now: forward held and straggling packets
    /// to `forward_to` (the new VM's machine address) and free it.
    ReleaseCapsule {
        name: String,
        forward_to: Ipv4Addr,
    },
    /// Migration, destination side: admit an image of `image_len` bytes.
    RestoreBegin {
        name: String,
        image_len: u64,
    },
    RestoreChunk {
        name: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// Verify the whole image, map the arena, resume the capsule at `epoch`,
    /// which must be above the image's and the VM's fence for the name.
    RestoreCommit {
        name: String,
        epoch: u64,
    },
    /// The directory has committed epoch `epoch` of capsule `name` (on
    /// another VM, or none): drop every copy of it here that is older —
    /// frozen, running or being restored — and refuse older ones from now on.
    Fence {
        name: String,
        epoch: u64,
    },
    RestoreAbort {
        name: String,
    },
    /// Tasks and sockets of a capsule, for `inspect`.
    InspectCapsule {
        name: String,
    },
    /// Pre-copy, source side: start tracking written pages and hand out a
    /// base image that holds the capsule's identity and arena length, no
    /// pages: those follow with `ReadPages` while the capsule keeps running,
    /// and a later `FreezeDelta` yields only the pages written since.
    PrecopyCapsule {
        name: String,
    },
    /// Pre-copy, source side: freeze like `FreezeCapsule`, but serialise only
    /// the pages written since `PrecopyCapsule` (a delta image).
    FreezeDelta {
        name: String,
    },
    /// Pre-copy, destination side: the image received so far is a base; keep
    /// it for the delta that follows.
    RestoreStage {
        name: String,
    },
    /// Pre-copy, source side: the next non-zero pages of the arena at or
    /// after offset `from`, read now while the capsule keeps running (a page
    /// written after `PrecopyCapsule` also comes with the delta). Each answer
    /// is small, so the capsule and the network run between requests.
    ReadPages {
        name: String,
        from: u64,
    },
    /// Pre-copy, destination side: lay these pages into the arena window of
    /// the base staged by `RestoreStage`.
    StagePages {
        name: String,
        batch: PageBatch,
    },
    /// A capsule at `locator` is about to move: hold packets this VM's
    /// capsules send to it instead of sending them into the void.
    HoldTraffic {
        locator: Ipv4Addr,
    },
    /// The move is over: send the held packets (to wherever the locator
    /// answers now) and stop holding.
    ReleaseTraffic {
        locator: Ipv4Addr,
    },
    /// Translation-table entries (locator → care-of address, with the
    /// capsule's epoch) for the router (and, in a later slice, every VM).
    /// With `replace`, `entries` is the whole table: what it does not name is
    /// dropped (a restarted router or VM gets the whole table). An entry whose
    /// epoch is older than the one the receiver holds for that locator is
    /// ignored. Answered with `Done`.
    UpdateTranslations {
        replace: bool,
        entries: Vec<Translation>,
    },
}

/// One translation-table entry: where the capsule at `locator` runs, as of
/// `epoch`. `care_of: None` says the capsule runs nowhere (killed, stopped,
/// suspended): the receiver keeps the epoch so an older update cannot bring
/// the entry back, and answers packets for it as for an unknown locator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub locator: Ipv4Addr,
    pub care_of: Option<Ipv4Addr>,
    pub epoch: u64,
}

/// Most entries in one `UpdateTranslations` (17 bytes each: well inside a
/// frame) and in a receiver's table.
pub const MAX_TRANSLATIONS: usize = 2048;

impl Translation {
    const ENCODED_LEN: usize = 4 + 1 + 4 + 8;

    fn encode(&self, w: &mut Writer) {
        w.raw(&self.locator.octets());
        match self.care_of {
            Some(addr) => w.u8(1).raw(&addr.octets()),
            None => w.u8(0).raw(&[0; 4]),
        };
        w.u64(self.epoch);
    }

    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let locator = Ipv4Addr::from(r.array::<4>("locator")?);
        let present = r.u8("care-of flag")?;
        let addr = Ipv4Addr::from(r.array::<4>("care-of address")?);
        let care_of = match present {
            0 if addr.is_unspecified() => None,
            1 => Some(addr),
            _ => return Err(DecodeError::Invalid("care-of flag")),
        };
        Ok(Self {
            locator,
            care_of,
            epoch: r.u64("epoch")?,
        })
    }
}

/// Largest image chunk in one request or reply (inside a frame).
pub const MAX_IMAGE_CHUNK: usize = 60 * 1024;

/// Most pages in one [`PageBatch`]: it must fit a frame with room to spare.
pub const MAX_BATCH_PAGES: usize = 15;

/// Pages of a capsule arena on their way from the source to the destination
/// during pre-copy, with where the source's scan stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageBatch {
    /// Where the next `ReadPages` continues (an arena offset).
    pub next: u64,
    /// Length of the arena being copied: the copy is over when `next == end`.
    pub end: u64,
    /// Page-aligned arena offsets, ascending, each with `PAGE_SIZE` bytes in
    /// `data` (in the same order).
    pub offsets: Vec<u64>,
    pub data: Vec<u8>,
}

impl PageBatch {
    pub fn pages(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.offsets
            .iter()
            .copied()
            .zip(self.data.chunks_exact(crate::image::PAGE_SIZE))
    }

    fn encode(&self, w: &mut Writer) {
        w.u64(self.next)
            .u64(self.end)
            .u32(self.offsets.len() as u32);
        for o in &self.offsets {
            w.u64(*o);
        }
        w.raw(&self.data);
    }

    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let page = crate::image::PAGE_SIZE;
        let next = r.u64("batch next")?;
        let end = r.u64("batch end")?;
        let count = r.count(8 + page, "page count")?;
        if count > MAX_BATCH_PAGES || next > end {
            return Err(DecodeError::Invalid("page batch"));
        }
        let mut offsets = Vec::with_capacity(count);
        for _ in 0..count {
            let offset = r.u64("page offset")?;
            let ascending = offsets.last().is_none_or(|last| offset > *last);
            if !offset.is_multiple_of(page as u64) || !ascending || offset >= end {
                return Err(DecodeError::Invalid("page offset"));
            }
            offsets.push(offset);
        }
        let data = r.raw(count * page, "page data")?.to_vec();
        Ok(Self {
            next,
            end,
            offsets,
            data,
        })
    }
}

/// Most arguments a capsule program takes, and most bytes in one.
pub const MAX_ARGS: usize = 32;
pub const MAX_ARG_LEN: usize = 256;

impl Request {
    const VERSION: u8 = 1;
    const STATUS: u8 = 2;
    const SHUTDOWN: u8 = 3;
    const RUN_CAPSULE: u8 = 4;
    const LIST_CAPSULES: u8 = 5;
    const KILL_CAPSULE: u8 = 6;
    const CAPSULE_LOGS: u8 = 7;
    const LIST_PROGRAMS: u8 = 8;
    const FREEZE: u8 = 9;
    const READ_IMAGE: u8 = 10;
    const THAW: u8 = 11;
    const RELEASE: u8 = 12;
    const RESTORE_BEGIN: u8 = 13;
    const RESTORE_CHUNK: u8 = 14;
    const RESTORE_COMMIT: u8 = 15;
    const RESTORE_ABORT: u8 = 16;
    const INSPECT: u8 = 17;
    const HOLD_TRAFFIC: u8 = 18;
    const RELEASE_TRAFFIC: u8 = 19;
    const PRECOPY: u8 = 20;
    const RESTORE_STAGE: u8 = 21;
    const FREEZE_DELTA: u8 = 22;
    const READ_PAGES: u8 = 23;
    const STAGE_PAGES: u8 = 24;
    const FENCE: u8 = 25;
    const UPDATE_TRANSLATIONS: u8 = 26;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Request::Version => {
                w.u8(Self::VERSION);
            }
            Request::Status => {
                w.u8(Self::STATUS);
            }
            Request::Shutdown => {
                w.u8(Self::SHUTDOWN);
            }
            Request::RunCapsule(run) => {
                w.u8(Self::RUN_CAPSULE)
                    .str(&run.name)
                    .str(&run.program)
                    .u32(run.args.len() as u32);
                for arg in &run.args {
                    w.str(arg);
                }
                w.raw(&run.locator.octets())
                    .u32(run.slot)
                    .u64(run.memory_limit)
                    .u64(run.epoch);
            }
            Request::ListCapsules => {
                w.u8(Self::LIST_CAPSULES);
            }
            Request::KillCapsule { name } => {
                w.u8(Self::KILL_CAPSULE).str(name);
            }
            Request::CapsuleLogs { name, offset, max } => {
                w.u8(Self::CAPSULE_LOGS).str(name).u64(*offset).u32(*max);
            }
            Request::ListPrograms => {
                w.u8(Self::LIST_PROGRAMS);
            }
            Request::FreezeCapsule { name } => {
                w.u8(Self::FREEZE).str(name);
            }
            Request::ReadImage { name, offset, len } => {
                w.u8(Self::READ_IMAGE).str(name).u64(*offset).u32(*len);
            }
            Request::ThawCapsule { name, epoch } => {
                w.u8(Self::THAW).str(name).u64(*epoch);
            }
            Request::ReleaseCapsule { name, forward_to } => {
                w.u8(Self::RELEASE).str(name).raw(&forward_to.octets());
            }
            Request::RestoreBegin { name, image_len } => {
                w.u8(Self::RESTORE_BEGIN).str(name).u64(*image_len);
            }
            Request::RestoreChunk { name, offset, data } => {
                w.u8(Self::RESTORE_CHUNK).str(name).u64(*offset).bytes(data);
            }
            Request::RestoreCommit { name, epoch } => {
                w.u8(Self::RESTORE_COMMIT).str(name).u64(*epoch);
            }
            Request::Fence { name, epoch } => {
                w.u8(Self::FENCE).str(name).u64(*epoch);
            }
            Request::RestoreAbort { name } => {
                w.u8(Self::RESTORE_ABORT).str(name);
            }
            Request::InspectCapsule { name } => {
                w.u8(Self::INSPECT).str(name);
            }
            Request::PrecopyCapsule { name } => {
                w.u8(Self::PRECOPY).str(name);
            }
            Request::RestoreStage { name } => {
                w.u8(Self::RESTORE_STAGE).str(name);
            }
            Request::FreezeDelta { name } => {
                w.u8(Self::FREEZE_DELTA).str(name);
            }
            Request::ReadPages { name, from } => {
                w.u8(Self::READ_PAGES).str(name).u64(*from);
            }
            Request::StagePages { name, batch } => {
                w.u8(Self::STAGE_PAGES).str(name);
                batch.encode(&mut w);
            }
            Request::HoldTraffic { locator } => {
                w.u8(Self::HOLD_TRAFFIC).raw(&locator.octets());
            }
            Request::ReleaseTraffic { locator } => {
                w.u8(Self::RELEASE_TRAFFIC).raw(&locator.octets());
            }
            Request::UpdateTranslations { replace, entries } => {
                w.u8(Self::UPDATE_TRANSLATIONS)
                    .u8(u8::from(*replace))
                    .u32(entries.len() as u32);
                for entry in entries {
                    entry.encode(&mut w);
                }
            }
        }
        w.finish()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, RequestDecodeError> {
        let mut r = Reader::new(buf);
        let tag = r.u8("request kind")?;
        let req = match tag {
            Self::VERSION => Request::Version,
            Self::STATUS => Request::Status,
            Self::SHUTDOWN => Request::Shutdown,
            Self::RUN_CAPSULE => {
                let name = r.string("capsule name")?;
                let program = r.string("program")?;
                let count = r.u32("argument count")? as usize;
                if count > MAX_ARGS {
                    return Err(DecodeError::Invalid("argument count").into());
                }
                let mut args = Vec::with_capacity(count);
                for _ in 0..count {
                    let arg = r.string("argument")?;
                    if arg.len() > MAX_ARG_LEN {
                        return Err(DecodeError::Invalid("argument length").into());
                    }
                    args.push(arg);
                }
                Request::RunCapsule(RunCapsule {
                    name,
                    program,
                    args,
                    locator: Ipv4Addr::from(r.array::<4>("locator")?),
                    slot: r.u32("slot")?,
                    memory_limit: r.u64("memory limit")?,
                    epoch: r.u64("epoch")?,
                })
            }
            Self::LIST_CAPSULES => Request::ListCapsules,
            Self::KILL_CAPSULE => Request::KillCapsule {
                name: r.string("capsule name")?,
            },
            Self::CAPSULE_LOGS => Request::CapsuleLogs {
                name: r.string("capsule name")?,
                offset: r.u64("log offset")?,
                max: r.u32("log max")?,
            },
            Self::LIST_PROGRAMS => Request::ListPrograms,
            Self::FREEZE => Request::FreezeCapsule {
                name: r.string("capsule name")?,
            },
            Self::READ_IMAGE => Request::ReadImage {
                name: r.string("capsule name")?,
                offset: r.u64("image offset")?,
                len: r.u32("chunk length")?,
            },
            Self::THAW => Request::ThawCapsule {
                name: r.string("capsule name")?,
                epoch: r.u64("epoch")?,
            },
            Self::RELEASE => Request::ReleaseCapsule {
                name: r.string("capsule name")?,
                forward_to: Ipv4Addr::from(r.array::<4>("forward address")?),
            },
            Self::RESTORE_BEGIN => Request::RestoreBegin {
                name: r.string("capsule name")?,
                image_len: r.u64("image length")?,
            },
            Self::RESTORE_CHUNK => Request::RestoreChunk {
                name: r.string("capsule name")?,
                offset: r.u64("image offset")?,
                data: r.bytes("image chunk")?.to_vec(),
            },
            Self::RESTORE_COMMIT => Request::RestoreCommit {
                name: r.string("capsule name")?,
                epoch: r.u64("epoch")?,
            },
            Self::FENCE => Request::Fence {
                name: r.string("capsule name")?,
                epoch: r.u64("epoch")?,
            },
            Self::RESTORE_ABORT => Request::RestoreAbort {
                name: r.string("capsule name")?,
            },
            Self::PRECOPY => Request::PrecopyCapsule {
                name: r.string("capsule name")?,
            },
            Self::RESTORE_STAGE => Request::RestoreStage {
                name: r.string("capsule name")?,
            },
            Self::FREEZE_DELTA => Request::FreezeDelta {
                name: r.string("capsule name")?,
            },
            Self::READ_PAGES => Request::ReadPages {
                name: r.string("capsule name")?,
                from: r.u64("page offset")?,
            },
            Self::STAGE_PAGES => Request::StagePages {
                name: r.string("capsule name")?,
                batch: PageBatch::decode(&mut r)?,
            },
            Self::HOLD_TRAFFIC => Request::HoldTraffic {
                locator: Ipv4Addr::from(r.array::<4>("locator")?),
            },
            Self::RELEASE_TRAFFIC => Request::ReleaseTraffic {
                locator: Ipv4Addr::from(r.array::<4>("locator")?),
            },
            Self::INSPECT => Request::InspectCapsule {
                name: r.string("capsule name")?,
            },
            Self::UPDATE_TRANSLATIONS => {
                let replace = match r.u8("replace flag")? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Invalid("replace flag").into()),
                };
                let count = r.count(Translation::ENCODED_LEN, "translation count")?;
                if count > MAX_TRANSLATIONS {
                    return Err(DecodeError::Invalid("translation count").into());
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(Translation::decode(&mut r)?);
                }
                Request::UpdateTranslations { replace, entries }
            }
            other => return Err(RequestDecodeError::Unknown(other)),
        };
        r.finish()?;
        Ok(req)
    }
}

/// A capsule's life state as the VM reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapsuleState {
    Running,
    Exited,
    Faulted {
        reason: String,
    },
    Killed,
    /// Stopped for a move; its packets are held.
    Frozen,
    /// Moved to another VM; about to be released here.
    Migrated,
}

impl CapsuleState {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Exited => "exited",
            Self::Faulted { .. } => "faulted",
            Self::Killed => "killed",
            Self::Frozen => "frozen",
            Self::Migrated => "migrated",
        }
    }
}

/// One capsule, as `ListCapsules` and `RunCapsule` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleInfo {
    pub name: String,
    pub program: String,
    pub locator: Ipv4Addr,
    pub slot: u32,
    pub state: CapsuleState,
    pub tasks: u32,
    /// Bytes of the capsule's arena that are mapped.
    pub memory_bytes: u64,
    pub memory_limit: u64,
    pub sockets: u32,
    pub uptime_ns: u64,
    /// The copy's epoch (docs/architecture.md, "Exactly one copy").
    pub epoch: u64,
}

impl CapsuleInfo {
    /// Bytes of the shortest encoding (empty strings, no fault reason): what
    /// a declared count is checked against before anything is reserved.
    const MIN_ENCODED_LEN: usize = 4 + 4 + 4 + 4 + 1 + 4 + 8 + 8 + 4 + 8 + 8;

    fn encode(&self, w: &mut Writer) {
        w.str(&self.name)
            .str(&self.program)
            .raw(&self.locator.octets())
            .u32(self.slot);
        match &self.state {
            CapsuleState::Running => w.u8(0),
            CapsuleState::Exited => w.u8(1),
            CapsuleState::Faulted { reason } => w.u8(2).str(reason),
            CapsuleState::Killed => w.u8(3),
            CapsuleState::Frozen => w.u8(4),
            CapsuleState::Migrated => w.u8(5),
        };
        w.u32(self.tasks)
            .u64(self.memory_bytes)
            .u64(self.memory_limit)
            .u32(self.sockets)
            .u64(self.uptime_ns)
            .u64(self.epoch);
    }

    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            name: r.string("capsule name")?,
            program: r.string("program")?,
            locator: Ipv4Addr::from(r.array::<4>("locator")?),
            slot: r.u32("slot")?,
            state: match r.u8("capsule state")? {
                0 => CapsuleState::Running,
                1 => CapsuleState::Exited,
                2 => CapsuleState::Faulted {
                    reason: r.string("fault reason")?,
                },
                3 => CapsuleState::Killed,
                4 => CapsuleState::Frozen,
                5 => CapsuleState::Migrated,
                _ => return Err(DecodeError::Invalid("capsule state")),
            },
            tasks: r.u32("tasks")?,
            memory_bytes: r.u64("memory")?,
            memory_limit: r.u64("memory limit")?,
            sockets: r.u32("sockets")?,
            uptime_ns: r.u64("uptime")?,
            epoch: r.u64("epoch")?,
        })
    }
}

/// A program the VM can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramInfo {
    pub name: String,
    pub description: String,
}

/// A request body that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestDecodeError {
    Unknown(u8),
    Malformed(DecodeError),
}

impl From<DecodeError> for RequestDecodeError {
    fn from(e: DecodeError) -> Self {
        Self::Malformed(e)
    }
}

/// Counters of the VM's network card.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NicCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames dropped on receive (malformed, or no room).
    pub rx_dropped: u64,
    /// NIC interrupts taken.
    pub interrupts: u64,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Nanoseconds since the kernel's first instruction.
    pub uptime_ns: u64,
    /// Nanoseconds from the first instruction to "ready" (control port open).
    pub boot_ns: u64,
    pub mem_total_bytes: u64,
    pub mem_used_bytes: u64,
    pub heap_size_bytes: u64,
    pub heap_used_bytes: u64,
    pub nic: NicCounters,
    /// Calibrated TSC frequency, for reading the figures above.
    pub tsc_hz: u64,
    pub switch: SwitchStatus,
}

/// The capsule switch's table size and what it dropped, since boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwitchStatus {
    /// Entries in the switch's neighbour (ARP) table now; it is bounded.
    pub neighbours: u64,
    /// Entries evicted (least recently used first) to keep it bounded.
    pub neighbour_evictions: u64,
    /// Packets for a capsule whose inbound queue was full (a frozen
    /// capsule's queue fills up first).
    pub capsule_queue_drops: u64,
    /// Packets from local capsules to a moving locator beyond the hold bound.
    pub held_drops: u64,
    /// Frames that found the transmit queue full (the NIC ring and the
    /// switch's paced queue behind it) or too many packets awaiting ARP.
    pub tx_drops: u64,
    /// ARP from another MAC claiming the locator of a capsule running on
    /// this VM: a sign that two copies run. The last field of `Status`,
    /// optional on the wire: kernels from before it send none (read as 0).
    pub arp_conflicts: u64,
}

/// Error classes a server reports. Each comes with a readable message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    Malformed = 1,
    Unauthenticated = 2,
    UnknownRequest = 3,
    Oversized = 4,
    UnsupportedVersion = 5,
    BadSequence = 6,
    Internal = 7,
    NotFound = 8,
    AlreadyExists = 9,
    LimitReached = 10,
    InvalidArgument = 11,
    /// The copy's epoch is below one the VM was told of: a stale copy.
    Stale = 12,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Malformed,
            2 => Self::Unauthenticated,
            3 => Self::UnknownRequest,
            4 => Self::Oversized,
            5 => Self::UnsupportedVersion,
            6 => Self::BadSequence,
            7 => Self::Internal,
            8 => Self::NotFound,
            9 => Self::AlreadyExists,
            10 => Self::LimitReached,
            11 => Self::InvalidArgument,
            12 => Self::Stale,
            _ => return None,
        })
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Unauthenticated => "unauthenticated",
            Self::UnknownRequest => "unknown request",
            Self::Oversized => "oversized",
            Self::UnsupportedVersion => "unsupported version",
            Self::BadSequence => "bad sequence",
            Self::Internal => "internal",
            Self::NotFound => "not found",
            Self::AlreadyExists => "already exists",
            Self::LimitReached => "limit reached",
            Self::InvalidArgument => "invalid argument",
            Self::Stale => "stale",
        }
    }
}

/// A server's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Version {
        protocol_version: u16,
        build_id: Vec<u8>,
        vm_name: String,
    },
    Status(Status),
    ShuttingDown,
    CapsuleStarted(CapsuleInfo),
    Capsules(Vec<CapsuleInfo>),
    Killed,
    Logs {
        data: Vec<u8>,
        next_offset: u64,
    },
    Programs(Vec<ProgramInfo>),
    Frozen {
        image_len: u64,
    },
    ImageChunk {
        data: Vec<u8>,
    },
    /// Thawed, released, chunk stored, aborted: done, nothing to report.
    Done,
    /// Pages read for a pre-copy (answer to `ReadPages`).
    Pages(PageBatch),
    Inspection {
        tasks: Vec<crate::image::TaskSummary>,
        sockets: Vec<crate::image::SocketSummary>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Response {
    const VERSION: u8 = 1;
    const STATUS: u8 = 2;
    const SHUTTING_DOWN: u8 = 3;
    const CAPSULE_STARTED: u8 = 4;
    const CAPSULES: u8 = 5;
    const KILLED: u8 = 6;
    const LOGS: u8 = 7;
    const PROGRAMS: u8 = 8;
    const FROZEN: u8 = 9;
    const IMAGE_CHUNK: u8 = 10;
    const DONE: u8 = 11;
    const INSPECTION: u8 = 12;
    const PAGES: u8 = 13;
    const ERROR: u8 = 0xff;

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error {
            code,
            message: message.into(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Response::Version {
                protocol_version,
                build_id,
                vm_name,
            } => {
                w.u8(Self::VERSION)
                    .u16(*protocol_version)
                    .bytes(build_id)
                    .str(vm_name);
            }
            Response::Status(s) => {
                w.u8(Self::STATUS)
                    .u64(s.uptime_ns)
                    .u64(s.boot_ns)
                    .u64(s.mem_total_bytes)
                    .u64(s.mem_used_bytes)
                    .u64(s.heap_size_bytes)
                    .u64(s.heap_used_bytes)
                    .u64(s.nic.rx_packets)
                    .u64(s.nic.rx_bytes)
                    .u64(s.nic.tx_packets)
                    .u64(s.nic.tx_bytes)
                    .u64(s.nic.rx_dropped)
                    .u64(s.nic.interrupts)
                    .u64(s.tsc_hz)
                    .u64(s.switch.neighbours)
                    .u64(s.switch.neighbour_evictions)
                    .u64(s.switch.capsule_queue_drops)
                    .u64(s.switch.held_drops)
                    .u64(s.switch.tx_drops)
                    .u64(s.switch.arp_conflicts);
            }
            Response::ShuttingDown => {
                w.u8(Self::SHUTTING_DOWN);
            }
            Response::CapsuleStarted(info) => {
                w.u8(Self::CAPSULE_STARTED);
                info.encode(&mut w);
            }
            Response::Capsules(list) => {
                w.u8(Self::CAPSULES).u32(list.len() as u32);
                for info in list {
                    info.encode(&mut w);
                }
            }
            Response::Killed => {
                w.u8(Self::KILLED);
            }
            Response::Logs { data, next_offset } => {
                w.u8(Self::LOGS).bytes(data).u64(*next_offset);
            }
            Response::Programs(list) => {
                w.u8(Self::PROGRAMS).u32(list.len() as u32);
                for p in list {
                    w.str(&p.name).str(&p.description);
                }
            }
            Response::Frozen { image_len } => {
                w.u8(Self::FROZEN).u64(*image_len);
            }
            Response::ImageChunk { data } => {
                w.u8(Self::IMAGE_CHUNK).bytes(data);
            }
            Response::Done => {
                w.u8(Self::DONE);
            }
            Response::Pages(batch) => {
                w.u8(Self::PAGES);
                batch.encode(&mut w);
            }
            Response::Inspection { tasks, sockets } => {
                w.u8(Self::INSPECTION).u32(tasks.len() as u32);
                for t in tasks {
                    t.encode(&mut w);
                }
                w.u32(sockets.len() as u32);
                for s in sockets {
                    s.encode(&mut w);
                }
            }
            Response::Error { code, message } => {
                w.u8(Self::ERROR).u16(*code as u16).str(message);
            }
        }
        w.finish()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let resp = match r.u8("response kind")? {
            Self::VERSION => Response::Version {
                protocol_version: r.u16("protocol version")?,
                build_id: r.bytes("build id")?.to_vec(),
                vm_name: r.string("vm name")?,
            },
            Self::STATUS => Response::Status(Status {
                uptime_ns: r.u64("uptime")?,
                boot_ns: r.u64("boot time")?,
                mem_total_bytes: r.u64("memory total")?,
                mem_used_bytes: r.u64("memory used")?,
                heap_size_bytes: r.u64("heap size")?,
                heap_used_bytes: r.u64("heap used")?,
                nic: NicCounters {
                    rx_packets: r.u64("rx packets")?,
                    rx_bytes: r.u64("rx bytes")?,
                    tx_packets: r.u64("tx packets")?,
                    tx_bytes: r.u64("tx bytes")?,
                    rx_dropped: r.u64("rx dropped")?,
                    interrupts: r.u64("interrupts")?,
                },
                tsc_hz: r.u64("tsc hz")?,
                switch: SwitchStatus {
                    neighbours: r.u64("neighbours")?,
                    neighbour_evictions: r.u64("neighbour evictions")?,
                    capsule_queue_drops: r.u64("capsule queue drops")?,
                    held_drops: r.u64("held drops")?,
                    tx_drops: r.u64("tx drops")?,
                    // Optional trailing field: absent from older kernels.
                    arp_conflicts: if r.remaining() == 0 {
                        0
                    } else {
                        r.u64("arp conflicts")?
                    },
                },
            }),
            Self::SHUTTING_DOWN => Response::ShuttingDown,
            Self::CAPSULE_STARTED => Response::CapsuleStarted(CapsuleInfo::decode(&mut r)?),
            Self::CAPSULES => {
                let count = r.count(CapsuleInfo::MIN_ENCODED_LEN, "capsule count")?;
                let mut list = Vec::with_capacity(count);
                for _ in 0..count {
                    list.push(CapsuleInfo::decode(&mut r)?);
                }
                Response::Capsules(list)
            }
            Self::KILLED => Response::Killed,
            Self::LOGS => Response::Logs {
                data: r.bytes("log data")?.to_vec(),
                next_offset: r.u64("log offset")?,
            },
            Self::PROGRAMS => {
                let count = r.count(8, "program count")?;
                let mut list = Vec::with_capacity(count);
                for _ in 0..count {
                    list.push(ProgramInfo {
                        name: r.string("program name")?,
                        description: r.string("description")?,
                    });
                }
                Response::Programs(list)
            }
            Self::FROZEN => Response::Frozen {
                image_len: r.u64("image length")?,
            },
            Self::IMAGE_CHUNK => Response::ImageChunk {
                data: r.bytes("image chunk")?.to_vec(),
            },
            Self::DONE => Response::Done,
            Self::PAGES => Response::Pages(PageBatch::decode(&mut r)?),
            Self::INSPECTION => {
                let count = r.count(crate::image::TaskSummary::MIN_ENCODED_LEN, "task count")?;
                let mut tasks = Vec::with_capacity(count);
                for _ in 0..count {
                    tasks.push(crate::image::TaskSummary::decode(&mut r)?);
                }
                let count = r.count(24, "socket count")?;
                let mut sockets = Vec::with_capacity(count);
                for _ in 0..count {
                    sockets.push(crate::image::SocketSummary::decode(&mut r)?);
                }
                Response::Inspection { tasks, sockets }
            }
            Self::ERROR => Response::Error {
                code: ErrorCode::from_u16(r.u16("error code")?)
                    .ok_or(DecodeError::Invalid("error code"))?,
                message: r.string("error message")?,
            },
            _ => return Err(DecodeError::Invalid("response kind")),
        };
        r.finish()?;
        Ok(resp)
    }
}

/// The client's first frame (unauthenticated framing, authenticated content):
/// its protocol version, its own fresh nonce and a tag that proves it holds
/// the control key for this very handshake (see [`crate::auth`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    pub protocol_version: u16,
    pub nonce: Nonce,
    pub tag: Tag,
}

impl ClientHello {
    /// Bytes of an encoded client hello: magic, version, nonce, tag.
    pub const LEN: usize = 4 + 2 + NONCE_LEN + MAC_LEN;
    /// Bytes the transcript covers: everything but the tag.
    const FIELDS_LEN: usize = Self::LEN - MAC_LEN;

    /// Magic, version and nonce: the part the handshake transcript covers.
    fn fields(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.raw(&CLIENT_HELLO_MAGIC)
            .u16(self.protocol_version)
            .raw(&self.nonce);
        w.finish()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.fields();
        out.extend_from_slice(&self.tag);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        if r.array::<4>("client hello magic")? != CLIENT_HELLO_MAGIC {
            return Err(DecodeError::Invalid("client hello magic"));
        }
        let hello = Self {
            protocol_version: r.u16("protocol version")?,
            nonce: r.array::<NONCE_LEN>("client nonce")?,
            tag: r.array::<MAC_LEN>("client hello mac")?,
        };
        r.finish()?;
        Ok(hello)
    }
}

/// The session key of a handshake, from the cluster key, the server's hello
/// payload and the client hello's fields.
fn handshake_key(cluster_key: &[u8], server_hello: &[u8], client_fields: &[u8]) -> auth::Key {
    let transcript = auth::transcript_hash(server_hello, client_fields);
    auth::session_key(&auth::control_key(cluster_key), &transcript)
}

/// An authenticated message: version, sequence number, body and MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub protocol_version: u16,
    pub seq: u64,
    pub body: Vec<u8>,
    pub tag: Tag,
}

impl Envelope {
    /// Seals `body` under a session key (see [`crate::auth::message_tag`]).
    pub fn seal(session_key: &auth::Key, dir: &Direction, seq: u64, body: Vec<u8>) -> Self {
        let tag = auth::message_tag(session_key, dir, PROTOCOL_VERSION, seq, &body);
        Self {
            protocol_version: PROTOCOL_VERSION,
            seq,
            body,
            tag,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u16(self.protocol_version)
            .u64(self.seq)
            .bytes(&self.body)
            .raw(&self.tag);
        w.finish()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let env = Self {
            protocol_version: r.u16("protocol version")?,
            seq: r.u64("sequence number")?,
            body: r.bytes("body")?.to_vec(),
            tag: r.array::<MAC_LEN>("mac")?,
        };
        r.finish()?;
        Ok(env)
    }

    /// Whether the MAC verifies; it covers version, sequence number and body.
    pub fn verify(&self, session_key: &auth::Key, dir: &Direction) -> bool {
        auth::verify_tag(
            session_key,
            dir,
            self.protocol_version,
            self.seq,
            &self.body,
            &self.tag,
        )
    }
}

/// Where a server's handshake stands.
enum ServerState {
    /// The hello went out; the next frame must be an authentic client hello.
    AwaitingClientHello,
    /// The client proved the key: requests are served.
    Open {
        session_key: auth::Key,
        /// The last request accepted, which [`ServerSession::reply`] answers.
        last_seq: u64,
        last_request_tag: Tag,
    },
    /// The client hello was refused; the connection is to be closed.
    Failed,
}

/// The server half of one control connection: checks the client hello and
/// each request, and seals each response. Pure logic; the kernel supplies
/// bytes, key and nonce.
pub struct ServerSession {
    cluster_key: Vec<u8>,
    nonce: Nonce,
    /// The hello as sent, for the handshake transcript.
    hello: Vec<u8>,
    state: ServerState,
}

/// The outcome of one frame received by a server.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// The client hello verified: the session is open. Nothing to send.
    Opened,
    /// An authentic, well-formed request to carry out and answer with [`ServerSession::reply`].
    Request { seq: u64, request: Request },
    /// A refused frame: send this payload back (it is already sealed or marked
    /// unauthenticated) and change nothing; the connection stays usable.
    Refused { reply: Vec<u8>, code: ErrorCode },
    /// The first frame was not an authentic client hello: send this
    /// (unauthenticated) payload back and close the connection.
    HandshakeFailed { reply: Vec<u8>, code: ErrorCode },
}

impl ServerSession {
    /// A session for one connection; `cluster_key` is the lab's key (the
    /// session derives the control key from it), `nonce` fresh randomness.
    pub fn new(cluster_key: &[u8], nonce: Nonce) -> Self {
        Self {
            cluster_key: cluster_key.to_vec(),
            nonce,
            hello: Vec::new(),
            state: ServerState::AwaitingClientHello,
        }
    }

    /// The hello payload to send first; the session remembers it, since the
    /// handshake covers it.
    pub fn hello(&mut self, build_id: &[u8], vm_name: &str) -> Vec<u8> {
        self.hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            build_id: build_id.to_vec(),
            vm_name: vm_name.to_string(),
            nonce: self.nonce,
        }
        .encode();
        self.hello.clone()
    }

    /// Whether the client proved that it holds the key.
    pub fn is_open(&self) -> bool {
        matches!(self.state, ServerState::Open { .. })
    }

    /// Seals a response to the request with sequence number `seq`, which must
    /// be the request last accepted (requests are answered one by one, in
    /// order). Anything else gets an unauthenticated `Internal` error.
    pub fn reply(&self, seq: u64, response: &Response) -> Vec<u8> {
        self.reply_body(seq, response.encode())
    }

    /// Like [`Self::reply`] with an already encoded body (the fuzz tests seal
    /// malformed bodies this way).
    pub fn reply_body(&self, seq: u64, body: Vec<u8>) -> Vec<u8> {
        match &self.state {
            ServerState::Open {
                session_key,
                last_seq,
                last_request_tag,
            } if *last_seq == seq => {
                let dir = Direction::Response {
                    request_tag: *last_request_tag,
                };
                Envelope::seal(session_key, &dir, seq, body).encode()
            }
            _ => self.unauthenticated_error(
                seq,
                ErrorCode::Internal,
                alloc::format!("no request {seq} to answer"),
            ),
        }
    }

    /// A reply to a frame that was too large (sequence number unknown).
    pub fn oversized_reply(&self, declared: usize) -> Vec<u8> {
        self.unauthenticated_error(
            0,
            ErrorCode::Oversized,
            alloc::format!("frame of {declared} bytes exceeds the limit of {MAX_FRAME_LEN}"),
        )
    }

    fn unauthenticated_error(&self, seq: u64, code: ErrorCode, message: String) -> Vec<u8> {
        Envelope {
            protocol_version: PROTOCOL_VERSION,
            seq,
            body: Response::error(code, message).encode(),
            tag: UNAUTHENTICATED_TAG,
        }
        .encode()
    }

    /// Handles one received frame: the client hello first, requests after.
    pub fn handle(&mut self, payload: &[u8]) -> Incoming {
        match self.state {
            ServerState::AwaitingClientHello => self.handshake(payload),
            ServerState::Failed => {
                let code = ErrorCode::Unauthenticated;
                let reply = self.unauthenticated_error(0, code, "handshake failed".to_string());
                Incoming::HandshakeFailed { reply, code }
            }
            ServerState::Open { .. } => self.request(payload),
        }
    }

    fn handshake(&mut self, payload: &[u8]) -> Incoming {
        match self.check_client_hello(payload) {
            Ok(session_key) => {
                self.state = ServerState::Open {
                    session_key,
                    last_seq: 0,
                    last_request_tag: [0; MAC_LEN],
                };
                Incoming::Opened
            }
            Err((code, message)) => {
                self.state = ServerState::Failed;
                let reply = self.unauthenticated_error(0, code, message);
                Incoming::HandshakeFailed { reply, code }
            }
        }
    }

    /// The session key, if `payload` is an authentic client hello.
    fn check_client_hello(&self, payload: &[u8]) -> Result<auth::Key, (ErrorCode, String)> {
        let client = ClientHello::decode(payload).map_err(|e| {
            let msg = alloc::format!("expected a client hello: {e}");
            (ErrorCode::Malformed, msg)
        })?;
        if client.protocol_version != PROTOCOL_VERSION {
            let msg = alloc::format!(
                "protocol version {} is not supported (this VM speaks {PROTOCOL_VERSION})",
                client.protocol_version
            );
            return Err((ErrorCode::UnsupportedVersion, msg));
        }
        let session_key = handshake_key(&self.cluster_key, &self.hello, &client.fields());
        if !auth::tags_equal(&auth::client_hello_tag(&session_key), &client.tag) {
            let msg = "client hello MAC does not verify: wrong cluster key?".to_string();
            return Err((ErrorCode::Unauthenticated, msg));
        }
        Ok(session_key)
    }

    fn request(&mut self, payload: &[u8]) -> Incoming {
        let refuse = |reply, code| Incoming::Refused { reply, code };
        let ServerState::Open {
            session_key,
            last_seq,
            ..
        } = &self.state
        else {
            unreachable!("request() is called on open sessions only")
        };
        let (session_key, last_seq) = (*session_key, *last_seq);
        let env = match Envelope::decode(payload) {
            Ok(env) => env,
            Err(e) => {
                let msg = alloc::format!("malformed request envelope: {e}");
                return refuse(
                    self.unauthenticated_error(0, ErrorCode::Malformed, msg),
                    ErrorCode::Malformed,
                );
            }
        };
        if env.protocol_version != PROTOCOL_VERSION {
            let msg = alloc::format!(
                "protocol version {} is not supported (this VM speaks {PROTOCOL_VERSION})",
                env.protocol_version
            );
            let code = ErrorCode::UnsupportedVersion;
            return refuse(self.unauthenticated_error(env.seq, code, msg), code);
        }
        if !env.verify(&session_key, &Direction::Request) {
            let code = ErrorCode::Unauthenticated;
            let msg = "request MAC does not verify: wrong cluster key?".to_string();
            return refuse(self.unauthenticated_error(env.seq, code, msg), code);
        }
        if env.seq <= last_seq {
            // Not signed: a response to this sequence number was already
            // sealed, and its one-time key must never seal a second message
            // (two Poly1305 tags under one key would give the key away).
            let code = ErrorCode::BadSequence;
            let msg = alloc::format!("sequence number {} not above {last_seq}", env.seq);
            return refuse(self.unauthenticated_error(env.seq, code, msg), code);
        }
        self.state = ServerState::Open {
            session_key,
            last_seq: env.seq,
            last_request_tag: env.tag,
        };
        match Request::decode(&env.body) {
            Ok(request) => Incoming::Request {
                seq: env.seq,
                request,
            },
            Err(RequestDecodeError::Unknown(kind)) => {
                let code = ErrorCode::UnknownRequest;
                let msg = alloc::format!("unknown request kind {kind}");
                refuse(self.reply(env.seq, &Response::error(code, msg)), code)
            }
            Err(RequestDecodeError::Malformed(e)) => {
                let code = ErrorCode::Malformed;
                let msg = alloc::format!("malformed request body: {e}");
                refuse(self.reply(env.seq, &Response::error(code, msg)), code)
            }
        }
    }
}

/// Why a client could not get an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    Decode(DecodeError),
    /// The response's MAC did not verify: not from a holder of the cluster
    /// key, or not an answer to this request in this session (a replay).
    BadServerTag,
    /// The server refused the request without authenticating its reply.
    Refused {
        code: ErrorCode,
        message: String,
    },
    /// The response answered another request.
    SequenceMismatch {
        expected: u64,
        got: u64,
    },
    VersionMismatch(u16),
    /// No request with this sequence number awaits an answer (the client
    /// answers only its latest request).
    NotPending(u64),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Decode(e) => write!(f, "undecodable response: {e}"),
            Self::BadServerTag => f.write_str(
                "response is not authenticated with the cluster key for this request and session",
            ),
            Self::Refused { code, message } => write!(f, "refused ({}): {message}", code.as_str()),
            Self::SequenceMismatch { expected, got } => {
                write!(f, "response to request {got}, expected {expected}")
            }
            Self::VersionMismatch(v) => write!(f, "server speaks protocol version {v}"),
            Self::NotPending(seq) => write!(f, "request {seq} is not awaiting an answer"),
        }
    }
}

impl From<DecodeError> for ClientError {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e)
    }
}

/// The client half of one control connection.
pub struct ClientSession {
    hello: Hello,
    client_hello: Vec<u8>,
    session_key: auth::Key,
    next_seq: u64,
    /// The latest request sealed: its sequence number and tag, which its
    /// response must be bound to.
    pending: Option<(u64, Tag)>,
}

impl ClientSession {
    /// Starts a session from the server's hello payload with the client's
    /// own fresh `nonce` (random: it is what makes this session's responses
    /// unlike any recorded before). Send [`Self::client_hello`] first.
    pub fn new(
        cluster_key: &[u8],
        hello_payload: &[u8],
        nonce: Nonce,
    ) -> Result<Self, ClientError> {
        let hello = Hello::decode(hello_payload)?;
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(ClientError::VersionMismatch(hello.protocol_version));
        }
        let mut client = ClientHello {
            protocol_version: PROTOCOL_VERSION,
            nonce,
            tag: [0; MAC_LEN],
        };
        let fields = client.fields();
        debug_assert_eq!(fields.len(), ClientHello::FIELDS_LEN);
        let session_key = handshake_key(cluster_key, hello_payload, &fields);
        client.tag = auth::client_hello_tag(&session_key);
        Ok(Self {
            hello,
            client_hello: client.encode(),
            session_key,
            next_seq: 1,
            pending: None,
        })
    }

    /// The server's hello. Its build id and name are authentic once a
    /// response has verified (the session key covers the hello).
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The client hello payload: the first frame to send.
    pub fn client_hello(&self) -> &[u8] {
        &self.client_hello
    }

    /// Seals a request; returns its sequence number and the payload to frame.
    pub fn seal(&mut self, request: &Request) -> (u64, Vec<u8>) {
        self.seal_body(request.encode())
    }

    /// Like [`Self::seal`] with an already encoded body (the fuzz tests seal
    /// malformed bodies this way).
    pub fn seal_body(&mut self, body: Vec<u8>) -> (u64, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let env = Envelope::seal(&self.session_key, &Direction::Request, seq, body);
        self.pending = Some((seq, env.tag));
        (seq, env.encode())
    }

    /// Checks and decodes the response to request `seq`, the latest sealed.
    pub fn open(&self, seq: u64, payload: &[u8]) -> Result<Response, ClientError> {
        let env = Envelope::decode(payload)?;
        if env.tag == UNAUTHENTICATED_TAG {
            // The server could not authenticate our request; its reply is
            // informative only and must not be trusted for anything else.
            return match Response::decode(&env.body)? {
                Response::Error { code, message } => Err(ClientError::Refused { code, message }),
                _ => Err(ClientError::BadServerTag),
            };
        }
        // The MAC covers the version too; this check only names the problem.
        if env.protocol_version != PROTOCOL_VERSION {
            return Err(ClientError::VersionMismatch(env.protocol_version));
        }
        let request_tag = match self.pending {
            Some((pending, tag)) if pending == seq => tag,
            _ => return Err(ClientError::NotPending(seq)),
        };
        if env.seq != seq {
            return Err(ClientError::SequenceMismatch {
                expected: seq,
                got: env.seq,
            });
        }
        if !env.verify(&self.session_key, &Direction::Response { request_tag }) {
            return Err(ClientError::BadServerTag);
        }
        Ok(Response::decode(&env.body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const KEY: [u8; 32] = [0x42; 32];
    const NONCE: Nonce = [9; 32];
    const CLIENT_NONCE: Nonce = [0xc1; 32];

    fn status() -> Status {
        Status {
            uptime_ns: 1,
            boot_ns: 2,
            mem_total_bytes: 3,
            mem_used_bytes: 4,
            heap_size_bytes: 5,
            heap_used_bytes: 6,
            nic: NicCounters {
                rx_packets: 7,
                rx_bytes: 8,
                tx_packets: 9,
                tx_bytes: 10,
                rx_dropped: 11,
                interrupts: 12,
            },
            tsc_hz: 13,
            switch: SwitchStatus {
                neighbours: 14,
                neighbour_evictions: 15,
                capsule_queue_drops: 16,
                held_drops: 17,
                tx_drops: 18,
                arp_conflicts: 19,
            },
        }
    }

    /// A server and a client whose handshake went through.
    fn pair() -> (ServerSession, ClientSession) {
        let mut server = ServerSession::new(&KEY, NONCE);
        let client =
            ClientSession::new(&KEY, &server.hello(b"build", "vm1"), CLIENT_NONCE).unwrap();
        assert_eq!(server.handle(client.client_hello()), Incoming::Opened);
        (server, client)
    }

    fn capsule_info(state: CapsuleState) -> CapsuleInfo {
        CapsuleInfo {
            name: "web".into(),
            program: "http".into(),
            locator: Ipv4Addr::new(198, 18, 0, 5),
            slot: 5,
            state,
            tasks: 3,
            memory_bytes: 1 << 20,
            memory_limit: 64 << 20,
            sockets: 4,
            uptime_ns: 123,
            epoch: 7,
        }
    }

    #[test]
    fn every_response_round_trips() {
        for resp in [
            Response::Version {
                protocol_version: 1,
                build_id: vec![1, 2, 3],
                vm_name: "vm1".into(),
            },
            Response::Status(status()),
            Response::ShuttingDown,
            Response::CapsuleStarted(capsule_info(CapsuleState::Running)),
            Response::Capsules(vec![]),
            Response::Capsules(vec![
                capsule_info(CapsuleState::Exited),
                capsule_info(CapsuleState::Faulted {
                    reason: "panic: x".into(),
                }),
                capsule_info(CapsuleState::Killed),
            ]),
            Response::Killed,
            Response::Logs {
                data: b"line\n".to_vec(),
                next_offset: 5,
            },
            Response::Programs(vec![ProgramInfo {
                name: "echo".into(),
                description: "TCP echo".into(),
            }]),
            Response::error(ErrorCode::Internal, "boom"),
            Response::error(ErrorCode::InvalidArgument, "bad"),
            Response::Frozen { image_len: 99 },
            Response::ImageChunk {
                data: vec![1, 2, 3],
            },
            Response::Done,
            Response::Pages(sample_batch()),
            Response::Pages(PageBatch::default()),
            Response::Inspection {
                tasks: vec![crate::image::TaskSummary {
                    id: 1,
                    name: "t".into(),
                    state: "runnable".into(),
                    rip: 5,
                    rsp: 6,
                }],
                sockets: vec![],
            },
            Response::CapsuleStarted(capsule_info(CapsuleState::Frozen)),
            Response::CapsuleStarted(capsule_info(CapsuleState::Migrated)),
        ] {
            let bytes = resp.encode();
            assert_eq!(Response::decode(&bytes).unwrap(), resp);
            // A status may end before its optional last field (an older
            // kernel's); see `a_status_without_arp_conflicts_still_decodes`.
            let optional_tail = if matches!(resp, Response::Status(_)) {
                8
            } else {
                0
            };
            for cut in 0..bytes.len() {
                if cut == bytes.len() - optional_tail {
                    continue;
                }
                assert!(
                    Response::decode(&bytes[..cut]).is_err(),
                    "truncated {resp:?} at {cut} decoded"
                );
            }
        }
    }

    /// Kernels from before `arp_conflicts` send a status of 18 u64s; it
    /// decodes, with no conflicts. A partial last field is still an error.
    #[test]
    fn a_status_without_arp_conflicts_still_decodes() {
        let new = Response::Status(status()).encode();
        let old = &new[..new.len() - 8];
        let Response::Status(decoded) = Response::decode(old).unwrap() else {
            panic!("not a status");
        };
        let mut expected = status();
        expected.switch.arp_conflicts = 0;
        assert_eq!(decoded, expected);
        assert_eq!(old.len(), 1 + 18 * 8);
        for cut in 1..8 {
            assert!(Response::decode(&new[..new.len() - cut]).is_err());
        }
        let Response::Status(decoded) = Response::decode(&new).unwrap() else {
            panic!("not a status");
        };
        assert_eq!(decoded.switch.arp_conflicts, 19);
    }

    #[test]
    fn every_request_round_trips() {
        for req in [
            Request::Version,
            Request::Status,
            Request::Shutdown,
            Request::RunCapsule(RunCapsule {
                name: "web".into(),
                program: "http".into(),
                args: vec!["--port".into(), "8080".into()],
                locator: Ipv4Addr::new(198, 18, 0, 7),
                slot: 7,
                memory_limit: 0,
                epoch: 1,
            }),
            Request::ListCapsules,
            Request::KillCapsule { name: "web".into() },
            Request::CapsuleLogs {
                name: "web".into(),
                offset: 10,
                max: 4096,
            },
            Request::ListPrograms,
            Request::FreezeCapsule { name: "a".into() },
            Request::ReadImage {
                name: "a".into(),
                offset: 7,
                len: 100,
            },
            Request::ThawCapsule {
                name: "a".into(),
                epoch: 3,
            },
            Request::ReleaseCapsule {
                name: "a".into(),
                forward_to: Ipv4Addr::new(192, 0, 2, 12),
            },
            Request::RestoreBegin {
                name: "a".into(),
                image_len: 1 << 20,
            },
            Request::RestoreChunk {
                name: "a".into(),
                offset: 0,
                data: vec![9; 100],
            },
            Request::RestoreCommit {
                name: "a".into(),
                epoch: u64::MAX,
            },
            Request::Fence {
                name: "a".into(),
                epoch: 9,
            },
            Request::RestoreAbort { name: "a".into() },
            Request::InspectCapsule { name: "a".into() },
            Request::HoldTraffic {
                locator: Ipv4Addr::new(198, 18, 0, 1),
            },
            Request::PrecopyCapsule { name: "a".into() },
            Request::RestoreStage { name: "a".into() },
            Request::FreezeDelta { name: "a".into() },
            Request::ReadPages {
                name: "a".into(),
                from: 8192,
            },
            Request::StagePages {
                name: "a".into(),
                batch: sample_batch(),
            },
            Request::ReleaseTraffic {
                locator: Ipv4Addr::new(198, 18, 0, 1),
            },
            Request::UpdateTranslations {
                replace: false,
                entries: vec![],
            },
            Request::UpdateTranslations {
                replace: true,
                entries: vec![
                    Translation {
                        locator: Ipv4Addr::new(198, 18, 0, 1),
                        care_of: Some(Ipv4Addr::new(198, 51, 100, 12)),
                        epoch: 4,
                    },
                    Translation {
                        locator: Ipv4Addr::new(198, 18, 0, 2),
                        care_of: None,
                        epoch: u64::MAX,
                    },
                ],
            },
        ] {
            let bytes = req.encode();
            assert_eq!(Request::decode(&bytes).unwrap(), req);
            for cut in 1..bytes.len() {
                assert!(
                    Request::decode(&bytes[..cut]).is_err(),
                    "truncated {req:?} at {cut} decoded"
                );
            }
        }
    }

    fn translations(replace: bool, entries: &[Translation]) -> Vec<u8> {
        Request::UpdateTranslations {
            replace,
            entries: entries.to_vec(),
        }
        .encode()
    }

    #[test]
    fn malformed_translation_updates_are_refused() {
        let entry = Translation {
            locator: Ipv4Addr::new(198, 18, 0, 1),
            care_of: Some(Ipv4Addr::new(192, 0, 2, 11)),
            epoch: 1,
        };
        let good = translations(false, &[entry]);
        // Byte layout: tag, replace, count (4), locator (4), flag, care-of (4), epoch (8).
        assert_eq!(good.len(), 1 + 1 + 4 + 17);
        // A replace flag other than 0/1.
        let mut bad = good.clone();
        bad[1] = 2;
        assert!(Request::decode(&bad).is_err());
        // A care-of flag other than 0/1, and an absent care-of that carries an address.
        let mut bad = good.clone();
        bad[10] = 7;
        assert!(Request::decode(&bad).is_err());
        let mut bad = good.clone();
        bad[10] = 0;
        assert!(Request::decode(&bad).is_err());
        // A count larger than what follows, and one above the bound.
        let mut bad = good.clone();
        bad[2..6].copy_from_slice(&2u32.to_le_bytes());
        assert!(Request::decode(&bad).is_err());
        let mut bad = good.clone();
        bad[2..6].copy_from_slice(&[0xff; 4]);
        assert!(Request::decode(&bad).is_err());
        let too_many = alloc::vec![entry; MAX_TRANSLATIONS + 1];
        assert!(Request::decode(&translations(true, &too_many)).is_err());
        let most = alloc::vec![entry; MAX_TRANSLATIONS];
        assert!(Request::decode(&translations(true, &most)).is_ok());
        // Trailing bytes.
        let mut bad = good.clone();
        bad.push(0);
        assert!(Request::decode(&bad).is_err());
    }

    #[test]
    fn forged_counts_do_not_allocate_or_decode() {
        // A capsule list claiming four billion entries in a few bytes.
        let mut w = Writer::new();
        w.u8(Response::CAPSULES).u32(u32::MAX);
        assert!(Response::decode(&w.finish()).is_err());
        let mut w = Writer::new();
        w.u8(Request::RUN_CAPSULE)
            .str("a")
            .str("echo")
            .u32(MAX_ARGS as u32 + 1);
        assert!(Request::decode(&w.finish()).is_err());
        let mut w = Writer::new();
        w.u8(Request::RUN_CAPSULE)
            .str("a")
            .str("echo")
            .u32(1)
            .str(&"x".repeat(MAX_ARG_LEN + 1));
        w.raw(&[198, 18, 0, 1]).u32(1).u64(0);
        assert!(Request::decode(&w.finish()).is_err());
    }

    #[test]
    fn authenticated_exchange() {
        let (mut server, mut client) = pair();
        assert_eq!(client.hello().build_id, b"build");
        for req in [Request::Version, Request::Status, Request::Shutdown] {
            let (seq, payload) = client.seal(&req);
            match server.handle(&payload) {
                Incoming::Request { seq: s, request } => {
                    assert_eq!((s, &request), (seq, &req));
                    let reply = server.reply(s, &Response::ShuttingDown);
                    assert_eq!(client.open(seq, &reply).unwrap(), Response::ShuttingDown);
                }
                other => panic!("refused: {other:?}"),
            }
        }
    }

    #[test]
    fn client_hello_round_trips_and_is_strict() {
        let (_, client) = pair();
        let bytes = client.client_hello().to_vec();
        assert_eq!(bytes.len(), ClientHello::LEN);
        assert_eq!(&bytes[..4], b"CPSC");
        assert_eq!(bytes[4..6], PROTOCOL_VERSION.to_le_bytes());
        assert_eq!(bytes[6..38], CLIENT_NONCE);
        let hello = ClientHello::decode(&bytes).unwrap();
        assert_eq!(hello.encode(), bytes);
        for cut in 0..bytes.len() {
            assert!(ClientHello::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(ClientHello::decode(&long).is_err());
        let mut magic = bytes;
        magic[3] = b'L';
        assert!(ClientHello::decode(&magic).is_err());
    }

    /// Expects a refused handshake with `code`, whose reply the client reads
    /// as an unauthenticated refusal; later frames are refused too.
    fn assert_handshake_fails(server: &mut ServerSession, frame: &[u8], code: ErrorCode) {
        let Incoming::HandshakeFailed { reply, code: got } = server.handle(frame) else {
            panic!("handshake accepted");
        };
        assert_eq!(got, code);
        let env = Envelope::decode(&reply).unwrap();
        assert_eq!(env.tag, UNAUTHENTICATED_TAG);
        assert!(matches!(
            Response::decode(&env.body),
            Ok(Response::Error { code: c, .. }) if c == code
        ));
        assert!(!server.is_open());
        assert!(matches!(
            server.handle(frame),
            Incoming::HandshakeFailed { .. }
        ));
    }

    #[test]
    fn only_an_authentic_client_hello_opens_a_session() {
        // The right key opens it.
        let mut server = ServerSession::new(&KEY, NONCE);
        let hello = server.hello(b"b", "vm");
        assert!(!server.is_open());
        let client = ClientSession::new(&KEY, &hello, CLIENT_NONCE).unwrap();
        assert_eq!(server.handle(client.client_hello()), Incoming::Opened);
        assert!(server.is_open());

        // The wrong key: refused before any request is looked at.
        let mut server = ServerSession::new(&KEY, NONCE);
        let hello = server.hello(b"b", "vm");
        let mut intruder = ClientSession::new(&[0x43; 32], &hello, CLIENT_NONCE).unwrap();
        let Incoming::HandshakeFailed { reply, .. } = server.handle(intruder.client_hello()) else {
            panic!("wrong key opened a session");
        };
        let (seq, _) = intruder.seal(&Request::Version);
        assert!(matches!(
            intruder.open(seq, &reply),
            Err(ClientError::Refused {
                code: ErrorCode::Unauthenticated,
                ..
            })
        ));

        // A client hello recorded in another connection (other server nonce).
        let mut server = ServerSession::new(&KEY, [10; 32]);
        server.hello(b"b", "vm");
        assert_handshake_fails(
            &mut server,
            client.client_hello(),
            ErrorCode::Unauthenticated,
        );

        // A request instead of a client hello: no way around the handshake.
        let (mut server, mut client) = pair();
        let (_, request) = client.seal(&Request::Status);
        let mut fresh = ServerSession::new(&KEY, NONCE);
        fresh.hello(b"build", "vm1");
        assert_handshake_fails(&mut fresh, &request, ErrorCode::Malformed);
        assert!(matches!(server.handle(&request), Incoming::Request { .. }));

        // Another protocol version, and a changed byte anywhere.
        let mut fresh = ServerSession::new(&KEY, NONCE);
        let hello = fresh.hello(b"build", "vm1");
        let honest = ClientSession::new(&KEY, &hello, CLIENT_NONCE).unwrap();
        let mut other = ClientHello::decode(honest.client_hello()).unwrap();
        other.protocol_version = 2;
        assert_handshake_fails(&mut fresh, &other.encode(), ErrorCode::UnsupportedVersion);
        for at in 4..ClientHello::LEN {
            let mut fresh = ServerSession::new(&KEY, NONCE);
            fresh.hello(b"build", "vm1");
            let mut changed = honest.client_hello().to_vec();
            changed[at] ^= 1;
            assert!(
                matches!(fresh.handle(&changed), Incoming::HandshakeFailed { .. }),
                "byte {at} changed was accepted"
            );
        }
    }

    /// The attack of a recorded session: hello and answers played again to a
    /// client. The client's own nonce makes every recorded answer worthless.
    #[test]
    fn response_replayed_from_another_session_is_rejected() {
        let mut server = ServerSession::new(&KEY, NONCE);
        let hello = server.hello(b"build", "vm1");
        let mut client = ClientSession::new(&KEY, &hello, CLIENT_NONCE).unwrap();
        assert_eq!(server.handle(client.client_hello()), Incoming::Opened);
        let (seq, payload) = client.seal(&Request::ListCapsules);
        assert!(matches!(server.handle(&payload), Incoming::Request { .. }));
        let recorded = server.reply(seq, &Response::Capsules(vec![]));
        assert!(client.open(seq, &recorded).is_ok());

        // The same hello (same server nonce) replayed to a new client.
        let mut victim = ClientSession::new(&KEY, &hello, [0x77; 32]).unwrap();
        let (seq, _) = victim.seal(&Request::ListCapsules);
        assert_eq!(victim.open(seq, &recorded), Err(ClientError::BadServerTag));
        // Nor does an answer from a real but other session verify.
        let (mut server2, mut client2) = pair();
        let (seq2, payload2) = client2.seal(&Request::ListCapsules);
        assert!(matches!(
            server2.handle(&payload2),
            Incoming::Request { .. }
        ));
        let other = server2.reply(seq2, &Response::Capsules(vec![]));
        assert_eq!(client2.open(seq2, &other), Ok(Response::Capsules(vec![])));
        assert_eq!(victim.open(seq, &other), Err(ClientError::BadServerTag));
    }

    /// A response is bound to the request it answers: not only to its
    /// session and sequence number, but to the request's own bytes.
    #[test]
    fn response_to_another_request_is_rejected() {
        // Two clients with the same nonces (a broken random source) share a
        // session key; their first requests differ.
        let mut server = ServerSession::new(&KEY, NONCE);
        let hello = server.hello(b"build", "vm1");
        let mut a = ClientSession::new(&KEY, &hello, CLIENT_NONCE).unwrap();
        let mut b = ClientSession::new(&KEY, &hello, CLIENT_NONCE).unwrap();
        assert_eq!(server.handle(a.client_hello()), Incoming::Opened);
        let (seq, payload) = a.seal(&Request::ListCapsules);
        assert!(matches!(server.handle(&payload), Incoming::Request { .. }));
        let answer = server.reply(seq, &Response::Done);
        assert_eq!(a.open(seq, &answer), Ok(Response::Done));
        let (seq_b, _) = b.seal(&Request::Shutdown);
        assert_eq!(seq_b, seq);
        assert_eq!(b.open(seq_b, &answer), Err(ClientError::BadServerTag));

        // In one session, the answer to request 1 is no answer to request 2,
        // even with its sequence number rewritten.
        let (seq2, payload2) = a.seal(&Request::Status);
        assert_eq!(
            a.open(seq2, &answer),
            Err(ClientError::SequenceMismatch {
                expected: seq2,
                got: seq,
            })
        );
        let mut renumbered = Envelope::decode(&answer).unwrap();
        renumbered.seq = seq2;
        assert_eq!(
            a.open(seq2, &renumbered.encode()),
            Err(ClientError::BadServerTag)
        );
        // The client only opens the answer to its latest request.
        assert_eq!(a.open(seq, &answer), Err(ClientError::NotPending(seq)));
        assert!(matches!(server.handle(&payload2), Incoming::Request { .. }));
        let reply2 = server.reply(seq2, &Response::Done);
        assert_eq!(a.open(seq2, &reply2), Ok(Response::Done));
        // A server answers only the request it accepted last.
        let stale = server.reply(seq, &Response::Done);
        assert_eq!(Envelope::decode(&stale).unwrap().tag, UNAUTHENTICATED_TAG);
    }

    /// The session key covers the server's hello: a build id changed on the
    /// way makes every response fail, so a verified response vouches for it.
    #[test]
    fn a_changed_hello_fails_the_session() {
        let mut server = ServerSession::new(&KEY, NONCE);
        let hello = server.hello(b"build", "vm1");
        let mut changed = Hello::decode(&hello).unwrap();
        changed.build_id = b"other".to_vec();
        let client = ClientSession::new(&KEY, &changed.encode(), CLIENT_NONCE).unwrap();
        assert_eq!(client.hello().build_id, b"other");
        assert!(matches!(
            server.handle(client.client_hello()),
            Incoming::HandshakeFailed {
                code: ErrorCode::Unauthenticated,
                ..
            }
        ));
    }

    #[test]
    fn replayed_request_is_refused() {
        let (mut server, mut client) = pair();
        let (_, payload) = client.seal(&Request::Shutdown);
        assert!(matches!(server.handle(&payload), Incoming::Request { .. }));
        let Incoming::Refused {
            code: ErrorCode::BadSequence,
            reply,
        } = server.handle(&payload)
        else {
            panic!("a replay was not refused for its sequence number");
        };
        // The refusal is not signed: the answer to the original request was,
        // under the same one-time key, and a second signed message would
        // reveal that key.
        let env = Envelope::decode(&reply).unwrap();
        assert_eq!(env.tag, UNAUTHENTICATED_TAG);
    }

    #[test]
    fn request_from_another_session_is_refused() {
        let (_, mut client) = pair();
        let (_, payload) = client.seal(&Request::Shutdown);
        // Another server nonce, and the same server nonce with another
        // client nonce: both are other sessions.
        for (server_nonce, client_nonce) in [([10; 32], CLIENT_NONCE), (NONCE, [11; 32])] {
            let mut other = ServerSession::new(&KEY, server_nonce);
            let hello = other.hello(b"build", "vm1");
            let c = ClientSession::new(&KEY, &hello, client_nonce).unwrap();
            assert_eq!(other.handle(c.client_hello()), Incoming::Opened);
            assert!(matches!(
                other.handle(&payload),
                Incoming::Refused {
                    code: ErrorCode::Unauthenticated,
                    ..
                }
            ));
        }
    }

    #[test]
    fn tampered_request_is_refused() {
        let (mut server, mut client) = pair();
        let (_, payload) = client.seal(&Request::Status);
        for at in 0..payload.len() {
            let mut changed = payload.clone();
            changed[at] ^= 0x20;
            assert!(
                matches!(server.handle(&changed), Incoming::Refused { .. }),
                "byte {at} changed was accepted"
            );
        }
        let body_at = 2 + 8 + 4;
        let mut changed = payload.clone();
        changed[body_at] = Request::SHUTDOWN;
        assert!(matches!(
            server.handle(&changed),
            Incoming::Refused {
                code: ErrorCode::Unauthenticated,
                ..
            }
        ));
        assert!(matches!(server.handle(&payload), Incoming::Request { .. }));
    }

    #[test]
    fn unknown_request_gets_authenticated_error() {
        let (mut server, mut client) = pair();
        let (seq, payload) = client.seal_body(vec![0x77]);
        let Incoming::Refused { reply, code } = server.handle(&payload) else {
            panic!()
        };
        assert_eq!(code, ErrorCode::UnknownRequest);
        match client.open(seq, &reply).unwrap() {
            Response::Error { code, message } => {
                assert_eq!(code, ErrorCode::UnknownRequest);
                assert!(message.contains("119"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_and_truncated_envelopes_are_refused() {
        let (mut server, mut client) = pair();
        let (_, payload) = client.seal(&Request::Status);
        for cut in 0..payload.len() {
            assert!(matches!(
                server.handle(&payload[..cut]),
                Incoming::Refused {
                    code: ErrorCode::Malformed,
                    ..
                }
            ));
        }
        let mut long = payload.clone();
        long.push(0);
        assert!(matches!(
            server.handle(&long),
            Incoming::Refused {
                code: ErrorCode::Malformed,
                ..
            }
        ));
        // Garbage of every length never panics, before or after the handshake.
        let mut x: u32 = 12345;
        for len in 0..200 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            assert!(matches!(server.handle(&junk), Incoming::Refused { .. }));
            let mut fresh = ServerSession::new(&KEY, NONCE);
            fresh.hello(b"build", "vm1");
            assert!(matches!(
                fresh.handle(&junk),
                Incoming::HandshakeFailed { .. }
            ));
            let _ = Response::decode(&junk);
            let _ = Hello::decode(&junk);
            let _ = ClientHello::decode(&junk);
        }
        // The original request still works afterwards.
        assert!(matches!(server.handle(&payload), Incoming::Request { .. }));
    }

    #[test]
    fn wrong_protocol_version_is_refused() {
        let (mut server, mut client) = pair();
        let (_, payload) = client.seal(&Request::Status);
        let mut env = Envelope::decode(&payload).unwrap();
        env.protocol_version = 99;
        assert!(matches!(
            server.handle(&env.encode()),
            Incoming::Refused {
                code: ErrorCode::UnsupportedVersion,
                ..
            }
        ));
    }

    #[test]
    fn forged_response_is_rejected_by_client() {
        let (_, mut client) = pair();
        let (seq, _) = client.seal(&Request::Status);
        let forged = Envelope::seal(
            &[1; 32],
            &Direction::Response {
                request_tag: [0; MAC_LEN],
            },
            seq,
            Response::ShuttingDown.encode(),
        );
        assert_eq!(
            client.open(seq, &forged.encode()),
            Err(ClientError::BadServerTag)
        );
        let mut unauth_ok = forged.clone();
        unauth_ok.tag = UNAUTHENTICATED_TAG;
        assert_eq!(
            client.open(seq, &unauth_ok.encode()),
            Err(ClientError::BadServerTag)
        );
    }

    #[test]
    fn frame_decoder_handles_split_and_oversized_input() {
        let mut dec = FrameDecoder::new();
        let mut stream = frame(b"one");
        stream.extend(frame(b""));
        stream.extend(frame(b"three"));
        for b in &stream {
            dec.push(core::slice::from_ref(b));
        }
        assert_eq!(dec.next_frame().unwrap().unwrap(), b"one");
        assert_eq!(dec.next_frame().unwrap().unwrap(), b"");
        assert_eq!(dec.next_frame().unwrap().unwrap(), b"three");
        assert_eq!(dec.next_frame().unwrap(), None);

        let mut dec = FrameDecoder::new();
        dec.push(&((MAX_FRAME_LEN + 1) as u32).to_le_bytes());
        assert_eq!(
            dec.next_frame(),
            Err(OversizedFrame {
                declared: MAX_FRAME_LEN + 1
            })
        );
        dec.push(b"more");
        assert!(dec.next_frame().is_err());
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn hello_rejects_wrong_magic_and_version() {
        let mut server = ServerSession::new(&KEY, NONCE);
        let mut hello = server.hello(b"b", "vm");
        hello[0] = b'X';
        assert!(ClientSession::new(&KEY, &hello, CLIENT_NONCE).is_err());
        let mut h = Hello::decode(&server.hello(b"b", "vm")).unwrap();
        h.protocol_version = PROTOCOL_VERSION + 1;
        assert_eq!(
            ClientSession::new(&KEY, &h.encode(), CLIENT_NONCE).err(),
            Some(ClientError::VersionMismatch(PROTOCOL_VERSION + 1))
        );
    }

    fn sample_batch() -> PageBatch {
        let page = crate::image::PAGE_SIZE;
        PageBatch {
            next: 5 * page as u64,
            end: 64 * page as u64,
            offsets: vec![0, 3 * page as u64],
            data: (0..2 * page).map(|i| (i % 251) as u8).collect(),
        }
    }

    #[test]
    fn a_full_page_batch_fits_one_frame() {
        let page = crate::image::PAGE_SIZE;
        let batch = PageBatch {
            next: 1 << 30,
            end: 1 << 30,
            offsets: (0..MAX_BATCH_PAGES as u64)
                .map(|i| i * page as u64)
                .collect(),
            data: vec![0xa5; MAX_BATCH_PAGES * page],
        };
        let request = Request::StagePages {
            name: "x".repeat(64),
            batch: batch.clone(),
        };
        // Envelope and MAC come on top of the encoded request.
        assert!(request.encode().len() + 256 < MAX_FRAME_LEN);
        assert!(Response::Pages(batch).encode().len() + 256 < MAX_FRAME_LEN);
    }

    #[test]
    fn malformed_page_batches_are_refused() {
        let page = crate::image::PAGE_SIZE as u64;
        let mut bad = Vec::new();
        let mut unaligned = sample_batch();
        unaligned.offsets[1] = 3 * page + 8;
        bad.push(("unaligned", unaligned));
        let mut descending = sample_batch();
        descending.offsets = vec![3 * page, 0];
        bad.push(("descending", descending));
        let mut repeated = sample_batch();
        repeated.offsets = vec![page, page];
        bad.push(("repeated", repeated));
        let mut beyond = sample_batch();
        beyond.offsets[1] = beyond.end;
        bad.push(("beyond the arena", beyond));
        let mut backwards = sample_batch();
        backwards.next = backwards.end + page;
        bad.push(("next after end", backwards));
        let too_many = PageBatch {
            next: 0,
            end: 1 << 30,
            offsets: (0..=MAX_BATCH_PAGES as u64).map(|i| i * page).collect(),
            data: vec![1; (MAX_BATCH_PAGES + 1) * page as usize],
        };
        bad.push(("too many pages", too_many));
        for (what, batch) in bad {
            let bytes = Response::Pages(batch).encode();
            assert!(Response::decode(&bytes).is_err(), "{what} batch decoded");
        }
        // Short page data is truncation, not a shorter page.
        let mut bytes = Response::Pages(sample_batch()).encode();
        bytes.truncate(bytes.len() - 1);
        assert!(Response::decode(&bytes).is_err());
    }
}
