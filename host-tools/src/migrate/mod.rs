//! Moving capsules: `migrate` (VM to VM, [`moves`]), `suspend` (VM to file)
//! and `resume` (file to VM, [`files`]), and `inspect` ([`inspect`]).
//!
//! The order of a move (docs/control-protocol.md, "Moving a capsule";
//! docs/architecture.md, "The stages of a move"): same build on both VMs →
//! destination admits → the intent goes on record in the directory
//! (`crate::journal`) → pre-copy: the pages stream to the destination while
//! the capsule runs ([`stream`]) → the other VMs hold traffic to the capsule
//! → freeze at the source → the delta streams through us to the destination
//! → the destination is checked alive and `commit-sent` goes on record →
//! commit at the destination at the next epoch (the capsule runs there) →
//! release at the source (held packets and stragglers are forwarded) → the
//! other VMs release their traffic → the directory records the new VM and
//! epoch and drops the intent. Any failure settles the move from what every
//! VM holds (`crate::recover`): before the commit was sent the capsule
//! resumes at the source; after it, it completes at the destination, or —
//! if the destination died — the capsule is lost and the source's
//! out-of-date copy fenced, never thawed. The capsule runs in exactly one
//! place at any time, also when this process dies half way.

use anyhow::{Result, anyhow, bail};
use capsules_wire::control::{Request, Response};

use crate::control::Transport;
use crate::directory::{CapsuleRecord, DirectoryMap};
use crate::fault;
use crate::journal::Intent;
use crate::recover::{self, Decision, Env};

#[cfg(test)]
mod fake;
pub mod files;
pub mod inspect;
pub mod moves;
pub mod stream;

pub use files::{IMAGE_KEY_ENV, image_key, load_image_file, resume, suspend};
pub use inspect::{Inspection, inspect_capsule, inspect_file, render_inspection};
pub use moves::{MigrationReport, Move, Stage, migrate, thaw};

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn expect_done(resp: Response, what: &str, vm: &str) -> Result<()> {
    match resp {
        Response::Done => Ok(()),
        Response::Error { code, message } => {
            bail!("{vm} refused {what}: {message} ({})", code.as_str())
        }
        other => bail!("unexpected answer to {what} from {vm}: {other:?}"),
    }
}

fn build_id_hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// `client.call(request)`; but when a test configured `drop-answer` at
/// `phase` (`crate::fault`), the request is sent and carried out, and its
/// answer lost: read and thrown away, and an error returned as if it had
/// never come. The connection is of no further use then.
fn call_at(
    client: &mut dyn Transport,
    phase: Option<&str>,
    what: &str,
    request: &Request,
) -> Result<Response> {
    if let Some(phase) = phase.filter(|p| fault::action(p) == Some(fault::Action::DropAnswer)) {
        client.lose_answer(request)?;
        bail!("the answer to {what} was lost (fault injection at {phase})");
    }
    client.call(request)
}

/// The directory's record of capsule `name`.
fn record(s: &dyn Env, map: &DirectoryMap, name: &str) -> Result<CapsuleRecord> {
    map.get(name)
        .cloned()
        .ok_or_else(|| anyhow!("no capsule named '{name}' in lab '{}'", s.lab_name()))
}

/// Puts `intent` on the capsule's record (saved, and appended to the
/// journal file).
fn write_intent(s: &dyn Env, map: &mut DirectoryMap, name: &str, intent: &Intent) -> Result<()> {
    let rec = map
        .get_mut(name)
        .ok_or_else(|| anyhow!("'{name}' left the directory"))?;
    rec.intent = Some(intent.clone());
    s.save_map(map)?;
    s.log_intent(name, intent)
}

/// Records how the operation ended (and carries out what the decision still
/// asks: fences, a thaw). The intent is gone from the record afterwards.
fn close_intent(
    s: &dyn Env,
    map: &mut DirectoryMap,
    rec: &CapsuleRecord,
    intent: &Intent,
    decision: Decision,
) -> Result<()> {
    let mut current = map.get(&rec.name).cloned().unwrap_or_else(|| rec.clone());
    current.intent = Some(intent.clone());
    recover::apply(s, map, &current, intent, decision, "migrate").map(|_| ())
}
