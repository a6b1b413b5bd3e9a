//! `spin`: CPU-bound tasks that count as fast as they can, so preemption and
//! fairness can be seen (and measured) from outside.

use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::capsule::api;
use crate::capsule_log;

/// Iterations done by all spin tasks (for tests and `logs`).
pub static ITERATIONS: AtomicU64 = AtomicU64::new(0);

pub fn main(args: &[String]) -> Result<(), String> {
    let tasks: u32 = match args {
        [] => 1,
        [flag, n] if flag == "--tasks" => n
            .parse()
            .map_err(|_| alloc::format!("bad task count '{n}'"))?,
        _ => return Err(String::from("usage: [--tasks N]")),
    };
    for i in 1..tasks {
        api::spawn("spin", move || spin_forever(i)).map_err(String::from)?;
    }
    spin_forever(0);
    Ok(())
}

fn spin_forever(index: u32) {
    let mut count: u64 = 0;
    let mut last_report = api::now_ns();
    loop {
        count = count.wrapping_add(1);
        core::hint::black_box(count);
        if count.is_multiple_of(1 << 16) {
            ITERATIONS.fetch_add(1 << 16, Ordering::Relaxed);
            let now = api::now_ns();
            if now - last_report > 10_000_000_000 {
                capsule_log!("spin task {index}: {count} iterations");
                last_report = now;
            }
        }
    }
}
