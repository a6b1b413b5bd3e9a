//! The capsule image: everything a capsule is, frozen, in one byte string
//! that a VM of the same kernel build can revive (see docs/image-format.md).
//!
//! Layout: a fixed header (with a random nonce), the body, then a trailer of
//! SHA-256 over header and body and a MAC of the same bytes under the cluster
//! key (Poly1305 under a one-time key derived from the key and the nonce; see
//! `auth`). Readers
//! check magic, version, lengths, digest and MAC before they look at anything
//! else, so a damaged, truncated or forged image is refused before a single
//! page is mapped.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::net::Ipv4Addr;

use crate::auth::{self, MAC_LEN, sha256};
use crate::codec::{DecodeError, Reader, Writer};

pub const IMAGE_MAGIC: [u8; 8] = *b"CPSLIMG\0";
pub const IMAGE_VERSION: u16 = 4;
/// Random bytes in every header, so that no two images sealed under one key
/// share a one-time MAC key.
pub const IMAGE_NONCE_LEN: usize = 16;
pub type ImageNonce = [u8; IMAGE_NONCE_LEN];
pub const PAGE_SIZE: usize = 4096;
/// Magic, version, build id length (u16) + 64 bytes room, body length, nonce.
const HEADER_LEN: usize = 8 + 2 + 2 + 64 + 8 + IMAGE_NONCE_LEN;
const NONCE_AT: usize = 84;
const TRAILER_LEN: usize = 32 + MAC_LEN;
/// Largest arena an image may describe (the window size).
pub const MAX_ARENA_BYTES: u64 = 1 << 30;

/// A run of consecutive non-zero pages of the arena.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Offset from the start of the arena window, page aligned.
    pub offset: u64,
    pub data: Vec<u8>,
}

/// A readable line about one task, for `inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSummary {
    pub id: u32,
    pub name: String,
    pub state: String,
    pub rip: u64,
    pub rsp: u64,
}

/// A readable line about one socket, for `inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketSummary {
    pub protocol: String,
    pub local: String,
    pub remote: String,
    pub state: String,
    pub send_queue: u32,
    pub recv_queue: u32,
}

impl TaskSummary {
    /// Bytes of the shortest encoding (id, two empty strings, rip, rsp).
    pub(crate) const MIN_ENCODED_LEN: usize = 4 + 4 + 4 + 8 + 8;

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.u32(self.id)
            .str(&self.name)
            .str(&self.state)
            .u64(self.rip)
            .u64(self.rsp);
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            id: r.u32("task id")?,
            name: r.string("task name")?,
            state: r.string("task state")?,
            rip: r.u64("task rip")?,
            rsp: r.u64("task rsp")?,
        })
    }
}

impl SocketSummary {
    pub(crate) fn encode(&self, w: &mut Writer) {
        w.str(&self.protocol)
            .str(&self.local)
            .str(&self.remote)
            .str(&self.state)
            .u32(self.send_queue)
            .u32(self.recv_queue);
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            protocol: r.string("socket protocol")?,
            local: r.string("socket local")?,
            remote: r.string("socket remote")?,
            state: r.string("socket state")?,
            send_queue: r.u32("send queue")?,
            recv_queue: r.u32("recv queue")?,
        })
    }
}

/// What an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// The whole capsule, frozen: can be restored on its own.
    Full,
    /// Pre-copy: the capsule's identity and arena length when the copy
    /// began, so the destination can admit it and map its window. The pages
    /// follow separately, read while the capsule keeps running (control
    /// requests `ReadPages`/`StagePages`). Useless alone; a
    /// [`ImageKind::Delta`] completes it.
    Base,
    /// The pages written since the base, and the frozen capsule's metadata.
    /// Pages listed here replace the base's, zero pages included.
    Delta,
}

impl ImageKind {
    fn to_u8(self) -> u8 {
        match self {
            Self::Full => 0,
            Self::Base => 1,
            Self::Delta => 2,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Full,
            1 => Self::Base,
            2 => Self::Delta,
            _ => return None,
        })
    }
}

/// Everything in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleImage {
    pub kind: ImageKind,
    pub build_id: Vec<u8>,
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
    pub locator: Ipv4Addr,
    pub slot: u32,
    /// The copy's epoch when it was frozen: every move, resume and thaw runs
    /// the capsule at a higher one, so an image whose epoch the directory has
    /// passed is a stale copy (docs/architecture.md, "Exactly one copy").
    pub epoch: u64,
    pub memory_limit: u64,
    /// Capsule clock (ns) at the moment of freezing: the restored capsule's
    /// clock continues from here.
    pub clock_ns: u64,
    /// Bytes of the arena window that were mapped (the restored arena maps as many).
    pub arena_len: u64,
    pub segments: Vec<Segment>,
    /// Address of the capsule's root object inside the arena.
    pub root: u64,
    /// The capsule's log ring: bytes written so far and the retained tail.
    pub log_written: u64,
    pub log_tail: Vec<u8>,
    pub tasks: Vec<TaskSummary>,
    pub sockets: Vec<SocketSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageError {
    BadMagic,
    UnsupportedVersion(u16),
    Truncated,
    DigestMismatch,
    /// The keyed MAC does not verify: tampered, or sealed with another key.
    BadMac,
    Malformed(DecodeError),
    Inconsistent(&'static str),
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => f.write_str("not a capsule image (bad magic)"),
            Self::UnsupportedVersion(v) => write!(
                f,
                "image format version {v} is not supported (this build reads {IMAGE_VERSION})"
            ),
            Self::Truncated => f.write_str("image is truncated"),
            Self::DigestMismatch => f.write_str("image is corrupted (SHA-256 mismatch)"),
            Self::BadMac => f.write_str(
                "image MAC does not verify (tampered, or sealed with another cluster key)",
            ),
            Self::Malformed(e) => write!(f, "image body is malformed: {e}"),
            Self::Inconsistent(why) => write!(f, "image is inconsistent: {why}"),
        }
    }
}

impl From<DecodeError> for ImageError {
    fn from(e: DecodeError) -> Self {
        Self::Malformed(e)
    }
}

/// Seals `content` (an image's header and body, the header holding the
/// nonce) with `key`: appends the SHA-256 of the content (zeros without
/// `with_digest`) and the MAC. The one sealing step of the encoder, of
/// [`reseal`] and of the fuzzers that build images field by field.
///
/// # Panics
/// If `content` is shorter than an image header: callers build the content
/// themselves, and an image without its nonce cannot be sealed (decoders
/// check lengths before they reach the MAC).
pub fn seal(mut content: Vec<u8>, key: &[u8], with_digest: bool) -> Vec<u8> {
    assert!(
        content.len() >= HEADER_LEN,
        "seal: {} bytes of content, shorter than the {HEADER_LEN}-byte image header",
        content.len()
    );
    let digest = if with_digest {
        sha256(&[&content])
    } else {
        [0u8; 32]
    };
    let tag = mac(key, &content);
    content.extend_from_slice(&digest);
    content.extend_from_slice(&tag);
    content
}

/// The MAC of header and body (`sealed`), whose header holds the nonce.
fn mac(key: &[u8], sealed: &[u8]) -> auth::Tag {
    let nonce = &sealed[NONCE_AT..NONCE_AT + IMAGE_NONCE_LEN];
    let one_time = auth::derive_key(key, &[b"CPSL-IMG", nonce]);
    auth::one_time_tag(&one_time, &[sealed])
}

/// Whether a page is all zero, looking at whole words: this scan runs while
/// the capsule is frozen, over every mapped page.
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut words = page.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes(w.try_into().expect("chunks of 8")) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

/// Splits arena pages into segments, leaving out pages that are all zero.
pub fn segments_from_pages(arena: &[u8]) -> Vec<Segment> {
    let mut segments: Vec<Segment> = Vec::new();
    for (index, page) in arena.chunks(PAGE_SIZE).enumerate() {
        // Word by word: this scan runs while the capsule is frozen.
        if is_zero_page(page) {
            continue;
        }
        let offset = (index * PAGE_SIZE) as u64;
        match segments.last_mut() {
            Some(last) if last.offset + last.data.len() as u64 == offset => {
                last.data.extend_from_slice(page)
            }
            _ => segments.push(Segment {
                offset,
                data: page.to_vec(),
            }),
        }
    }
    segments
}

impl CapsuleImage {
    fn encode_body(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(self.kind.to_u8());
        w.str(&self.name)
            .str(&self.program)
            .u32(self.args.len() as u32);
        for a in &self.args {
            w.str(a);
        }
        w.raw(&self.locator.octets())
            .u32(self.slot)
            .u64(self.epoch)
            .u64(self.memory_limit)
            .u64(self.clock_ns)
            .u64(self.arena_len)
            .u64(self.root)
            .u64(self.log_written)
            .bytes(&self.log_tail)
            .u32(self.tasks.len() as u32);
        for t in &self.tasks {
            t.encode(&mut w);
        }
        w.u32(self.sockets.len() as u32);
        for s in &self.sockets {
            s.encode(&mut w);
        }
        w.u32(self.segments.len() as u32);
        for seg in &self.segments {
            w.u64(seg.offset).bytes(&seg.data);
        }
        w.finish()
    }

    /// The image as bytes, sealed with `key`, with its SHA-256 digest.
    /// `nonce` must be random (never the same twice under one key).
    pub fn encode(&self, key: &[u8], nonce: &ImageNonce) -> Vec<u8> {
        self.encode_with(key, nonce, true)
    }

    /// The image sealed with `key` only (digest left zero): for images in
    /// flight between VMs, where the MAC is checked anyway and every hash
    /// pass lengthens the pause. [`reseal`] adds the digest for files.
    pub fn encode_for_transfer(&self, key: &[u8], nonce: &ImageNonce) -> Vec<u8> {
        self.encode_with(key, nonce, false)
    }

    fn encode_with(&self, key: &[u8], nonce: &ImageNonce, with_digest: bool) -> Vec<u8> {
        let body = self.encode_body();
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TRAILER_LEN);
        out.extend_from_slice(&IMAGE_MAGIC);
        out.extend_from_slice(&IMAGE_VERSION.to_le_bytes());
        let mut id = [0u8; 64];
        let id_len = self.build_id.len().min(64);
        id[..id_len].copy_from_slice(&self.build_id[..id_len]);
        out.extend_from_slice(&(id_len as u16).to_le_bytes());
        out.extend_from_slice(&id);
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(nonce);
        out.extend_from_slice(&body);
        seal(out, key, with_digest)
    }

    /// Checks framing, digest and MAC, then decodes. Nothing is trusted before
    /// the MAC verifies.
    pub fn decode(bytes: &[u8], key: &[u8]) -> Result<Self, ImageError> {
        let sealed = check_seal(bytes, Some(key))?;
        Self::decode_body(bytes, sealed)
    }

    /// Decodes after checking only the digest (when the image carries one),
    /// for reading an image whose key is not at hand. Never use it to restore.
    pub fn decode_unauthenticated(bytes: &[u8]) -> Result<Self, ImageError> {
        let sealed = check_seal(bytes, None)?;
        Self::decode_body(bytes, sealed)
    }

    fn decode_body(bytes: &[u8], sealed: Sealed) -> Result<Self, ImageError> {
        let body = &bytes[HEADER_LEN..HEADER_LEN + sealed.body_len];
        let mut r = Reader::new(body);
        let kind =
            ImageKind::from_u8(r.u8("image kind")?).ok_or(DecodeError::Invalid("image kind"))?;
        let name = r.string("name")?;
        let program = r.string("program")?;
        let argc = r.u32("argument count")? as usize;
        if argc > 64 {
            return Err(ImageError::Inconsistent("too many arguments"));
        }
        let mut args = Vec::with_capacity(argc);
        for _ in 0..argc {
            args.push(r.string("argument")?);
        }
        let locator = Ipv4Addr::from(r.array::<4>("locator")?);
        let slot = r.u32("slot")?;
        let epoch = r.u64("epoch")?;
        let memory_limit = r.u64("memory limit")?;
        let clock_ns = r.u64("clock")?;
        let arena_len = r.u64("arena length")?;
        let root = r.u64("root")?;
        let log_written = r.u64("log written")?;
        let log_tail = r.bytes("log tail")?.to_vec();
        let tasks_n = r.count(TaskSummary::MIN_ENCODED_LEN, "task count")?;
        let mut tasks = Vec::with_capacity(tasks_n);
        for _ in 0..tasks_n {
            tasks.push(TaskSummary::decode(&mut r)?);
        }
        let sockets_n = r.count(24, "socket count")?;
        let mut sockets = Vec::with_capacity(sockets_n);
        for _ in 0..sockets_n {
            sockets.push(SocketSummary::decode(&mut r)?);
        }
        let segments_n = r.count(12, "segment count")?;
        let mut segments = Vec::with_capacity(segments_n);
        for _ in 0..segments_n {
            segments.push(Segment {
                offset: r.u64("segment offset")?,
                data: r.bytes("segment data")?.to_vec(),
            });
        }
        r.finish()?;
        let image = Self {
            kind,
            build_id: sealed.build_id,
            name,
            program,
            args,
            locator,
            slot,
            epoch,
            memory_limit,
            clock_ns,
            arena_len,
            segments,
            root,
            log_written,
            log_tail,
            tasks,
            sockets,
        };
        image.check_layout()?;
        Ok(image)
    }

    /// Segments must be page aligned, ordered, non-overlapping and inside the arena.
    fn check_layout(&self) -> Result<(), ImageError> {
        if self.arena_len == 0
            || self.arena_len > MAX_ARENA_BYTES
            || !self.arena_len.is_multiple_of(PAGE_SIZE as u64)
        {
            return Err(ImageError::Inconsistent("arena length"));
        }
        let mut end = 0;
        for seg in &self.segments {
            let len = seg.data.len() as u64;
            if !seg.offset.is_multiple_of(PAGE_SIZE as u64)
                || !len.is_multiple_of(PAGE_SIZE as u64)
                || len == 0
            {
                return Err(ImageError::Inconsistent("segment alignment"));
            }
            // Checked: an offset near 2^64 must not wrap past the test
            // (found by fuzzing, docs/fuzzing.md).
            let seg_end = seg.offset.checked_add(len);
            match seg_end {
                Some(seg_end) if seg.offset >= end && seg_end <= self.arena_len => end = seg_end,
                _ => return Err(ImageError::Inconsistent("segment placement")),
            }
        }
        if self.kind == ImageKind::Full && self.segments.first().is_none_or(|s| s.offset != 0) {
            return Err(ImageError::Inconsistent("the arena header page is missing"));
        }
        Ok(())
    }

    /// Bytes of memory the image occupies once restored.
    pub fn resident_bytes(&self) -> u64 {
        self.arena_len
    }
}

struct Sealed {
    build_id: Vec<u8>,
    body_len: usize,
}

fn check_seal(bytes: &[u8], key: Option<&[u8]>) -> Result<Sealed, ImageError> {
    if bytes.len() < 8 {
        return Err(ImageError::Truncated);
    }
    if bytes[..8] != IMAGE_MAGIC {
        return Err(ImageError::BadMagic);
    }
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(ImageError::Truncated);
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != IMAGE_VERSION {
        return Err(ImageError::UnsupportedVersion(version));
    }
    let id_len = u16::from_le_bytes([bytes[10], bytes[11]]) as usize;
    if id_len > 64 {
        return Err(ImageError::Inconsistent("build id length"));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[76..84]);
    let body_len = u64::from_le_bytes(len);
    // A crafted length must not wrap the sum.
    let Some(expected) = ((HEADER_LEN + TRAILER_LEN) as u64).checked_add(body_len) else {
        return Err(ImageError::Truncated);
    };
    if (bytes.len() as u64) < expected {
        return Err(ImageError::Truncated);
    }
    if bytes.len() as u64 != expected {
        return Err(ImageError::Inconsistent("bytes after the trailer"));
    }
    let body_len = body_len as usize;
    let sealed_end = HEADER_LEN + body_len;
    let (content, trailer) = bytes.split_at(sealed_end);
    // Sealed in-flight images may leave the digest out (all zero): their MAC
    // already covers every byte, and hashing twice doubles the time the
    // capsule stands still. Without a key, the digest is required.
    let digest_present = trailer[..32] != [0u8; 32];
    if (digest_present || key.is_none()) && sha256(&[content]) != trailer[..32] {
        return Err(ImageError::DigestMismatch);
    }
    if let Some(key) = key {
        let tag: auth::Tag = trailer[32..].try_into().expect("trailer length checked");
        if !auth::tags_equal(&mac(key, content), &tag) {
            return Err(ImageError::BadMac);
        }
    }
    Ok(Sealed {
        build_id: bytes[12..12 + id_len].to_vec(),
        body_len,
    })
}

/// Re-seals a verified image under another key (moving an image between
/// clusters, or to and from a file sealed with the host's key).
pub fn reseal(bytes: &[u8], old_key: &[u8], new_key: &[u8]) -> Result<Vec<u8>, ImageError> {
    let sealed = check_seal(bytes, Some(old_key))?;
    let content_end = HEADER_LEN + sealed.body_len;
    Ok(seal(bytes[..content_end].to_vec(), new_key, true))
}

/// The kind recorded in an image, read without verifying anything (to pick
/// how to restore it; the restore then verifies everything).
pub fn peek_kind(bytes: &[u8]) -> Option<ImageKind> {
    if bytes.len() <= HEADER_LEN || bytes[..8] != IMAGE_MAGIC {
        return None;
    }
    ImageKind::from_u8(bytes[HEADER_LEN])
}

/// The build id recorded in an image, read without verifying anything (to
/// refuse a wrong-build destination before any work).
pub fn peek_build_id(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.len() < HEADER_LEN || bytes[..8] != IMAGE_MAGIC {
        return None;
    }
    let id_len = u16::from_le_bytes([bytes[10], bytes[11]]) as usize;
    bytes.get(12..12 + id_len.min(64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const KEY: &[u8] = &[5; 32];
    const NONCE: ImageNonce = [0x6e; IMAGE_NONCE_LEN];

    fn sample() -> CapsuleImage {
        let mut arena = vec![0u8; 8 * PAGE_SIZE];
        arena[0] = 1; // header page
        arena[PAGE_SIZE * 3 + 7] = 9;
        arena[PAGE_SIZE * 4] = 9;
        CapsuleImage {
            kind: ImageKind::Full,
            build_id: vec![0xab; 20],
            name: "db".into(),
            program: "kv".into(),
            args: vec!["--port".into(), "6379".into()],
            locator: Ipv4Addr::new(198, 18, 0, 9),
            slot: 9,
            epoch: 3,
            memory_limit: 64 << 20,
            clock_ns: 123_456,
            arena_len: arena.len() as u64,
            segments: segments_from_pages(&arena),
            root: 0x4002_4000_1000,
            log_written: 3,
            log_tail: b"hi\n".to_vec(),
            tasks: vec![TaskSummary {
                id: 0,
                name: "kv".into(),
                state: "waiting-net".into(),
                rip: 1,
                rsp: 2,
            }],
            sockets: vec![SocketSummary {
                protocol: "tcp".into(),
                local: "198.18.0.9:6379".into(),
                remote: "192.0.2.1:5000".into(),
                state: "ESTABLISHED".into(),
                send_queue: 0,
                recv_queue: 4,
            }],
        }
    }

    #[test]
    fn zero_pages_are_skipped_and_runs_merged() {
        let s = sample();
        let offsets: Vec<(u64, usize)> = s
            .segments
            .iter()
            .map(|g| (g.offset, g.data.len()))
            .collect();
        assert_eq!(
            offsets,
            [(0, PAGE_SIZE), (3 * PAGE_SIZE as u64, 2 * PAGE_SIZE)]
        );
    }

    #[test]
    fn round_trip_with_key() {
        let s = sample();
        let bytes = s.encode(KEY, &NONCE);
        assert_eq!(CapsuleImage::decode(&bytes, KEY).unwrap(), s);
        assert_eq!(CapsuleImage::decode_unauthenticated(&bytes).unwrap(), s);
        assert_eq!(peek_build_id(&bytes), Some(&[0xab; 20][..]));
    }

    #[test]
    fn wrong_key_tamper_truncation_and_garbage_are_refused() {
        let bytes = sample().encode(KEY, &NONCE);
        assert_eq!(
            CapsuleImage::decode(&bytes, &[6; 32]),
            Err(ImageError::BadMac)
        );
        for cut in [0, 5, 8, 50, 84, bytes.len() / 2, bytes.len() - 1] {
            let e = CapsuleImage::decode(&bytes[..cut], KEY).unwrap_err();
            assert!(
                matches!(e, ImageError::Truncated | ImageError::BadMagic),
                "cut {cut}: {e:?}"
            );
        }
        for at in [0, 9, 100, bytes.len() / 2, bytes.len() - 40] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert!(
                CapsuleImage::decode(&bad, KEY).is_err(),
                "flip at {at} accepted"
            );
        }
        // Changing the body and fixing the digest still fails the MAC.
        let mut forged = bytes.clone();
        forged[HEADER_LEN + 5] ^= 1;
        let end = forged.len() - TRAILER_LEN;
        let digest = sha256(&[&forged[..end]]);
        forged[end..end + 32].copy_from_slice(&digest);
        assert_eq!(CapsuleImage::decode(&forged, KEY), Err(ImageError::BadMac));
        let mut long = bytes.clone();
        long.push(0);
        assert!(CapsuleImage::decode(&long, KEY).is_err());
        assert_eq!(
            CapsuleImage::decode(b"not an image at all, really", KEY),
            Err(ImageError::BadMagic)
        );
    }

    #[test]
    fn transfer_images_skip_the_digest_but_not_the_mac() {
        let s = sample();
        let bytes = s.encode_for_transfer(KEY, &NONCE);
        assert_eq!(CapsuleImage::decode(&bytes, KEY).unwrap(), s);
        // Without a key the missing digest is an error, never a free pass.
        assert_eq!(
            CapsuleImage::decode_unauthenticated(&bytes),
            Err(ImageError::DigestMismatch)
        );
        let mut bad = bytes.clone();
        bad[HEADER_LEN + 3] ^= 1;
        assert_eq!(CapsuleImage::decode(&bad, KEY), Err(ImageError::BadMac));
        // Resealing for a file adds the digest.
        let file = reseal(&bytes, KEY, &[9; 32]).unwrap();
        assert_eq!(CapsuleImage::decode_unauthenticated(&file).unwrap(), s);
    }

    #[test]
    fn future_version_is_refused() {
        let mut bytes = sample().encode(KEY, &NONCE);
        let future = IMAGE_VERSION + 1;
        bytes[8..10].copy_from_slice(&future.to_le_bytes());
        assert_eq!(
            CapsuleImage::decode(&bytes, KEY),
            Err(ImageError::UnsupportedVersion(future))
        );
    }

    #[test]
    fn the_nonce_is_sealed_and_changes_the_mac() {
        let a = sample().encode(KEY, &NONCE);
        let b = sample().encode(KEY, &[0x11; IMAGE_NONCE_LEN]);
        assert_eq!(a.len(), b.len());
        assert_ne!(a[a.len() - MAC_LEN..], b[b.len() - MAC_LEN..]);
        assert!(CapsuleImage::decode(&b, KEY).is_ok());
        let mut swapped = a.clone();
        swapped[NONCE_AT] ^= 1;
        // Digest first: a file-style image reports the corruption.
        assert_eq!(
            CapsuleImage::decode(&swapped, KEY),
            Err(ImageError::DigestMismatch)
        );
        let mut in_flight = sample().encode_for_transfer(KEY, &NONCE);
        in_flight[NONCE_AT] ^= 1;
        assert_eq!(
            CapsuleImage::decode(&in_flight, KEY),
            Err(ImageError::BadMac)
        );
    }

    #[test]
    fn a_body_length_near_the_top_of_u64_is_truncation_not_a_wrap() {
        let mut bytes = sample().encode(KEY, &NONCE);
        bytes[76..84].copy_from_slice(&(u64::MAX - 50).to_le_bytes());
        assert_eq!(
            CapsuleImage::decode(&bytes, KEY),
            Err(ImageError::Truncated)
        );
    }

    #[test]
    fn kind_can_be_peeked() {
        let mut s = sample();
        assert_eq!(peek_kind(&s.encode(KEY, &NONCE)), Some(ImageKind::Full));
        s.kind = ImageKind::Delta;
        assert_eq!(peek_kind(&s.encode(KEY, &NONCE)), Some(ImageKind::Delta));
        assert_eq!(peek_kind(b"not an image at all, not at all"), None);
    }

    #[test]
    fn reseal_moves_between_keys() {
        let bytes = sample().encode(KEY, &NONCE);
        let moved = reseal(&bytes, KEY, &[7; 32]).unwrap();
        assert_eq!(CapsuleImage::decode(&moved, &[7; 32]).unwrap(), sample());
        assert_eq!(CapsuleImage::decode(&moved, KEY), Err(ImageError::BadMac));
        assert_eq!(reseal(&bytes, &[9; 32], &[7; 32]), Err(ImageError::BadMac));
    }

    #[test]
    fn bad_layouts_are_refused() {
        let mut s = sample();
        s.segments[1].offset = 4095;
        assert!(matches!(
            CapsuleImage::decode(&s.encode(KEY, &NONCE), KEY),
            Err(ImageError::Inconsistent(_))
        ));
        let mut s = sample();
        s.segments[1].offset = s.arena_len;
        assert!(matches!(
            CapsuleImage::decode(&s.encode(KEY, &NONCE), KEY),
            Err(ImageError::Inconsistent(_))
        ));
        let mut s = sample();
        s.segments.remove(0);
        assert!(matches!(
            CapsuleImage::decode(&s.encode(KEY, &NONCE), KEY),
            Err(ImageError::Inconsistent(_))
        ));
        let mut s = sample();
        s.arena_len = MAX_ARENA_BYTES + PAGE_SIZE as u64;
        assert!(matches!(
            CapsuleImage::decode(&s.encode(KEY, &NONCE), KEY),
            Err(ImageError::Inconsistent(_))
        ));
    }
}
