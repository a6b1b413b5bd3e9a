//! The checks behind the cargo-fuzz targets (docs/fuzzing.md): the same
//! properties as the bounded runs in `wire/tests/fuzz_*.rs` and
//! `apps/tests/fuzz_*.rs`, driven by libFuzzer's coverage feedback instead of
//! a seeded generator. Each check panics (a libFuzzer crash) when a property
//! fails.

use capsules_apps::{http, kv};
use capsules_wire::bootcfg::BootConfig;
use capsules_wire::control::{
    ClientHello, ClientSession, Envelope, FrameDecoder, Hello, Incoming, Request, Response,
    ServerSession,
};
use capsules_wire::image::{
    CapsuleImage, IMAGE_MAGIC, IMAGE_NONCE_LEN, IMAGE_VERSION, ImageKind, MAX_ARENA_BYTES,
    PAGE_SIZE, peek_build_id, peek_kind, reseal, seal,
};

pub const KEY: [u8; 32] = [0x42; 32];
pub const OTHER_KEY: [u8; 32] = [0xa5; 32];
pub const SERVER_NONCE: [u8; 32] = [9; 32];
pub const CLIENT_NONCE: [u8; 32] = [0xc1; 32];

/// Image header layout (docs/image-format.md).
pub const HEADER_LEN: usize = 100;
pub const BODY_LEN_AT: usize = 76;
pub const NONCE_AT: usize = 84;
pub const TRAILER_LEN: usize = 48;

pub fn check_request(data: &[u8]) {
    if let Ok(request) = Request::decode(data) {
        let again = request.encode();
        assert_eq!(again, data, "accepted request is not canonical");
        assert_eq!(Request::decode(&again), Ok(request));
    }
}

pub fn check_response(data: &[u8]) {
    if let Ok(response) = Response::decode(data) {
        let again = response.encode();
        assert_eq!(again, data, "accepted response is not canonical");
        assert_eq!(Response::decode(&again), Ok(response));
    }
}

/// A byte stream into a server session (cut where `data[0]` says), the
/// client-side decoders on every frame, and each frame once more as a
/// request body sealed with the session key.
pub fn check_control_stream(data: &[u8]) {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let _ = Hello::decode(stream);
    let _ = ClientHello::decode(stream);
    let mut server = ServerSession::new(&KEY, SERVER_NONCE);
    let hello = server.hello(b"build", "vm");
    let mut client = ClientSession::new(&KEY, &hello, CLIENT_NONCE).expect("own hello");
    if cut & 1 == 0 {
        assert_eq!(server.handle(client.client_hello()), Incoming::Opened);
    }
    let step = usize::from(cut >> 1).max(1);
    let mut decoder = FrameDecoder::new();
    for piece in stream.chunks(step) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let _ = Envelope::decode(&frame);
                    let _ = client.open(1, &frame);
                    match server.handle(&frame) {
                        Incoming::Request { .. } => panic!("a forged request was accepted"),
                        Incoming::Opened => panic!("a forged client hello was accepted"),
                        _ => {}
                    }
                    if server.is_open() {
                        let (seq, payload) = client.seal_body(frame.clone());
                        match (server.handle(&payload), Request::decode(&frame)) {
                            (Incoming::Request { seq: s, request }, Ok(decoded)) => {
                                assert_eq!((s, request), (seq, decoded))
                            }
                            (Incoming::Refused { reply, .. }, Err(_)) => {
                                assert!(client.open(seq, &reply).is_ok())
                            }
                            (outcome, decoded) => {
                                panic!("session and decoder disagree: {outcome:?} vs {decoded:?}")
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// Seals `header` and `body` with `key` as the encoder does.
pub fn seal_image(header: &[u8], body: &[u8], key: &[u8], with_digest: bool) -> Vec<u8> {
    let mut content = header.to_vec();
    content.extend_from_slice(body);
    seal(content, key, with_digest)
}

/// A valid image header for a body of `body_len` bytes.
pub fn image_header(body_len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&IMAGE_MAGIC);
    h.extend_from_slice(&IMAGE_VERSION.to_le_bytes());
    h.extend_from_slice(&20u16.to_le_bytes());
    h.extend_from_slice(&[0xab; 20]);
    h.extend_from_slice(&[0; 44]);
    h.extend_from_slice(&(body_len as u64).to_le_bytes());
    h.extend_from_slice(&[0x6e; IMAGE_NONCE_LEN]);
    assert_eq!(h.len(), HEADER_LEN);
    h
}

/// What a restore will map must lie inside the arena.
pub fn check_sound(image: &CapsuleImage) {
    let page = PAGE_SIZE as u128;
    let arena = u128::from(image.arena_len);
    assert!(arena > 0 && arena <= u128::from(MAX_ARENA_BYTES) && arena % page == 0);
    let mut end = 0u128;
    for seg in &image.segments {
        let (offset, len) = (u128::from(seg.offset), seg.data.len() as u128);
        assert!(offset % page == 0 && len % page == 0 && len > 0);
        assert!(
            offset >= end && offset + len <= arena,
            "segment outside the arena"
        );
        end = offset + len;
    }
    if image.kind == ImageKind::Full {
        assert_eq!(image.segments.first().map(|s| s.offset), Some(0));
    }
}

/// `data[0]` picks digest or not; the rest is an image body, sealed with the
/// key so that the body decoder behind the MAC sees it.
pub fn check_sealed_image_body(data: &[u8]) {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let with_digest = flags & 1 == 1;
    let bytes = seal_image(&image_header(body.len()), body, &KEY, with_digest);
    let decoded = CapsuleImage::decode(&bytes, &KEY);
    let unauthenticated = CapsuleImage::decode_unauthenticated(&bytes);
    if with_digest {
        assert_eq!(decoded.is_ok(), unauthenticated.is_ok());
    }
    if let Ok(image) = &decoded {
        check_sound(image);
        let again = if with_digest {
            image.encode(&KEY, &[0x6e; IMAGE_NONCE_LEN])
        } else {
            image.encode_for_transfer(&KEY, &[0x6e; IMAGE_NONCE_LEN])
        };
        assert_eq!(again, bytes, "accepted image is not canonical");
        let moved = reseal(&bytes, &KEY, &OTHER_KEY).expect("reseal");
        assert_eq!(CapsuleImage::decode(&moved, &OTHER_KEY).as_ref(), Ok(image));
    }
}

/// Raw bytes as an image file: the seal must hold.
pub fn check_image_bytes(data: &[u8]) {
    let _ = peek_kind(data);
    let _ = peek_build_id(data);
    if let Ok(image) = CapsuleImage::decode(data, &KEY) {
        check_sound(&image);
    }
    if let Ok(image) = CapsuleImage::decode_unauthenticated(data) {
        check_sound(&image);
    }
    let _ = reseal(data, &KEY, &OTHER_KEY);
}

pub fn check_bootcfg(data: &[u8]) {
    let Ok(line) = core::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = BootConfig::parse(line) {
        let rendered = cfg.to_cmdline();
        assert_eq!(
            BootConfig::parse(&rendered).as_ref(),
            Ok(&cfg),
            "{rendered}"
        );
    }
}

/// Cut points from the first bytes of the input: replies must not depend on them.
fn cuts(selector: &[u8], len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = selector
        .iter()
        .map(|&b| usize::from(b) * len / 256)
        .collect();
    cuts.push(len);
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

fn kv_run(stream: &[u8], cuts: &[usize]) -> (Vec<u8>, bool) {
    let info = kv::ServerInfo {
        capsule: "cache",
        locator: "198.18.0.7",
        vm: "vm1",
        uptime_ms: 65_000,
        connected_clients: 1,
        total_commands: 0,
    };
    let mut store = kv::Store::new();
    let mut session = kv::Session::new();
    let mut out = Vec::new();
    let mut from = 0;
    for &to in cuts {
        let info = kv::ServerInfo {
            total_commands: session.commands_executed(),
            ..info
        };
        let flow = session.feed(&stream[from..to], &mut store, 1_000_000, &info, &mut out);
        from = to;
        if flow == kv::Flow::Close {
            return (out, true);
        }
    }
    (out, false)
}

pub fn check_kv(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (selector, stream) = data.split_at(4);
    let whole = kv_run(stream, &[stream.len()]);
    let pieces = kv_run(stream, &cuts(selector, stream.len()));
    assert_eq!(whole, pieces, "replies depend on how the stream was cut");
}

fn http_run(stream: &[u8], cuts: &[usize]) -> Option<(Vec<u8>, bool)> {
    let site = http::SiteInfo {
        capsule: "web",
        locator: "198.18.0.9",
        vm: "vm2",
        uptime_ms: 12_345,
        requests_served: 0,
    };
    let mut session = http::Session::new();
    let mut wire = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut from = 0;
    for &to in cuts {
        let info = http::SiteInfo {
            requests_served: session.requests_served(),
            ..site
        };
        let mut flow = session.feed(&stream[from..to], &info, &mut wire);
        from = to;
        loop {
            if session.pending_body() > 1 << 20 {
                return None;
            }
            while session.pending_body() > 0 {
                let n = session.fill_body(&mut chunk);
                assert!(n > 0);
                wire.extend_from_slice(&chunk[..n]);
            }
            if flow == http::Flow::Close || !session.needs_feed() {
                break;
            }
            let info = http::SiteInfo {
                requests_served: session.requests_served(),
                ..site
            };
            flow = session.feed(&[], &info, &mut wire);
        }
        if flow == http::Flow::Close {
            return Some((wire, true));
        }
    }
    Some((wire, false))
}

pub fn check_http(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (selector, stream) = data.split_at(4);
    let (Some(whole), Some(pieces)) = (
        http_run(stream, &[stream.len()]),
        http_run(stream, &cuts(selector, stream.len())),
    ) else {
        return;
    };
    assert_eq!(whole, pieces, "output depends on how the stream was cut");
}
