//! `sink`: a TCP listener that checks numbered lines. Every line of the form
//! `ticker NAME N` must carry N one above the previous line of NAME; each
//! line is counted, and a gap or repeat is logged as `GAP`. Two capsules can
//! thus prove, through the capsule log, that a stream between them survives
//! moves without loss or duplication.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use super::lock_yielding;
use crate::capsule::api::{self, TcpListener, TcpStream};
use crate::capsule_log;

pub const DEFAULT_PORT: u16 = 9000;
/// Log one line in this many, so the log shows progress without filling up.
const LOG_EVERY: u64 = 10;

pub fn main(args: &[String]) -> Result<(), String> {
    let port = super::port_arg(args, DEFAULT_PORT)?;
    let mut listener = TcpListener::bind(port).map_err(|e| alloc::format!("bind {port}: {e}"))?;
    capsule_log!("sink listening on {}:{port}", api::locator());
    let last: Arc<spin::Mutex<BTreeMap<String, u64>>> = Arc::new(spin::Mutex::new(BTreeMap::new()));
    loop {
        let stream = listener
            .accept()
            .map_err(|e| alloc::format!("accept: {e}"))?;
        let last = last.clone();
        if api::spawn("sink-conn", move || serve(stream, &last)).is_err() {
            capsule_log!("sink: too many connections; refusing one");
        }
    }
}

fn serve(mut stream: TcpStream, last: &spin::Mutex<BTreeMap<String, u64>>) {
    let mut buf = [0u8; 2048];
    let mut line: Vec<u8> = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b != b'\n' {
                if line.len() < 256 {
                    line.push(b);
                }
                continue;
            }
            check(&line, last);
            line.clear();
        }
    }
}

fn check(line: &[u8], last: &spin::Mutex<BTreeMap<String, u64>>) {
    let text = core::str::from_utf8(line).unwrap_or("");
    let mut words = text.split_ascii_whitespace();
    let (Some("ticker"), Some(name), Some(seq)) = (words.next(), words.next(), words.next()) else {
        capsule_log!("sink: unexpected line {text:?}");
        return;
    };
    let Ok(seq) = seq.parse::<u64>() else {
        capsule_log!("sink: bad number in {text:?}");
        return;
    };
    let previous = lock_yielding(last).insert(String::from(name), seq);
    match previous {
        Some(p) if p + 1 != seq => capsule_log!("sink: GAP from {name}: {p} then {seq}"),
        None if seq != 1 => capsule_log!("sink: GAP from {name}: first line is {seq}"),
        _ if seq % LOG_EVERY == 0 => capsule_log!("sink: {name} {seq}"),
        _ => {}
    }
}
