//! HMAC-SHA256 message authentication with the cluster key.
//!
//! Every control request and response carries a MAC over a domain label (so a
//! response can never be replayed as a request), the session nonce chosen by
//! the server (so a message from one session is worthless in another), the
//! sequence number (so a message cannot be replayed within its session) and the
//! message body.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const MAC_LEN: usize = 32;
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

/// Computes the MAC of one message.
pub fn message_tag(key: &[u8], dir: Direction, nonce: &Nonce, seq: u64, body: &[u8]) -> Tag {
    let mut mac = keyed(key);
    mac.update(dir.label());
    mac.update(nonce);
    mac.update(&seq.to_le_bytes());
    mac.update(&(body.len() as u64).to_le_bytes());
    mac.update(body);
    mac.finalize().into_bytes().into()
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
    let mut mac = keyed(key);
    mac.update(dir.label());
    mac.update(nonce);
    mac.update(&seq.to_le_bytes());
    mac.update(&(body.len() as u64).to_le_bytes());
    mac.update(body);
    mac.verify_slice(tag).is_ok()
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
