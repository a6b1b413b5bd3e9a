//! Message authentication with the cluster key.
//!
//! Every control request and response carries a MAC over a domain label (so a
//! response can never be replayed as a request), the session nonce chosen by
//! the server (so a message from one session is worthless in another), the
//! sequence number (so a message cannot be replayed within its session) and the
//! message body.
//!
//! The MAC is Poly1305 under a one-time key: HMAC-SHA256 of the cluster key
//! over label, nonce and sequence number gives a different 32-byte key for
//! every message, and Poly1305 under that key covers the body. HMAC then only
//! ever hashes a few dozen bytes, and the bulk (image chunks of 60 KiB) goes
//! through Poly1305, which costs about a fifth of SHA-256's instructions per
//! byte: under emulation that is most of a migration's pause.

use hmac::{Hmac, Mac};
use poly1305::Poly1305;
use poly1305::universal_hash::KeyInit;
use sha2::{Digest, Sha256};

pub const MAC_LEN: usize = 16;
pub const NONCE_LEN: usize = 32;

pub type Tag = [u8; MAC_LEN];
pub type Nonce = [u8; NONCE_LEN];

/// Which direction a MAC covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

impl Direction {
    fn label(self) -> &'static [u8] {
        match self {
            Direction::Request => b"CPSL-REQ",
            Direction::Response => b"CPSL-RSP",
        }
    }
}

fn keyed(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// HMAC-SHA256 of `key` over `parts`: a one-time Poly1305 key when the parts
/// are never the same twice under one key.
pub fn derive_key(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = keyed(key);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
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

/// Computes the MAC of one message.
pub fn message_tag(key: &[u8], dir: Direction, nonce: &Nonce, seq: u64, body: &[u8]) -> Tag {
    let one_time = derive_key(key, &[dir.label(), nonce, &seq.to_le_bytes()]);
    one_time_tag(&one_time, &[body])
}

/// Checks a MAC in constant time.
pub fn verify_tag(
    key: &[u8],
    dir: Direction,
    nonce: &Nonce,
    seq: u64,
    body: &[u8],
    tag: &Tag,
) -> bool {
    tags_equal(&message_tag(key, dir, nonce, seq, body), tag)
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
        let nonce = [1u8; 32];
        let base = message_tag(&key, Direction::Request, &nonce, 1, b"body");
        assert!(verify_tag(
            &key,
            Direction::Request,
            &nonce,
            1,
            b"body",
            &base
        ));
        assert!(!verify_tag(
            &[8u8; 32],
            Direction::Request,
            &nonce,
            1,
            b"body",
            &base
        ));
        assert!(!verify_tag(
            &key,
            Direction::Response,
            &nonce,
            1,
            b"body",
            &base
        ));
        assert!(!verify_tag(
            &key,
            Direction::Request,
            &[2u8; 32],
            1,
            b"body",
            &base
        ));
        assert!(!verify_tag(
            &key,
            Direction::Request,
            &nonce,
            2,
            b"body",
            &base
        ));
        assert!(!verify_tag(
            &key,
            Direction::Request,
            &nonce,
            1,
            b"bodz",
            &base
        ));
    }
}
