//! Bounded, seeded fuzzing of the `http` protocol engine (docs/fuzzing.md).
//! Inputs are pipelined requests from a generator that knows methods,
//! targets, versions and the headers that frame a request (Content-Length,
//! Transfer-Encoding, Connection), mutations of them, and random bytes. Each
//! stream is driven twice — in one piece and cut at random points — through
//! the loop the kernel's driver uses (feed, pump the streamed body, feed
//! again for requests pipelined behind it).
//!
//! Properties: no input panics; the bytes sent do not depend on how the
//! stream was cut; for generated streams, the responses are well framed (one
//! per request up to the one that closes, each with a Content-Length its body
//! matches, `/bytes/N` bodies byte for byte).

#[path = "../../wire/tests/fuzzkit/mod.rs"]
mod fuzzkit;

use capsules_apps::http::{Flow, Session, SiteInfo, pattern_byte};
use fuzzkit::{Rng, Stats, guarded, inputs, mutate};

const SITE: SiteInfo<'static> = SiteInfo {
    capsule: "web",
    locator: "198.18.0.9",
    vm: "vm2",
    uptime_ms: 12_345,
    requests_served: 40,
};

/// Bodies larger than this are not pumped (a mutated `/bytes/N` may ask for
/// up to 1 GiB); such an input is skipped.
const BODY_BUDGET: u64 = 1 << 20;

const DICTIONARY: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b" HTTP/2.0",
    b"\r\n",
    b"\n",
    b"\r\n\r\n",
    b"/bytes/",
    b"/healthz",
    b"http://h",
    b"Content-Length: ",
    b"Content-Length: 18446744073709551615",
    b"Content-Length: 99999999999999999999",
    b"Transfer-Encoding: chunked",
    b"Connection: close",
    b"Connection: keep-alive",
    b":",
    b" ",
    b"\t",
    b"\0",
    b"1073741824",
    b"1073741825",
];

/// A request and what the server must do with it.
struct Generated {
    bytes: Vec<u8>,
    head: bool,
    /// `/bytes/N` with GET: the body is the pattern.
    pattern: Option<u64>,
    /// The connection closes after this response (or it is refused).
    last: bool,
}

fn gen_request(rng: &mut Rng) -> Generated {
    let eol: &[u8] = if rng.chance(1, 8) { b"\n" } else { b"\r\n" };
    let method = *rng.pick(&[
        "GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS",
    ]);
    let n = if rng.chance(1, 16) {
        rng.below(64 << 10) as u64
    } else {
        rng.below(600) as u64
    };
    let target = match rng.below(9) {
        0 => "/".to_string(),
        1 => "/healthz".to_string(),
        2 => "/healthz?x=1#f".to_string(),
        3 => format!("http://web.capsule/bytes/{n}"),
        4 => "/nope".to_string(),
        5 => "/bytes/1073741825".to_string(),
        6 => "/bytes/01x".to_string(),
        _ => format!("/bytes/{n}"),
    };
    let http10 = rng.chance(1, 6);
    let mut bytes = Vec::new();
    for _ in 0..rng.below(2) {
        bytes.extend_from_slice(eol);
    }
    let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
    bytes.extend_from_slice(format!("{method} {target} {version}").as_bytes());
    bytes.extend_from_slice(eol);
    bytes.extend_from_slice(b"Host: web.capsule");
    bytes.extend_from_slice(eol);
    let mut close = false;
    let mut keep_alive = false;
    match rng.below(6) {
        0 => {
            bytes.extend_from_slice(b"Connection: close");
            close = true;
        }
        1 => {
            bytes.extend_from_slice(b"Connection:  Keep-Alive , x");
            keep_alive = true;
        }
        _ => bytes.extend_from_slice(b"User-Agent: fuzz/1"),
    }
    bytes.extend_from_slice(eol);
    let body_len = if method == "POST" || rng.chance(1, 10) {
        rng.below(100)
    } else {
        0
    };
    if body_len > 0 || rng.chance(1, 10) {
        bytes.extend_from_slice(format!("content-length:\t{body_len} ").as_bytes());
        bytes.extend_from_slice(eol);
    }
    bytes.extend_from_slice(eol);
    bytes.extend(rng.bytes(body_len));
    let with_body = method == "GET";
    let pattern = target
        .rsplit_once("/bytes/")
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .filter(|n| *n <= 1 << 30 && with_body && (method == "GET" || method == "HEAD"));
    Generated {
        bytes,
        head: method == "HEAD",
        pattern,
        last: close || (http10 && !keep_alive),
    }
}

/// Drives a session over `stream` cut at `cuts`, as the kernel does: feed,
/// send, pump the body, feed again while requests wait behind a body.
/// `None` when a body is over the budget.
fn drive(stream: &[u8], cuts: &[usize]) -> Option<(Vec<u8>, bool)> {
    let mut session = Session::new();
    let mut wire = Vec::new();
    let mut from = 0;
    let mut chunk = [0u8; 1000];
    for &to in cuts {
        let site = SiteInfo {
            requests_served: SITE.requests_served + session.requests_served(),
            ..SITE
        };
        let mut flow = session.feed(&stream[from..to], &site, &mut wire);
        from = to;
        loop {
            if session.pending_body() > BODY_BUDGET {
                return None;
            }
            while session.pending_body() > 0 {
                let n = session.fill_body(&mut chunk);
                assert!(n > 0, "a pending body produced nothing");
                wire.extend_from_slice(&chunk[..n]);
            }
            if flow == Flow::Close || !session.needs_feed() {
                break;
            }
            let site = SiteInfo {
                requests_served: SITE.requests_served + session.requests_served(),
                ..SITE
            };
            flow = session.feed(&[], &site, &mut wire);
        }
        if flow == Flow::Close {
            let mut more = Vec::new();
            assert_eq!(
                session.feed(b"GET / HTTP/1.1\r\n\r\n", &SITE, &mut more),
                Flow::Close
            );
            assert!(more.is_empty(), "a closed session answered");
            return Some((wire, true));
        }
    }
    Some((wire, false))
}

/// Splits the wire into responses: (status, headers, body). HEAD responses
/// carry a Content-Length but no body: `heads` says which those are.
fn split_responses(wire: &[u8], heads: &[bool]) -> Vec<(u16, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        let rest = &wire[at..];
        let head_end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("response head ends with a blank line");
        let head = std::str::from_utf8(&rest[..head_end]).expect("ASCII head");
        let status: u16 = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.parse().ok())
            .expect("Content-Length");
        let is_head = heads.get(out.len()).copied().unwrap_or(false);
        let body_len = if is_head { 0 } else { length };
        let body_at = head_end + 4;
        let body = rest
            .get(body_at..body_at + body_len)
            .expect("body as long as Content-Length")
            .to_vec();
        out.push((status, head.to_string(), body));
        at += body_at + body_len;
    }
    out
}

#[test]
fn fuzz_http_sessions() {
    let target = "http";
    let mut rng = Rng::for_target(target);
    let mut stats = Stats::new(target);
    let mut pool: Vec<Vec<u8>> = Vec::new();
    for _ in 0..inputs(100_000) {
        let kind = rng.below(10);
        let mut generated = Vec::new();
        let stream = match kind {
            0..=2 => {
                generated = (0..rng.range(1, 5))
                    .map(|_| gen_request(&mut rng))
                    .collect();
                generated.iter().flat_map(|g| g.bytes.clone()).collect()
            }
            3..=8 if !pool.is_empty() => {
                let base = rng.pick(&pool).clone();
                mutate(&mut rng, &base, DICTIONARY, &pool)
            }
            _ => rng.random_input(200),
        };
        if kind <= 2 {
            if pool.len() < 64 {
                pool.push(stream.clone());
            } else {
                let i = rng.below(64);
                pool[i] = stream.clone();
            }
        }
        let cuts = rng.cuts(stream.len());
        let answered = guarded(target, &stream, || {
            let Some(whole) = drive(&stream, &[stream.len()]) else {
                return false;
            };
            let Some(pieces) = drive(&stream, &cuts) else {
                return false;
            };
            assert!(
                pieces == whole,
                "output depends on how the stream was cut at {cuts:?}:\n{}\n---\n{}",
                String::from_utf8_lossy(&whole.0),
                String::from_utf8_lossy(&pieces.0)
            );
            if !generated.is_empty() {
                check_generated(&generated, &whole.0, whole.1);
            }
            !whole.0.is_empty()
        });
        stats.input(answered);
    }
}

/// The responses to a generated stream: one per request up to the first
/// that closes, each framed by its Content-Length, bodies as asked.
fn check_generated(requests: &[Generated], wire: &[u8], closed: bool) {
    let answered = requests
        .iter()
        .position(|g| g.last)
        .map_or(requests.len(), |i| i + 1);
    let heads: Vec<bool> = requests.iter().map(|g| g.head).collect();
    let responses = split_responses(wire, &heads);
    assert_eq!(
        responses.len(),
        answered,
        "responses to {answered} requests"
    );
    assert_eq!(
        closed,
        answered < requests.len() || requests[answered - 1].last
    );
    for (g, (status, head, body)) in requests.iter().zip(&responses) {
        if let Some(n) = g.pattern {
            assert_eq!(*status, 200, "{head}");
            assert_eq!(body.len() as u64, n);
            assert!(
                body.iter()
                    .enumerate()
                    .all(|(i, b)| *b == pattern_byte(i as u64)),
                "/bytes/{n} body differs from the pattern"
            );
        }
        let keep = head.contains("Connection: keep-alive");
        assert_eq!(keep, !g.last, "{head}");
    }
}
