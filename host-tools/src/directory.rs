//! The directory: the lab's source of truth for where capsules are.
//!
//! It maps each capsule name to its locator (its own IPv4 address), its arena
//! slot (which fixes its memory window on every VM), the VM that hosts it and
//! what it runs. Locators come from the lab's capsule range (default
//! 198.18.0.0/16), slots from 1..=4095; both are unique cluster-wide and kept
//! for the capsule's life, because a capsule that moves must keep its address
//! and its window.
//!
//! The map lives in the lab's state directory as `directory.json`, replaced
//! atomically (temporary file + rename) so a reader never sees half a file
//! and a crash loses nothing. Writers serialise on `directory.lock` with
//! flock(2): separate `capsulectl` invocations (and the DNS server, which only
//! reads) cooperate without a daemon in the write path.
//!
//! [`serve`] answers DNS for the map (`NAME.capsule` → A locator) with
//! hickory-proto doing the wire format; `capsulectl lab up` starts it inside
//! the lab namespace on the bridge address, port 53.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use serde::{Deserialize, Serialize};

/// The capsule range a lab uses unless told otherwise (RFC 2544 benchmark space).
pub const DEFAULT_CAPSULE_RANGE: &str = "198.18.0.0/16";
/// The DNS zone capsule names live in: `web.capsule`.
pub const DNS_ZONE: &str = "capsule";
/// Arena slots the kernel accepts are below 4096; 0 is never handed out so
/// that a zero in a record always means "unset".
pub const MAX_SLOT: u32 = 4095;
/// Longest capsule name: one DNS label.
pub const MAX_CAPSULE_NAME: usize = 63;
/// TTL of answers: short, since capsules come, go and move.
pub const DNS_TTL: u32 = 5;
const MAP_FILE: &str = "directory.json";
const LOCK_FILE: &str = "directory.lock";
const MAP_VERSION: u32 = 1;

/// An IPv4 prefix that locators are taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapsuleRange {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl CapsuleRange {
    fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = (u64::from(u32::MAX) << (32 - u32::from(self.prefix))) as u32;
        u32::from(ip) & mask == u32::from(self.base)
    }

    /// The address at `offset` from the base, if it may be a locator: never
    /// the network or broadcast address, and never an address ending in .0 or
    /// .255, which some stacks treat specially.
    fn usable(&self, offset: u64) -> Option<Ipv4Addr> {
        if offset == 0 || offset + 1 >= self.size() {
            return None;
        }
        let ip = Ipv4Addr::from(u32::from(self.base) + offset as u32);
        let last = ip.octets()[3];
        (last != 0 && last != 255).then_some(ip)
    }
}

impl fmt::Display for CapsuleRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl FromStr for CapsuleRange {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let Some((addr, prefix)) = s.split_once('/') else {
            bail!("capsule range '{s}' is not ADDRESS/PREFIX (e.g. {DEFAULT_CAPSULE_RANGE})");
        };
        let base: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("capsule range '{s}': bad address"))?;
        let prefix: u8 = prefix
            .parse()
            .with_context(|| format!("capsule range '{s}': bad prefix"))?;
        if !(8..=30).contains(&prefix) {
            bail!("capsule range '{s}': the prefix must be between 8 and 30");
        }
        let range = CapsuleRange { base, prefix };
        let host_bits = u32::from(base) & !((u32::MAX) << (32 - u32::from(prefix)));
        if host_bits != 0 {
            bail!("capsule range '{s}': the address has host bits set below /{prefix}");
        }
        // The kernel refuses such locators (smoltcp cannot own a multicast or
        // broadcast address): a lab must not hand them out. A /8 or longer
        // lies within one first octet.
        let first = base.octets()[0];
        if first == 0 || first == 127 || first >= 224 {
            bail!(
                "capsule range '{s}': not unicast host addresses (0/8, 127/8, multicast \
                 224/4 and reserved 240/4 cannot be locators)"
            );
        }
        Ok(range)
    }
}

impl Serialize for CapsuleRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CapsuleRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for CapsuleRange {
    fn default() -> Self {
        DEFAULT_CAPSULE_RANGE.parse().expect("default range parses")
    }
}

/// One capsule as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsuleRecord {
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
    pub locator: Ipv4Addr,
    pub slot: u32,
    pub vm: String,
    /// Bytes asked for (0: the VM's default).
    pub memory_limit: u64,
    /// Seconds since the Unix epoch when it was started.
    pub created_unix: u64,
    /// The epoch of the copy the directory committed: every move, resume
    /// and thaw runs the capsule at a higher one, and a VM refuses or drops
    /// a copy below it (docs/architecture.md, "Exactly one copy").
    #[serde(default = "first_epoch")]
    pub epoch: u64,
    /// A move, suspend or resume of this capsule that has begun and not
    /// ended: written before the capsule is frozen, cleared with the outcome.
    /// One left behind by a process that died is finished or rolled back by
    /// `capsulectl recover` (every capsule command runs it first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<crate::journal::Intent>,
    /// Why the capsule runs nowhere: the VM that held the only copy died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
}

fn first_epoch() -> u64 {
    1
}

/// The whole map, as stored in `directory.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryMap {
    pub version: u32,
    pub range: CapsuleRange,
    /// Where the next search for a free locator (offset in the range) and
    /// slot starts. Moving on instead of taking the lowest free one keeps a
    /// just-freed locator out of use for a while, so stale ARP entries in
    /// clients cannot send a new capsule's traffic to the old one's VM.
    pub next_locator: u64,
    pub next_slot: u32,
    pub capsules: BTreeMap<String, CapsuleRecord>,
    /// The highest epoch committed per capsule name, kept after the capsule
    /// ends or is suspended: a suspended image older than it is stale, and
    /// a capsule started again under the name goes on counting from it.
    #[serde(default)]
    pub epochs: BTreeMap<String, u64>,
}

/// Capsule names become DNS labels: letters, digits and '-', starting with a
/// letter or digit. Lower case only, since DNS does not tell cases apart.
pub fn validate_capsule_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CAPSULE_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        bail!(
            "invalid capsule name '{name}': use 1-{MAX_CAPSULE_NAME} characters of [a-z0-9-], \
             starting with a letter or digit (it becomes the DNS name {name}.{DNS_ZONE})"
        );
    }
    Ok(())
}

impl DirectoryMap {
    pub fn new(range: CapsuleRange) -> Self {
        Self {
            version: MAP_VERSION,
            range,
            next_locator: 1,
            next_slot: 1,
            capsules: BTreeMap::new(),
            epochs: BTreeMap::new(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&CapsuleRecord> {
        self.capsules.get(&name.to_ascii_lowercase())
    }

    /// A free locator and a free slot. The cursors move on, but nothing is
    /// recorded: the caller inserts the record once the VM has started the
    /// capsule, and simply drops the pair on failure.
    pub fn allocate(&mut self) -> Result<(Ipv4Addr, u32)> {
        let used_ips: std::collections::HashSet<Ipv4Addr> =
            self.capsules.values().map(|c| c.locator).collect();
        let used_slots: std::collections::HashSet<u32> =
            self.capsules.values().map(|c| c.slot).collect();
        let size = self.range.size();
        let mut locator = None;
        for step in 0..size {
            let offset = (self.next_locator + step) % size;
            if let Some(ip) = self.range.usable(offset)
                && !used_ips.contains(&ip)
            {
                locator = Some((ip, offset));
                break;
            }
        }
        let Some((ip, offset)) = locator else {
            bail!("the capsule range {} has no free locator", self.range);
        };
        let mut slot = None;
        for step in 0..MAX_SLOT {
            let s = (self.next_slot.saturating_sub(1) + step) % MAX_SLOT + 1;
            if !used_slots.contains(&s) {
                slot = Some(s);
                break;
            }
        }
        let Some(slot) = slot else {
            bail!("all {MAX_SLOT} arena slots are in use");
        };
        self.next_locator = (offset + 1) % size;
        self.next_slot = slot % MAX_SLOT + 1;
        Ok((ip, slot))
    }

    /// Adds a record; name, locator and slot must all be free.
    pub fn insert(&mut self, record: CapsuleRecord) -> Result<()> {
        validate_capsule_name(&record.name)?;
        if self.capsules.contains_key(&record.name) {
            bail!("a capsule named '{}' already exists", record.name);
        }
        if let Some(c) = self.capsules.values().find(|c| c.locator == record.locator) {
            bail!("locator {} is already used by '{}'", record.locator, c.name);
        }
        if let Some(c) = self.capsules.values().find(|c| c.slot == record.slot) {
            bail!("slot {} is already used by '{}'", record.slot, c.name);
        }
        self.note_epoch(&record.name, record.epoch);
        self.capsules.insert(record.name.clone(), record);
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Option<CapsuleRecord> {
        let rec = self.capsules.remove(&name.to_ascii_lowercase())?;
        self.note_epoch(&rec.name, rec.epoch);
        Some(rec)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut CapsuleRecord> {
        self.capsules.get_mut(&name.to_ascii_lowercase())
    }

    /// Remembers that epoch `epoch` of `name` was committed.
    pub fn note_epoch(&mut self, name: &str, epoch: u64) {
        let e = self.epochs.entry(name.to_string()).or_insert(0);
        *e = (*e).max(epoch);
    }

    /// The highest epoch committed for `name`, live or ended (0: never).
    pub fn last_epoch(&self, name: &str) -> u64 {
        let live = self.get(name).map_or(0, |r| r.epoch);
        self.epochs.get(name).copied().unwrap_or(0).max(live)
    }

    /// `PROGRAM-N` with the smallest N ≥ 1 not taken.
    pub fn default_name(&self, program: &str) -> String {
        let stem: String = program
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        (1..)
            .map(|n| format!("{stem}-{n}"))
            .find(|n| !self.capsules.contains_key(n))
            .expect("some number is free")
    }

    /// The locator of a DNS name in the zone (`web.capsule.`), any case.
    pub fn resolve(&self, fqdn: &str, zone: &str) -> Option<Ipv4Addr> {
        let name = fqdn.trim_end_matches('.').to_ascii_lowercase();
        let label = name.strip_suffix(&format!(".{zone}"))?;
        self.capsules.get(label).map(|c| c.locator)
    }
}

pub fn map_path(lab_dir: &Path) -> PathBuf {
    lab_dir.join(MAP_FILE)
}

/// Reads the map; a lab without one yet has an empty map over `range`.
pub fn load(lab_dir: &Path, range: CapsuleRange) -> Result<DirectoryMap> {
    let path = map_path(lab_dir);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("corrupt directory map {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DirectoryMap::new(range)),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes the map atomically: a reader (the DNS server) sees the old file or
/// the new one, never a mix, and a crash leaves one of them whole.
///
/// This is the one place every change of the map goes through (run, kill,
/// resume, the record of a move, recovery): in a routed lab the router's
/// translation table follows it here (`routed::publish`).
pub fn save(lab_dir: &Path, map: &DirectoryMap) -> Result<()> {
    crate::state::write_atomically(&map_path(lab_dir), &serde_json::to_vec_pretty(map)?, 0o644)?;
    crate::routed::publish(lab_dir, map);
    Ok(())
}

/// An exclusive flock on the lab's directory lock file; released on drop
/// (closing the descriptor), also when the process dies.
pub struct MapLock {
    _file: File,
}

pub fn lock(lab_dir: &Path) -> Result<MapLock> {
    let path = lab_dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot lock {}", path.display()));
    }
    Ok(MapLock { _file: file })
}

/// The DNS answer to one datagram, or `None` when nothing should be sent
/// (not even a header to answer to, or a response sent to us).
pub fn answer(map: &DirectoryMap, zone: &str, datagram: &[u8]) -> Option<Vec<u8>> {
    let request = match Message::from_vec(datagram) {
        Ok(m) => m,
        Err(_) => {
            // Undecodable: FORMERR if there is at least a header to take the
            // id from and it claims to be a query, else silence.
            if datagram.len() < 12 || datagram[2] & 0x80 != 0 {
                return None;
            }
            let id = u16::from_be_bytes([datagram[0], datagram[1]]);
            let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return reply.to_vec().ok();
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let id = request.metadata.id;
    let op = request.metadata.op_code;
    let mut reply = Message::response(id, op);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.authoritative = true;
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        reply.set_edns(edns);
    }
    if op != OpCode::Query {
        reply.metadata.response_code = ResponseCode::NotImp;
        return reply.to_vec().ok();
    }
    if request.queries.len() != 1 {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply.to_vec().ok();
    }
    let query = request.queries[0].clone();
    reply.add_query(query.clone());
    let fqdn = query.name.to_ascii();
    let apex = fqdn.trim_end_matches('.').eq_ignore_ascii_case(zone);
    match map.resolve(&fqdn, zone) {
        _ if query.query_class != DNSClass::IN && query.query_class != DNSClass::ANY => {
            reply.metadata.response_code = ResponseCode::Refused;
        }
        Some(ip) => {
            // The name exists; only A (and ANY) have data, other types get
            // NOERROR with an empty answer ("no data").
            if matches!(query.query_type, RecordType::A | RecordType::ANY) {
                reply.add_answer(Record::from_rdata(
                    query.name.clone(),
                    DNS_TTL,
                    RData::A(A(ip)),
                ));
            }
        }
        None if apex => {}
        None => reply.metadata.response_code = ResponseCode::NXDomain,
    }
    reply.to_vec().ok()
}

/// Identity of the map file, to notice a replacement without reading it.
fn file_stamp(path: &Path) -> Option<(u64, i64, i64, u64)> {
    fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
}

/// A DNS query for `name` (type A), for readiness checks and tests.
pub fn query_bytes(name: &str, id: u16) -> Result<Vec<u8>> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(hickory_proto::op::Query::query(
        Name::from_ascii(name).context("bad DNS name")?,
        RecordType::A,
    ));
    Ok(m.to_vec()?)
}

/// Asks the directory at `server` for `name`; `Ok(None)` for NXDOMAIN or no
/// data, an error when no answer comes.
pub fn lookup(server: SocketAddr, name: &str, timeout: Duration) -> Result<Option<Ipv4Addr>> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(timeout))?;
    let id = u16::try_from(std::process::id() & 0xffff).unwrap_or(1);
    sock.send_to(&query_bytes(name, id)?, server)
        .with_context(|| format!("cannot send a DNS query to {server}"))?;
    let mut buf = [0u8; 1500];
    let (n, _) = sock
        .recv_from(&mut buf)
        .with_context(|| format!("no DNS answer from {server}"))?;
    let reply = Message::from_vec(&buf[..n]).context("undecodable DNS answer")?;
    Ok(reply.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    }))
}

/// Serves DNS for the lab's map on `listen` until the process is killed.
/// The map is re-read whenever its file is replaced, so writers never need
/// to tell the server anything.
pub fn serve(lab_dir: &Path, listen: SocketAddr, zone: &str, range: CapsuleRange) -> Result<()> {
    let sock = UdpSocket::bind(listen)
        .with_context(|| format!("cannot bind the DNS server to {listen}"))?;
    let path = map_path(lab_dir);
    let mut stamp = file_stamp(&path);
    let mut map = load(lab_dir, range)?;
    eprintln!(
        "directory: serving {} capsule(s) as *.{zone} on {listen} (map {})",
        map.capsules.len(),
        path.display()
    );
    let mut buf = [0u8; 4096];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            // Transient (e.g. ICMP unreachable reported on the socket).
            Err(e) => {
                eprintln!("directory: receive failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let now = file_stamp(&path);
        if now != stamp {
            match load(lab_dir, range) {
                Ok(m) => {
                    map = m;
                    stamp = now;
                }
                // Keep answering from the last good map.
                Err(e) => eprintln!("directory: keeping the previous map: {e:#}"),
            }
        }
        if let Some(reply) = answer(&map, zone, &buf[..n]) {
            let _ = sock.send_to(&reply, peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, ip: Ipv4Addr, slot: u32) -> CapsuleRecord {
        CapsuleRecord {
            name: name.into(),
            program: "echo".into(),
            args: vec![],
            locator: ip,
            slot,
            vm: "vm1".into(),
            memory_limit: 0,
            created_unix: 0,
            epoch: 1,
            intent: None,
            lost: None,
        }
    }

    #[test]
    fn ranges_parse_and_refuse_nonsense() {
        let r: CapsuleRange = "198.18.0.0/16".parse().unwrap();
        assert_eq!(r, CapsuleRange::default());
        assert!(r.contains(Ipv4Addr::new(198, 18, 7, 9)));
        assert!(!r.contains(Ipv4Addr::new(198, 19, 0, 1)));
        for bad in [
            "198.18.0.0",
            "198.18.0.1/16",
            "x/16",
            "10.0.0.0/31",
            "10.0.0.0/4",
            // Not unicast host addresses: the kernel refuses them as locators.
            "0.0.0.0/8",
            "127.0.0.0/16",
            "224.0.0.0/8",
            "239.255.0.0/16",
            "240.0.0.0/8",
            "255.255.255.0/24",
        ] {
            assert!(bad.parse::<CapsuleRange>().is_err(), "{bad}");
        }
        assert_eq!(r.usable(0), None);
        assert_eq!(r.usable(1), Some(Ipv4Addr::new(198, 18, 0, 1)));
        assert_eq!(r.usable(255), None);
        assert_eq!(r.usable(256), None);
        assert_eq!(r.usable(65535), None);
    }

    #[test]
    fn allocation_is_unique_and_moves_on() {
        let mut m = DirectoryMap::new(CapsuleRange::default());
        let (a, sa) = m.allocate().unwrap();
        m.insert(record("a", a, sa)).unwrap();
        let (b, sb) = m.allocate().unwrap();
        assert_eq!((a, sa), (Ipv4Addr::new(198, 18, 0, 1), 1));
        assert_eq!((b, sb), (Ipv4Addr::new(198, 18, 0, 2), 2));
        m.insert(record("b", b, sb)).unwrap();
        m.remove("a").unwrap();
        // The freed pair is not handed out again straight away.
        let (c, sc) = m.allocate().unwrap();
        assert_eq!((c, sc), (Ipv4Addr::new(198, 18, 0, 3), 3));
        // Duplicates are refused.
        assert!(m.insert(record("b", c, sc)).is_err());
        assert!(m.insert(record("x", b, sc)).is_err());
        assert!(m.insert(record("x", c, sb)).is_err());
        assert!(m.insert(record("Bad_Name", c, sc)).is_err());
    }

    #[test]
    fn small_ranges_run_out_cleanly_and_skip_specials() {
        let mut m = DirectoryMap::new("10.9.0.0/30".parse().unwrap());
        let mut got = vec![];
        while let Ok((ip, slot)) = m.allocate() {
            m.insert(record(&format!("c{}", got.len()), ip, slot))
                .unwrap();
            got.push(ip);
        }
        assert_eq!(
            got,
            [Ipv4Addr::new(10, 9, 0, 1), Ipv4Addr::new(10, 9, 0, 2)]
        );
        let mut m = DirectoryMap::new(CapsuleRange::default());
        m.next_locator = 254;
        let (ip, _) = m.allocate().unwrap();
        assert_eq!(ip, Ipv4Addr::new(198, 18, 0, 254));
        let (ip, _) = m.allocate().unwrap();
        assert_eq!(ip, Ipv4Addr::new(198, 18, 1, 1));
    }

    #[test]
    fn slots_wrap_and_fill() {
        let mut m = DirectoryMap::new(CapsuleRange::default());
        // Filled directly: allocating 4095 times is quadratic in a debug build.
        for slot in 1..=MAX_SLOT {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 256 + slot);
            m.capsules
                .insert(format!("c{slot}"), record(&format!("c{slot}"), ip, slot));
        }
        assert!(m.allocate().unwrap_err().to_string().contains("slots"));
        m.remove("c7").unwrap();
        assert_eq!(m.allocate().unwrap().1, 7);
    }

    #[test]
    fn names() {
        for ok in ["web", "echo-1", "a", &"x".repeat(63)] {
            validate_capsule_name(ok).unwrap();
        }
        for bad in ["", "-x", "Web", "a_b", "a.b", "a b", &"x".repeat(64)] {
            assert!(validate_capsule_name(bad).is_err(), "{bad:?}");
        }
        let mut m = DirectoryMap::new(CapsuleRange::default());
        assert_eq!(m.default_name("echo"), "echo-1");
        m.insert(record("echo-1", Ipv4Addr::new(198, 18, 0, 1), 1))
            .unwrap();
        assert_eq!(m.default_name("echo"), "echo-2");
        assert_eq!(m.default_name("crash_panic"), "crash-panic-1");
        assert_eq!(
            m.resolve("ECHO-1.Capsule.", "capsule"),
            Some(Ipv4Addr::new(198, 18, 0, 1))
        );
        assert_eq!(m.resolve("echo-1.other.", "capsule"), None);
        assert_eq!(m.resolve("echo-1", "capsule"), None);
    }

    #[test]
    fn map_persists_atomically() {
        let dir = std::env::temp_dir().join(format!("capsulectl-dir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let range = CapsuleRange::default();
        let mut m = load(&dir, range).unwrap();
        assert!(m.capsules.is_empty());
        let (ip, slot) = m.allocate().unwrap();
        m.insert(record("web", ip, slot)).unwrap();
        {
            let _l = lock(&dir).unwrap();
            save(&dir, &m).unwrap();
        }
        assert_eq!(load(&dir, range).unwrap(), m);
        assert!(!dir.join("directory.json.tmp").exists());
        fs::write(map_path(&dir), b"{").unwrap();
        assert!(load(&dir, range).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_writers_never_share_a_locator_or_slot() {
        let dir = std::env::temp_dir().join(format!("capsulectl-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let range = CapsuleRange::default();
        // Each thread opens the lock file itself, so each holds its own open
        // file description: flock excludes them from one another exactly as
        // it excludes separate capsulectl processes.
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        let _l = lock(&dir).unwrap();
                        let mut m = load(&dir, range).unwrap();
                        let (ip, slot) = m.allocate().unwrap();
                        m.insert(record(&format!("t{t}-{i}"), ip, slot)).unwrap();
                        save(&dir, &m).unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let m = load(&dir, range).unwrap();
        assert_eq!(m.capsules.len(), 80, "a write was lost");
        let ips: std::collections::HashSet<_> = m.capsules.values().map(|c| c.locator).collect();
        let slots: std::collections::HashSet<_> = m.capsules.values().map(|c| c.slot).collect();
        assert_eq!((ips.len(), slots.len()), (80, 80));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn ask(m: &DirectoryMap, name: &str, rtype: RecordType) -> Message {
        let mut q = Message::new(77, MessageType::Query, OpCode::Query);
        q.add_query(hickory_proto::op::Query::query(
            Name::from_ascii(name).unwrap(),
            rtype,
        ));
        Message::from_vec(&answer(m, DNS_ZONE, &q.to_vec().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn dns_answers() {
        let mut m = DirectoryMap::new(CapsuleRange::default());
        m.insert(record("web", Ipv4Addr::new(198, 18, 0, 9), 1))
            .unwrap();
        let r = ask(&m, "web.capsule.", RecordType::A);
        assert_eq!(r.metadata.id, 77);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(198, 18, 0, 9))));
        let r = ask(&m, "WEB.capsule.", RecordType::AAAA);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        let r = ask(&m, "nope.capsule.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let r = ask(&m, "capsule.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        let r = ask(&m, "example.com.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn dns_survives_garbage() {
        let m = DirectoryMap::new(CapsuleRange::default());
        assert_eq!(answer(&m, DNS_ZONE, b""), None);
        assert_eq!(answer(&m, DNS_ZONE, b"\x01\x02\x03"), None);
        // A header that promises a question which is not there: FORMERR.
        let bad = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'a'];
        let r = Message::from_vec(&answer(&m, DNS_ZONE, &bad).unwrap()).unwrap();
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        // Every truncation and a bit flip in every byte of a real query gives
        // either silence or a decodable answer, never a panic.
        let q = query_bytes("web.capsule.", 5).unwrap();
        for cut in 0..q.len() {
            if let Some(r) = answer(&m, DNS_ZONE, &q[..cut]) {
                Message::from_vec(&r).unwrap();
            }
        }
        for i in 0..q.len() {
            let mut f = q.clone();
            f[i] ^= 0xa5;
            if let Some(r) = answer(&m, DNS_ZONE, &f) {
                Message::from_vec(&r).unwrap();
            }
        }
        // A response is never answered (no reflection loops).
        let mut resp = q.clone();
        resp[2] |= 0x80;
        assert_eq!(answer(&m, DNS_ZONE, &resp), None);
    }

    #[test]
    fn serve_and_lookup_over_udp() {
        let dir = std::env::temp_dir().join(format!("capsulectl-dns-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let range = CapsuleRange::default();
        let mut m = DirectoryMap::new(range);
        m.insert(record("web", Ipv4Addr::new(198, 18, 0, 1), 1))
            .unwrap();
        save(&dir, &m).unwrap();
        // Find a free port, then serve on it from a thread.
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let d = dir.clone();
        std::thread::spawn(move || serve(&d, addr, DNS_ZONE, range));
        let t = Duration::from_secs(2);
        let mut first = None;
        for _ in 0..50 {
            if let Ok(v) = lookup(addr, "web.capsule.", t) {
                first = Some(v);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(first, Some(Some(Ipv4Addr::new(198, 18, 0, 1))));
        assert_eq!(lookup(addr, "db.capsule.", t).unwrap(), None);
        // A replaced map file is picked up without telling the server.
        m.insert(record("db", Ipv4Addr::new(198, 18, 0, 2), 2))
            .unwrap();
        save(&dir, &m).unwrap();
        assert_eq!(
            lookup(addr, "db.capsule.", t).unwrap(),
            Some(Ipv4Addr::new(198, 18, 0, 2))
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
