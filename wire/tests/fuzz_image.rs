//! Bounded, seeded fuzzing of capsule images (docs/fuzzing.md, image format in
//! docs/image-format.md): the seal check (magic, version, lengths, digest,
//! MAC), the body decoder and its layout check, `reseal` and the peeks.
//!
//! Images come from the real encoder, then are changed two ways: as bytes
//! (the seal must refuse every change), and structure-aware, by changing the
//! body or header fields and sealing the result again with the key, so that
//! the body decoder behind the MAC sees hostile bodies too.
//!
//! Properties: no input panics; every generated image round-trips (with and
//! without digest, after `reseal`); an image with any single byte changed is
//! refused; whatever is accepted has a sound layout (segments aligned,
//! ordered, inside the arena) and re-encodes to an image that decodes equal;
//! decoding allocates at most a small multiple of the image.

mod fuzzkit;
mod wiregen;

use capsules_wire::image::*;
use fuzzkit::{Rng, Stats, assert_bounded, guarded, inputs, measure, mutate};
use wiregen::{gen_image, gen_nonce};

const KEY: &[u8] = &[0x5a; 32];
const OTHER_KEY: &[u8] = &[0xa5; 32];

/// Header layout (docs/image-format.md): magic 8, version 2, build id length
/// 2, build id room 64, body length 8, nonce 16; trailer: SHA-256, MAC.
const HEADER_LEN: usize = 100;
const ID_LEN_AT: usize = 10;
const BODY_LEN_AT: usize = 76;
const NONCE_AT: usize = 84;
const TRAILER_LEN: usize = 32 + 16;

const ALLOC_FACTOR: usize = 8;
const SLACK: usize = 4096;

const DICTIONARY: &[&[u8]] = &[
    b"CPSLIMG\0",
    &[3, 0],
    &[0, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0xff],
    &[0, 0x10, 0, 0],
    &[0, 0xf0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0, 0, 0, 0x40, 0, 0, 0, 0],
    &[0, 1, 2],
];

/// Sets one field of a valid image to a value outside what the encoder
/// would ever be given: the layout check has to refuse it without tripping.
fn make_hostile(rng: &mut Rng, image: &mut CapsuleImage) {
    let page = PAGE_SIZE as u64;
    let edge = |rng: &mut Rng, arena: u64| -> u64 {
        match rng.below(7) {
            0 => !(page - 1),
            1 => !(page - 1) - page * rng.below(4) as u64,
            2 => 1 << 63,
            3 => arena,
            4 => arena.wrapping_sub(page),
            5 => MAX_ARENA_BYTES,
            _ => rng.interesting_u64(),
        }
    };
    let arena = image.arena_len;
    match rng.below(6) {
        0 => image.arena_len = edge(rng, arena),
        1 | 2 => {
            if image.segments.is_empty() {
                image.segments.push(Segment {
                    offset: 0,
                    data: vec![1; PAGE_SIZE],
                });
            }
            let i = rng.below(image.segments.len());
            image.segments[i].offset = edge(rng, arena);
        }
        3 => {
            if let Some(seg) = image.segments.last_mut() {
                let len = seg.data.len();
                seg.data.resize(
                    match rng.below(3) {
                        0 => 0,
                        1 => len + 1 + rng.below(PAGE_SIZE - 1),
                        _ => len + PAGE_SIZE * (1 + rng.below(3)),
                    },
                    7,
                );
            }
        }
        4 => {
            // Overlapping or reordered runs.
            if let Some(seg) = image.segments.first().cloned() {
                let at = rng.below(image.segments.len() + 1);
                image.segments.insert(at, seg);
            }
        }
        _ => image.kind = *rng.pick(&[ImageKind::Full, ImageKind::Base, ImageKind::Delta]),
    }
}

/// Seals `header` (its body length field as given) and `body` with `key`,
/// as the encoder does: SHA-256 (or zeros) and the MAC over both.
fn seal(header: &[u8], body: &[u8], key: &[u8], with_digest: bool) -> Vec<u8> {
    let mut content = header.to_vec();
    content.extend_from_slice(body);
    capsules_wire::image::seal(content, key, with_digest)
}

/// Checks an accepted image on its own terms, without trusting the
/// decoder's layout check: what a restore will map must be inside the arena.
fn check_sound(image: &CapsuleImage) {
    let page = PAGE_SIZE as u128;
    let arena = u128::from(image.arena_len);
    assert!(
        arena > 0 && arena <= u128::from(MAX_ARENA_BYTES) && arena % page == 0,
        "accepted arena length {}",
        image.arena_len
    );
    assert!(image.build_id.len() <= 64);
    let mut end = 0u128;
    for seg in &image.segments {
        let (offset, len) = (u128::from(seg.offset), seg.data.len() as u128);
        assert!(
            offset % page == 0 && len % page == 0 && len > 0,
            "accepted segment at {:#x} of {len} bytes",
            seg.offset
        );
        assert!(
            offset >= end && offset + len <= arena,
            "accepted segment at {:#x} of {len} bytes in an arena of {:#x}",
            seg.offset,
            image.arena_len
        );
        end = offset + len;
    }
    if image.kind == ImageKind::Full {
        assert_eq!(image.segments.first().map(|s| s.offset), Some(0));
    }
}

/// Decodes `bytes` every way there is and checks what is accepted.
/// `expected`: the only image the bytes may decode to (when they were not
/// sealed again after a change), or `None` for resealed hostile images.
fn check_decoders(
    target: &str,
    bytes: &[u8],
    expected: Option<&CapsuleImage>,
    with_digest: bool,
) -> bool {
    let _ = peek_kind(bytes);
    let _ = peek_build_id(bytes);
    let (decoded, allocated) = measure(|| CapsuleImage::decode(bytes, KEY));
    assert_bounded(target, bytes, allocated, ALLOC_FACTOR, SLACK);
    let (unauthenticated, allocated) = measure(|| CapsuleImage::decode_unauthenticated(bytes));
    assert_bounded(target, bytes, allocated, ALLOC_FACTOR, SLACK);
    let resealed = reseal(bytes, KEY, OTHER_KEY);
    if decoded.is_ok() {
        assert!(resealed.is_ok(), "a decodable image could not be resealed");
    }
    for image in [&decoded, &unauthenticated].into_iter().flatten() {
        check_sound(image);
        if let Some(expected) = expected {
            assert_eq!(image, expected, "a changed image decoded to something else");
        }
        // It re-encodes to an image that decodes equal, with the same body.
        let nonce: ImageNonce = bytes[NONCE_AT..NONCE_AT + IMAGE_NONCE_LEN]
            .try_into()
            .unwrap();
        let again = if with_digest {
            image.encode(KEY, &nonce)
        } else {
            image.encode_for_transfer(KEY, &nonce)
        };
        assert_eq!(
            again[HEADER_LEN..again.len() - TRAILER_LEN],
            bytes[HEADER_LEN..bytes.len() - TRAILER_LEN],
            "accepted body is not canonical"
        );
        assert_eq!(CapsuleImage::decode(&again, KEY).as_ref(), Ok(image));
    }
    if let Ok(moved) = resealed {
        assert_eq!(
            CapsuleImage::decode(&moved, OTHER_KEY).ok(),
            decoded.clone().ok()
        );
    }
    decoded.is_ok() || unauthenticated.is_ok()
}

#[test]
fn fuzz_image_decoding() {
    let target = "image";
    let mut rng = Rng::for_target(target);
    let mut stats = Stats::new(target);
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for _ in 0..inputs(60_000) {
        let image = gen_image(&mut rng);
        let nonce = gen_nonce(&mut rng);
        let with_digest = rng.chance(1, 2);
        let bytes = if with_digest {
            image.encode(KEY, &nonce)
        } else {
            image.encode_for_transfer(KEY, &nonce)
        };
        let body_range = HEADER_LEN..bytes.len() - TRAILER_LEN;
        bodies.push(bytes[body_range.clone()].to_vec());
        if bodies.len() > 32 {
            bodies.swap_remove(rng.below(32));
        }
        match rng.below(5) {
            // The round trip, every way.
            0 => {
                assert_eq!(CapsuleImage::decode(&bytes, KEY).as_ref(), Ok(&image));
                if with_digest {
                    assert_eq!(
                        CapsuleImage::decode_unauthenticated(&bytes).as_ref(),
                        Ok(&image)
                    );
                }
                let moved = reseal(&bytes, KEY, OTHER_KEY).unwrap();
                assert_eq!(CapsuleImage::decode(&moved, OTHER_KEY), Ok(image));
                stats.input(true);
            }
            // Bytes changed after sealing: only the original may come out.
            1 => {
                let changed = mutate(&mut rng, &bytes, DICTIONARY, &bodies);
                let accepted = guarded(target, &changed, || {
                    check_decoders(target, &changed, Some(&image), with_digest)
                });
                if changed != bytes {
                    assert!(
                        CapsuleImage::decode(&changed, KEY).is_err(),
                        "a changed image passed the seal: {}",
                        fuzzkit::hex(&changed)
                    );
                }
                stats.input(accepted);
            }
            // A field set to a hostile value by the real encoder.
            2 => {
                let mut hostile = image.clone();
                make_hostile(&mut rng, &mut hostile);
                let sealed = if with_digest {
                    hostile.encode(KEY, &nonce)
                } else {
                    hostile.encode_for_transfer(KEY, &nonce)
                };
                let accepted = guarded(target, &sealed, || {
                    check_decoders(target, &sealed, None, with_digest)
                });
                stats.input(accepted);
            }
            // A hostile body (or header) sealed with the key: the decoder
            // behind the MAC must hold.
            _ => {
                let mut header = bytes[..HEADER_LEN].to_vec();
                let body = mutate(&mut rng, &bytes[body_range], DICTIONARY, &bodies);
                header[BODY_LEN_AT..NONCE_AT].copy_from_slice(&(body.len() as u64).to_le_bytes());
                if rng.chance(1, 8) {
                    // The header's own fields: id length, version, padding.
                    let mut changed = mutate(&mut rng, &header, DICTIONARY, &[]);
                    changed.resize(HEADER_LEN, 0);
                    changed[..8].copy_from_slice(&header[..8]);
                    if rng.chance(1, 2) {
                        changed[BODY_LEN_AT..NONCE_AT]
                            .copy_from_slice(&header[BODY_LEN_AT..NONCE_AT]);
                    }
                    header = changed;
                } else if rng.chance(1, 8) {
                    header[ID_LEN_AT..ID_LEN_AT + 2]
                        .copy_from_slice(&(rng.below(80) as u16).to_le_bytes());
                }
                let sealed = seal(&header, &body, KEY, with_digest);
                let accepted = guarded(target, &sealed, || {
                    check_decoders(target, &sealed, None, with_digest)
                });
                stats.input(accepted);
            }
        }
    }
}

/// Every single byte of a sealed image, changed to any other value, makes
/// the image refused: the framing catches the header fields, the digest or
/// the MAC everything else.
#[test]
fn fuzz_image_single_byte_changes_are_refused() {
    let target = "image-single-byte";
    let mut rng = Rng::for_target(target);
    let mut stats = Stats::new(target);
    let total = inputs(100_000);
    while (stats.inputs as usize) < total {
        let mut image = gen_image(&mut rng);
        // Small images, so that every position of many images is tried.
        image.segments.truncate(1);
        image.args.truncate(2);
        if let Some(seg) = image.segments.first_mut() {
            seg.data.truncate(PAGE_SIZE);
            image.arena_len = image.arena_len.max(seg.offset + PAGE_SIZE as u64);
        }
        let nonce = gen_nonce(&mut rng);
        let with_digest = rng.chance(1, 2);
        let bytes = if with_digest {
            image.encode(KEY, &nonce)
        } else {
            image.encode_for_transfer(KEY, &nonce)
        };
        assert_eq!(CapsuleImage::decode(&bytes, KEY).as_ref(), Ok(&image));
        let len = bytes.len();
        // Every position of the header, the trailer and up to 256 of the
        // body's; in the segment data, a sample.
        let positions: Vec<usize> = (0..len)
            .filter(|&at| at < HEADER_LEN + 256 || at >= len - TRAILER_LEN || rng.chance(1, 32))
            .collect();
        for at in positions {
            let mut changed = bytes.clone();
            changed[at] ^= 1 + rng.below(255) as u8;
            let result = guarded(target, &changed, || CapsuleImage::decode(&changed, KEY));
            let e = match result {
                Ok(_) => panic!(
                    "image with byte {at} of {len} changed was accepted: {}",
                    fuzzkit::hex(&changed)
                ),
                Err(e) => e,
            };
            let sealed_content = (ID_LEN_AT + 2..BODY_LEN_AT).contains(&at)
                || (NONCE_AT..len - TRAILER_LEN).contains(&at);
            if sealed_content {
                assert!(
                    matches!(e, ImageError::BadMac | ImageError::DigestMismatch),
                    "byte {at}: {e:?}"
                );
            }
            if at >= len - TRAILER_LEN + 32 {
                assert_eq!(e, ImageError::BadMac, "byte {at} (MAC)");
            }
            stats.input(false);
        }
    }
}
