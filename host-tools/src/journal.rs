//! The move journal: what a move, suspend or resume is about to do, written
//! into the capsule's directory record before anything irreversible (the
//! intent), and what came of it (the outcome). The intent lives in the
//! directory map, so it changes atomically with the record it belongs to;
//! every intent and outcome is also appended to `journal.jsonl` in the lab
//! directory, one JSON object per line, for people reading what happened.
//!
//! The process that writes an intent holds the directory lock until it
//! writes the outcome. Anyone who takes the lock and finds an intent knows
//! that its writer died mid-way, and finishes or rolls it back by asking
//! every VM what it holds (`crate::recover`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

const JOURNAL_FILE: &str = "journal.jsonl";

/// What was under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntentKind {
    /// VM to VM (`migrate`).
    Move,
    /// VM to a file (`suspend`).
    Suspend,
    /// File to VM (`resume`).
    Resume,
}

/// How far it had got, as far as its writer said. Recovery decides from
/// what the VMs hold, and from one phase: at `CommitSent` the source's
/// frozen copy may be out of date, so it is never thawed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Pages stream to the destination while the capsule runs.
    Precopy,
    /// The capsule is about to be frozen (or is), its image on the way.
    Freeze,
    /// The image is written or sent; the new copy is about to start.
    Commit,
    /// A move's commit is about to be sent to the destination (written,
    /// and fsync'd, before it is): from here on the destination may run the
    /// capsule, so the source's frozen copy is never thawed again. If the
    /// destination dies now, the capsule is lost.
    CommitSent,
}

/// A move, suspend or resume that has begun and not ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub kind: IntentKind,
    /// The VM that held the copy (none for a resume).
    pub from: Option<String>,
    /// The VM the capsule goes to (none for a suspend).
    pub to: Option<String>,
    /// The epoch of the copy being moved.
    pub epoch: u64,
    /// The epoch the new copy runs at if the move completes.
    pub next_epoch: u64,
    pub phase: Phase,
    /// The destination's boot that was sent the commit: its QEMU pid when
    /// the intent went to `commit-sent`. A destination running another boot
    /// now (restarted since) holds nothing of that commit, and recovery
    /// takes it as dead for this intent — so the commit-sent rule holds
    /// (lost, never a thaw) even when it answers again with no copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_boot: Option<u32>,
    /// A suspend's image file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    pub started_unix: u64,
    /// The process that wrote it.
    pub pid: u32,
}

impl Intent {
    pub fn new(kind: IntentKind, from: Option<&str>, to: Option<&str>, epoch: u64) -> Self {
        Self {
            kind,
            from: from.map(str::to_string),
            to: to.map(str::to_string),
            epoch,
            next_epoch: epoch + 1,
            phase: match kind {
                IntentKind::Move => Phase::Precopy,
                IntentKind::Suspend => Phase::Freeze,
                IntentKind::Resume => Phase::Commit,
            },
            to_boot: None,
            file: None,
            started_unix: unix_now(),
            pid: std::process::id(),
        }
    }

    /// One line for people: "move vm1 -> vm2 (epoch 3 -> 4, pre-copy)".
    pub fn describe(&self) -> String {
        let place = |p: &Option<String>, none: &str| p.clone().unwrap_or_else(|| none.to_string());
        format!(
            "{} {} -> {} (epoch {} -> {}, {}, by pid {})",
            match self.kind {
                IntentKind::Move => "move",
                IntentKind::Suspend => "suspend",
                IntentKind::Resume => "resume",
            },
            place(&self.from, "file"),
            place(&self.to, "file"),
            self.epoch,
            self.next_epoch,
            match self.phase {
                Phase::Precopy => "pre-copy",
                Phase::Freeze => "freeze",
                Phase::Commit => "commit",
                Phase::CommitSent => "commit-sent",
            },
            self.pid
        )
    }
}

/// How a journaled operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The new copy runs (at `epoch`) on `vm`.
    Moved { vm: String, epoch: u64 },
    /// The capsule runs (again) where it was, at `epoch`.
    RolledBack { vm: String, epoch: u64 },
    /// The capsule is in its image file now, and runs nowhere.
    Suspended { file: PathBuf },
    /// A resume that did not happen: the record is gone again.
    Abandoned,
    /// No copy survived: the VM that held the only one died.
    Lost { why: String },
}

#[derive(Serialize)]
struct Entry<'a> {
    unix: u64,
    capsule: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    intent: Option<&'a Intent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a Outcome>,
    /// Who wrote the outcome: the operation itself, or `recover`.
    by: &'a str,
}

fn append(lab_dir: &Path, entry: &Entry) -> Result<()> {
    let path = lab_dir.join(JOURNAL_FILE);
    let mut line = serde_json::to_vec(entry)?;
    line.push(b'\n');
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.write_all(&line)
        .with_context(|| format!("cannot append to {}", path.display()))
}

/// Appends an intent to the journal file (the map holds the live copy).
pub fn log_intent(lab_dir: &Path, capsule: &str, intent: &Intent) -> Result<()> {
    append(
        lab_dir,
        &Entry {
            unix: unix_now(),
            capsule,
            intent: Some(intent),
            outcome: None,
            by: "intent",
        },
    )
}

/// Appends an outcome; `by` says who decided it ("migrate", "recover", …).
pub fn log_outcome(lab_dir: &Path, capsule: &str, outcome: &Outcome, by: &str) -> Result<()> {
    append(
        lab_dir,
        &Entry {
            unix: unix_now(),
            capsule,
            intent: None,
            outcome: Some(outcome),
            by,
        },
    )
}

/// The journal's lines, oldest first (for tests and post-mortems).
pub fn read(lab_dir: &Path) -> Result<Vec<serde_json::Value>> {
    let path = lab_dir.join(JOURNAL_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad line in {}", path.display())))
        .collect()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_round_trip_through_the_map_format() {
        let mut i = Intent::new(IntentKind::Move, Some("vm1"), Some("vm2"), 3);
        i.phase = Phase::Commit;
        let json = serde_json::to_string(&i).unwrap();
        assert!(json.contains("\"kind\":\"move\"") && json.contains("\"phase\":\"commit\""));
        assert_eq!(serde_json::from_str::<Intent>(&json).unwrap(), i);
        assert_eq!(i.next_epoch, 4);
        assert!(
            i.describe()
                .starts_with("move vm1 -> vm2 (epoch 3 -> 4, commit")
        );
    }

    #[test]
    fn the_journal_file_keeps_every_line_in_order() {
        let dir = std::env::temp_dir().join(format!("capsules-journal-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let i = Intent::new(IntentKind::Suspend, Some("vm1"), None, 1);
        log_intent(&dir, "db", &i).unwrap();
        log_outcome(
            &dir,
            "db",
            &Outcome::RolledBack {
                vm: "vm1".into(),
                epoch: 3,
            },
            "recover",
        )
        .unwrap();
        let lines = read(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["intent"]["kind"], "suspend");
        assert_eq!(lines[1]["outcome"]["rolled-back"]["epoch"], 3);
        assert_eq!(lines[1]["by"], "recover");
    }
}
