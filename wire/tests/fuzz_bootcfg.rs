//! Bounded, seeded fuzzing of the kernel command line (`bootcfg`,
//! docs/fuzzing.md): valid configurations rendered by `to_cmdline` and parsed
//! back, then the rendered text changed byte- and word-wise, plus random text.
//!
//! Properties: no input panics; every generated configuration round-trips
//! (also with its words reordered and spaced differently); whatever is
//! accepted keeps the parser's own rules and renders to a line that parses
//! to the same configuration; parsing allocates at most a small multiple of
//! the line.

mod fuzzkit;

use core::net::Ipv4Addr;

use capsules_wire::bootcfg::*;
use fuzzkit::{Rng, Stats, assert_bounded, guarded, inputs, measure, mutate};

const DICTIONARY: &[&[u8]] = &[
    b"ip=",
    b"gw=",
    b"ctl=",
    b"log=",
    b"key=",
    b"name=",
    b"locators=",
    b"probe",
    b"=",
    b"/",
    b".",
    b" ",
    b"\t",
    b"\n",
    b"0",
    b"32",
    b"33",
    b"255",
    b"256",
    b"65535",
    b"65536",
    b"+",
    b"-",
    b"debug",
    b"198.18.0.0/16",
    b"192.0.2.1",
    b"00112233445566778899aabbccddeeff",
    "\u{a0}".as_bytes(),
    "\u{3000}".as_bytes(),
    "é".as_bytes(),
];

fn gen_cidr(rng: &mut Rng, prefixes: core::ops::RangeInclusive<u8>) -> Ipv4Cidr {
    let prefix = rng.range(usize::from(*prefixes.start()), usize::from(*prefixes.end())) as u8;
    Ipv4Cidr {
        addr: Ipv4Addr::from(rng.u32()),
        prefix,
    }
}

fn network_of(cidr: Ipv4Cidr) -> Ipv4Cidr {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(cidr.prefix))
        .unwrap_or(0);
    Ipv4Cidr {
        addr: Ipv4Addr::from(u32::from(cidr.addr) & mask),
        prefix: cidr.prefix,
    }
}

/// A configuration that keeps every rule of the parser.
fn gen_config(rng: &mut Rng) -> BootConfig {
    let mut cfg = BootConfig::default();
    if rng.chance(1, 2) {
        cfg.locators = network_of(gen_cidr(rng, LOCATOR_PREFIXES));
    }
    // A machine subnet that does not overlap the locator range.
    let ip = (0..8)
        .map(|_| gen_cidr(rng, 0..=32))
        .find(|ip| !cfg.locators.contains(ip.addr) && !ip.contains(cfg.locators.addr));
    if let Some(ip) = ip.filter(|_| rng.chance(3, 4)) {
        cfg.ip = Some(ip);
        if rng.chance(2, 3) {
            // A gateway in the subnet: keep the network bits, vary the rest.
            let host_bits = u32::MAX.checked_shr(u32::from(ip.prefix)).unwrap_or(0);
            let gw = (u32::from(ip.addr) & !host_bits) | (rng.u32() & host_bits);
            cfg.gateway = Some(Ipv4Addr::from(gw));
        }
    }
    if rng.chance(1, 2) {
        cfg.control_port = 1 + rng.below(65535) as u16;
    }
    cfg.log_level = *rng.pick(&[
        LogLevel::Error,
        LogLevel::Warn,
        LogLevel::Info,
        LogLevel::Debug,
        LogLevel::Trace,
    ]);
    if rng.chance(2, 3) {
        const NAME: &[u8] = b"abcxyzABCXYZ0189-_";
        let len = rng.range(1, MAX_NAME_LEN);
        cfg.name = Some((0..len).map(|_| *rng.pick(NAME) as char).collect());
    }
    cfg.probe = rng.chance(1, 4);
    cfg
}

/// The same words in another order and with other blanks between them.
fn respace(rng: &mut Rng, line: &str) -> String {
    let mut words: Vec<&str> = line.split_ascii_whitespace().collect();
    for i in (1..words.len()).rev() {
        let j = rng.below(i + 1);
        words.swap(i, j);
    }
    let mut out = String::new();
    for word in words {
        for _ in 0..rng.range(usize::from(!out.is_empty()), 3) {
            out.push(*rng.pick(&[' ', '\t', '\n', '\r', '\x0c']));
        }
        out.push_str(word);
    }
    out
}

/// Parses `line` and checks what is accepted.
fn check_line(line: &str) -> bool {
    let (parsed, allocated) = measure(|| BootConfig::parse(line));
    assert_bounded("bootcfg", line.as_bytes(), allocated, 8, 1024);
    let Ok(cfg) = parsed else {
        return false;
    };
    if let Some(name) = &cfg.name {
        assert!(!name.is_empty() && name.len() <= MAX_NAME_LEN);
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }
    assert_ne!(cfg.control_port, 0);
    if let Some(gw) = cfg.gateway {
        let ip = cfg.ip.expect("gw without ip accepted");
        assert!(ip.prefix <= 32 && ip.contains(gw));
    }
    let rendered = cfg.to_cmdline();
    assert_eq!(
        BootConfig::parse(&rendered).as_ref(),
        Ok(&cfg),
        "accepted {line:?} renders as {rendered:?}, which parses differently"
    );
    assert_eq!(BootConfig::parse(&rendered).unwrap().to_cmdline(), rendered);
    true
}

#[test]
fn fuzz_command_line() {
    let target = "bootcfg";
    let mut rng = Rng::for_target(target);
    let mut stats = Stats::new(target);
    let mut pool: Vec<Vec<u8>> = (0..32)
        .map(|_| gen_config(&mut rng).to_cmdline().into_bytes())
        .collect();
    for i in 0..inputs(100_000) {
        let input: Vec<u8> = match rng.below(10) {
            0 | 1 => {
                let cfg = gen_config(&mut rng);
                let line = cfg.to_cmdline();
                assert_eq!(BootConfig::parse(&line).as_ref(), Ok(&cfg), "{line}");
                let shuffled = respace(&mut rng, &line);
                assert_eq!(
                    BootConfig::parse(&shuffled).as_ref(),
                    Ok(&cfg),
                    "{shuffled:?}"
                );
                pool[i % 32] = line.clone().into_bytes();
                shuffled.into_bytes()
            }
            2..=8 => {
                let base = rng.pick(&pool).clone();
                mutate(&mut rng, &base, DICTIONARY, &pool)
            }
            _ => {
                let len = rng.below(80);
                (0..len)
                    .map(|_| {
                        if rng.chance(1, 2) {
                            *rng.pick(b"ipgwctlogkeynamprobe=/. 0123456789abcdef\t")
                        } else {
                            rng.u8()
                        }
                    })
                    .collect()
            }
        };
        // The kernel reads a line that is not UTF-8 as empty; parse what
        // is, and the lossy reading of what is not.
        let line = match String::from_utf8(input.clone()) {
            Ok(line) => line,
            Err(_) => String::from_utf8_lossy(&input).into_owned(),
        };
        let accepted = guarded(target, &input, || check_line(&line));
        stats.input(accepted);
    }
}

#[test]
fn fuzz_hex_and_cidr() {
    let target = "bootcfg-fields";
    let mut rng = Rng::for_target(target);
    let mut stats = Stats::new(target);
    for _ in 0..inputs(100_000) {
        let bytes = rng.random_input(80);
        let hex = encode_hex(&bytes);
        assert_eq!(decode_hex(&hex).as_deref(), Some(&bytes[..]));
        assert_eq!(
            decode_hex(&hex.to_ascii_uppercase()).as_deref(),
            Some(&bytes[..])
        );
        let changed = mutate(&mut rng, hex.as_bytes(), DICTIONARY, &[]);
        let text = String::from_utf8_lossy(&changed).into_owned();
        let decoded = guarded(target, &changed, || decode_hex(&text));
        if let Some(decoded) = &decoded {
            assert_eq!(encode_hex(decoded), text.to_ascii_lowercase());
        }
        let cidr = guarded(target, &changed, || Ipv4Cidr::parse(&text));
        if let Some(cidr) = cidr {
            assert!(cidr.prefix <= 32);
            assert_eq!(Ipv4Cidr::parse(&cidr.to_string()), Some(cidr));
            let _ = cidr.contains(Ipv4Addr::from(rng.u32()));
        }
        stats.input(decoded.is_some() || cidr.is_some());
    }
}
