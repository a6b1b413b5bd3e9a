//! Capsule programs compiled into the kernel image. Each runs as a capsule's
//! first task and uses only the capsule API.

pub mod echo;
pub mod faults;
pub mod http;
pub mod kv;
pub mod sink;
pub mod spin;
pub mod ticker;

use crate::capsule::Program;

/// Everything `run` can start, with a one-line description each.
pub static ALL: &[Program] = &[
    Program {
        name: "echo",
        description: "TCP echo server (--port N, default 7)",
        main: echo::main,
    },
    Program {
        name: "kv",
        description: "in-memory key-value server for Redis clients, RESP2 (--port N, default 6379)",
        main: kv::main,
    },
    Program {
        name: "http",
        description: "HTTP/1.1 server: / status, /bytes/N, /healthz (--port N, default 80)",
        main: http::main,
    },
    Program {
        name: "ticker",
        description: "connects to ADDR:PORT and sends a numbered line every MS ms (ADDR:PORT [MS])",
        main: ticker::main,
    },
    Program {
        name: "sink",
        description: "TCP listener that checks numbered ticker lines and logs gaps (--port N, default 9000)",
        main: sink::main,
    },
    Program {
        name: "spin",
        description: "CPU-bound loop, to show preemption and fairness (--tasks N)",
        main: spin::main,
    },
    Program {
        name: "crash-panic",
        description: "test only: panics after ARG ms (default 0)",
        main: faults::panic_after,
    },
    Program {
        name: "crash-divide",
        description: "test only: divides by zero after ARG ms (default 0)",
        main: faults::divide_by_zero_after,
    },
    Program {
        name: "crash-pagefault",
        description: "test only: touches an unmapped address after ARG ms (default 0)",
        main: faults::touch_unmapped_after,
    },
];

/// Takes a lock that other tasks of the same capsule may hold. A holder may
/// be preempted, so waiting yields instead of spinning out the time slice.
pub fn lock_yielding<T>(m: &::spin::Mutex<T>) -> ::spin::MutexGuard<'_, T> {
    loop {
        if let Some(guard) = m.try_lock() {
            return guard;
        }
        crate::capsule::api::yield_now();
    }
}

/// `--port N` or nothing.
pub fn port_arg(
    args: &[alloc::string::String],
    default: u16,
) -> Result<u16, alloc::string::String> {
    match args {
        [] => Ok(default),
        [flag, value] if flag == "--port" => value
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| alloc::format!("bad port '{value}'")),
        _ => Err(alloc::format!(
            "unexpected arguments {args:?}; usage: [--port N]"
        )),
    }
}
