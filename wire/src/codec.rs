//! Little-endian binary codec used by every message in this crate.
//!
//! Variable-length fields carry a `u32` length prefix. The reader never trusts
//! a length: it checks it against the bytes that are actually left.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Why a byte sequence could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended before the field named here was complete.
    Truncated(&'static str),
    /// A field held a value that is not allowed.
    Invalid(&'static str),
    /// Bytes were left over after a complete message.
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated(what) => write!(f, "truncated input while reading {what}"),
            DecodeError::Invalid(what) => write!(f, "invalid value for {what}"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} unexpected trailing bytes"),
        }
    }
}

/// Appends encoded fields to a byte vector.
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self { buf: Vec::new() }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Fixed-size field: no length prefix.
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// Variable-size field with a `u32` length prefix.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.raw(v)
    }

    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads encoded fields from a byte slice.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn raw(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.raw(N, what)?);
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.raw(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(what)? as usize;
        self.raw(len, what)
    }

    pub fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let bytes = self.bytes(what)?;
        core::str::from_utf8(bytes)
            .map(String::from)
            .map_err(|_| DecodeError::Invalid(what))
    }

    /// A `u32` element count, checked against what could possibly follow
    /// (each element takes at least `min_item_len` bytes), so a forged count
    /// never makes a decoder reserve memory it cannot fill.
    pub fn count(&mut self, min_item_len: usize, what: &'static str) -> Result<usize, DecodeError> {
        let count = self.u32(what)? as usize;
        if count.saturating_mul(min_item_len) > self.remaining() {
            return Err(DecodeError::Truncated(what));
        }
        Ok(count)
    }

    /// Succeeds only when every byte was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_field_kinds() {
        let mut w = Writer::new();
        w.u8(7)
            .u16(0xbeef)
            .u32(0xdead_beef)
            .u64(u64::MAX)
            .bytes(b"abc")
            .str("h\u{e9}llo");
        let buf = w.finish();
        let mut r = Reader::new(&buf);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 0xbeef);
        assert_eq!(r.u32("c").unwrap(), 0xdead_beef);
        assert_eq!(r.u64("d").unwrap(), u64::MAX);
        assert_eq!(r.bytes("e").unwrap(), b"abc");
        assert_eq!(r.string("f").unwrap(), "h\u{e9}llo");
        r.finish().unwrap();
    }

    #[test]
    fn length_prefix_larger_than_input_is_truncation() {
        let mut w = Writer::new();
        w.u32(1000).raw(b"short");
        let buf = w.finish();
        assert_eq!(
            Reader::new(&buf).bytes("blob"),
            Err(DecodeError::Truncated("blob"))
        );
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        let mut w = Writer::new();
        w.bytes(&[0xff, 0xfe]);
        let buf = w.finish();
        assert_eq!(
            Reader::new(&buf).string("name"),
            Err(DecodeError::Invalid("name"))
        );
    }

    #[test]
    fn trailing_bytes_are_reported() {
        let r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.finish(), Err(DecodeError::TrailingBytes(3)));
    }
}
