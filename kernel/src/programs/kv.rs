//! `kv`: an in-memory key-value server for standard Redis clients (RESP2).
//! The protocol and store are `capsules_apps::kv`; this file gives them
//! sockets and tasks. All state lives in the capsule's arena.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use capsules_apps::Flow;
use capsules_apps::kv::{ServerInfo, Session, Store};
use spin::Mutex;

use super::lock_yielding;
use crate::capsule::api::{self, TcpListener, TcpStream};
use crate::capsule_log;

/// How often expired keys are swept (they also vanish when touched).
const PURGE_INTERVAL_MS: u64 = 100;

struct Shared {
    store: Mutex<Store>,
    clients: AtomicU32,
    commands: AtomicU64,
    locator: String,
}

pub fn main(args: &[String]) -> Result<(), String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let port = capsules_apps::kv::parse_args(&args)?;
    let mut listener = TcpListener::bind(port).map_err(|e| alloc::format!("bind {port}: {e}"))?;
    let shared = Arc::new(Shared {
        store: Mutex::new(Store::new()),
        clients: AtomicU32::new(0),
        commands: AtomicU64::new(0),
        locator: alloc::format!("{}", api::locator()),
    });
    capsule_log!("kv listening on {}:{port}", shared.locator);
    let sweeper = shared.clone();
    api::spawn("kv-expiry", move || {
        loop {
            api::sleep_ms(PURGE_INTERVAL_MS);
            let now = api::uptime_ms();
            lock_yielding(&sweeper.store).purge_expired(now);
        }
    })
    .map_err(String::from)?;
    loop {
        let stream = listener
            .accept()
            .map_err(|e| alloc::format!("accept: {e}"))?;
        let shared = shared.clone();
        if api::spawn("kv-conn", move || serve(stream, &shared)).is_err() {
            capsule_log!("kv: too many connections; refusing one");
        }
    }
}

fn serve(mut stream: TcpStream, shared: &Shared) {
    shared.clients.fetch_add(1, Ordering::Relaxed);
    let name = api::name();
    let mut session = Session::new();
    let mut buf = alloc::vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let vm = api::vm_name();
        let before = session.commands_executed();
        let flow = {
            let info = ServerInfo {
                capsule: &name,
                locator: &shared.locator,
                vm: &vm,
                uptime_ms: api::uptime_ms(),
                connected_clients: shared.clients.load(Ordering::Relaxed),
                total_commands: shared.commands.load(Ordering::Relaxed),
            };
            let now = api::uptime_ms();
            let mut store = lock_yielding(&shared.store);
            session.feed(&buf[..n], &mut store, now, &info, &mut out)
        };
        shared
            .commands
            .fetch_add(session.commands_executed() - before, Ordering::Relaxed);
        if stream.write_all(&out).is_err() {
            break;
        }
        out.clear();
        if flow == Flow::Close {
            break;
        }
    }
    stream.shutdown();
    shared.clients.fetch_sub(1, Ordering::Relaxed);
}
