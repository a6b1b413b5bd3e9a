//! Unpredictable bytes for session nonces: RDRAND where the CPU has it, mixed
//! with TSC readings through SHA-256 so that a CPU without RDRAND still gets
//! nonces that never repeat.

use core::sync::atomic::{AtomicU64, Ordering};

use capsules_wire::auth::sha256;

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn bytes32() -> [u8; 32] {
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut hw = [0u8; 32];
    for chunk in hw.chunks_mut(8) {
        let v = crate::arch::cpu::hardware_random().unwrap_or(0);
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    let tsc = crate::arch::cpu::rdtsc();
    sha256(&[
        &hw,
        &tsc.to_le_bytes(),
        &count.to_le_bytes(),
        crate::build_id(),
    ])
}
