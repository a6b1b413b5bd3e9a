//! The kernel command line: `ip=ADDR/PREFIX gw=ADDR ctl=PORT log=LEVEL key=HEX name=NAME probe`.
//!
//! The host renders it with [`BootConfig::to_cmdline`] and the kernel parses it
//! with [`BootConfig::parse`]. Parsing is strict: an unknown option, a repeated
//! option or a malformed value is an error, so a kernel never runs silently
//! misconfigured.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::net::Ipv4Addr;

/// Default TCP port of the control service.
pub const DEFAULT_CONTROL_PORT: u16 = 7070;
/// Cluster keys are between these many bytes long.
pub const MIN_KEY_LEN: usize = 16;
pub const MAX_KEY_LEN: usize = 64;
/// Longest VM name accepted.
pub const MAX_NAME_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "error" => Self::Error,
            "warn" => Self::Warn,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => return None,
        })
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// An IPv4 address with its prefix length, as in `192.0.2.11/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, prefix) = s.split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        (prefix <= 32).then_some(Self { addr, prefix })
    }

    /// True when `other` lies in this address's subnet.
    pub fn contains(&self, other: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        };
        (u32::from(self.addr) & mask) == (u32::from(other) & mask)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Everything the kernel takes from its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// The VM's own (machine) address. Without it the network stays down.
    pub ip: Option<Ipv4Cidr>,
    pub gateway: Option<Ipv4Addr>,
    pub control_port: u16,
    pub log_level: LogLevel,
    /// The cluster key for control-service authentication.
    pub key: Option<Vec<u8>>,
    pub name: Option<String>,
    /// Exit with success as soon as boot completes (accelerator probe, boot benchmarks).
    pub probe: bool,
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            ip: None,
            gateway: None,
            control_port: DEFAULT_CONTROL_PORT,
            log_level: LogLevel::Info,
            key: None,
            name: None,
            probe: false,
        }
    }
}

/// Why a command line was refused. Names the offending option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootConfigError {
    UnknownOption(String),
    Malformed {
        option: &'static str,
        value: String,
        expected: &'static str,
    },
    Repeated(&'static str),
    /// A consistency rule across options was broken.
    Inconsistent(&'static str),
}

impl fmt::Display for BootConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownOption(o) => write!(f, "unknown option '{o}'"),
            Self::Malformed {
                option,
                value,
                expected,
            } => {
                write!(f, "malformed {option}='{value}': expected {expected}")
            }
            Self::Repeated(o) => write!(f, "option '{o}' given more than once"),
            Self::Inconsistent(why) => f.write_str(why),
        }
    }
}

const OPTIONS: [&str; 7] = ["ip", "gw", "ctl", "log", "key", "name", "probe"];

impl BootConfig {
    pub fn parse(cmdline: &str) -> Result<Self, BootConfigError> {
        let mut cfg = Self::default();
        let mut seen = [false; OPTIONS.len()];
        for word in cmdline.split_ascii_whitespace() {
            let (opt, value) = match word.split_once('=') {
                Some((o, v)) => (o, Some(v)),
                None => (word, None),
            };
            let Some(index) = OPTIONS.iter().position(|o| *o == opt) else {
                return Err(BootConfigError::UnknownOption(word.to_string()));
            };
            let option = OPTIONS[index];
            if core::mem::replace(&mut seen[index], true) {
                return Err(BootConfigError::Repeated(option));
            }
            let malformed = |expected| BootConfigError::Malformed {
                option,
                value: value.unwrap_or("").to_string(),
                expected,
            };
            match (option, value) {
                ("probe", None) => cfg.probe = true,
                ("probe", Some(_)) => return Err(malformed("no value")),
                (_, None) => return Err(malformed("a value after '='")),
                ("ip", Some(v)) => {
                    cfg.ip = Some(Ipv4Cidr::parse(v).ok_or_else(|| malformed("ADDR/PREFIX"))?)
                }
                ("gw", Some(v)) => {
                    cfg.gateway = Some(v.parse().map_err(|_| malformed("an IPv4 address"))?)
                }
                ("ctl", Some(v)) => {
                    cfg.control_port = v
                        .parse()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| malformed("a TCP port 1-65535"))?
                }
                ("log", Some(v)) => {
                    cfg.log_level = LogLevel::parse(v)
                        .ok_or_else(|| malformed("error|warn|info|debug|trace"))?
                }
                ("key", Some(v)) => {
                    cfg.key = Some(
                        decode_hex(v)
                            .filter(|k| (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&k.len()))
                            .ok_or_else(|| malformed("16 to 64 bytes of hex"))?,
                    )
                }
                ("name", Some(v)) => {
                    let ok = !v.is_empty()
                        && v.len() <= MAX_NAME_LEN
                        && v.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !ok {
                        return Err(malformed("1-32 characters of [A-Za-z0-9_-]"));
                    }
                    cfg.name = Some(v.to_string());
                }
                _ => unreachable!("every option in OPTIONS is handled"),
            }
        }
        if let (Some(ip), Some(gw)) = (cfg.ip, cfg.gateway)
            && !ip.contains(gw)
        {
            return Err(BootConfigError::Inconsistent(
                "gw is not in the subnet of ip",
            ));
        }
        if cfg.gateway.is_some() && cfg.ip.is_none() {
            return Err(BootConfigError::Inconsistent("gw given without ip"));
        }
        Ok(cfg)
    }

    /// Renders the command line that [`BootConfig::parse`] reads back unchanged.
    pub fn to_cmdline(&self) -> String {
        let mut words: Vec<String> = Vec::new();
        if let Some(ip) = self.ip {
            words.push(alloc::format!("ip={ip}"));
        }
        if let Some(gw) = self.gateway {
            words.push(alloc::format!("gw={gw}"));
        }
        words.push(alloc::format!("ctl={}", self.control_port));
        words.push(alloc::format!("log={}", self.log_level.as_str()));
        if let Some(key) = &self.key {
            words.push(alloc::format!("key={}", encode_hex(key)));
        }
        if let Some(name) = &self.name {
            words.push(alloc::format!("name={name}"));
        }
        if self.probe {
            words.push("probe".to_string());
        }
        words.join(" ")
    }
}

pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_command_line_round_trips() {
        let cfg = BootConfig {
            ip: Some(Ipv4Cidr {
                addr: Ipv4Addr::new(192, 0, 2, 11),
                prefix: 24,
            }),
            gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
            control_port: 7171,
            log_level: LogLevel::Debug,
            key: Some((0u8..32).collect()),
            name: Some("vm1".into()),
            probe: true,
        };
        let line = cfg.to_cmdline();
        assert_eq!(BootConfig::parse(&line).unwrap(), cfg);
    }

    #[test]
    fn empty_line_gives_defaults() {
        assert_eq!(BootConfig::parse("  ").unwrap(), BootConfig::default());
    }

    #[test]
    fn unknown_option_is_named() {
        let err = BootConfig::parse("ip=192.0.2.1/24 colour=blue").unwrap_err();
        assert_eq!(err, BootConfigError::UnknownOption("colour=blue".into()));
        assert!(err.to_string().contains("colour"));
    }

    #[test]
    fn malformed_values_are_refused() {
        for line in [
            "ip=192.0.2.1",
            "ip=192.0.2.1/33",
            "ip=300.0.2.1/24",
            "gw=nope",
            "ctl=0",
            "ctl=70000",
            "log=loud",
            "key=abc",
            "key=zz00112233445566778899aabbccddeeff",
            "key=0011",
            "name=",
            "name=has/slash",
            "probe=1",
            "ip",
        ] {
            assert!(
                matches!(
                    BootConfig::parse(line),
                    Err(BootConfigError::Malformed { .. })
                ),
                "{line} should be malformed"
            );
        }
    }

    #[test]
    fn repeated_and_inconsistent_options_are_refused() {
        assert_eq!(
            BootConfig::parse("log=info log=debug"),
            Err(BootConfigError::Repeated("log"))
        );
        assert!(matches!(
            BootConfig::parse("ip=192.0.2.11/24 gw=198.51.100.1"),
            Err(BootConfigError::Inconsistent(_))
        ));
        assert!(matches!(
            BootConfig::parse("gw=192.0.2.1"),
            Err(BootConfigError::Inconsistent(_))
        ));
    }

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_hex(&encode_hex(&bytes)).unwrap(), bytes);
        assert_eq!(decode_hex("ABcd").unwrap(), [0xab, 0xcd]);
    }
}
