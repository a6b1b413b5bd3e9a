//! A capsule's log: a fixed-size ring in kernel memory (it outlives a crashed
//! capsule, so `logs` can say why it died). Offsets count every byte ever
//! written, so a reader can follow the log without missing or repeating lines.

use alloc::vec;
use alloc::vec::Vec;

pub const LOG_CAPACITY: usize = 16 * 1024;

pub struct LogRing {
    buf: Vec<u8>,
    /// Bytes written since the capsule started.
    written: u64,
}

impl LogRing {
    pub fn new() -> Self {
        Self {
            buf: vec![0; LOG_CAPACITY],
            written: 0,
        }
    }

    /// Appends without allocating (the buffer is sized once).
    pub fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let at = (self.written % LOG_CAPACITY as u64) as usize;
            self.buf[at] = b;
            self.written += 1;
        }
    }

    /// Refills a ring from an image: `tail` are the last bytes of `written`.
    pub fn restore(&mut self, written: u64, tail: &[u8]) {
        let tail = &tail[tail.len().saturating_sub(LOG_CAPACITY)..];
        self.written = written.saturating_sub(tail.len() as u64);
        self.push(tail);
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes from `offset` on (or from the oldest still kept), at most `max`,
    /// and the offset after them.
    pub fn read_from(&self, offset: u64, max: usize) -> (Vec<u8>, u64) {
        let oldest = self.written.saturating_sub(LOG_CAPACITY as u64);
        let start = offset.clamp(oldest, self.written);
        let end = (start + max as u64).min(self.written);
        let out = (start..end)
            .map(|i| self.buf[(i % LOG_CAPACITY as u64) as usize])
            .collect();
        (out, end)
    }
}

impl Default for LogRing {
    fn default() -> Self {
        Self::new()
    }
}

/// Lets `write!` format into the ring without allocating.
impl core::fmt::Write for LogRing {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}
