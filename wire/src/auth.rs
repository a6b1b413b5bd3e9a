//! Keys and message authentication.
//!
//! **Keys.** Each lab has one random *cluster key* (16–64 bytes). Nothing is
//! authenticated with it directly: HMAC-SHA256 of the cluster key over a
//! purpose label gives one key per purpose, the *control key* (label
//! `"capsules control v1"`) and the *image key* (`"capsules image v1"`), so a
//! MAC made for an image can never pass for a control message or the other
//! way round ([`control_key`], [`image_key`]).
//!
//! **Control sessions** (protocol version 3, docs/control-protocol.md). Both
//! ends contribute a 32-byte nonce: the server in its hello, the client in its
//! client hello. The *session key* is HMAC-SHA256 of the control key over a
//! label and the SHA-256 of both hellos ([`transcript_hash`],
//! [`session_key`]), so it is new in every connection even if one side's
//! nonce repeats, and it authenticates the server's hello (build id, VM name)
//! along with everything after it. The client proves that it holds the key
//! with a tag over nothing but the session key ([`client_hello_tag`]).
//!
//! Every request and response is MACed with Poly1305 under a one-time key:
//! HMAC-SHA256 of the session key over the direction's label, the protocol
//! version and the sequence number, and for a response also the tag of the
//! request it answers ([`message_tag`]). A response therefore verifies only
//! in its own session, for its own sequence number and for the very request
//! it answers. HMAC only ever hashes a few dozen bytes; the body (image chunks
//! of 60 KiB) goes through Poly1305, which costs about a fifth of SHA-256's
//! instructions per byte: under emulation that is most of a migration's pause.

use hmac::{Hmac, Mac};
use poly1305::Poly1305;
use poly1305::universal_hash::KeyInit;
use sha2::{Digest, Sha256};

pub const MAC_LEN: usize = 16;
pub const NONCE_LEN: usize = 32;
/// Length of every derived key (control, image, session, one-time).
pub const KEY_LEN: usize = 32;
/// Cluster keys are between these many bytes long.
pub const MIN_CLUSTER_KEY_LEN: usize = 16;
pub const MAX_CLUSTER_KEY_LEN: usize = 64;

pub type Tag = [u8; MAC_LEN];
pub type Nonce = [u8; NONCE_LEN];
pub type Key = [u8; KEY_LEN];

/// Label of the control key derived from the cluster key.
pub const CONTROL_KEY_LABEL: &[u8] = b"capsules control v1";
/// Label of the image key derived from the cluster key.
pub const IMAGE_KEY_LABEL: &[u8] = b"capsules image v1";

const HANDSHAKE_LABEL: &[u8] = b"CPSL-HANDSHAKE";
const SESSION_LABEL: &[u8] = b"CPSL-SESSION";
const CLIENT_HELLO_LABEL: &[u8] = b"CPSL-CLIENT-HELLO";
const REQUEST_LABEL: &[u8] = b"CPSL-REQ";
const RESPONSE_LABEL: &[u8] = b"CPSL-RSP";

/// Which direction a MAC covers. A response is bound to the request it
/// answers through that request's tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response { request_tag: Tag },
}

fn keyed(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// HMAC-SHA256 of `key` over `parts`: a one-time Poly1305 key when the parts
/// are never the same twice under one key.
pub fn derive_key(key: &[u8], parts: &[&[u8]]) -> Key {
    let mut mac = keyed(key);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The key that authenticates control sessions, from the cluster key.
pub fn control_key(cluster_key: &[u8]) -> Key {
    derive_key(cluster_key, &[CONTROL_KEY_LABEL])
}

/// The key that seals capsule images in a lab, from the cluster key.
pub fn image_key(cluster_key: &[u8]) -> Key {
    derive_key(cluster_key, &[IMAGE_KEY_LABEL])
}

/// SHA-256 over the handshake: a label, the server hello's length (`u32`
/// LE) and payload, then the client hello without its tag.
pub fn transcript_hash(server_hello: &[u8], client_hello_fields: &[u8]) -> [u8; 32] {
    sha256(&[
        HANDSHAKE_LABEL,
        &(server_hello.len() as u32).to_le_bytes(),
        server_hello,
        client_hello_fields,
    ])
}

/// The key of one control session: HMAC-SHA256 of the control key over a
/// label and the handshake's transcript hash.
pub fn session_key(control_key: &Key, transcript: &[u8; 32]) -> Key {
    derive_key(control_key, &[SESSION_LABEL, transcript])
}

/// The client hello's tag: the first 16 bytes of HMAC-SHA256 of the session
/// key over a label. Only a holder of the control key can compute it, and
/// only for this handshake.
pub fn client_hello_tag(session_key: &Key) -> Tag {
    let full = derive_key(session_key, &[CLIENT_HELLO_LABEL]);
    let mut tag = [0u8; MAC_LEN];
    tag.copy_from_slice(&full[..MAC_LEN]);
    tag
}

/// Poly1305 of `data` under a one-time key from [`derive_key`].
pub fn one_time_tag(one_time_key: &[u8; 32], data: &[&[u8]]) -> Tag {
    // Poly1305 takes whole 16-byte blocks until the last; feed it through a
    // small buffer so that the parts may have any length.
    use poly1305::universal_hash::UniversalHash;
    let mut poly = Poly1305::new(one_time_key.into());
    let mut pending = [0u8; 16];
    let mut filled = 0;
    for part in data {
        let mut part: &[u8] = part;
        if filled > 0 {
            let take = (16 - filled).min(part.len());
            pending[filled..filled + take].copy_from_slice(&part[..take]);
            filled += take;
            part = &part[take..];
            if filled < 16 {
                continue;
            }
            poly.update(&[pending.into()]);
        }
        let whole = part.len() / 16 * 16;
        let (blocks, rest) = part.split_at(whole);
        // A few blocks at a time through a small array: the hash wants
        // `Block`s, and copying 256 bytes costs little next to hashing them.
        let mut group = [poly1305::Block::default(); 16];
        for chunk in blocks.chunks(group.len() * 16) {
            let n = chunk.len() / 16;
            for (block, bytes) in group.iter_mut().zip(chunk.chunks_exact(16)) {
                block.copy_from_slice(bytes);
            }
            poly.update(&group[..n]);
        }
        pending[..rest.len()].copy_from_slice(rest);
        filled = rest.len();
    }
    poly.compute_unpadded(&pending[..filled]).into()
}

/// Compares two tags in time independent of where they differ.
pub fn tags_equal(a: &Tag, b: &Tag) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The one-time key of one message: HMAC-SHA256 of the session key over
/// the direction's label, the protocol version (`u16` LE), the sequence
/// number (`u64` LE) and, for a response, the request's tag.
fn message_key(session_key: &Key, dir: &Direction, version: u16, seq: u64) -> Key {
    let (version, seq) = (version.to_le_bytes(), seq.to_le_bytes());
    match dir {
        Direction::Request => derive_key(session_key, &[REQUEST_LABEL, &version, &seq]),
        Direction::Response { request_tag } => {
            derive_key(session_key, &[RESPONSE_LABEL, &version, &seq, request_tag])
        }
    }
}

/// Computes the MAC of one message of a session.
pub fn message_tag(session_key: &Key, dir: &Direction, version: u16, seq: u64, body: &[u8]) -> Tag {
    one_time_tag(&message_key(session_key, dir, version, seq), &[body])
}

/// Checks a MAC in constant time.
pub fn verify_tag(
    session_key: &Key,
    dir: &Direction,
    version: u16,
    seq: u64,
    body: &[u8],
    tag: &Tag,
) -> bool {
    tags_equal(&message_tag(session_key, dir, version, seq, body), tag)
}

/// Plain SHA-256, for callers that need a digest (nonce mixing, build ids).
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut mac = keyed(b"Jefe");
        mac.update(b"what do ya want for nothing?");
        let out: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(
            crate::bootcfg::encode_hex(&out),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn poly1305_matches_rfc8439_section_2_5_2() {
        let key: [u8; 32] = [
            0x85, 0xd6, 0xbe, 0x78, 0x57, 0x55, 0x6d, 0x33, 0x7f, 0x44, 0x52, 0xfe, 0x42, 0xd5,
            0x06, 0xa8, 0x01, 0x03, 0x80, 0x8a, 0xfb, 0x0d, 0xb2, 0xfd, 0x4a, 0xbf, 0xf6, 0xaf,
            0x41, 0x49, 0xf5, 0x1b,
        ];
        let tag = one_time_tag(&key, &[b"Cryptographic Forum Research Group"]);
        assert_eq!(
            crate::bootcfg::encode_hex(&tag),
            "a8061dc1305136c6c22b8baf0c0127a9"
        );
    }

    #[test]
    fn one_time_tag_ignores_how_the_data_is_split() {
        let data: alloc::vec::Vec<u8> = (0..200u32).map(|i| (i * 7) as u8).collect();
        let key = [3u8; 32];
        let whole = one_time_tag(&key, &[&data]);
        for cut in [0, 1, 15, 16, 17, 31, 100, 199, 200] {
            let (a, b) = data.split_at(cut);
            assert_eq!(one_time_tag(&key, &[a, b]), whole, "split at {cut}");
            let (b1, b2) = b.split_at(b.len() / 2);
            assert_eq!(
                one_time_tag(&key, &[a, b1, b2]),
                whole,
                "three parts at {cut}"
            );
        }
        assert_ne!(one_time_tag(&key, &[&data[1..]]), whole);
    }

    #[test]
    fn tag_depends_on_every_input() {
        let key = [7u8; 32];
        let req = Direction::Request;
        let base = message_tag(&key, &req, 3, 1, b"body");
        assert!(verify_tag(&key, &req, 3, 1, b"body", &base));
        let rsp = |t: u8| Direction::Response {
            request_tag: [t; MAC_LEN],
        };
        let answer = message_tag(&key, &rsp(1), 3, 1, b"body");
        assert!(verify_tag(&key, &rsp(1), 3, 1, b"body", &answer));
        let changed: [(&Key, Direction, u16, u64, &[u8]); 8] = [
            (&[8u8; 32], req, 3, 1, b"body"),
            (&key, rsp(1), 3, 1, b"body"),
            (&key, req, 4, 1, b"body"),
            (&key, req, 3, 2, b"body"),
            (&key, req, 3, 1, b"bodz"),
            (&key, req, 3, 1 << 32, b"body"),
            (&key, req, 3, 1, b""),
            (&key, req, 0x0103, 0, b"body"),
        ];
        for (k, dir, version, seq, body) in changed {
            assert!(
                !verify_tag(k, &dir, version, seq, body, &base),
                "{dir:?} {version} {seq} verified"
            );
        }
        // A response verifies only for the request it answers.
        assert!(!verify_tag(&key, &rsp(2), 3, 1, b"body", &answer));
        assert!(!verify_tag(&key, &req, 3, 1, b"body", &answer));
    }

    #[test]
    fn purpose_keys_differ_from_each_other_and_from_the_cluster_key() {
        let cluster = [0x11u8; 32];
        let control = control_key(&cluster);
        let image = image_key(&cluster);
        assert_ne!(control, image);
        assert_ne!(control, cluster);
        assert_ne!(image, cluster);
        // Deterministic, and HMAC-SHA256 of the cluster key over the label.
        assert_eq!(control, control_key(&cluster));
        assert_eq!(control, derive_key(&cluster, &[b"capsules control v1"]));
        assert_eq!(image, derive_key(&cluster, &[b"capsules image v1"]));
        // Another cluster key gives other keys.
        assert_ne!(control_key(&[0x12u8; 32]), control);
        assert_ne!(image_key(&[0x12u8; 32]), image);
        // Known values (Python's hmac module), pinned so that the labels
        // never change unnoticed: kernel and host must derive alike.
        assert_eq!(
            crate::bootcfg::encode_hex(&control_key(&[0u8; 32])),
            "bb388b1f4deb5f7f02b2407134d2c159e68000c92c609b060cf51da70458e512"
        );
        assert_eq!(
            crate::bootcfg::encode_hex(&image_key(&[0u8; 32])),
            "52557a323c14a3a3fe41e6e303697bc7fc7e7c5124429c821a3613eaa1a7af32"
        );
    }

    #[test]
    fn session_keys_depend_on_both_hellos() {
        let control = control_key(&[3u8; 32]);
        let server_hello = b"CPSL server hello with nonce A";
        let client_fields = b"CPSC client fields with nonce B";
        let t = transcript_hash(server_hello, client_fields);
        let k = session_key(&control, &t);
        assert_ne!(
            session_key(
                &control,
                &transcript_hash(b"CPSL server hello with nonce X", client_fields)
            ),
            k
        );
        assert_ne!(
            session_key(
                &control,
                &transcript_hash(server_hello, b"CPSC client fields with nonce Y")
            ),
            k
        );
        assert_ne!(session_key(&control_key(&[4u8; 32]), &t), k);
        // Moving a byte from one hello to the other changes the transcript.
        assert_ne!(transcript_hash(b"ab", b"c"), transcript_hash(b"a", b"bc"));
        assert_ne!(client_hello_tag(&k), client_hello_tag(&[0u8; 32]));
        assert_eq!(
            client_hello_tag(&k)[..],
            derive_key(&k, &[b"CPSL-CLIENT-HELLO"])[..16]
        );
    }
}
