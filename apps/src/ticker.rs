//! `ticker`: a capsule acting as a client. It connects out to a target and
//! sends one numbered line every interval, so a listener can tell from the
//! sequence numbers whether a line was lost or repeated (e.g. across a
//! migration).
//!
//! Arguments: `ADDR:PORT [INTERVAL_MS]`, or the same as flags
//! `--to ADDR:PORT --every MS` (flags and positional forms may be mixed; the
//! interval defaults to 1000 ms).

use alloc::format;
use alloc::string::String;
use core::net::Ipv4Addr;

/// Interval used when none is given.
pub const DEFAULT_INTERVAL_MS: u64 = 1000;

/// One line on the wire: `ticker <name> <seq>\n`.
pub fn line(name: &str, seq: u64) -> String {
    format!("ticker {name} {seq}\n")
}

/// Reads a line produced by [`line`]; the trailing `\n` (or `\r\n`) is
/// optional so callers may pass lines from a line splitter.
pub fn parse_line(line: &str) -> Option<(&str, u64)> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    let rest = line.strip_prefix("ticker ")?;
    let (name, seq) = rest.split_once(' ')?;
    if name.is_empty() || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((name, seq.parse().ok()?))
}

/// Where and how often to tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Args {
    pub target: Ipv4Addr,
    pub port: u16,
    pub interval_ms: u64,
}

const USAGE: &str = "usage: ticker ADDR:PORT [INTERVAL_MS]  (or --to ADDR:PORT --every MS)";

/// Parses the ticker's arguments (see the module documentation).
pub fn parse_args(args: &[&str]) -> Result<Args, String> {
    let mut target = None;
    let mut interval = None;
    let mut rest = args.iter();
    while let Some(&arg) = rest.next() {
        let (slot, value) = match arg {
            "--to" | "--every" => match rest.next() {
                Some(&value) => (arg == "--to", value),
                None => return Err(format!("{arg} needs a value; {USAGE}")),
            },
            _ if arg.starts_with("--") => {
                return Err(format!("unknown argument '{arg}'; {USAGE}"));
            }
            // Positional: the first is the target, the second the interval.
            _ => (target.is_none(), arg),
        };
        if slot {
            if target.is_some() {
                return Err(format!("target given twice; {USAGE}"));
            }
            target = Some(parse_target(value)?);
        } else {
            if interval.is_some() {
                return Err(format!("interval given twice; {USAGE}"));
            }
            interval = Some(parse_interval(value)?);
        }
    }
    let Some((target, port)) = target else {
        return Err(format!("missing target; {USAGE}"));
    };
    Ok(Args {
        target,
        port,
        interval_ms: interval.unwrap_or(DEFAULT_INTERVAL_MS),
    })
}

fn parse_target(text: &str) -> Result<(Ipv4Addr, u16), String> {
    let (addr, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("target '{text}' is not ADDR:PORT"))?;
    let addr = addr
        .parse::<Ipv4Addr>()
        .map_err(|_| format!("invalid IPv4 address '{addr}'"))?;
    Ok((addr, crate::args::parse_port(port)?))
}

fn parse_interval(text: &str) -> Result<u64, String> {
    // Zero would turn the ticker into a busy loop flooding the peer.
    match text.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(ms),
        _ => Err(format!(
            "invalid interval '{text}' (expected milliseconds >= 1)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_round_trip() {
        let text = line("t1", 42);
        assert_eq!(text, "ticker t1 42\n");
        assert_eq!(parse_line(&text), Some(("t1", 42)));
        assert_eq!(parse_line("ticker t1 42\r\n"), Some(("t1", 42)));
        assert_eq!(parse_line("ticker t1 42"), Some(("t1", 42)));
        assert_eq!(parse_line(&line("x", u64::MAX)), Some(("x", u64::MAX)));
    }

    #[test]
    fn malformed_lines() {
        for bad in [
            "",
            "ticker",
            "ticker  1",
            "ticker a",
            "ticker a -1",
            "ticker a +1",
            "ticker a 1 2",
            "tick a 1",
            "ticker a 99999999999999999999",
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn positional_and_flag_arguments() {
        let expected = Args {
            target: Ipv4Addr::new(198, 51, 100, 1),
            port: 9000,
            interval_ms: 100,
        };
        assert_eq!(parse_args(&["198.51.100.1:9000", "100"]), Ok(expected));
        assert_eq!(
            parse_args(&["--to", "198.51.100.1:9000", "--every", "100"]),
            Ok(expected)
        );
        assert_eq!(
            parse_args(&["--every", "100", "198.51.100.1:9000"]),
            Ok(expected)
        );
        assert_eq!(
            parse_args(&["198.51.100.1:9000"]).map(|a| a.interval_ms),
            Ok(DEFAULT_INTERVAL_MS)
        );
    }

    #[test]
    fn bad_arguments() {
        for bad in [
            &[][..],
            &["198.51.100.1"],
            &["198.51.100.1:0"],
            &["198.51.100.300:80"],
            &["host:80"],
            &["198.51.100.1:80", "0"],
            &["198.51.100.1:80", "fast"],
            &["198.51.100.1:80", "1", "2"],
            &["--to"],
            &["--bogus", "1"],
        ] {
            assert!(parse_args(bad).is_err(), "{bad:?}");
        }
    }
}
