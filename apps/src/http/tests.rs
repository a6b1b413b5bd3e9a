use super::*;
use alloc::format;
use alloc::vec;
use std::string::String as StdString;

const SITE: SiteInfo<'static> = SiteInfo {
    capsule: "web",
    locator: "198.18.0.9",
    vm: "vm2",
    uptime_ms: 12_345,
    requests_served: 40,
};

fn feed(session: &mut Session, input: &[u8]) -> (StdString, Flow) {
    let mut out = Vec::new();
    let flow = session.feed(input, &SITE, &mut out);
    (StdString::from_utf8(out).unwrap(), flow)
}

/// Drives a session like the kernel would: feed, then pump bodies through a
/// small buffer, re-feeding for requests pipelined behind a body.
fn drive(session: &mut Session, input: &[u8], chunk: usize) -> (Vec<u8>, Flow) {
    let mut wire = Vec::new();
    let mut flow = session.feed(input, &SITE, &mut wire);
    let mut buf = vec![0u8; chunk];
    loop {
        while session.pending_body() > 0 {
            let n = session.fill_body(&mut buf);
            assert!(n > 0);
            wire.extend_from_slice(&buf[..n]);
        }
        if flow == Flow::Close || !session.needs_feed() {
            return (wire, flow);
        }
        flow = session.feed(&[], &SITE, &mut wire);
    }
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response
        .split("\r\n\r\n")
        .next()?
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
}

#[test]
fn status_page_and_healthz() {
    let mut session = Session::new();
    let (out, flow) = feed(&mut session, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(flow, Flow::Continue);
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert_eq!(header(&out, "Connection"), Some("keep-alive"));
    let body = out.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(
        header(&out, "Content-Length"),
        Some(format!("{}", body.len()).as_str())
    );
    for line in [
        "capsule: web\n",
        "locator: 198.18.0.9\n",
        "vm: vm2\n",
        "uptime_ms: 12345\n",
        "requests_served: 41\n",
    ] {
        assert!(body.contains(line), "{line:?} missing in {body:?}");
    }
    let (out, _) = feed(&mut session, b"GET /healthz HTTP/1.1\r\n\r\n");
    assert!(
        out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\nok\n"),
        "{out}"
    );
    assert_eq!(session.requests_served(), 2);
}

#[test]
fn keep_alive_pipelining_in_one_segment() {
    let mut session = Session::new();
    let (out, flow) = feed(
        &mut session,
        b"GET /healthz HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\nGET /nope?x=1 HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    );
    assert_eq!(flow, Flow::Close);
    let statuses: Vec<&str> = out.matches("HTTP/1.1 ").map(|_| "").collect();
    assert_eq!(
        statuses.len(),
        4,
        "the request after Connection: close is ignored: {out}"
    );
    assert!(out.contains("404 Not Found"));
    assert!(out.ends_with("Connection: close\r\n\r\nok\n"), "{out}");
    assert_eq!(
        feed(&mut session, b"GET / HTTP/1.1\r\n\r\n"),
        (StdString::new(), Flow::Close)
    );
}

#[test]
fn requests_split_at_every_byte() {
    let request = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut session = Session::new();
    let mut out = Vec::new();
    for _ in 0..3 {
        for byte in request {
            assert_eq!(
                session.feed(core::slice::from_ref(byte), &SITE, &mut out),
                Flow::Continue
            );
        }
    }
    assert_eq!(
        StdString::from_utf8(out)
            .unwrap()
            .matches("\r\n\r\nok\n")
            .count(),
        3
    );
}

#[test]
fn head_sends_no_body() {
    let mut session = Session::new();
    let (out, _) = feed(&mut session, b"HEAD /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(header(&out, "Content-Length"), Some("3"));
    assert!(out.ends_with("\r\n\r\n"));
    let (out, _) = feed(&mut session, b"HEAD /bytes/1000 HTTP/1.1\r\n\r\n");
    assert_eq!(header(&out, "Content-Length"), Some("1000"));
    assert!(out.ends_with("\r\n\r\n"));
    assert_eq!(session.pending_body(), 0);
}

#[test]
fn bytes_body_is_exact_through_a_small_buffer() {
    for count in [0u64, 1, 250, 251, 252, 1000, 70_001] {
        let mut session = Session::new();
        let request = format!("GET /bytes/{count} HTTP/1.1\r\n\r\n");
        let (wire, flow) = drive(&mut session, request.as_bytes(), 97);
        assert_eq!(flow, Flow::Continue);
        let head_end = wire.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = core::str::from_utf8(&wire[..head_end]).unwrap();
        assert_eq!(
            header(head, "Content-Length"),
            Some(format!("{count}").as_str())
        );
        assert_eq!(
            header(head, "Content-Type"),
            Some("application/octet-stream")
        );
        let expected: Vec<u8> = (0..count).map(pattern_byte).collect();
        assert!(
            wire[head_end..] == expected[..],
            "body of /bytes/{count} differs"
        );
    }
}

#[test]
fn pipelined_requests_wait_behind_a_streamed_body() {
    let mut session = Session::new();
    let mut out = Vec::new();
    let flow = session.feed(
        b"GET /bytes/10 HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
        &SITE,
        &mut out,
    );
    assert_eq!(flow, Flow::Continue);
    assert!(
        !StdString::from_utf8_lossy(&out).contains("ok\n"),
        "second response must wait"
    );
    assert_eq!(session.pending_body(), 10);
    assert!(!session.needs_feed(), "not before the body is pumped");
    let (wire, _) = drive(&mut session, b"", 4);
    assert!(!session.needs_feed());
    assert_eq!(
        &wire[..10],
        &(0..10).map(pattern_byte).collect::<Vec<u8>>()[..]
    );
    assert!(StdString::from_utf8_lossy(&wire[10..]).ends_with("\r\n\r\nok\n"));
}

#[test]
fn connection_close_after_streamed_body() {
    let mut session = Session::new();
    let (wire, flow) = drive(
        &mut session,
        b"GET /bytes/5 HTTP/1.1\r\nConnection: close\r\n\r\n",
        2,
    );
    assert_eq!(flow, Flow::Close);
    assert!(wire.ends_with(&[0, 31, 62, 93, 124]));
}

#[test]
fn http10_defaults_to_close() {
    let mut session = Session::new();
    let (out, flow) = feed(&mut session, b"GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!(
        (header(&out, "Connection"), flow),
        (Some("close"), Flow::Close)
    );
    let mut session = Session::new();
    let (out, flow) = feed(
        &mut session,
        b"GET /healthz HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
    );
    assert_eq!(
        (header(&out, "Connection"), flow),
        (Some("keep-alive"), Flow::Continue)
    );
}

#[test]
fn request_bodies_are_skipped() {
    let mut session = Session::new();
    let (out, flow) = feed(
        &mut session,
        b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello",
    );
    assert_eq!(flow, Flow::Continue);
    assert!(out.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
    assert_eq!(header(&out, "Allow"), Some("GET, HEAD"));
    let (out, _) = feed(&mut session, b" worldGET /healthz HTTP/1.1\r\n\r\n");
    assert!(
        out.starts_with("HTTP/1.1 200 OK") && out.ends_with("ok\n"),
        "{out}"
    );
    let (out, _) = feed(
        &mut session,
        b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\r\nGET /healthz HTTP/1.1\r\n\r\n",
    );
    assert_eq!(out.matches("200 OK").count(), 2);
}

#[test]
fn not_found_and_odd_targets() {
    let mut session = Session::new();
    for (target, status) in [
        ("/missing", "404"),
        ("/bytes/", "404"),
        ("/bytes/abc", "404"),
        ("/bytes/-1", "404"),
        ("/bytes/1073741825", "400"),
        ("/bytes/99999999999999999999999", "404"),
        ("*", "400"),
        ("http://example/healthz", "200"),
        ("/healthz?probe=1", "200"),
    ] {
        let (out, flow) = feed(
            &mut session,
            format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes(),
        );
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status} ")),
            "{target}: {out}"
        );
        assert_eq!(flow, Flow::Continue, "{target}");
    }
}

#[test]
fn malformed_requests_get_400_and_close() {
    for bad in [
        &b"GET\r\n\r\n"[..],
        b"GET /\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET / HTTX/1.1\r\n\r\n",
        b"G@T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET / HTTP/1.1\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length:\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ] {
        let mut session = Session::new();
        let (out, flow) = feed(&mut session, bad);
        assert!(
            out.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{:?}: {out}",
            StdString::from_utf8_lossy(bad)
        );
        assert_eq!(header(&out, "Connection"), Some("close"));
        assert_eq!(flow, Flow::Close);
    }
    let mut session = Session::new();
    let (out, flow) = feed(&mut session, b"GET / HTTP/2.0\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 505 "));
    assert_eq!(flow, Flow::Close);
    let mut session = Session::new();
    let (out, flow) = feed(
        &mut session,
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 501 "));
    assert_eq!(flow, Flow::Close);
}

#[test]
fn oversized_heads_are_refused() {
    let mut session = Session::new();
    let mut request = b"GET / HTTP/1.1\r\n".to_vec();
    while request.len() <= MAX_HEAD_LEN {
        request.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let (out, flow) = feed(&mut session, &request);
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    assert_eq!(flow, Flow::Close);

    let mut session = Session::new();
    request.extend_from_slice(b"\r\n");
    let (out, flow) = feed(&mut session, &request);
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    assert_eq!(flow, Flow::Close);
}

#[test]
fn bare_lf_line_endings_are_accepted() {
    let mut session = Session::new();
    let (out, flow) = feed(&mut session, b"GET /healthz HTTP/1.1\nHost: a\n\n");
    assert_eq!(flow, Flow::Continue);
    assert!(out.ends_with("ok\n"));
}

#[test]
fn pattern_is_documented_formula_and_fill_matches_it() {
    assert_eq!(pattern_byte(0), 0);
    assert_eq!(pattern_byte(1), 31);
    assert_eq!(pattern_byte(251), (251u64 * 31 + 1) as u8);
    let mut session = Session::new();
    session.body = PatternBody {
        next_index: (1 << 30) - 700,
        remaining: 700,
    };
    let mut buf = [0u8; 1000];
    assert_eq!(session.fill_body(&mut buf), 700);
    for (i, &b) in buf[..700].iter().enumerate() {
        assert_eq!(b, pattern_byte((1 << 30) - 700 + i as u64));
    }
    assert_eq!(session.fill_body(&mut buf), 0);
}

#[test]
fn args_parsing() {
    assert_eq!(parse_args(&[]), Ok(80));
    assert_eq!(parse_args(&["--port=8080"]), Ok(8080));
    assert!(parse_args(&["8080"]).is_err());
}

#[test]
fn random_bytes_never_panic() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let fragments: [&[u8]; 12] = [
        b"GET ",
        b"HEAD ",
        b"/bytes/",
        b"/",
        b" HTTP/1.1",
        b"\r\n",
        b"\n",
        b"Content-Length: ",
        b"Connection: close",
        b"7",
        b":",
        b"\r\n\r\n",
    ];
    let mut buf = [0u8; 64];
    for _ in 0..crate::fuzz_rounds(500) {
        let mut session = Session::new();
        for _ in 0..30 {
            let mut chunk = Vec::new();
            for _ in 0..(next() % 10) {
                if next() % 3 == 0 {
                    chunk.push(next() as u8);
                } else {
                    chunk.extend_from_slice(fragments[(next() % fragments.len() as u64) as usize]);
                }
            }
            let mut out = Vec::new();
            let flow = session.feed(&chunk, &SITE, &mut out);
            for _ in 0..4 {
                session.fill_body(&mut buf);
            }
            if flow == Flow::Close {
                break;
            }
        }
    }
}
