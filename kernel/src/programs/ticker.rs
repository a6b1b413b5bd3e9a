//! `ticker`: a capsule as a client. Connects to ADDR:PORT and sends
//! `ticker NAME N` lines every MS milliseconds, N counting from 1 without gaps;
//! reconnects if the connection drops.

use alloc::string::String;
use core::net::Ipv4Addr;

use crate::capsule::api::{self, TcpStream};
use crate::capsule_log;

pub fn main(args: &[String]) -> Result<(), String> {
    let (addr, port, interval) = parse(args)?;
    let name = api::name();
    let mut seq: u64 = 1;
    loop {
        let mut stream = match TcpStream::connect(addr, port) {
            Ok(s) => s,
            Err(e) => {
                capsule_log!("ticker: connect {addr}:{port}: {e}; retrying");
                api::sleep_ms(1000);
                continue;
            }
        };
        capsule_log!("ticker connected to {addr}:{port}");
        loop {
            let line = alloc::format!("ticker {name} {seq}\n");
            if let Err(e) = stream.write_all(line.as_bytes()) {
                capsule_log!("ticker: {e}; reconnecting");
                break;
            }
            seq += 1;
            api::sleep_ms(interval);
        }
    }
}

fn parse(args: &[String]) -> Result<(Ipv4Addr, u16, u64), String> {
    let usage = || String::from("usage: ADDR:PORT [INTERVAL_MS]");
    let target = args.first().ok_or_else(usage)?;
    let (addr, port) = target.split_once(':').ok_or_else(usage)?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| alloc::format!("bad address '{addr}'"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| alloc::format!("bad port '{port}'"))?;
    let interval = match args.get(1) {
        Some(ms) => ms
            .parse()
            .ok()
            .filter(|m| *m > 0)
            .ok_or_else(|| alloc::format!("bad interval '{ms}'"))?,
        None => 1000,
    };
    if args.len() > 2 {
        return Err(usage());
    }
    Ok((addr, port, interval))
}
