//! `echo`: a TCP echo server; each connection is served by its own task.

use alloc::string::String;

use crate::capsule::api::{self, TcpListener, TcpStream};
use crate::capsule_log;

pub const DEFAULT_PORT: u16 = 7;

pub fn main(args: &[String]) -> Result<(), String> {
    let port = super::port_arg(args, DEFAULT_PORT)?;
    let mut listener = TcpListener::bind(port).map_err(|e| alloc::format!("bind {port}: {e}"))?;
    capsule_log!("echo listening on {}:{port}", api::locator());
    loop {
        let stream = listener
            .accept()
            .map_err(|e| alloc::format!("accept: {e}"))?;
        if api::spawn("echo-conn", move || serve(stream)).is_err() {
            capsule_log!("echo: too many connections; refusing one");
        }
    }
}

fn serve(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    stream.shutdown();
}
