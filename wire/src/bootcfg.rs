//! The kernel command line: `ip=ADDR/PREFIX gw=ADDR ctl=PORT log=LEVEL name=NAME
//! locators=ADDR/PREFIX probe`, or for the router of a routed lab
//! `role=router nics=ADDR/PREFIX,ADDR/PREFIX,… ctl=… log=… name=… locators=…`.
//!
//! The cluster key is not among them: every local user can read a process's
//! command line, so the key reaches the kernel through QEMU's fw_cfg as the
//! file `opt/capsules/key` (see [`crate::auth`]), and `key=` is refused
//! (without repeating its value).
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
/// Longest VM name accepted.
pub const MAX_NAME_LEN: usize = 32;
/// The capsule locator range when `locators=` is not given.
pub const DEFAULT_LOCATOR_RANGE: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(198, 18, 0, 0),
    prefix: 16,
};
/// Most NICs a router takes (`nics=`): one per subnet of a routed lab.
pub const MAX_ROUTER_NICS: usize = 8;
/// Prefix lengths a locator range may have (the same bounds `capsulectl lab
/// up --capsule-range` enforces).
pub const LOCATOR_PREFIXES: core::ops::RangeInclusive<u8> = 8..=30;

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

    /// True when the address has no bits set below the prefix (`10.77.0.0/16`,
    /// not `10.77.0.1/16`).
    pub fn is_network(&self) -> bool {
        let host_bits = u32::MAX.checked_shr(self.prefix.into()).unwrap_or(0);
        u32::from(self.addr) & host_bits == 0
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
    pub name: Option<String>,
    /// Exit with success as soon as boot completes (accelerator probe, boot benchmarks).
    pub probe: bool,
    /// The capsule locator range (`locators=`): reached on-link, since
    /// capsules on other VMs answer ARP for their locators themselves.
    pub locators: Ipv4Cidr,
    /// `role=router`: the kernel forwards between its NICs instead of
    /// running capsules; `router_nics` (`nics=`) are its addresses, one per
    /// virtio-net device in PCI order. The control service listens on the
    /// first.
    pub role: Role,
    pub router_nics: Vec<Ipv4Cidr>,
}

/// What the kernel is booted as (`role=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// A capsule VM (the default).
    #[default]
    Vm,
    /// The special router of a routed lab.
    Router,
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            ip: None,
            gateway: None,
            control_port: DEFAULT_CONTROL_PORT,
            log_level: LogLevel::Info,
            name: None,
            probe: false,
            locators: DEFAULT_LOCATOR_RANGE,
            role: Role::Vm,
            router_nics: Vec::new(),
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

const OPTIONS: [&str; 9] = [
    "ip", "gw", "ctl", "log", "name", "probe", "locators", "role", "nics",
];

/// What a `key=` word is told (its value is never repeated: it is a secret).
pub const KEY_REFUSED: &str =
    "key= is not accepted: the cluster key comes through fw_cfg (opt/capsules/key)";

impl BootConfig {
    pub fn parse(cmdline: &str) -> Result<Self, BootConfigError> {
        let mut cfg = Self::default();
        let mut seen = [false; OPTIONS.len()];
        for word in cmdline.split_ascii_whitespace() {
            let (opt, value) = match word.split_once('=') {
                Some((o, v)) => (o, Some(v)),
                None => (word, None),
            };
            if opt == "key" {
                return Err(BootConfigError::Inconsistent(KEY_REFUSED));
            }
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
                ("locators", Some(v)) => {
                    cfg.locators = Ipv4Cidr::parse(v)
                        .filter(|r| LOCATOR_PREFIXES.contains(&r.prefix) && r.is_network())
                        .ok_or_else(|| malformed("a network ADDR/PREFIX with prefix 8-30"))?
                }
                ("role", Some(v)) => {
                    cfg.role = match v {
                        "vm" => Role::Vm,
                        "router" => Role::Router,
                        _ => return Err(malformed("vm|router")),
                    }
                }
                ("nics", Some(v)) => {
                    let mut nics = Vec::new();
                    for part in v.split(',') {
                        let nic = Ipv4Cidr::parse(part)
                            .filter(|c| (1..=30).contains(&c.prefix) && !c.is_network())
                            .ok_or_else(|| malformed("ADDR/PREFIX,… (host addresses)"))?;
                        if nics.len() == MAX_ROUTER_NICS {
                            return Err(malformed("at most 8 addresses"));
                        }
                        nics.push(nic);
                    }
                    cfg.router_nics = nics;
                }
                _ => unreachable!("every option in OPTIONS is handled"),
            }
        }
        match cfg.role {
            Role::Router => {
                if cfg.router_nics.is_empty() {
                    return Err(BootConfigError::Inconsistent("role=router needs nics="));
                }
                if cfg.ip.is_some() || cfg.gateway.is_some() {
                    return Err(BootConfigError::Inconsistent(
                        "role=router takes nics=, not ip= or gw=",
                    ));
                }
                for (i, a) in cfg.router_nics.iter().enumerate() {
                    if cfg.locators.contains(a.addr) || a.contains(cfg.locators.addr) {
                        return Err(BootConfigError::Inconsistent(
                            "locators overlaps the subnet of a router NIC",
                        ));
                    }
                    if cfg.router_nics[..i]
                        .iter()
                        .any(|b| b.contains(a.addr) || a.contains(b.addr))
                    {
                        return Err(BootConfigError::Inconsistent(
                            "two router NICs share a subnet",
                        ));
                    }
                }
            }
            Role::Vm if !cfg.router_nics.is_empty() => {
                return Err(BootConfigError::Inconsistent("nics= needs role=router"));
            }
            Role::Vm => {}
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
        // Locators in the machine subnet (or the other way round) would make
        // the switch take the VM's own neighbours for capsules.
        if let Some(ip) = cfg.ip
            && (cfg.locators.contains(ip.addr) || ip.contains(cfg.locators.addr))
        {
            return Err(BootConfigError::Inconsistent(
                "locators overlaps the subnet of ip",
            ));
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
        if let Some(name) = &self.name {
            words.push(alloc::format!("name={name}"));
        }
        words.push(alloc::format!("locators={}", self.locators));
        if self.role == Role::Router {
            words.push("role=router".to_string());
        }
        if !self.router_nics.is_empty() {
            let nics: Vec<String> = self.router_nics.iter().map(|n| n.to_string()).collect();
            words.push(alloc::format!("nics={}", nics.join(",")));
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
            name: Some("vm1".into()),
            probe: true,
            locators: Ipv4Cidr {
                addr: Ipv4Addr::new(10, 77, 0, 0),
                prefix: 16,
            },
            ..BootConfig::default()
        };
        let line = cfg.to_cmdline();
        assert!(line.contains("locators=10.77.0.0/16"), "{line}");
        assert_eq!(BootConfig::parse(&line).unwrap(), cfg);
    }

    #[test]
    fn router_role_round_trips_and_is_checked() {
        let cfg = BootConfig {
            role: Role::Router,
            router_nics: alloc::vec![
                Ipv4Cidr::parse("192.0.2.254/24").unwrap(),
                Ipv4Cidr::parse("198.51.100.254/24").unwrap(),
                Ipv4Cidr::parse("203.0.113.254/24").unwrap(),
            ],
            name: Some("router".into()),
            ..BootConfig::default()
        };
        let line = cfg.to_cmdline();
        assert!(
            line.contains("role=router nics=192.0.2.254/24,198.51.100.254/24,203.0.113.254/24"),
            "{line}"
        );
        assert_eq!(BootConfig::parse(&line).unwrap(), cfg);
        assert_eq!(BootConfig::parse("").unwrap().role, Role::Vm);
        for bad in [
            "role=router",
            "role=bridge nics=192.0.2.254/24",
            "nics=192.0.2.254/24",
            "role=router nics=192.0.2.254/24 ip=192.0.2.11/24",
            "role=router nics=192.0.2.254/24,192.0.2.253/24",
            "role=router nics=192.0.2.0/24",
            "role=router nics=192.0.2.254",
            "role=router nics=192.0.2.254/24,",
            "role=router nics=198.18.0.254/24",
            "role=router nics=1.0.0.1/24,1.0.1.1/24,1.0.2.1/24,1.0.3.1/24,1.0.4.1/24,\
             1.0.5.1/24,1.0.6.1/24,1.0.7.1/24,1.0.8.1/24",
        ] {
            assert!(BootConfig::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn locator_range_defaults_and_is_checked() {
        assert_eq!(
            BootConfig::parse("log=info").unwrap().locators,
            DEFAULT_LOCATOR_RANGE
        );
        let cfg = BootConfig::parse("ip=192.0.2.11/24 locators=10.77.0.0/16").unwrap();
        assert!(cfg.locators.contains(Ipv4Addr::new(10, 77, 3, 4)));
        assert!(!cfg.locators.contains(Ipv4Addr::new(198, 18, 0, 1)));
        // Host bits, prefixes outside 8-30 and non-addresses are malformed.
        for bad in [
            "locators=10.77.0.1/16",
            "locators=10.0.0.0/7",
            "locators=10.77.0.0/31",
            "locators=10.77.0.0",
            "locators=ten/16",
        ] {
            assert!(
                matches!(
                    BootConfig::parse(bad),
                    Err(BootConfigError::Malformed {
                        option: "locators",
                        ..
                    })
                ),
                "{bad} should be malformed"
            );
        }
        // A range that holds the machine's own subnet, or lies inside it.
        for clash in [
            "ip=192.0.2.11/24 locators=192.0.0.0/16",
            "ip=10.77.0.5/16 locators=10.77.0.0/24",
        ] {
            assert!(
                matches!(
                    BootConfig::parse(clash),
                    Err(BootConfigError::Inconsistent(_))
                ),
                "{clash} should be refused"
            );
        }
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
    fn a_key_on_the_command_line_is_refused_without_repeating_it() {
        let secret = "00112233445566778899aabbccddeeff";
        for line in [
            alloc::format!("key={secret}"),
            alloc::format!("ip=192.0.2.11/24 key={secret} name=vm1"),
            "key".into(),
            "key=".into(),
        ] {
            let err = BootConfig::parse(&line).unwrap_err();
            assert_eq!(err, BootConfigError::Inconsistent(KEY_REFUSED), "{line}");
            assert!(!err.to_string().contains(secret));
            assert!(err.to_string().contains("fw_cfg"));
        }
        assert!(!BootConfig::default().to_cmdline().contains("key"));
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
