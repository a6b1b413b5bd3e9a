//! `http`: an HTTP/1.1 server with keep-alive and pipelining.
//!
//! Routes (GET and HEAD):
//! - `/` — a `text/plain` status page, one `key: value` per line: capsule,
//!   locator, vm, uptime, requests served;
//! - `/healthz` — `ok\n`;
//! - `/bytes/N` — N bytes (up to 1 GiB) of [`pattern_byte`]`(0..N)`, streamed.
//!
//! Other paths get 404, other methods 405. A malformed request line or
//! header, a header section over 16 KiB or a bad `Content-Length` get a 400
//! and the connection closes, because the stream can no longer be framed.
//!
//! Large bodies are never built in memory: [`Session::feed`] queues the
//! response head in `out` and leaves the body pending; the caller pumps it
//! with [`Session::fill_body`] while the socket has room. Pipelined requests
//! stay buffered until the body is done, which keeps responses in order. A
//! driver therefore loops:
//!
//! ```text
//! flow = session.feed(received, info, &mut out);
//! loop {
//!     send(out); out.clear();
//!     while session.pending_body() > 0 { n = session.fill_body(&mut chunk); send(&chunk[..n]); }
//!     if flow == Close || !session.needs_feed() { break; }
//!     flow = session.feed(&[], info, &mut out);   // answer what was pipelined behind the body
//! }
//! if flow == Close { close } else { read more }
//! ```

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

pub use crate::Flow;

/// The conventional HTTP port.
pub const DEFAULT_PORT: u16 = 80;
/// Largest request head (request line and headers).
pub const MAX_HEAD_LEN: usize = 16 << 10;
/// Largest body `/bytes/N` serves.
pub const MAX_BYTES: u64 = 1 << 30;

/// Parses `[--port N]`.
pub fn parse_args(args: &[&str]) -> Result<u16, String> {
    crate::args::parse_port_args("http", args, DEFAULT_PORT)
}

/// Byte `index` of every `/bytes/N` body: `(index * 31 + index / 251) mod 256`.
///
/// Multiplying by an odd number makes consecutive bytes differ, and the
/// `index / 251` term shifts the 256-byte cycle every 251 bytes, so a chunk
/// that is dropped, repeated or misplaced by any offset below about 64 KiB
/// changes the content — a client comparing against this function notices.
pub fn pattern_byte(index: u64) -> u8 {
    index.wrapping_mul(31).wrapping_add(index / 251) as u8
}

/// What the status page reports; supplied by the kernel side.
#[derive(Debug, Clone, Copy)]
pub struct SiteInfo<'a> {
    pub capsule: &'a str,
    pub locator: &'a str,
    pub vm: &'a str,
    pub uptime_ms: u64,
    /// Requests served by all sessions, as known to the caller.
    pub requests_served: u64,
}

/// A `/bytes/N` body still to be produced.
#[derive(Debug, Default, Clone, Copy)]
struct PatternBody {
    next_index: u64,
    remaining: u64,
}

/// Per-connection protocol state.
#[derive(Debug, Default)]
pub struct Session {
    input: Vec<u8>,
    /// Where to resume looking for the end of a partly received head.
    head_scan: usize,
    /// Request body bytes still to be skipped.
    discard: u64,
    body: PatternBody,
    /// No further requests will be answered; close once output is sent.
    closing: bool,
    /// Requests arrived while a body was pending and wait for a `feed`.
    parked_behind_body: bool,
    served: u64,
}

/// A request the server cannot frame; answered, then the connection closes.
struct Reject {
    status: u16,
    reason: &'static str,
}

const fn reject(status: u16, reason: &'static str) -> Reject {
    Reject { status, reason }
}

#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a [u8],
    target: &'a [u8],
    keep_alive: bool,
    content_length: u64,
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes, answers every complete request (pipelining
    /// allowed) and appends the responses to `out`; stops early while a
    /// streamed body is pending (see the module documentation).
    ///
    /// Returns [`Flow::Close`] after `Connection: close`, HTTP/1.0 without
    /// keep-alive, or a bad request (its 400 is in `out`): the caller sends
    /// `out`, pumps any pending body, then closes. Later calls ignore input.
    /// The status page reports `info.requests_served` plus the requests this
    /// call answered, so the caller should fold [`Session::requests_served`]
    /// into its total between calls.
    pub fn feed(&mut self, input: &[u8], info: &SiteInfo, out: &mut Vec<u8>) -> Flow {
        if self.closing {
            return Flow::Close;
        }
        self.input.extend_from_slice(input);
        let mut pos = 0;
        let mut served_in_call = 0;
        let flow = loop {
            if self.body.remaining > 0 {
                self.parked_behind_body = pos < self.input.len();
                break Flow::Continue;
            }
            self.parked_behind_body = false;
            if self.discard > 0 {
                let available = (self.input.len() - pos) as u64;
                let skipped = available.min(self.discard);
                pos += skipped as usize;
                self.discard -= skipped;
                if self.discard > 0 {
                    break Flow::Continue;
                }
            }
            // Clients may send stray line breaks between requests (RFC 9112 §2.2).
            while let Some(line_break) = [&b"\r\n"[..], b"\n"]
                .into_iter()
                .find(|eol| self.input[pos..].starts_with(eol))
            {
                pos += line_break.len();
                // The resume offset was relative to where the skipped bytes began.
                self.head_scan = 0;
            }
            let rest = &self.input[pos..];
            let head_len = match find_head_end(rest, self.head_scan) {
                Ok(len) => len,
                Err(resume) => {
                    if rest.len() > MAX_HEAD_LEN {
                        self.closing = true;
                        write_reject(out, &reject(400, "header section too large"));
                        break Flow::Close;
                    }
                    self.head_scan = resume;
                    break Flow::Continue;
                }
            };
            self.head_scan = 0;
            self.served += 1;
            served_in_call += 1;
            let request = if head_len > MAX_HEAD_LEN {
                Err(reject(400, "header section too large"))
            } else {
                parse_head(&rest[..head_len])
            };
            pos += head_len;
            let request = match request {
                Ok(request) => request,
                Err(rejection) => {
                    self.closing = true;
                    write_reject(out, &rejection);
                    break Flow::Close;
                }
            };
            let site = SiteInfo {
                requests_served: info.requests_served.saturating_add(served_in_call),
                ..*info
            };
            self.body = respond(&request, &site, out);
            self.discard = request.content_length;
            if !request.keep_alive {
                self.closing = true;
                break Flow::Close;
            }
        };
        if self.closing {
            self.input = Vec::new();
        } else {
            self.input.drain(..pos);
        }
        flow
    }

    /// Body bytes of the current response not yet produced by
    /// [`Session::fill_body`].
    pub fn pending_body(&self) -> u64 {
        self.body.remaining
    }

    /// Writes the next body bytes into `buf`; returns how many (0 when no
    /// body is pending).
    pub fn fill_body(&mut self, buf: &mut [u8]) -> usize {
        let count = buf
            .len()
            .min(usize::try_from(self.body.remaining).unwrap_or(usize::MAX));
        // Within a run of up to 251 bytes the `index / 251` term is constant,
        // so each run is an arithmetic sequence: no division per byte, and a
        // loop the compiler can vectorise.
        let mut filled = 0;
        while filled < count {
            let index = self.body.next_index + filled as u64;
            let run = ((251 - index % 251) as usize).min(count - filled);
            let first = pattern_byte(index);
            for (step, byte) in buf[filled..filled + run].iter_mut().enumerate() {
                *byte = first.wrapping_add((step as u8).wrapping_mul(31));
            }
            filled += run;
        }
        self.body.next_index += count as u64;
        self.body.remaining -= count as u64;
        count
    }

    /// Whether requests pipelined behind a streamed body are waiting: once
    /// the body is pumped, call [`Session::feed`] with no new input to answer
    /// them.
    pub fn needs_feed(&self) -> bool {
        !self.closing && self.parked_behind_body && self.body.remaining == 0
    }

    /// Requests answered by this session so far (any status).
    pub fn requests_served(&self) -> u64 {
        self.served
    }
}

/// Length of the head (through its blank line) if complete; otherwise the
/// offset to resume scanning from once more bytes arrive.
fn find_head_end(buf: &[u8], from: usize) -> Result<usize, usize> {
    let mut at = from.min(buf.len());
    while let Some(offset) = buf[at..].iter().position(|&b| b == b'\n') {
        let newline = at + offset;
        match (buf.get(newline + 1), buf.get(newline + 2)) {
            (Some(b'\n'), _) => return Ok(newline + 2),
            (Some(b'\r'), Some(b'\n')) => return Ok(newline + 3),
            (None, _) | (Some(b'\r'), None) => return Err(newline),
            _ => at = newline + 1,
        }
    }
    Err(buf.len())
}

fn parse_head(head: &[u8]) -> Result<Request<'_>, Reject> {
    let bad = reject(400, "malformed request");
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty());
    let request_line = lines.next().ok_or(bad)?;
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(reject(400, "malformed request line"));
    };
    if method.is_empty() || !method.iter().all(|&b| is_token_byte(b)) {
        return Err(reject(400, "malformed method"));
    }
    if target.is_empty() || target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(reject(400, "malformed request target"));
    }
    let http11 = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            return Err(reject(505, "only HTTP/1.0 and HTTP/1.1 are supported"));
        }
        _ => return Err(reject(400, "malformed HTTP version")),
    };

    let mut close = false;
    let mut keep_alive = false;
    let mut content_length: Option<u64> = None;
    for line in lines {
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(reject(400, "malformed header"))?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        // Whitespace before the colon or a folded line is a smuggling vector (RFC 9112 §5).
        if name.is_empty() || !name.iter().all(|&b| is_token_byte(b)) {
            return Err(reject(400, "malformed header name"));
        }
        if value.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err(reject(400, "malformed header value"));
        }
        let value = trim(value);
        if name.eq_ignore_ascii_case(b"content-length") {
            let length = parse_content_length(value).ok_or(reject(400, "bad Content-Length"))?;
            if content_length.is_some_and(|seen| seen != length) {
                return Err(reject(400, "conflicting Content-Length"));
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(reject(
                501,
                "request bodies with Transfer-Encoding are not supported",
            ));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in value.split(|&b| b == b',').map(trim) {
                close |= option.eq_ignore_ascii_case(b"close");
                keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    Ok(Request {
        method,
        target,
        keep_alive: !close && (http11 || keep_alive),
        content_length: content_length.unwrap_or(0),
    })
}

fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &b| {
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim(bytes: &[u8]) -> &[u8] {
    let is_blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes
        .iter()
        .position(|b| !is_blank(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_blank(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// The path of an origin-form (`/p?q`) or absolute-form (`http://h/p`)
/// target, without query or fragment; `None` for anything else.
fn path_of(target: &[u8]) -> Option<&[u8]> {
    let path = if target.starts_with(b"/") {
        target
    } else {
        let scheme_end = target.windows(3).position(|w| w == b"://")?;
        let after_authority = &target[scheme_end + 3..];
        match after_authority.iter().position(|&b| b == b'/') {
            Some(slash) => &after_authority[slash..],
            None => b"/",
        }
    };
    let end = path
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(path.len());
    Some(&path[..end])
}

/// Writes the response for a well-formed request; returns the body still to
/// be streamed (empty unless `/bytes/N` was asked for with GET).
fn respond(request: &Request<'_>, site: &SiteInfo<'_>, out: &mut Vec<u8>) -> PatternBody {
    let with_body = request.method != b"HEAD";
    let mut send = |status: u16, content_type: &str, body: &[u8], extra: &str| {
        write_head(
            out,
            status,
            content_type,
            body.len() as u64,
            request.keep_alive,
            extra,
        );
        if with_body {
            out.extend_from_slice(body);
        }
    };
    if request.method != b"GET" && request.method != b"HEAD" {
        send(
            405,
            "text/plain",
            b"method not allowed\n",
            "Allow: GET, HEAD\r\n",
        );
        return PatternBody::default();
    }
    let Some(path) = path_of(request.target) else {
        send(400, "text/plain", b"bad request target\n", "");
        return PatternBody::default();
    };
    match path {
        b"/" => send(
            200,
            "text/plain; charset=utf-8",
            status_page(site).as_bytes(),
            "",
        ),
        b"/healthz" => send(200, "text/plain", b"ok\n", ""),
        _ => match path.strip_prefix(b"/bytes/").map(parse_content_length) {
            None | Some(None) => send(404, "text/plain", b"not found\n", ""),
            Some(Some(count)) if count > MAX_BYTES => {
                send(400, "text/plain", b"at most 1073741824 bytes\n", "");
            }
            Some(Some(count)) => {
                write_head(
                    out,
                    200,
                    "application/octet-stream",
                    count,
                    request.keep_alive,
                    "",
                );
                if with_body {
                    return PatternBody {
                        next_index: 0,
                        remaining: count,
                    };
                }
            }
        },
    }
    PatternBody::default()
}

fn status_page(site: &SiteInfo<'_>) -> String {
    let mut page = String::with_capacity(192);
    // Writing into a String cannot fail.
    let _ = write!(
        page,
        "capsule: {}\nprogram: http\nlocator: {}\nvm: {}\nuptime_ms: {}\nuptime: {}.{:03} s\nrequests_served: {}\n",
        single_line(site.capsule),
        single_line(site.locator),
        single_line(site.vm),
        site.uptime_ms,
        site.uptime_ms / 1000,
        site.uptime_ms % 1000,
        site.requests_served,
    );
    page
}

/// Keeps a stray line break in a name from forging extra status lines.
fn single_line(text: &str) -> impl core::fmt::Display + '_ {
    struct SingleLine<'a>(&'a str);
    impl core::fmt::Display for SingleLine<'_> {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            for c in self.0.chars() {
                f.write_char(if c.is_control() { ' ' } else { c })?;
            }
            Ok(())
        }
    }
    SingleLine(text)
}

fn write_reject(out: &mut Vec<u8>, rejection: &Reject) {
    let body_len = rejection.reason.len() as u64 + 1;
    write_head(out, rejection.status, "text/plain", body_len, false, "");
    out.extend_from_slice(rejection.reason.as_bytes());
    out.push(b'\n');
}

fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    content_length: u64,
    keep_alive: bool,
    extra: &str,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_u64(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\nServer: capsules-http\r\nContent-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    push_u64(out, content_length);
    out.extend_from_slice(if keep_alive {
        b"\r\nConnection: keep-alive\r\n"
    } else {
        b"\r\nConnection: close\r\n"
    });
    out.extend_from_slice(extra.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

fn push_u64(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests;
