//! `echo`: a TCP echo server (RFC 862). The byte shovelling is the kernel
//! side's job; only argument handling lives here.

use alloc::string::String;

/// The well-known echo port.
pub const DEFAULT_PORT: u16 = 7;

/// Parses `[--port N]`.
pub fn parse_args(args: &[&str]) -> Result<u16, String> {
    crate::args::parse_port_args("echo", args, DEFAULT_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_argument() {
        assert_eq!(parse_args(&[]), Ok(7));
        assert_eq!(parse_args(&["--port", "7007"]), Ok(7007));
        assert!(parse_args(&["7007"]).is_err());
    }
}
