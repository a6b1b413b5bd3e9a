//! Command-line parsing shared by the server programs.
//!
//! Capsule programs receive their arguments as plain strings from
//! `capsulectl run PROGRAM -- ARGS…`; errors are returned as readable text
//! because they end up in the capsule's log and in the operator's terminal.

use alloc::format;
use alloc::string::String;

/// Parses `[--port N]` (also `--port=N`) for a server listening on one TCP
/// port, falling back to `default_port` when the flag is absent.
pub fn parse_port_args(program: &str, args: &[&str], default_port: u16) -> Result<u16, String> {
    let usage = || format!("usage: {program} [--port N]");
    let mut port = default_port;
    let mut rest = args.iter();
    while let Some(&arg) = rest.next() {
        let value = if arg == "--port" {
            match rest.next() {
                Some(&value) => value,
                None => return Err(format!("--port needs a value; {}", usage())),
            }
        } else if let Some(value) = arg.strip_prefix("--port=") {
            value
        } else if arg == "--help" || arg == "-h" {
            return Err(usage());
        } else {
            return Err(format!("unknown argument '{arg}'; {}", usage()));
        };
        port = parse_port(value)?;
    }
    Ok(port)
}

/// A TCP/UDP port number; 0 is refused because a listener on "any port"
/// would be unreachable for clients that were told a fixed one.
pub fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("invalid port '{text}' (expected 1-65535)")),
        Ok(port) => Ok(port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_explicit_ports() {
        assert_eq!(parse_port_args("kv", &[], 6379), Ok(6379));
        assert_eq!(parse_port_args("kv", &["--port", "7000"], 6379), Ok(7000));
        assert_eq!(parse_port_args("kv", &["--port=8080"], 6379), Ok(8080));
    }

    #[test]
    fn bad_ports_and_arguments_are_errors() {
        assert!(parse_port_args("kv", &["--port"], 1).is_err());
        assert!(parse_port_args("kv", &["--port", "0"], 1).is_err());
        assert!(parse_port_args("kv", &["--port", "65536"], 1).is_err());
        assert!(parse_port_args("kv", &["--port", "-1"], 1).is_err());
        assert!(parse_port_args("kv", &["--verbose"], 1).is_err());
        assert!(parse_port_args("kv", &["--help"], 1).is_err());
    }
}
