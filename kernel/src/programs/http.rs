//! `http`: HTTP/1.1 with keep-alive: `/` status page, `/bytes/N`, `/healthz`.
//! Request parsing and responses are `capsules_apps::http`; this file gives
//! them sockets and tasks, and streams large bodies in chunks.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use capsules_apps::Flow;
use capsules_apps::http::{Session, SiteInfo};

use crate::capsule::api::{self, NetError, TcpListener, TcpStream};
use crate::capsule_log;

struct Shared {
    served: AtomicU64,
    locator: String,
}

pub fn main(args: &[String]) -> Result<(), String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let port = capsules_apps::http::parse_args(&args)?;
    let mut listener = TcpListener::bind(port).map_err(|e| alloc::format!("bind {port}: {e}"))?;
    let shared = Arc::new(Shared {
        served: AtomicU64::new(0),
        locator: alloc::format!("{}", api::locator()),
    });
    capsule_log!("http listening on {}:{port}", shared.locator);
    loop {
        let stream = listener
            .accept()
            .map_err(|e| alloc::format!("accept: {e}"))?;
        let shared = shared.clone();
        if api::spawn("http-conn", move || {
            let _ = serve(stream, &shared);
        })
        .is_err()
        {
            capsule_log!("http: too many connections; refusing one");
        }
    }
}

fn serve(mut stream: TcpStream, shared: &Shared) -> Result<(), NetError> {
    let name = api::name();
    let mut session = Session::new();
    let mut buf = alloc::vec![0u8; 8 * 1024];
    let mut chunk = alloc::vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let mut input = &buf[..n];
        // Feed once with the new bytes, then again with nothing while requests
        // wait behind a streamed body (see `Session::needs_feed`).
        loop {
            let vm = api::vm_name();
            let before = session.requests_served();
            let info = SiteInfo {
                capsule: &name,
                locator: &shared.locator,
                vm: &vm,
                uptime_ms: api::uptime_ms(),
                requests_served: shared.served.load(Ordering::Relaxed),
            };
            let flow = session.feed(input, &info, &mut out);
            input = &[];
            shared
                .served
                .fetch_add(session.requests_served() - before, Ordering::Relaxed);
            stream.write_all(&out)?;
            out.clear();
            while session.pending_body() > 0 {
                let k = session.fill_body(&mut chunk);
                stream.write_all(&chunk[..k])?;
            }
            if flow == Flow::Close {
                stream.shutdown();
                return Ok(());
            }
            if !session.needs_feed() {
                break;
            }
        }
    }
    stream.shutdown();
    Ok(())
}
