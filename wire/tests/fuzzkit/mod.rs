//! A small, seeded fuzz driver shared by the bounded fuzz tests of `wire/`
//! and `apps/` (docs/fuzzing.md): a deterministic random source, a byte
//! mutator (bit flips, truncation, length fields set to extremes, splices,
//! dictionary tokens), a catch-and-report wrapper that prints the failing
//! input, and a counting global allocator to bound what a decoder allocates.
//!
//! Everything is driven by one seed, so a failure reproduces exactly:
//! `CAPSULES_FUZZ_SEED` picks another seed, `CAPSULES_FUZZ_INPUTS` scales the
//! number of inputs per target (a longer soak than the default quick pass).

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::Instant;

/// The seed of every target unless `CAPSULES_FUZZ_SEED` says otherwise.
pub const DEFAULT_SEED: u64 = 0xC0FF_EE15_CA95_0001;

/// SplitMix64: tiny, fast, and good enough to drive a mutator.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for `target`, from the run's seed: targets do not share
    /// streams, so adding inputs to one leaves the others unchanged.
    pub fn for_target(target: &str) -> Self {
        let mut h = seed();
        for b in target.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        Self(h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den < num
    }

    pub fn u8(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn u16(&mut self) -> u16 {
        self.next_u64() as u16
    }

    pub fn u32(&mut self) -> u32 {
        self.next_u64() as u32
    }

    /// A `u64` that is often an edge: 0, 1, a power of two, near a maximum.
    pub fn interesting_u64(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => 1,
            2 => u64::MAX - self.below(3) as u64,
            3 => 1 << self.below(64),
            4 => (1u64 << self.below(64)).wrapping_sub(1),
            5 => u64::from(u32::MAX) + self.below(3) as u64 - 1,
            6 => self.below(1 << 16) as u64,
            _ => self.next_u64(),
        }
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.u8()).collect()
    }

    /// Pure random bytes of a random length up to `max_len` (short lengths
    /// are favoured: most parsers decide early).
    /// Where to cut a stream of `len` bytes into the reads a server sees:
    /// a few random points, sometimes every byte of the first 300, and
    /// always the end (sorted, no repeats).
    pub fn cuts(&mut self, len: usize) -> Vec<usize> {
        let mut cuts: Vec<usize> = (0..self.below(8)).map(|_| self.below(len + 1)).collect();
        if self.chance(1, 16) {
            cuts.extend(0..len.min(300));
        }
        cuts.push(len);
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    }

    pub fn random_input(&mut self, max_len: usize) -> Vec<u8> {
        let len = if self.chance(3, 4) {
            self.below(max_len.min(64) + 1)
        } else {
            self.below(max_len + 1)
        };
        self.bytes(len)
    }
}

/// The run's seed: `CAPSULES_FUZZ_SEED` (decimal or 0x-hex) or the default.
pub fn seed() -> u64 {
    std::env::var("CAPSULES_FUZZ_SEED")
        .ok()
        .and_then(|s| match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        })
        .unwrap_or(DEFAULT_SEED)
}

/// How many inputs a target runs: `default`, or `CAPSULES_FUZZ_INPUTS`.
pub fn inputs(default: usize) -> usize {
    std::env::var("CAPSULES_FUZZ_INPUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Edge values written over length and count fields.
const EXTREMES_32: [u32; 12] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x1_0000,
    0x1_0001,
    0x7fff_ffff,
    0x8000_0000,
    u32::MAX,
];

/// Applies one to four random mutations to `input`. `dictionary` holds
/// tokens of the format (keywords, magic numbers); `pool` holds other inputs
/// to splice with.
pub fn mutate(rng: &mut Rng, input: &[u8], dictionary: &[&[u8]], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        mutate_once(rng, &mut out, dictionary, pool);
    }
    out
}

fn mutate_once(rng: &mut Rng, out: &mut Vec<u8>, dictionary: &[&[u8]], pool: &[Vec<u8>]) {
    let len = out.len();
    match rng.below(13) {
        // Flip one bit.
        0 | 1 if len > 0 => {
            let at = rng.below(len);
            out[at] ^= 1 << rng.below(8);
        }
        // Replace a byte with a random or an edge value.
        2 if len > 0 => {
            let at = rng.below(len);
            out[at] = match rng.below(4) {
                0 => 0,
                1 => 0xff,
                2 => 0x7f ^ (rng.u8() & 0x80),
                _ => rng.u8(),
            };
        }
        // Truncate.
        3 if len > 0 => {
            let at = rng.below(len);
            out.truncate(at);
        }
        // Drop a range.
        4 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(16));
            out.drain(at..at + n);
        }
        // Insert random bytes.
        5 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(8);
            let bytes = rng.bytes(n);
            out.splice(at..at, bytes);
        }
        // A little-endian u16/u32/u64 length or count field set to an extreme.
        6 | 7 if len > 0 => {
            let width = *rng.pick(&[2usize, 4, 4, 8]);
            let at = rng.below(len);
            let value = match rng.below(4) {
                0 => u64::from(*rng.pick(&EXTREMES_32)),
                1 => rng.interesting_u64(),
                // A count that may just fit the bytes that follow: what a
                // decoder that reserves by count must not trust.
                2 => (len >> rng.range(1, 6)) as u64,
                // A plausible wrong length: near the input's own size.
                _ => (len as u64)
                    .wrapping_add(rng.below(9) as u64)
                    .wrapping_sub(4),
            };
            let bytes = value.to_le_bytes();
            let end = (at + width).min(len);
            out[at..end].copy_from_slice(&bytes[..end - at]);
        }
        // Write a dictionary token over or into the input.
        8 | 9 if !dictionary.is_empty() => {
            let token = rng.pick(dictionary);
            let at = rng.below(len + 1);
            if rng.chance(1, 2) {
                out.splice(at..at, token.iter().copied());
            } else {
                let end = (at + token.len()).min(len);
                out.splice(at..end, token.iter().copied());
            }
        }
        // Splice: our prefix with another input's suffix.
        10 if !pool.is_empty() => {
            let other = rng.pick(pool);
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            out.truncate(cut);
            out.extend_from_slice(&other[from..]);
        }
        // Duplicate a range (repeated fields, pipelined repeats).
        11 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            let copy = out[at..at + n].to_vec();
            let to = rng.below(len + 1);
            out.splice(to..to, copy);
        }
        // Add a byte with the value of a neighbour plus or minus one.
        _ if len > 0 => {
            let at = rng.below(len);
            out[at] = if rng.chance(1, 2) {
                out[at].wrapping_add(1)
            } else {
                out[at].wrapping_sub(1)
            };
        }
        _ => out.push(rng.u8()),
    }
}

/// Hex of at most the first 512 bytes, for failure reports.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for b in bytes.iter().take(512) {
        let _ = write!(s, "{b:02x}");
    }
    if bytes.len() > 512 {
        let _ = write!(s, "... ({} bytes)", bytes.len());
    }
    s
}

/// Runs `f` on `input`; if it panics, prints the target, the input (hex) and
/// how to reproduce, then lets the panic continue (so the test fails).
pub fn guarded<R>(target: &str, input: &[u8], f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            eprintln!(
                "fuzz target '{target}' failed (seed {:#x}) on input {}",
                seed(),
                hex(input)
            );
            resume_unwind(panic)
        }
    }
}

/// Counts, per thread, the bytes requested from the allocator while a
/// [`measure`] is running.
pub struct CountingAlloc;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    // `try_with`: the allocator also runs while thread locals are torn down.
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            let _ = ALLOCATED.try_with(|a| a.set(a.get().saturating_add(bytes)));
        }
    });
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Runs `f` and returns its result with the bytes it asked the allocator for
/// (on this thread; every allocation counts, frees do not give credit).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    ALLOCATED.with(|a| a.set(0));
    MEASURING.with(|m| m.set(true));
    let r = f();
    MEASURING.with(|m| m.set(false));
    (r, ALLOCATED.with(|a| a.get()))
}

/// Fails unless a decoder of `input_len` bytes allocated at most
/// `factor × input_len + slack` bytes.
pub fn assert_bounded(target: &str, input: &[u8], allocated: usize, factor: usize, slack: usize) {
    let limit = factor * input.len() + slack;
    assert!(
        allocated <= limit,
        "fuzz target '{target}': {allocated} bytes allocated for a {}-byte input \
         (limit {factor}x + {slack}); input {}",
        input.len(),
        hex(input)
    );
}

/// Per-target statistics, printed at the end (`cargo test -- --nocapture`).
pub struct Stats {
    target: &'static str,
    started: Instant,
    pub inputs: u64,
    pub accepted: u64,
}

impl Stats {
    pub fn new(target: &'static str) -> Self {
        Self {
            target,
            started: Instant::now(),
            inputs: 0,
            accepted: 0,
        }
    }

    pub fn input(&mut self, accepted: bool) {
        self.inputs += 1;
        self.accepted += u64::from(accepted);
    }
}

impl Drop for Stats {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            println!(
                "fuzz {}: {} inputs ({} accepted) in {:.2} s, seed {:#x}",
                self.target,
                self.inputs,
                self.accepted,
                self.started.elapsed().as_secs_f64(),
                seed()
            );
        }
    }
}
