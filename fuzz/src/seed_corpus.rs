//! Writes a seed corpus for the cargo-fuzz targets from the real encoders
//! (the generators of the bounded runs in `wire/tests/`), so that libFuzzer
//! starts from valid messages, images, command lines and sessions:
//! `cargo +nightly run --bin seed_corpus` from `fuzz/` (docs/fuzzing.md).

#[path = "../../wire/tests/fuzzkit/mod.rs"]
mod fuzzkit;
#[path = "../../wire/tests/wiregen/mod.rs"]
mod wiregen;

use std::fs;
use std::path::Path;

use capsules_fuzz::{CLIENT_NONCE, HEADER_LEN, KEY, TRAILER_LEN};
use capsules_wire::control::{ClientSession, ServerSession, frame};
use fuzzkit::Rng;

const PER_TARGET: usize = 64;

fn write(target: &str, items: impl IntoIterator<Item = Vec<u8>>) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus directory");
    for (i, item) in items.into_iter().enumerate() {
        fs::write(dir.join(format!("seed-{i:03}")), item).expect("seed file");
    }
}

fn main() {
    let mut rng = Rng::new(fuzzkit::DEFAULT_SEED);
    write(
        "control_request",
        (0..PER_TARGET).map(|_| wiregen::gen_request(&mut rng).encode()),
    );
    write(
        "control_response",
        (0..PER_TARGET).map(|_| wiregen::gen_response(&mut rng).encode()),
    );
    // A cut selector, then the frames a client sends: its hello and requests,
    // from another session than the target's (same key, another server
    // nonce), so that every frame looks right and none may be accepted.
    let streams: Vec<Vec<u8>> = (0..PER_TARGET)
        .map(|i| {
            let mut server = ServerSession::new(&KEY, [0x5e; 32]);
            let hello = server.hello(b"build", "vm");
            let mut client = ClientSession::new(&KEY, &hello, CLIENT_NONCE).unwrap();
            let mut stream = vec![(i * 37) as u8];
            if i % 2 == 1 {
                stream.extend(frame(client.client_hello()));
            }
            for _ in 0..3 {
                let (_, payload) = client.seal(&wiregen::gen_request(&mut rng));
                stream.extend(frame(&payload));
            }
            stream
        })
        .collect();
    write("control_stream", streams);
    let images: Vec<(bool, Vec<u8>)> = (0..PER_TARGET)
        .map(|i| {
            let image = wiregen::gen_image(&mut rng);
            let with_digest = i % 2 == 0;
            let nonce = wiregen::gen_nonce(&mut rng);
            let bytes = if with_digest {
                image.encode(&KEY, &nonce)
            } else {
                image.encode_for_transfer(&KEY, &nonce)
            };
            (with_digest, bytes)
        })
        .collect();
    write(
        "image_sealed",
        images.iter().map(|(with_digest, bytes)| {
            let mut seed = vec![u8::from(*with_digest)];
            seed.extend_from_slice(&bytes[HEADER_LEN..bytes.len() - TRAILER_LEN]);
            seed
        }),
    );
    write("image_bytes", images.into_iter().map(|(_, bytes)| bytes));
    write(
        "bootcfg",
        [
            "",
            "log=info",
            "ip=192.0.2.11/24 gw=192.0.2.1 ctl=7070 log=debug name=vm1",
            "ip=10.0.0.5/8 locators=198.18.0.0/16 probe",
            "name=a_b-c log=trace ctl=1",
        ]
        .map(|s| s.as_bytes().to_vec()),
    );
    write(
        "kv",
        [
            &b"\x10\x40\x80\xc0*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n*2\r\n$4\r\nINCR\r\n$1\r\nk\r\n"[..],
            b"\x00\x20\x40\x60PING\r\nGET k\r\nSET k \"a b\\x41\" EX 10\r\nTTL k\r\n",
            b"\x05\x06\x07\x08*2\r\n$4\r\nKEYS\r\n$3\r\n[a*\r\nINFO all\r\nCLIENT SETNAME x\r\n",
            b"\x30\x31\x32\x33MSET a 1 b 2\r\nMGET a b c\r\nEXPIRE a 5 NX\r\nPEXPIRE b 1 GT\r\nQUIT\r\n",
        ]
        .map(<[u8]>::to_vec),
    );
    write(
        "http",
        [
            &b"\x10\x40\x80\xc0GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /bytes/300 HTTP/1.1\r\n\r\n"[..],
            b"\x00\x20\x40\x60HEAD /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
            b"\x05\x06\x07\x08POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET http://h/bytes/7?q HTTP/1.1\r\nConnection: close\r\n\r\n",
        ]
        .map(<[u8]>::to_vec),
    );
    println!("seed corpus written to fuzz/corpus/");
}
