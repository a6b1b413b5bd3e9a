use super::*;
use alloc::format;
use std::string::ToString;

const INFO: ServerInfo<'static> = ServerInfo {
    capsule: "cache",
    locator: "198.18.0.7",
    vm: "vm1",
    uptime_ms: 65_000,
    connected_clients: 3,
    total_commands: 10,
};

struct Harness {
    store: Store,
    session: Session,
    now_ms: u64,
}

impl Harness {
    fn new() -> Self {
        Self {
            store: Store::new(),
            session: Session::new(),
            now_ms: 1_000_000,
        }
    }

    fn feed(&mut self, input: &[u8]) -> (Vec<u8>, Flow) {
        let mut out = Vec::new();
        let flow = self
            .session
            .feed(input, &mut self.store, self.now_ms, &INFO, &mut out);
        (out, flow)
    }

    /// Sends one command as a RESP array and returns the reply as text.
    fn cmd(&mut self, args: &[&str]) -> std::string::String {
        let (out, flow) = self.feed(&encode(args));
        assert_eq!(flow, Flow::Continue, "{args:?}");
        std::string::String::from_utf8(out).unwrap()
    }
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    out
}

#[test]
fn ping_and_echo() {
    let mut h = Harness::new();
    assert_eq!(h.cmd(&["PING"]), "+PONG\r\n");
    assert_eq!(h.cmd(&["ping", "hi"]), "$2\r\nhi\r\n");
    assert_eq!(
        h.cmd(&["PING", "a", "b"]),
        "-ERR wrong number of arguments for 'ping' command\r\n"
    );
    assert_eq!(h.cmd(&["EcHo", ""]), "$0\r\n\r\n");
}

#[test]
fn set_get_and_conditions() {
    let mut h = Harness::new();
    assert_eq!(h.cmd(&["GET", "k"]), "$-1\r\n");
    assert_eq!(h.cmd(&["SET", "k", "v"]), "+OK\r\n");
    assert_eq!(h.cmd(&["GET", "k"]), "$1\r\nv\r\n");
    assert_eq!(h.cmd(&["SET", "k", "w", "NX"]), "$-1\r\n");
    assert_eq!(h.cmd(&["SET", "k", "w", "XX"]), "+OK\r\n");
    assert_eq!(h.cmd(&["SET", "new", "x", "XX"]), "$-1\r\n");
    assert_eq!(h.cmd(&["SET", "new", "x", "nx"]), "+OK\r\n");
    assert_eq!(
        h.cmd(&["SET", "k", "z", "NX", "XX"]),
        "-ERR syntax error\r\n"
    );
    assert_eq!(h.cmd(&["SET", "k", "z", "GET"]), "$1\r\nw\r\n");
    assert_eq!(h.cmd(&["SET", "none", "z", "GET"]), "$-1\r\n");
    assert_eq!(h.cmd(&["SET", "k", "q", "NX", "GET"]), "$1\r\nz\r\n");
    assert_eq!(h.cmd(&["GET", "k"]), "$1\r\nz\r\n");
    assert_eq!(h.cmd(&["SET", "k", "z", "bogus"]), "-ERR syntax error\r\n");
    assert_eq!(
        h.cmd(&["SET", "k"]),
        "-ERR wrong number of arguments for 'set' command\r\n"
    );
    assert_eq!(
        h.cmd(&["GET", "k", "x"]),
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
}

#[test]
fn set_with_expiry_options() {
    let mut h = Harness::new();
    assert_eq!(h.cmd(&["SET", "a", "1", "EX", "10"]), "+OK\r\n");
    assert_eq!(h.cmd(&["TTL", "a"]), ":10\r\n");
    assert_eq!(h.cmd(&["PTTL", "a"]), ":10000\r\n");
    assert_eq!(h.cmd(&["SET", "b", "1", "PX", "1500", "NX"]), "+OK\r\n");
    assert_eq!(h.cmd(&["PTTL", "b"]), ":1500\r\n");
    assert_eq!(h.cmd(&["SET", "b", "2", "XX", "PX", "100"]), "+OK\r\n");
    assert_eq!(h.cmd(&["SET", "b", "3", "XX", "KEEPTTL"]), "+OK\r\n");
    assert_eq!(h.cmd(&["PTTL", "b"]), ":100\r\n");
    assert_eq!(h.cmd(&["SET", "b", "4"]), "+OK\r\n");
    assert_eq!(
        h.cmd(&["TTL", "b"]),
        ":-1\r\n",
        "plain SET clears the expiry"
    );
    assert_eq!(
        h.cmd(&["SET", "c", "1", "EX", "1", "PX", "5"]),
        "-ERR syntax error\r\n"
    );
    assert_eq!(
        h.cmd(&["SET", "c", "1", "EX", "1", "KEEPTTL"]),
        "-ERR syntax error\r\n"
    );
    assert_eq!(h.cmd(&["SET", "c", "1", "EX"]), "-ERR syntax error\r\n");
    assert_eq!(
        h.cmd(&["SET", "c", "1", "EX", "x"]),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        h.cmd(&["SET", "c", "1", "EX", "0"]),
        "-ERR invalid expire time in 'set' command\r\n"
    );
    assert_eq!(
        h.cmd(&["SET", "c", "1", "PX", "-5"]),
        "-ERR invalid expire time in 'set' command\r\n"
    );
    assert_eq!(
        h.cmd(&["SET", "c", "1", "EX", "9223372036854775807"]),
        "-ERR invalid expire time in 'set' command\r\n"
    );
    assert_eq!(h.cmd(&["EXISTS", "c"]), ":0\r\n");
    let at = (h.now_ms + 2000).to_string();
    assert_eq!(h.cmd(&["SET", "d", "1", "PXAT", &at]), "+OK\r\n");
    assert_eq!(h.cmd(&["PTTL", "d"]), ":2000\r\n");
    h.now_ms += 1500;
    assert_eq!(h.cmd(&["GET", "a"]), "$1\r\n1\r\n");
    assert_eq!(h.cmd(&["GET", "b"]), "$1\r\n4\r\n");
    h.now_ms += 10_000;
    assert_eq!(h.cmd(&["GET", "a"]), "$-1\r\n");
    assert_eq!(h.cmd(&["TTL", "a"]), ":-2\r\n");
    assert_eq!(
        h.cmd(&["SET", "a", "again", "NX"]),
        "+OK\r\n",
        "expired keys count as missing"
    );
}

#[test]
fn expire_and_ttl() {
    let mut h = Harness::new();
    assert_eq!(h.cmd(&["EXPIRE", "missing", "10"]), ":0\r\n");
    assert_eq!(h.cmd(&["TTL", "missing"]), ":-2\r\n");
    h.cmd(&["SET", "k", "v"]);
    assert_eq!(h.cmd(&["TTL", "k"]), ":-1\r\n");
    assert_eq!(h.cmd(&["EXPIRE", "k", "100"]), ":1\r\n");
    assert_eq!(h.cmd(&["TTL", "k"]), ":100\r\n");
    h.now_ms += 40_400;
    assert_eq!(h.cmd(&["TTL", "k"]), ":60\r\n");
    assert_eq!(h.cmd(&["EXPIRE", "k", "10", "GT"]), ":0\r\n");
    assert_eq!(h.cmd(&["EXPIRE", "k", "10", "LT"]), ":1\r\n");
    assert_eq!(h.cmd(&["EXPIRE", "k", "50", "NX"]), ":0\r\n");
    assert_eq!(h.cmd(&["EXPIRE", "k", "50", "XX"]), ":1\r\n");
    assert_eq!(
        h.cmd(&["EXPIRE", "k", "50", "NX", "XX"]),
        "-ERR NX and XX, GT or LT options at the same time are not compatible\r\n"
    );
    assert_eq!(
        h.cmd(&["EXPIRE", "k", "5", "GT", "LT"]),
        "-ERR GT and LT options at the same time are not compatible\r\n"
    );
    assert_eq!(
        h.cmd(&["EXPIRE", "k", "5", "SOON"]),
        "-ERR Unsupported option SOON\r\n"
    );
    assert_eq!(
        h.cmd(&["EXPIRE", "k", "ten"]),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        h.cmd(&["EXPIRE", "k", "9223372036854775807"]),
        "-ERR invalid expire time in 'expire' command\r\n"
    );
    assert_eq!(h.cmd(&["PERSIST", "k"]), ":1\r\n");
    assert_eq!(h.cmd(&["TTL", "k"]), ":-1\r\n");
    assert_eq!(h.cmd(&["PEXPIRE", "k", "250"]), ":1\r\n");
    assert_eq!(h.cmd(&["PTTL", "k"]), ":250\r\n");
    assert_eq!(
        h.cmd(&["EXPIRE", "k", "0"]),
        ":1\r\n",
        "a past deadline deletes"
    );
    assert_eq!(h.cmd(&["EXISTS", "k"]), ":0\r\n");
    assert_eq!(
        h.cmd(&["TTL"]),
        "-ERR wrong number of arguments for 'ttl' command\r\n"
    );
}

#[test]
fn counters() {
    let mut h = Harness::new();
    assert_eq!(h.cmd(&["INCR", "n"]), ":1\r\n");
    assert_eq!(h.cmd(&["INCRBY", "n", "41"]), ":42\r\n");
    assert_eq!(h.cmd(&["DECR", "n"]), ":41\r\n");
    assert_eq!(h.cmd(&["DECRBY", "n", "50"]), ":-9\r\n");
    assert_eq!(h.cmd(&["GET", "n"]), "$2\r\n-9\r\n");
    h.cmd(&["SET", "s", "abc"]);
    assert_eq!(
        h.cmd(&["INCR", "s"]),
        "-ERR value is not an integer or out of range\r\n"
    );
    h.cmd(&["SET", "s", " 1"]);
    assert_eq!(
        h.cmd(&["INCR", "s"]),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        h.cmd(&["INCRBY", "n", "1.5"]),
        "-ERR value is not an integer or out of range\r\n"
    );
    h.cmd(&["SET", "max", "9223372036854775807"]);
    assert_eq!(
        h.cmd(&["INCR", "max"]),
        "-ERR increment or decrement would overflow\r\n"
    );
    assert_eq!(h.cmd(&["GET", "max"]), "$19\r\n9223372036854775807\r\n");
    h.cmd(&["SET", "min", "-9223372036854775808"]);
    assert_eq!(
        h.cmd(&["DECR", "min"]),
        "-ERR increment or decrement would overflow\r\n"
    );
    assert_eq!(
        h.cmd(&["DECRBY", "n", "-9223372036854775808"]),
        "-ERR value is not an integer or out of range\r\n"
    );
    h.cmd(&["SET", "t", "5", "EX", "100"]);
    assert_eq!(h.cmd(&["INCR", "t"]), ":6\r\n");
    assert_eq!(h.cmd(&["TTL", "t"]), ":100\r\n", "INCR keeps the expiry");
    assert_eq!(
        h.cmd(&["INCR"]),
        "-ERR wrong number of arguments for 'incr' command\r\n"
    );
}

#[test]
fn multi_key_and_string_commands() {
    let mut h = Harness::new();
    assert_eq!(h.cmd(&["MSET", "a", "1", "b", "2"]), "+OK\r\n");
    assert_eq!(
        h.cmd(&["MSET", "a", "1", "b"]),
        "-ERR wrong number of arguments for 'mset' command\r\n"
    );
    assert_eq!(
        h.cmd(&["MGET", "a", "nope", "b"]),
        "*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n"
    );
    assert_eq!(h.cmd(&["EXISTS", "a", "a", "nope"]), ":2\r\n");
    assert_eq!(h.cmd(&["APPEND", "a", "23"]), ":3\r\n");
    assert_eq!(h.cmd(&["APPEND", "fresh", "xy"]), ":2\r\n");
    assert_eq!(h.cmd(&["STRLEN", "a"]), ":3\r\n");
    assert_eq!(h.cmd(&["STRLEN", "nope"]), ":0\r\n");
    assert_eq!(h.cmd(&["DBSIZE"]), ":3\r\n");
    assert_eq!(h.cmd(&["DEL", "a", "b", "nope"]), ":2\r\n");
    assert_eq!(h.cmd(&["DBSIZE"]), ":1\r\n");
    assert_eq!(h.cmd(&["FLUSHALL"]), "+OK\r\n");
    assert_eq!(h.cmd(&["DBSIZE"]), ":0\r\n");
    assert_eq!(h.cmd(&["FLUSHALL", "later"]), "-ERR syntax error\r\n");
}

#[test]
fn keys_patterns() {
    let mut h = Harness::new();
    for key in ["user:1", "user:2", "user:10", "session", "h*llo"] {
        h.cmd(&["SET", key, "x"]);
    }
    h.cmd(&["SET", "user:gone", "x", "PX", "1"]);
    h.now_ms += 1;
    assert_eq!(
        h.cmd(&["KEYS", "user:*"]),
        "*3\r\n$6\r\nuser:1\r\n$7\r\nuser:10\r\n$6\r\nuser:2\r\n"
    );
    assert_eq!(
        h.cmd(&["KEYS", "user:?"]),
        "*2\r\n$6\r\nuser:1\r\n$6\r\nuser:2\r\n"
    );
    assert_eq!(h.cmd(&["KEYS", "user:[^1]"]), "*1\r\n$6\r\nuser:2\r\n");
    assert_eq!(h.cmd(&["KEYS", "h\\*llo"]), "*1\r\n$5\r\nh*llo\r\n");
    assert_eq!(h.cmd(&["KEYS", "nothing*"]), "*0\r\n");
    assert_eq!(h.cmd(&["KEYS", "*"]).matches("\r\n$").count(), 5);
}

#[test]
fn server_commands() {
    let mut h = Harness::new();
    h.cmd(&["SET", "a", "1"]);
    h.cmd(&["SET", "b", "1", "EX", "5"]);
    let info = h.cmd(&["INFO"]);
    for field in [
        "# Server\r\n",
        "redis_version:7.0.0-capsules\r\n",
        "capsule:cache\r\n",
        "locator:198.18.0.7\r\n",
        "vm:vm1\r\n",
        "uptime_in_seconds:65\r\n",
        "connected_clients:3\r\n",
        "total_commands_processed:11\r\n",
        "db0:keys=2,expires=1,avg_ttl=0\r\n",
    ] {
        assert!(info.contains(field), "{field:?} missing from {info:?}");
    }
    let server_only = h.cmd(&["INFO", "server"]);
    assert!(server_only.contains("vm:vm1") && !server_only.contains("db0"));
    assert_eq!(h.cmd(&["SELECT", "0"]), "+OK\r\n");
    assert_eq!(h.cmd(&["SELECT", "1"]), "-ERR DB index is out of range\r\n");
    assert_eq!(
        h.cmd(&["SELECT", "x"]),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(h.cmd(&["CLIENT", "GETNAME"]), "$-1\r\n");
    assert_eq!(h.cmd(&["CLIENT", "SETNAME", "worker-1"]), "+OK\r\n");
    assert_eq!(h.cmd(&["client", "getname"]), "$8\r\nworker-1\r\n");
    assert_eq!(h.session.client_name(), Some(&b"worker-1"[..]));
    assert_eq!(
        h.cmd(&["CLIENT", "SETNAME", "has space"]),
        "-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    );
    assert_eq!(
        h.cmd(&["CLIENT", "SETNAME"]),
        "-ERR wrong number of arguments for 'client|setname' command\r\n"
    );
    assert_eq!(
        h.cmd(&["CLIENT", "KILL"]),
        "-ERR unknown subcommand 'KILL'. Try CLIENT HELP.\r\n"
    );
    assert_eq!(
        h.cmd(&["CLIENT"]),
        "-ERR wrong number of arguments for 'client' command\r\n"
    );
    assert_eq!(h.cmd(&["COMMAND"]), "*0\r\n");
    assert_eq!(h.cmd(&["COMMAND", "DOCS"]), "*0\r\n");
    assert!(h.cmd(&["COMMAND", "COUNT"]).starts_with(':'));
}

#[test]
fn unknown_commands_keep_the_connection() {
    let mut h = Harness::new();
    assert_eq!(
        h.cmd(&["FROB", "a", "b"]),
        "-ERR unknown command 'FROB', with args beginning with: 'a' 'b' \r\n"
    );
    assert_eq!(
        h.cmd(&["nosuch"]),
        "-ERR unknown command 'nosuch', with args beginning with: \r\n"
    );
    let reply = h.cmd(&["x\r\ny", &"z".repeat(500)]);
    assert!(
        reply.len() < 400 && reply.matches("\r\n").count() == 1,
        "{reply:?}"
    );
    assert_eq!(h.cmd(&["PING"]), "+PONG\r\n");
}

#[test]
fn quit_closes_after_ok() {
    let mut h = Harness::new();
    let (out, flow) = h.feed(b"PING\r\nQUIT\r\nPING\r\n");
    assert_eq!(out, b"+PONG\r\n+OK\r\n");
    assert_eq!(flow, Flow::Close);
    assert_eq!(h.feed(b"PING\r\n"), (Vec::new(), Flow::Close));
}

#[test]
fn inline_commands() {
    let mut h = Harness::new();
    let (out, flow) =
        h.feed(b"set greeting \"hello world\"\r\nget greeting\nexists greeting\r\n\r\n");
    assert_eq!(flow, Flow::Continue);
    assert_eq!(out, b"+OK\r\n$11\r\nhello world\r\n:1\r\n");
    let (out, flow) = h.feed(b"get \"unterminated\r\n");
    assert_eq!(
        out,
        b"-ERR Protocol error: unbalanced quotes in request\r\n"
    );
    assert_eq!(flow, Flow::Close);
}

#[test]
fn pipelined_batch_fed_byte_by_byte() {
    let mut h = Harness::new();
    let mut batch = Vec::new();
    let mut expected = Vec::new();
    for i in 0..100 {
        match i % 4 {
            0 => {
                batch.extend(encode(&["SET", &format!("key{i}"), &format!("value{i}")]));
                expected.extend_from_slice(b"+OK\r\n");
            }
            1 => {
                batch.extend(encode(&["GET", &format!("key{}", i - 1)]));
                let value = format!("value{}", i - 1);
                expected.extend(format!("${}\r\n{value}\r\n", value.len()).into_bytes());
            }
            2 => {
                batch.extend_from_slice(b"INCR counter\r\n");
                expected.extend(format!(":{}\r\n", i / 4 + 1).into_bytes());
            }
            _ => {
                batch.extend(encode(&["PING"]));
                expected.extend_from_slice(b"+PONG\r\n");
            }
        }
    }
    let mut out = Vec::new();
    for byte in &batch {
        let flow = h.session.feed(
            core::slice::from_ref(byte),
            &mut h.store,
            h.now_ms,
            &INFO,
            &mut out,
        );
        assert_eq!(flow, Flow::Continue);
    }
    assert_eq!(
        std::string::String::from_utf8_lossy(&out),
        std::string::String::from_utf8_lossy(&expected)
    );
    assert_eq!(h.session.commands_executed(), 100);
    assert!(h.session.input.is_empty(), "executed bytes are released");
}

#[test]
fn huge_declared_bulk_is_refused_without_allocating() {
    let mut h = Harness::new();
    let (out, flow) = h.feed(b"*1\r\n$67108865\r\n");
    assert_eq!(out, b"-ERR Protocol error: invalid bulk length\r\n");
    assert_eq!(flow, Flow::Close);

    let mut h = Harness::new();
    let (out, flow) = h.feed(b"*2\r\n$3\r\nGET\r\n$67108864\r\nab");
    assert_eq!((out.as_slice(), flow), (&b""[..], Flow::Continue));
    assert!(
        h.session.input.capacity() < 4096,
        "nothing reserved for the declared length"
    );

    let mut h = Harness::new();
    let (out, flow) = h.feed(b"*1048577\r\n");
    assert_eq!(out, b"-ERR Protocol error: invalid multibulk length\r\n");
    assert_eq!(flow, Flow::Close);
}

#[test]
fn replies_before_a_protocol_error_are_kept() {
    let mut h = Harness::new();
    let (out, flow) = h.feed(b"PING\r\n*1\r\n+PING\r\n");
    assert_eq!(
        out,
        b"+PONG\r\n-ERR Protocol error: expected '$', got '+'\r\n"
    );
    assert_eq!(flow, Flow::Close);
}

#[test]
fn binary_values_round_trip() {
    let mut h = Harness::new();
    let value: Vec<u8> = (0..=255u8).collect();
    let mut request = b"*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$256\r\n".to_vec();
    request.extend_from_slice(&value);
    request.extend_from_slice(b"\r\n*2\r\n$3\r\nGET\r\n$1\r\nb\r\n");
    let (out, _) = h.feed(&request);
    let mut expected = b"+OK\r\n$256\r\n".to_vec();
    expected.extend_from_slice(&value);
    expected.extend_from_slice(b"\r\n");
    assert_eq!(out, expected);
}

#[test]
fn args_parsing() {
    assert_eq!(parse_args(&[]), Ok(6379));
    assert_eq!(parse_args(&["--port", "7000"]), Ok(7000));
    assert!(parse_args(&["--port", "x"]).is_err());
}

#[test]
fn random_bytes_never_panic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let fragments: [&[u8]; 14] = [
        b"*",
        b"$",
        b"\r\n",
        b"\n",
        b"3",
        b"-1",
        b"SET ",
        b"GET k",
        b"\"",
        b"'",
        b"INCR k\r\n",
        b"EXPIRE k 1\r\n",
        b"KEYS [*\r\n",
        b"99999999999",
    ];
    for _ in 0..crate::fuzz_rounds(300) {
        let mut h = Harness::new();
        for _ in 0..40 {
            let mut chunk = Vec::new();
            for _ in 0..(next() % 8) {
                if next() % 2 == 0 {
                    chunk.extend_from_slice(fragments[(next() % fragments.len() as u64) as usize]);
                } else {
                    chunk.push(next() as u8);
                }
            }
            h.now_ms += next() % 3000;
            let (_, flow) = h.feed(&chunk);
            h.store.purge_expired(h.now_ms);
            if flow == Flow::Close {
                break;
            }
        }
    }
}
