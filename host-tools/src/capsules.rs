//! Capsule commands: run, ps, kill, logs, programs.
//!
//! The directory (see [`crate::directory`]) says which capsules exist and
//! where; each VM's control service says how they are. `run` and `kill` hold
//! the directory lock across their control request, so concurrent
//! invocations cannot hand out the same locator or slot, and a failed request
//! leaves the map exactly as it was.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use capsules_wire::control::{
    CapsuleInfo, CapsuleState, MAX_ARG_LEN, MAX_ARGS, ProgramInfo, Request, Response, RunCapsule,
};
use serde::Serialize;

use crate::control::ControlClient;
use crate::directory::{self, CapsuleRecord, DirectoryMap};
use crate::lab;
use crate::netns::{self, NetnsGuard};
use crate::state::{LabState, VmRecord};

/// Timeout of capsule control requests: starting a capsule under TCG may
/// take longer than a Version round trip.
pub const CAPSULE_TIMEOUT: Duration = Duration::from_secs(5);
/// Log bytes asked for per request (well below the 64 KiB frame limit).
const LOG_CHUNK: u32 = 16 * 1024;

/// A lab opened for capsule commands: state loaded and this thread inside
/// the lab namespace for as long as it lives.
pub struct LabSession {
    pub lab: LabState,
    pub dir: std::path::PathBuf,
    pub(crate) key: Vec<u8>,
    _inside: NetnsGuard,
}

impl LabSession {
    pub fn open(name: &str) -> Result<Self> {
        netns::require_root_and_ip()?;
        let (lab, dir) = lab::load_lab(name)?;
        let key = lab.key()?;
        if !netns::exists(&lab.netns) {
            bail!(
                "lab '{name}' has state but no namespace {}: `capsulectl lab down --lab {name}` cleans it",
                lab.netns
            );
        }
        let inside = NetnsGuard::enter(&lab.netns)?;
        Ok(Self {
            lab,
            dir,
            key,
            _inside: inside,
        })
    }

    pub fn vm(&self, name: &str) -> Result<&VmRecord> {
        self.lab.vm(name).map_err(|_| {
            let names: Vec<&str> = self.lab.vms.iter().map(|v| v.name.as_str()).collect();
            anyhow!(
                "unknown VM '{name}': lab '{}' has {}",
                self.lab.name,
                names.join(", ")
            )
        })
    }

    pub fn connect(&self, vm: &VmRecord) -> Result<ControlClient> {
        // A VM of another subnet is reached from its own subnet's namespace,
        // never through the router (as `lab::connect`).
        let _there = vm
            .netns
            .as_deref()
            .map(crate::netns::NetnsGuard::enter)
            .transpose()?;
        let addr = std::net::SocketAddr::from((vm.ip, vm.control_port));
        ControlClient::connect_with(addr, &self.key, lab::CONTROL_TIMEOUT, CAPSULE_TIMEOUT)
            .map(|c| c.named(&vm.name))
            .with_context(|| format!("VM {} ({}) does not answer", vm.name, vm.ip))
    }

    /// One request to one VM; an error reply becomes an error naming the VM.
    pub fn call(&self, vm: &VmRecord, request: &Request) -> Result<Response> {
        let resp = self.connect(vm)?.call(request)?;
        if let Response::Error { code, message } = resp {
            bail!("{} refused: {message} ({})", vm.name, code.as_str());
        }
        Ok(resp)
    }

    pub fn list_capsules(&self, vm: &VmRecord) -> Result<Vec<CapsuleInfo>> {
        match self.call(vm, &Request::ListCapsules)? {
            Response::Capsules(list) => Ok(list),
            other => bail!(
                "unexpected answer to ListCapsules from {}: {other:?}",
                vm.name
            ),
        }
    }

    pub fn load_map(&self) -> Result<DirectoryMap> {
        directory::load(&self.dir, self.lab.capsule_range)
    }

    /// Takes the directory lock and loads the map, after finishing or rolling
    /// back whatever a dead process left open (an intent in the map means its
    /// writer died: it held this lock until its outcome). A recovery that
    /// cannot be decided yet fails the command only if it concerns
    /// `capsule`; for the others it is a warning.
    pub fn lock_map(&self, capsule: Option<&str>) -> Result<(directory::MapLock, DirectoryMap)> {
        let lock = directory::lock(&self.dir)?;
        let mut map = self.load_map()?;
        let open: Vec<String> = map
            .capsules
            .values()
            .filter(|r| r.intent.is_some())
            .map(|r| r.name.clone())
            .collect();
        for name in open {
            if let Err(e) = crate::recover::recover_all(self, &mut map, Some(&name)) {
                if capsule == Some(name.as_str()) {
                    return Err(e);
                }
                eprintln!("capsulectl: warning: {e:#}");
            }
        }
        crate::vm::mark_lost_on_dead_vms(self, &mut map)?;
        Ok((lock, map))
    }
}

impl crate::recover::Env for LabSession {
    fn lab_name(&self) -> &str {
        &self.lab.name
    }

    fn vms(&self) -> &[VmRecord] {
        &self.lab.vms
    }

    fn connect(&self, vm: &VmRecord) -> Result<crate::recover::Conn> {
        LabSession::connect(self, vm).map(|c| Box::new(c) as crate::recover::Conn)
    }

    fn is_alive(&self, vm: &VmRecord) -> bool {
        lab::vm_alive(vm)
    }

    fn save_map(&self, map: &DirectoryMap) -> Result<()> {
        directory::save(&self.dir, map)
    }

    fn committed(&self, locator: std::net::Ipv4Addr, vm: &VmRecord, epoch: u64) {
        crate::routed::push_entry(&self.dir, locator, vm.ip, epoch);
    }

    fn log_intent(&self, capsule: &str, intent: &crate::journal::Intent) -> Result<()> {
        crate::journal::log_intent(&self.dir, capsule, intent)
    }

    fn log_outcome(
        &self,
        capsule: &str,
        outcome: &crate::journal::Outcome,
        by: &str,
    ) -> Result<()> {
        crate::journal::log_outcome(&self.dir, capsule, outcome, by)
    }

    fn vm(&self, name: &str) -> Result<&VmRecord> {
        LabSession::vm(self, name)
    }
}

/// What `run` needs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub program: String,
    pub name: Option<String>,
    pub on: Option<String>,
    pub memory_mib: Option<u64>,
    pub args: Vec<String>,
}

/// What `run` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Started {
    pub name: String,
    pub program: String,
    pub locator: Ipv4Addr,
    pub slot: u32,
    pub vm: String,
    pub dns: String,
}

fn check_args(opts: &RunOptions) -> Result<()> {
    if opts.args.len() > MAX_ARGS {
        bail!("too many program arguments: at most {MAX_ARGS}");
    }
    if let Some(a) = opts.args.iter().find(|a| a.len() > MAX_ARG_LEN) {
        bail!(
            "program argument of {} bytes is too long (at most {MAX_ARG_LEN})",
            a.len()
        );
    }
    if opts.memory_mib == Some(0) {
        bail!("--memory must be at least 1 MiB");
    }
    Ok(())
}

/// Picks the VM for a new capsule: the named one, else the answering VM with
/// the fewest capsules (ties: the first).
fn pick_vm<'a>(s: &'a LabSession, on: Option<&str>) -> Result<&'a VmRecord> {
    if let Some(name) = on {
        let vm = s.vm(name)?;
        s.list_capsules(vm)?;
        return Ok(vm);
    }
    let mut best: Option<(&VmRecord, usize)> = None;
    let mut errors = Vec::new();
    for vm in &s.lab.vms {
        match s.list_capsules(vm) {
            Ok(list) if best.is_none_or(|(_, n)| list.len() < n) => best = Some((vm, list.len())),
            Ok(_) => {}
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    best.map(|(vm, _)| vm).ok_or_else(|| {
        anyhow!(
            "no VM of lab '{}' answers: {}",
            s.lab.name,
            errors.join("; ")
        )
    })
}

/// `capsulectl run`: reserve a locator and slot, start the capsule, record it.
pub fn run(s: &LabSession, opts: &RunOptions) -> Result<Started> {
    check_args(opts)?;
    if let Some(name) = &opts.name {
        directory::validate_capsule_name(name)?;
    }
    let (_lock, mut map) = s.lock_map(opts.name.as_deref())?;
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => map.default_name(&opts.program),
    };
    directory::validate_capsule_name(&name)?;
    if let Some(c) = map.get(&name) {
        bail!(
            "a capsule named '{name}' already exists (locator {}, on {}): pick another --name or `capsulectl kill {name}` first",
            c.locator,
            c.vm
        );
    }
    let vm = pick_vm(s, opts.on.as_deref())?;
    // The pair is only reserved in this process's copy of the map until the
    // VM has started the capsule; on any failure it is dropped unsaved.
    let (locator, slot) = map.allocate()?;
    let memory_limit = opts.memory_mib.unwrap_or(0) * 1024 * 1024;
    // A name used before goes on counting: any copy of the old capsule that
    // might still surface somewhere is older than this one.
    let epoch = map.last_epoch(&name) + 1;
    let request = Request::RunCapsule(RunCapsule {
        name: name.clone(),
        program: opts.program.clone(),
        args: opts.args.clone(),
        locator,
        slot,
        memory_limit,
        epoch,
    });
    let info = match s.call(vm, &request)? {
        Response::CapsuleStarted(info) => info,
        other => bail!(
            "unexpected answer to RunCapsule from {}: {other:?}",
            vm.name
        ),
    };
    let created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    map.insert(CapsuleRecord {
        name: name.clone(),
        program: info.program.clone(),
        args: opts.args.clone(),
        locator,
        slot,
        vm: vm.name.clone(),
        memory_limit,
        created_unix,
        epoch,
        intent: None,
        lost: None,
    })?;
    if let Err(e) = directory::save(&s.dir, &map) {
        // Do not leave a capsule running that the directory does not know.
        let _ = s.call(vm, &Request::KillCapsule { name: name.clone() });
        return Err(e.context("cannot record the capsule; it was killed again"));
    }
    Ok(Started {
        dns: format!("{name}.{}", directory::DNS_ZONE),
        name,
        program: info.program,
        locator,
        slot,
        vm: vm.name.clone(),
    })
}

/// One row of `ps`: one copy of a capsule on one VM, or a directory record
/// that no VM reports a copy of.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PsRow {
    pub name: String,
    pub program: String,
    pub locator: Ipv4Addr,
    pub slot: u32,
    /// Where this copy is (for a record without a copy: where the
    /// directory says it should be).
    pub vm: String,
    /// running, frozen, exited, faulted, killed or migrated (what the VM
    /// reports); missing (its VM does not know it), unreachable (its VM does
    /// not answer) or lost (the VM that held the only copy died).
    pub state: String,
    /// Why a faulted capsule ended, or why a lost one is lost.
    pub reason: Option<String>,
    /// This copy's epoch as its VM reports it.
    pub epoch: Option<u64>,
    /// The epoch the directory committed for the capsule (none: the
    /// directory does not know the capsule at all).
    pub directory_epoch: Option<u64>,
    /// Whether this is the copy the directory names (its VM and epoch). Any
    /// other copy is stale or unknown: a `recover` or the next capsule
    /// command ends it.
    pub recorded: bool,
    /// An operation in progress, or left half done by a process that died.
    pub intent: Option<String>,
    pub tasks: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub memory_limit: Option<u64>,
    pub sockets: Option<u32>,
    pub uptime_ns: Option<u64>,
    pub args: Vec<String>,
}

impl PsRow {
    fn of_copy(i: &CapsuleInfo, vm: &str, rec: Option<&CapsuleRecord>) -> Self {
        Self {
            name: i.name.clone(),
            program: i.program.clone(),
            locator: i.locator,
            slot: i.slot,
            vm: vm.to_string(),
            state: i.state.label().into(),
            reason: match &i.state {
                CapsuleState::Faulted { reason } => Some(reason.clone()),
                _ => None,
            },
            epoch: Some(i.epoch),
            directory_epoch: rec.map(|r| r.epoch),
            recorded: rec.is_some_and(|r| r.vm == vm && r.epoch == i.epoch),
            intent: rec.and_then(|r| r.intent.as_ref()).map(|i| i.describe()),
            tasks: Some(i.tasks),
            memory_bytes: Some(i.memory_bytes),
            memory_limit: Some(i.memory_limit),
            sockets: Some(i.sockets),
            uptime_ns: Some(i.uptime_ns),
            args: rec.map(|r| r.args.clone()).unwrap_or_default(),
        }
    }

    fn of_record(c: &CapsuleRecord, state: &str) -> Self {
        Self {
            name: c.name.clone(),
            program: c.program.clone(),
            locator: c.locator,
            slot: c.slot,
            vm: c.vm.clone(),
            state: state.into(),
            reason: c.lost.clone(),
            epoch: None,
            directory_epoch: Some(c.epoch),
            recorded: true,
            intent: c.intent.as_ref().map(|i| i.describe()),
            tasks: None,
            memory_bytes: None,
            memory_limit: None,
            sockets: None,
            uptime_ns: None,
            args: c.args.clone(),
        }
    }
}

/// Joins directory records with what each VM reports (`None`: VM silent):
/// a row for every copy any VM reports — so that two copies can never hide
/// behind one record — and one for each record no VM reports a copy of.
/// A record on a VM in `dead` (its QEMU is gone) shows as lost even before
/// a capsule command or `recover` writes that down.
pub fn join_rows(
    map: &DirectoryMap,
    reports: &BTreeMap<String, Option<Vec<CapsuleInfo>>>,
    dead: &[String],
) -> Vec<PsRow> {
    let mut rows = Vec::new();
    for c in map.capsules.values() {
        let copies: Vec<PsRow> = reports
            .iter()
            .filter_map(|(vm, list)| Some((vm, list.as_ref()?)))
            .flat_map(|(vm, list)| {
                list.iter()
                    .filter(|i| i.name == c.name)
                    .map(move |i| PsRow::of_copy(i, vm, Some(c)))
            })
            .collect();
        let recorded_found = copies.iter().any(|r| r.vm == c.vm);
        if !recorded_found {
            let row = if c.lost.is_some() {
                PsRow::of_record(c, "lost")
            } else if dead.contains(&c.vm) && !copies.iter().any(|r| r.state == "running") {
                let mut row = PsRow::of_record(c, "lost");
                row.reason = Some(format!("{} died holding the only copy", c.vm));
                row
            } else {
                match reports.get(&c.vm) {
                    Some(Some(_)) => PsRow::of_record(c, "missing"),
                    _ => PsRow::of_record(c, "unreachable"),
                }
            };
            rows.push(row);
        }
        rows.extend(copies);
    }
    // Copies of capsules the directory does not know at all.
    for (vm, list) in reports {
        for i in list.iter().flatten() {
            if map.get(&i.name).is_none() {
                rows.push(PsRow::of_copy(i, vm, None));
            }
        }
    }
    rows
}

/// `capsulectl ps`: every VM of the lab is asked, not only those the
/// directory names.
pub fn ps(s: &LabSession) -> Result<Vec<PsRow>> {
    let map = s.load_map()?;
    let reports: BTreeMap<String, Option<Vec<CapsuleInfo>>> = s
        .lab
        .vms
        .iter()
        .map(|vm| (vm.name.clone(), s.list_capsules(vm).ok()))
        .collect();
    let dead: Vec<String> = s
        .lab
        .vms
        .iter()
        .filter(|vm| !lab::vm_alive(vm))
        .map(|vm| vm.name.clone())
        .collect();
    Ok(join_rows(&map, &reports, &dead))
}

/// `capsulectl kill`: KillCapsule on its VM, then out of the directory. A VM
/// that no longer knows the capsule counts as killed; a VM that does not
/// answer keeps the record unless `force`.
pub fn kill(s: &LabSession, name: &str, force: bool) -> Result<CapsuleRecord> {
    let (_lock, mut map) = s.lock_map(Some(name))?;
    let Some(rec) = map.get(name).cloned() else {
        bail!(
            "no capsule named '{name}' in lab '{}' (see `capsulectl ps --lab {}`)",
            s.lab.name,
            s.lab.name
        );
    };
    if rec.lost.is_some() {
        // No copy survived anywhere: only the record is left to remove.
        map.remove(name);
        directory::save(&s.dir, &map)?;
        return Ok(rec);
    }
    let vm = s.vm(&rec.vm)?;
    let outcome = s.connect(vm).and_then(|mut c| {
        c.call(&Request::KillCapsule {
            name: rec.name.clone(),
        })
    });
    match outcome {
        Ok(Response::Killed) => {}
        Ok(Response::Error {
            code: capsules_wire::control::ErrorCode::NotFound,
            ..
        }) => {}
        Ok(Response::Error { code, message }) => {
            bail!(
                "{} refused to kill '{name}': {message} ({})",
                vm.name,
                code.as_str()
            )
        }
        Ok(other) => bail!("unexpected answer to KillCapsule: {other:?}"),
        Err(e) if force => eprintln!(
            "capsulectl: warning: {e:#}; removing '{name}' from the directory anyway (--force)"
        ),
        Err(e) => {
            return Err(e.context(format!(
                "'{name}' is kept in the directory; use --force to forget it"
            )));
        }
    }
    map.remove(name);
    directory::save(&s.dir, &map)?;
    Ok(rec)
}

/// Writes a capsule's log to `out` from `offset`; returns the next offset.
fn drain_logs(
    client: &mut ControlClient,
    name: &str,
    mut offset: u64,
    out: &mut dyn Write,
) -> Result<u64> {
    loop {
        let resp = client.call(&Request::CapsuleLogs {
            name: name.into(),
            offset,
            max: LOG_CHUNK,
        })?;
        match resp {
            Response::Logs { data, next_offset } => {
                out.write_all(&data)?;
                out.flush()?;
                let done = data.is_empty() || next_offset == offset;
                offset = next_offset;
                if done {
                    return Ok(offset);
                }
            }
            Response::Error { code, message } => {
                bail!("logs of '{name}' refused: {message} ({})", code.as_str())
            }
            other => bail!("unexpected answer to CapsuleLogs: {other:?}"),
        }
    }
}

/// `capsulectl logs`: the capsule's log so far; with `follow`, keeps polling
/// (every `poll`) until the capsule is no longer running.
pub fn logs(
    s: &LabSession,
    name: &str,
    follow: bool,
    poll: Duration,
    out: &mut dyn Write,
) -> Result<()> {
    let map = s.load_map()?;
    let Some(rec) = map.get(name).cloned() else {
        bail!("no capsule named '{name}' in lab '{}'", s.lab.name);
    };
    let vm = s.vm(&rec.vm)?;
    let mut client = s.connect(vm)?;
    let mut offset = drain_logs(&mut client, &rec.name, 0, out)?;
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(poll);
        // The state is read before the log, so the last lines of a capsule
        // that ends between the two reads are still printed below.
        let state = match capsule_state(&mut client, &rec.name) {
            Ok(st) => st,
            // The control service closes idle connections: reconnect once.
            Err(_) => {
                client = s.connect(vm)?;
                capsule_state(&mut client, &rec.name)?
            }
        };
        match drain_logs(&mut client, &rec.name, offset, out) {
            Ok(o) => offset = o,
            // Killed capsules leave the VM's list, and their log with them.
            Err(_) if state.is_none() => return Ok(()),
            Err(e) => return Err(e),
        }
        if state != Some(CapsuleState::Running) {
            return Ok(());
        }
    }
}

/// A capsule's state on its VM; `None` when the VM does not know it.
fn capsule_state(client: &mut ControlClient, name: &str) -> Result<Option<CapsuleState>> {
    match client.call(&Request::ListCapsules)? {
        Response::Capsules(list) => Ok(list.into_iter().find(|c| c.name == name).map(|c| c.state)),
        other => bail!("unexpected answer to ListCapsules: {other:?}"),
    }
}

/// `capsulectl programs`: asks the first VM that answers.
pub fn programs(s: &LabSession) -> Result<Vec<ProgramInfo>> {
    let mut errors = Vec::new();
    for vm in &s.lab.vms {
        match s.call(vm, &Request::ListPrograms) {
            Ok(Response::Programs(list)) => return Ok(list),
            Ok(other) => errors.push(format!("{}: unexpected answer {other:?}", vm.name)),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    bail!(
        "no VM of lab '{}' answers: {}",
        s.lab.name,
        errors.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::CapsuleRange;

    fn info(name: &str, state: CapsuleState) -> CapsuleInfo {
        CapsuleInfo {
            name: name.into(),
            program: "echo".into(),
            locator: Ipv4Addr::new(198, 18, 0, 1),
            slot: 1,
            state,
            tasks: 1,
            memory_bytes: 65536,
            memory_limit: 1 << 26,
            sockets: 1,
            uptime_ns: 5,
            epoch: 1,
        }
    }

    fn rec(name: &str, vm: &str, n: u8) -> CapsuleRecord {
        CapsuleRecord {
            name: name.into(),
            program: "echo".into(),
            args: vec![],
            locator: Ipv4Addr::new(198, 18, 0, n),
            slot: u32::from(n),
            vm: vm.into(),
            memory_limit: 0,
            created_unix: 0,
            epoch: 1,
            intent: None,
            lost: None,
        }
    }

    #[test]
    fn ps_joins_directory_and_vm_reports() {
        let mut map = DirectoryMap::new(CapsuleRange::default());
        map.insert(rec("a", "vm1", 1)).unwrap();
        map.insert(rec("b", "vm1", 2)).unwrap();
        map.insert(rec("c", "vm2", 3)).unwrap();
        map.insert(rec("d", "vm1", 4)).unwrap();
        let mut reports = BTreeMap::new();
        reports.insert(
            "vm1".to_string(),
            Some(vec![
                info("a", CapsuleState::Running),
                info(
                    "b",
                    CapsuleState::Faulted {
                        reason: "page fault".into(),
                    },
                ),
            ]),
        );
        reports.insert("vm2".to_string(), None);
        let rows = join_rows(&map, &reports, &[]);
        let states: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.name.as_str(), r.state.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                ("a", "running"),
                ("b", "faulted"),
                ("c", "unreachable"),
                ("d", "missing")
            ]
        );
        assert_eq!(rows[1].reason.as_deref(), Some("page fault"));
        assert_eq!(rows[0].memory_bytes, Some(65536));
        assert_eq!(rows[2].tasks, None);
        let json = serde_json::to_value(&rows).unwrap();
        for key in ["name", "program", "locator", "vm", "state"] {
            assert!(json[0].get(key).is_some(), "{key}");
        }
        assert_eq!(json[0]["locator"], "198.18.0.1");
        assert!(rows.iter().all(|r| r.recorded));
    }

    #[test]
    fn ps_shows_every_copy_not_just_the_recorded_one() {
        let mut map = DirectoryMap::new(CapsuleRange::default());
        map.insert(rec("a", "vm1", 1)).unwrap();
        let mut lost = rec("b", "vm2", 2);
        lost.lost = Some("vm2 died holding the only copy".into());
        map.insert(lost).unwrap();
        let mut frozen_old = info("a", CapsuleState::Frozen);
        frozen_old.epoch = 0;
        let mut reports = BTreeMap::new();
        reports.insert(
            "vm1".to_string(),
            Some(vec![info("a", CapsuleState::Running)]),
        );
        reports.insert(
            "vm2".to_string(),
            Some(vec![frozen_old, info("stray", CapsuleState::Running)]),
        );
        let rows = join_rows(&map, &reports, &[]);
        let seen: Vec<(&str, &str, &str, bool)> = rows
            .iter()
            .map(|r| (r.name.as_str(), r.vm.as_str(), r.state.as_str(), r.recorded))
            .collect();
        assert_eq!(
            seen,
            [
                ("a", "vm1", "running", true),
                ("a", "vm2", "frozen", false),
                ("b", "vm2", "lost", true),
                ("stray", "vm2", "running", false),
            ]
        );
        assert_eq!(
            rows[2].reason.as_deref(),
            Some("vm2 died holding the only copy")
        );
        assert_eq!(rows[3].directory_epoch, None);
    }

    #[test]
    fn a_record_on_a_dead_vm_shows_as_lost_unless_a_copy_runs_elsewhere() {
        let mut map = DirectoryMap::new(CapsuleRange::default());
        map.insert(rec("a", "vm2", 1)).unwrap();
        map.insert(rec("b", "vm2", 2)).unwrap();
        let mut reports = BTreeMap::new();
        reports.insert(
            "vm1".to_string(),
            Some(vec![info("b", CapsuleState::Running)]),
        );
        reports.insert("vm2".to_string(), None);
        let rows = join_rows(&map, &reports, &["vm2".to_string()]);
        let seen: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| (r.name.as_str(), r.vm.as_str(), r.state.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                ("a", "vm2", "lost"),
                ("b", "vm2", "unreachable"),
                ("b", "vm1", "running")
            ]
        );
        assert_eq!(
            rows[0].reason.as_deref(),
            Some("vm2 died holding the only copy")
        );
        // Silent but alive: nothing is concluded.
        let rows = join_rows(&map, &reports, &[]);
        assert_eq!(rows[0].state, "unreachable");
        // A copy elsewhere that does not run (frozen, ended) keeps nothing
        // alive: the record is lost, and that copy shows as it is.
        reports.insert(
            "vm1".to_string(),
            Some(vec![info("b", CapsuleState::Frozen)]),
        );
        let rows = join_rows(&map, &reports, &["vm2".to_string()]);
        let seen: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| (r.name.as_str(), r.vm.as_str(), r.state.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                ("a", "vm2", "lost"),
                ("b", "vm2", "lost"),
                ("b", "vm1", "frozen")
            ]
        );
    }

    #[test]
    fn run_arguments_are_checked_before_anything_happens() {
        let mut o = RunOptions {
            program: "echo".into(),
            ..Default::default()
        };
        check_args(&o).unwrap();
        o.args = vec!["x".into(); MAX_ARGS + 1];
        assert!(check_args(&o).is_err());
        o.args = vec!["x".repeat(MAX_ARG_LEN + 1)];
        assert!(check_args(&o).is_err());
        o.args = vec![];
        o.memory_mib = Some(0);
        assert!(check_args(&o).is_err());
    }
}
