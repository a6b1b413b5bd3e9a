//! Bounded, seeded fuzzing of the `kv` protocol engine (RESP2,
//! docs/fuzzing.md). Inputs are pipelined command streams from a generator
//! that knows the commands and their options (RESP arrays and inline
//! commands), mutations of them (bit flips, truncation, lengths set to
//! extremes, splices), and random bytes. Each stream is fed to a session
//! twice: in one piece, and cut at random points.
//!
//! Properties: no input panics; the replies do not depend on how the stream
//! was cut; the replies are well-formed RESP, one per command executed (plus
//! one protocol error when the stream breaks), and a broken stream ends the
//! session.

#[path = "../../wire/tests/fuzzkit/mod.rs"]
mod fuzzkit;

use capsules_apps::kv::{Flow, ServerInfo, Session, Store};
use fuzzkit::{Rng, Stats, guarded, inputs, mutate};

const INFO: ServerInfo<'static> = ServerInfo {
    capsule: "cache",
    locator: "198.18.0.7",
    vm: "vm1",
    uptime_ms: 65_000,
    connected_clients: 3,
    total_commands: 10,
};

const NOW_MS: u64 = 1_000_000;

const COMMANDS: &[&str] = &[
    "GET", "SET", "PING", "ECHO", "DEL", "EXISTS", "INCR", "DECR", "INCRBY", "DECRBY", "MGET",
    "MSET", "APPEND", "STRLEN", "KEYS", "DBSIZE", "FLUSHALL", "FLUSHDB", "EXPIRE", "PEXPIRE",
    "PERSIST", "TTL", "PTTL", "INFO", "SELECT", "CLIENT", "COMMAND", "QUIT", "set", "Get", "NOPE",
];

const WORDS: &[&[u8]] = &[
    b"k",
    b"a",
    b"counter",
    b"",
    b"x y",
    b"\r\n",
    b"\"",
    b"'",
    b"\\x41",
    b"0",
    b"1",
    b"-1",
    b"42",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"9223372036854775808",
    b"99999999999999999999",
    b"01",
    b"+1",
    b"1.5",
    b"NX",
    b"XX",
    b"GT",
    b"LT",
    b"EX",
    b"PX",
    b"EXAT",
    b"PXAT",
    b"KEEPTTL",
    b"GET",
    b"SETNAME",
    b"GETNAME",
    b"SETINFO",
    b"COUNT",
    b"*",
    b"k*",
    b"[a-",
    b"[^k]*",
    b"?",
    b"\\",
    b"all",
    b"server",
    b"keyspace",
    b"ASYNC",
];

const DICTIONARY: &[&[u8]] = &[
    b"*",
    b"$",
    b"\r\n",
    b"\n",
    b"\r",
    b"*-1\r\n",
    b"*0\r\n",
    b"$-1\r\n",
    b"*1048576\r\n",
    b"*1048577\r\n",
    b"$67108864\r\n",
    b"$67108865\r\n",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"\"",
    b"'",
    b"\\x",
    b" ",
    b"SET k ",
    b"INCR k\r\n",
    b"EXPIRE k ",
    b"KEYS *\r\n",
];

fn gen_arg(rng: &mut Rng) -> Vec<u8> {
    match rng.below(6) {
        0 => {
            let len = rng.below(12);
            rng.bytes(len)
        }
        1 => {
            let mut v = rng.pick(WORDS).to_vec();
            let word = *rng.pick(WORDS);
            v.extend_from_slice(word);
            v
        }
        _ => rng.pick(WORDS).to_vec(),
    }
}

/// An inline command needs no quoting when no argument is empty or holds a
/// blank or a quote.
fn inline_safe(args: &[Vec<u8>]) -> bool {
    args.iter().all(|a| {
        !a.is_empty()
            && a.iter()
                .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\'')
    })
}

fn encode_command(rng: &mut Rng, args: &[Vec<u8>], out: &mut Vec<u8>) {
    if inline_safe(args) && rng.chance(1, 4) {
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                out.push(b' ');
            }
            out.extend_from_slice(a);
        }
        out.extend_from_slice(if rng.chance(1, 2) { b"\r\n" } else { b"\n" });
    } else {
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// A pipelined batch of commands.
fn gen_stream(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.range(1, 8) {
        let name = *rng.pick(COMMANDS);
        // QUIT ends the stream; keep it rare.
        if name == "QUIT" && rng.chance(3, 4) {
            continue;
        }
        let mut args = vec![name.as_bytes().to_vec()];
        for _ in 0..rng.below(5) {
            args.push(gen_arg(rng));
        }
        encode_command(rng, &args, &mut out);
    }
    out
}

/// What one run of a stream through a session produced.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    out: Vec<u8>,
    closed: bool,
    commands: u64,
}

/// Feeds `stream` in pieces ending at `cuts` (ascending; the last is the
/// stream's length), folding the session's count into the caller's total
/// between calls as the kernel's driver does.
fn run(stream: &[u8], cuts: &[usize]) -> Outcome {
    let mut store = Store::new();
    let mut session = Session::new();
    let mut out = Vec::new();
    let mut from = 0;
    let mut closed = false;
    for &to in cuts {
        let info = ServerInfo {
            total_commands: INFO.total_commands + session.commands_executed(),
            ..INFO
        };
        let flow = session.feed(&stream[from..to], &mut store, NOW_MS, &info, &mut out);
        from = to;
        if flow == Flow::Close {
            closed = true;
            // Later input is ignored, and Close is said again.
            let mut more = Vec::new();
            assert_eq!(
                session.feed(b"PING\r\n", &mut store, NOW_MS, &info, &mut more),
                Flow::Close
            );
            assert!(more.is_empty());
            break;
        }
    }
    Outcome {
        out,
        closed,
        commands: session.commands_executed(),
    }
}

/// Reads one RESP reply at `at`; returns where it ends.
fn reply_end(buf: &[u8], at: usize) -> Option<usize> {
    let line_end = |from: usize| {
        buf[from..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| from + p)
    };
    let kind = *buf.get(at)?;
    let end = line_end(at + 1)?;
    let line = &buf[at + 1..end];
    let number = || -> Option<i64> { std::str::from_utf8(line).ok()?.parse().ok() };
    match kind {
        b'+' | b'-' => (!line.contains(&b'\n') && !line.contains(&b'\r')).then_some(end + 2),
        b':' => number().map(|_| end + 2),
        b'$' => match number()? {
            -1 => Some(end + 2),
            n if n >= 0 => {
                let body_end = end + 2 + n as usize;
                (buf.get(body_end..body_end + 2)? == b"\r\n").then_some(body_end + 2)
            }
            _ => None,
        },
        b'*' => {
            let mut next = end + 2;
            for _ in 0..number()? {
                next = reply_end(buf, next)?;
            }
            Some(next)
        }
        _ => None,
    }
}

fn count_replies(buf: &[u8]) -> Option<(u64, bool)> {
    let mut at = 0;
    let mut n = 0;
    let mut last_is_protocol_error = false;
    while at < buf.len() {
        let end = reply_end(buf, at)?;
        last_is_protocol_error = buf[at..end].starts_with(b"-ERR Protocol error");
        at = end;
        n += 1;
    }
    Some((n, last_is_protocol_error))
}

#[test]
fn fuzz_kv_sessions() {
    let target = "kv";
    let mut rng = Rng::for_target(target);
    let mut stats = Stats::new(target);
    let mut pool: Vec<Vec<u8>> = (0..32).map(|_| gen_stream(&mut rng)).collect();
    for i in 0..inputs(100_000) {
        let stream = match rng.below(10) {
            0..=2 => {
                let s = gen_stream(&mut rng);
                pool[i % 32] = s.clone();
                s
            }
            3..=8 => {
                let base = rng.pick(&pool).clone();
                mutate(&mut rng, &base, DICTIONARY, &pool)
            }
            _ => rng.random_input(200),
        };
        let cuts = rng.cuts(stream.len());
        let accepted = guarded(target, &stream, || {
            let whole = run(&stream, &[stream.len()]);
            let pieces = run(&stream, &cuts);
            assert_eq!(
                String::from_utf8_lossy(&pieces.out),
                String::from_utf8_lossy(&whole.out),
                "replies depend on how the stream was cut at {cuts:?}"
            );
            assert_eq!(pieces, whole, "cut at {cuts:?}");
            let (replies, protocol_error) =
                count_replies(&whole.out).expect("replies are not well-formed RESP");
            assert_eq!(
                replies,
                whole.commands + u64::from(protocol_error),
                "one reply per command"
            );
            if protocol_error {
                assert!(whole.closed, "a broken stream left the session open");
            }
            !protocol_error
        });
        stats.input(accepted);
    }
}
