//! Regression tests for what the fuzz targets found (docs/fuzzing.md lists
//! each finding with its fix). Each test failed before its fix.

mod fuzzkit;

use capsules_wire::control::*;

const KEY: [u8; 32] = [0x42; 32];

/// Finding 1: the client ignored the protocol version of a response
/// envelope. The version was not covered by the MAC then, so a response
/// whose version was changed on the way was accepted as if nothing had
/// happened. (The MAC now covers it too; the check names the problem.)
#[test]
fn client_refuses_a_response_envelope_of_another_protocol_version() {
    let mut server = ServerSession::new(&KEY, [7; 32]);
    let hello = server.hello(b"build", "vm");
    let mut client = ClientSession::new(&KEY, &hello, [8; 32]).unwrap();
    assert_eq!(server.handle(client.client_hello()), Incoming::Opened);
    let (seq, payload) = client.seal(&Request::Status);
    assert!(matches!(server.handle(&payload), Incoming::Request { .. }));
    let reply = server.reply(seq, &Response::Done);
    assert_eq!(client.open(seq, &reply), Ok(Response::Done));
    let mut env = Envelope::decode(&reply).unwrap();
    env.protocol_version = PROTOCOL_VERSION + 0x40;
    assert_eq!(
        client.open(seq, &env.encode()),
        Err(ClientError::VersionMismatch(PROTOCOL_VERSION + 0x40))
    );
}

/// Finding 2: a capsule list reserved room for its declared count after
/// checking it against 8 bytes per entry, while an entry takes at least 49
/// encoded bytes and 112 in memory: a 8 KB reply made the client reserve
/// 112 KB (14 times its size) before failing. Counts are now checked against
/// the smallest encoding of an entry.
#[test]
fn forged_list_counts_reserve_at_most_a_small_multiple_of_the_input() {
    let mut lists = Vec::new();
    // Capsules (kind 5) and Inspection (kind 12, tasks first): a count that
    // fits the bytes left at the old minimum but not at the real one.
    for (kind, old_min) in [(5u8, 8usize), (12, 16)] {
        let count = 1000u32;
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&count.to_le_bytes());
        bytes.resize(bytes.len() + count as usize * old_min, 0);
        lists.push(bytes);
    }
    for bytes in lists {
        let (decoded, allocated) = fuzzkit::measure(|| Response::decode(&bytes));
        assert!(decoded.is_err());
        assert!(
            allocated <= 4 * bytes.len(),
            "{allocated} bytes allocated for a {}-byte reply of kind {}",
            bytes.len(),
            bytes[0]
        );
    }
}

/// Finding 3: the image layout check added a segment's offset and length
/// without checking for overflow. A segment at offset 2^64 − 4096 panicked a
/// debug build ("attempt to add with overflow") — `capsulectl inspect` reads
/// files with only a digest, which anyone can compute — and a release build
/// wrapped the sum to 0 and accepted a segment far outside the arena.
#[test]
fn an_image_segment_beyond_the_end_of_the_address_space_is_refused() {
    use capsules_wire::image::*;
    let page = PAGE_SIZE as u64;
    for offset in [!(page - 1), !(page - 1) - page] {
        let image = CapsuleImage {
            kind: ImageKind::Delta,
            build_id: vec![1; 20],
            name: "x".into(),
            program: "kv".into(),
            args: vec![],
            locator: core::net::Ipv4Addr::new(198, 18, 0, 1),
            slot: 1,
            memory_limit: 0,
            epoch: 1,
            clock_ns: 0,
            arena_len: 2 * page,
            segments: vec![Segment {
                offset,
                data: vec![0xcc; 2 * PAGE_SIZE],
            }],
            root: 0,
            log_written: 0,
            log_tail: vec![],
            tasks: vec![],
            sockets: vec![],
        };
        let bytes = image.encode(&KEY, &[3; IMAGE_NONCE_LEN]);
        let refused = |r: Result<CapsuleImage, ImageError>| {
            matches!(r, Err(ImageError::Inconsistent("segment placement")))
        };
        assert!(refused(CapsuleImage::decode(&bytes, &KEY)), "{offset:#x}");
        assert!(refused(CapsuleImage::decode_unauthenticated(&bytes)));
    }
}
