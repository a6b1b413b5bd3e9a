//! RESP2 framing: an incremental request parser and reply writers.
//!
//! The parser is resumable: it remembers how far into a partly received
//! command it got, so a client trickling in a large request costs linear work
//! rather than a re-parse per received segment. Declared lengths are only
//! trusted after their bytes have arrived; nothing is reserved from them
//! beyond a small cap.

use alloc::vec::Vec;
use core::ops::Range;

/// Largest bulk string a client may send.
pub const MAX_BULK_LEN: usize = 64 << 20;
/// Largest number of elements in a request array.
pub const MAX_ARRAY_LEN: usize = 1 << 20;
/// Longest inline command or length line; Redis uses the same bound.
pub const MAX_LINE_LEN: usize = 64 << 10;
/// Caps what a declared array length may pre-reserve for argument slots.
const ARGS_RESERVE_CAP: usize = 16;

/// A stream that cannot be parsed any further; the connection must close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    InvalidMultibulkLength,
    InvalidBulkLength,
    ExpectedDollar(u8),
    MissingBulkTerminator,
    TooBigCountString,
    TooBigInlineRequest,
    UnbalancedQuotes,
}

impl ProtocolError {
    /// Writes the Redis-worded error reply.
    pub fn write_reply(self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"-ERR Protocol error: ");
        match self {
            Self::InvalidMultibulkLength => out.extend_from_slice(b"invalid multibulk length"),
            Self::InvalidBulkLength => out.extend_from_slice(b"invalid bulk length"),
            Self::ExpectedDollar(got) => {
                out.extend_from_slice(b"expected '$', got '");
                out.push(if got.is_ascii_graphic() || got == b' ' {
                    got
                } else {
                    b'?'
                });
                out.push(b'\'');
            }
            Self::MissingBulkTerminator => {
                out.extend_from_slice(b"expected CRLF after bulk string")
            }
            Self::TooBigCountString => out.extend_from_slice(b"too big mbulk count string"),
            Self::TooBigInlineRequest => out.extend_from_slice(b"too big inline request"),
            Self::UnbalancedQuotes => out.extend_from_slice(b"unbalanced quotes in request"),
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Where the argument ranges of a complete command point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Into the session's input buffer (RESP array of bulk strings).
    Input,
    /// Into [`Parser::inline_args`] (inline commands may contain escapes).
    Inline,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Start,
    Elements { remaining: usize },
    Payload { remaining: usize, len: usize },
    Inline,
}

/// Incremental RESP request parser over a buffer owned by the caller.
#[derive(Debug)]
pub struct Parser {
    /// First byte of the command being parsed; everything before is done.
    start: usize,
    /// Next byte not yet examined.
    cursor: usize,
    state: State,
    args: Vec<Range<usize>>,
    inline_args: Vec<u8>,
}

impl Parser {
    pub fn new() -> Self {
        Self {
            start: 0,
            cursor: 0,
            state: State::Start,
            args: Vec::new(),
            inline_args: Vec::new(),
        }
    }

    /// Argument ranges of the command last returned by [`Parser::parse`].
    pub fn args(&self) -> &[Range<usize>] {
        &self.args
    }

    pub fn inline_args(&self) -> &[u8] {
        &self.inline_args
    }

    /// Advances over `buf` (which only ever grows at the end between calls,
    /// except through [`Parser::compact`]). Returns a complete command, or
    /// `None` when more bytes are needed.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<Source>, ProtocolError> {
        loop {
            match self.state {
                State::Start => {
                    let Some(&first) = buf.get(self.cursor) else {
                        return Ok(None);
                    };
                    self.args.clear();
                    if first != b'*' {
                        self.state = State::Inline;
                        continue;
                    }
                    let Some((digits, next)) =
                        line_at(buf, self.cursor + 1, ProtocolError::InvalidMultibulkLength)?
                    else {
                        return Ok(None);
                    };
                    let count =
                        parse_i64(&buf[digits]).ok_or(ProtocolError::InvalidMultibulkLength)?;
                    if count > MAX_ARRAY_LEN as i64 {
                        return Err(ProtocolError::InvalidMultibulkLength);
                    }
                    self.cursor = next;
                    if count <= 0 {
                        // Redis treats `*0` and `*-1` requests as nothing to do.
                        self.start = next;
                        continue;
                    }
                    let count = count as usize;
                    self.args.reserve(count.min(ARGS_RESERVE_CAP));
                    self.state = State::Elements { remaining: count };
                }
                State::Elements { remaining: 0 } => return Ok(Some(Source::Input)),
                State::Elements { remaining } => {
                    let Some(&marker) = buf.get(self.cursor) else {
                        return Ok(None);
                    };
                    if marker != b'$' {
                        return Err(ProtocolError::ExpectedDollar(marker));
                    }
                    let Some((digits, next)) =
                        line_at(buf, self.cursor + 1, ProtocolError::InvalidBulkLength)?
                    else {
                        return Ok(None);
                    };
                    let len = match parse_i64(&buf[digits]) {
                        Some(len) if (0..=MAX_BULK_LEN as i64).contains(&len) => len as usize,
                        _ => return Err(ProtocolError::InvalidBulkLength),
                    };
                    self.cursor = next;
                    self.state = State::Payload {
                        remaining: remaining - 1,
                        len,
                    };
                }
                State::Payload { remaining, len } => {
                    let end = self.cursor + len;
                    if buf.len() < end + 2 {
                        return Ok(None);
                    }
                    if &buf[end..end + 2] != b"\r\n" {
                        return Err(ProtocolError::MissingBulkTerminator);
                    }
                    self.args.push(self.cursor..end);
                    self.cursor = end + 2;
                    self.state = State::Elements { remaining };
                }
                State::Inline => {
                    let newline = buf[self.cursor..].iter().position(|&b| b == b'\n');
                    let Some(offset) = newline else {
                        if buf.len() - self.start > MAX_LINE_LEN {
                            return Err(ProtocolError::TooBigInlineRequest);
                        }
                        self.cursor = buf.len();
                        return Ok(None);
                    };
                    let end = self.cursor + offset;
                    if end - self.start > MAX_LINE_LEN {
                        return Err(ProtocolError::TooBigInlineRequest);
                    }
                    let line = &buf[self.start..end];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    split_inline(line, &mut self.inline_args, &mut self.args)?;
                    self.cursor = end + 1;
                    if self.args.is_empty() {
                        self.start = self.cursor;
                        self.state = State::Start;
                        continue;
                    }
                    return Ok(Some(Source::Inline));
                }
            }
        }
    }

    /// Marks the command last returned by [`Parser::parse`] as executed.
    pub fn finish(&mut self) {
        self.start = self.cursor;
        self.state = State::Start;
        self.args.clear();
    }

    /// Drops executed bytes from the front of `buf`, keeping positions valid.
    pub fn compact(&mut self, buf: &mut Vec<u8>) {
        let done = self.start;
        if done == 0 {
            return;
        }
        buf.drain(..done);
        self.start = 0;
        self.cursor -= done;
        for range in &mut self.args {
            *range = range.start - done..range.end - done;
        }
    }
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

/// Finds a `\r\n`-terminated line starting at `from`: the line's range and the
/// position after its terminator.
fn line_at(
    buf: &[u8],
    from: usize,
    malformed: ProtocolError,
) -> Result<Option<(Range<usize>, usize)>, ProtocolError> {
    let rest = buf.get(from..).unwrap_or(&[]);
    match rest.iter().position(|&b| b == b'\r') {
        None if rest.len() > MAX_LINE_LEN => Err(ProtocolError::TooBigCountString),
        None => Ok(None),
        Some(offset) => match rest.get(offset + 1) {
            None => Ok(None),
            Some(b'\n') => Ok(Some((from..from + offset, from + offset + 2))),
            // A lone CR inside a length line cannot be a number either.
            Some(_) => Err(malformed),
        },
    }
}

/// Splits an inline command the way `redis-cli` quoting expects: whitespace
/// separates arguments; "double quotes" understand `\n \r \t \b \a \\ \" \xHH`;
/// 'single quotes' only `\'`.
fn split_inline(
    line: &[u8],
    store: &mut Vec<u8>,
    args: &mut Vec<Range<usize>>,
) -> Result<(), ProtocolError> {
    store.clear();
    args.clear();
    let mut i = 0;
    loop {
        while i < line.len() && is_space(line[i]) {
            i += 1;
        }
        if i == line.len() {
            return Ok(());
        }
        let begin = store.len();
        match line[i] {
            b'"' => {
                i += 1;
                loop {
                    let Some(&b) = line.get(i) else {
                        return Err(ProtocolError::UnbalancedQuotes);
                    };
                    match b {
                        b'"' => break,
                        b'\\'
                            if line.len() > i + 3
                                && line[i + 1] == b'x'
                                && hex_value(line[i + 2]).is_some()
                                && hex_value(line[i + 3]).is_some() =>
                        {
                            let high = hex_value(line[i + 2]).unwrap_or(0);
                            let low = hex_value(line[i + 3]).unwrap_or(0);
                            store.push(high << 4 | low);
                            i += 3;
                        }
                        b'\\' if i + 1 < line.len() => {
                            i += 1;
                            store.push(match line[i] {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                b'b' => 0x08,
                                b'a' => 0x07,
                                other => other,
                            });
                        }
                        other => store.push(other),
                    }
                    i += 1;
                }
                i += 1;
                if i < line.len() && !is_space(line[i]) {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
            }
            b'\'' => {
                i += 1;
                loop {
                    let Some(&b) = line.get(i) else {
                        return Err(ProtocolError::UnbalancedQuotes);
                    };
                    match b {
                        b'\'' => break,
                        b'\\' if line.get(i + 1) == Some(&b'\'') => {
                            store.push(b'\'');
                            i += 1;
                        }
                        other => store.push(other),
                    }
                    i += 1;
                }
                i += 1;
                if i < line.len() && !is_space(line[i]) {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
            }
            _ => {
                while i < line.len() && !is_space(line[i]) {
                    store.push(line[i]);
                    i += 1;
                }
            }
        }
        args.push(begin..store.len());
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Strict decimal i64 as Redis accepts it: optional `-`, no `+`, no spaces,
/// no leading zeros, no `-0`.
pub fn parse_i64(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, text),
    };
    match digits {
        [] => return None,
        [b'0'] if !negative => return Some(0),
        [b'0', ..] => return None,
        _ => {}
    }
    // Accumulate negatively so i64::MIN parses without overflow.
    let mut value: i64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_sub(i64::from(b - b'0'))?;
    }
    if negative {
        Some(value)
    } else {
        value.checked_neg()
    }
}

/// Appends the decimal form of `value` without going through `core::fmt`.
pub fn push_decimal(out: &mut Vec<u8>, value: i64) {
    if value < 0 {
        out.push(b'-');
    }
    let mut magnitude = value.unsigned_abs();
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (magnitude % 10) as u8;
        magnitude /= 10;
        if magnitude == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

pub fn simple(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'+');
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

/// An error reply; CR and LF are replaced so a message built from client
/// bytes cannot break the framing.
pub fn error(out: &mut Vec<u8>, message: &[u8]) {
    out.push(b'-');
    out.extend(
        message
            .iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

pub fn integer(out: &mut Vec<u8>, value: i64) {
    out.push(b':');
    push_decimal(out, value);
    out.extend_from_slice(b"\r\n");
}

pub fn bulk(out: &mut Vec<u8>, data: &[u8]) {
    out.push(b'$');
    push_decimal(out, data.len() as i64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

pub fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

pub fn array_header(out: &mut Vec<u8>, len: usize) {
    out.push(b'*');
    push_decimal(out, len as i64);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut parser = Parser::new();
        let mut commands = Vec::new();
        while let Some(source) = parser.parse(input)? {
            let src = match source {
                Source::Input => input,
                Source::Inline => parser.inline_args(),
            };
            commands.push(
                parser
                    .args()
                    .iter()
                    .map(|r| src[r.clone()].to_vec())
                    .collect(),
            );
            parser.finish();
        }
        Ok(commands)
    }

    #[test]
    fn integers_are_parsed_strictly() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-1"), Some(-1));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"9223372036854775808",
            b"1a",
        ] {
            assert_eq!(parse_i64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn decimals_are_written_exactly() {
        for value in [0, 7, -7, i64::MAX, i64::MIN, 1_000_000] {
            let mut out = Vec::new();
            push_decimal(&mut out, value);
            assert_eq!(out, std::format!("{value}").into_bytes());
        }
    }

    #[test]
    fn arrays_and_inline_commands() {
        assert_eq!(
            parse_all(b"*2\r\n$3\r\nGET\r\n$0\r\n\r\nPING\r\n*0\r\n\r\n  set a  b \n").unwrap(),
            vec![
                vec![b"GET".to_vec(), b"".to_vec()],
                vec![b"PING".to_vec()],
                vec![b"set".to_vec(), b"a".to_vec(), b"b".to_vec()],
            ]
        );
    }

    #[test]
    fn inline_quoting() {
        assert_eq!(
            parse_all(b"set \"a b\\n\\x41\" 'it\\'s'\r\n").unwrap(),
            vec![vec![b"set".to_vec(), b"a b\nA".to_vec(), b"it's".to_vec()]]
        );
        assert_eq!(
            parse_all(b"set \"a\r\n"),
            Err(ProtocolError::UnbalancedQuotes)
        );
        assert_eq!(
            parse_all(b"set \"a\"b\r\n"),
            Err(ProtocolError::UnbalancedQuotes)
        );
        assert_eq!(
            parse_all(b"set 'a\r\n"),
            Err(ProtocolError::UnbalancedQuotes)
        );
    }

    #[test]
    fn malformed_frames() {
        assert_eq!(
            parse_all(b"*x\r\n"),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            parse_all(b"*1048577\r\n"),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            parse_all(b"*1\r\n:1\r\n"),
            Err(ProtocolError::ExpectedDollar(b':'))
        );
        assert_eq!(
            parse_all(b"*1\r\n$-1\r\n"),
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(
            parse_all(b"*1\r\n$67108865\r\n"),
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(
            parse_all(b"*1\r\n$1\r\nab\r\n"),
            Err(ProtocolError::MissingBulkTerminator)
        );
        assert_eq!(
            parse_all(b"*1\r\n$1\rx"),
            Err(ProtocolError::InvalidBulkLength)
        );
        let long = vec![b'a'; MAX_LINE_LEN + 2];
        assert_eq!(parse_all(&long), Err(ProtocolError::TooBigInlineRequest));
        let mut long_count = b"*".to_vec();
        long_count.extend(vec![b'1'; MAX_LINE_LEN + 2]);
        assert_eq!(
            parse_all(&long_count),
            Err(ProtocolError::TooBigCountString)
        );
    }

    #[test]
    fn huge_declared_lengths_reserve_nothing() {
        let mut parser = Parser::new();
        let input = b"*1048576\r\n$67108864\r\nabc";
        assert_eq!(parser.parse(input), Ok(None));
        assert!(parser.args.capacity() <= ARGS_RESERVE_CAP);
    }

    #[test]
    fn compaction_keeps_partial_commands() {
        let mut parser = Parser::new();
        let mut buf = b"PING\r\n*2\r\n$3\r\nGET\r\n$1\r\n".to_vec();
        assert_eq!(parser.parse(&buf), Ok(Some(Source::Inline)));
        parser.finish();
        assert_eq!(parser.parse(&buf), Ok(None));
        parser.compact(&mut buf);
        assert!(buf.starts_with(b"*2"));
        buf.extend_from_slice(b"k\r\n");
        assert_eq!(parser.parse(&buf), Ok(Some(Source::Input)));
        let args: Vec<&[u8]> = parser.args().iter().map(|r| &buf[r.clone()]).collect();
        assert_eq!(args, vec![&b"GET"[..], b"k"]);
    }
}
