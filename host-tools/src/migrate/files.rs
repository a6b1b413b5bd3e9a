//! A capsule to a file and back: `suspend` (freeze, save its image sealed
//! with the image key, end it on its VM) and `resume` (restore a saved
//! image on a VM at a new epoch), both journaled like a move.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use capsules_wire::control::{CapsuleInfo, CapsuleState, MAX_IMAGE_CHUNK, Request, Response};
use capsules_wire::image::{self, CapsuleImage};

use super::stream::read_image;
use super::{build_id_hex, close_intent, expect_done, record, write_intent};
use crate::capsules::LabSession;
use crate::control::ControlClient;
use crate::directory::{self, CapsuleRecord};
use crate::fault;
use crate::journal::{self, Intent, IntentKind};
use crate::progress::Progress;
use crate::recover::{self, Decision};

/// Where the key that seals suspended images on disk lives (created on first use).
pub const IMAGE_KEY_ENV: &str = "CAPSULES_IMAGE_KEY_FILE";
const DEFAULT_IMAGE_KEY_FILE: &str = "/var/lib/capsules/image.key";

/// Freezes capsule `name` on the VM behind `client`; returns its image length.
fn freeze(client: &mut ControlClient, vm: &str, name: &str) -> Result<u64> {
    match client.call(&Request::FreezeCapsule { name: name.into() })? {
        Response::Frozen { image_len } => Ok(image_len),
        Response::Error { code, message } => {
            bail!(
                "{vm} refused to freeze '{name}': {message} ({})",
                code.as_str()
            )
        }
        other => bail!("unexpected answer to FreezeCapsule from {vm}: {other:?}"),
    }
}

/// Sends an image to `client` in chunks and commits it, counting the bytes
/// sent on `progress`.
fn restore_image(
    client: &mut ControlClient,
    vm: &str,
    name: &str,
    bytes: &[u8],
    epoch: u64,
    progress: &Progress,
) -> Result<CapsuleInfo> {
    expect_done(
        client.call(&Request::RestoreBegin {
            name: name.into(),
            image_len: bytes.len() as u64,
        })?,
        "the image",
        vm,
    )?;
    for (i, chunk) in bytes.chunks(MAX_IMAGE_CHUNK).enumerate() {
        let offset = (i * MAX_IMAGE_CHUNK) as u64;
        expect_done(
            client.call(&Request::RestoreChunk {
                name: name.into(),
                offset,
                data: chunk.to_vec(),
            })?,
            "an image chunk",
            vm,
        )?;
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    commit(
        client,
        vm,
        &Request::RestoreCommit {
            name: name.into(),
            epoch,
        },
    )
}

fn commit(client: &mut ControlClient, vm: &str, request: &Request) -> Result<CapsuleInfo> {
    match client.call(request)? {
        Response::CapsuleStarted(info) => Ok(info),
        Response::Error { code, message } => {
            bail!("{vm} refused the image: {message} ({})", code.as_str())
        }
        other => bail!("unexpected answer to RestoreCommit from {vm}: {other:?}"),
    }
}

/// A fresh random nonce for sealing an image.
fn image_nonce() -> Result<image::ImageNonce> {
    let mut nonce = image::ImageNonce::default();
    getrandom::fill(&mut nonce).map_err(|e| anyhow!("no randomness for an image nonce: {e}"))?;
    Ok(nonce)
}

/// The key that seals images on disk: 32 random bytes in a 0600 file,
/// created on first use. Survives labs, so a capsule suspended in one lab
/// can be resumed in a later one.
pub fn image_key() -> Result<Vec<u8>> {
    let path = PathBuf::from(
        std::env::var_os(IMAGE_KEY_ENV).unwrap_or_else(|| DEFAULT_IMAGE_KEY_FILE.into()),
    );
    match fs::read(&path) {
        Ok(key) if key.len() == 32 => return Ok(key),
        Ok(_) => bail!(
            "image key file {} is damaged (not 32 bytes)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read image key {}", path.display()));
        }
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut key = vec![0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow!("no randomness for the image key: {e}"))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create image key {}", path.display()))?;
    f.write_all(&key)?;
    Ok(key)
}

/// `capsulectl suspend NAME -o FILE`: freeze, save, end it on its VM.
pub fn suspend(s: &LabSession, name: &str, out: &Path) -> Result<(CapsuleRecord, u64)> {
    let file_key = image_key()?;
    let (_lock, mut map) = s.lock_map(Some(name))?;
    let rec = record(s, &map, name)?;
    if let Some(why) = &rec.lost {
        bail!("'{name}' is lost ({why}): no copy is left to suspend");
    }
    let vm = s.vm(&rec.vm)?.clone();
    let mut c = s.connect(&vm)?;
    let mut intent = Intent::new(IntentKind::Suspend, Some(&vm.name), None, rec.epoch);
    // Absolute: `recover` may run from another directory.
    intent.file = Some(std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf()));
    write_intent(s, &mut map, &rec.name, &intent)?;
    fault::point("freeze");
    let saved = (|| -> Result<u64> {
        let image_len = freeze(&mut c, &vm.name, &rec.name)?;
        fault::point("transfer");
        let progress = Progress::bytes(
            image_len,
            format!("suspend '{name}' {} -> {}", vm.name, out.display()),
        );
        let mut bytes = Vec::with_capacity(image_len as usize);
        read_image(&mut c, &vm.name, &rec.name, image_len, None, |_, data| {
            progress.inc(data.len() as u64);
            bytes.extend_from_slice(&data);
            Ok(())
        })?;
        progress.finish();
        let sealed = image::reseal(&bytes, &s.lab.image_key()?, &file_key)
            .map_err(|e| anyhow!("the image from {} does not verify: {e}", vm.name))?;
        crate::state::write_atomically(out, &sealed, 0o600)?;
        Ok(image_len)
    })();
    let image_len = match saved {
        Ok(len) => len,
        Err(e) => {
            // Nothing was written: the copy on the VM is the capsule still.
            let views = recover::views(s, &rec.name, None);
            let decision = recover::decide(&intent, &views, None);
            return Err(match close_intent(s, &mut map, &rec, &intent, decision) {
                Ok(()) => e.context(format!("'{name}' keeps running on {}", vm.name)),
                Err(left) => e.context(format!("and resuming it failed too: {left:#}")),
            });
        }
    };
    fault::point("commit-sent");
    match c.call(&Request::KillCapsule {
        name: rec.name.clone(),
    })? {
        Response::Killed => {}
        other => eprintln!(
            "capsulectl: warning: saved, but {} did not end '{name}': {other:?}",
            vm.name
        ),
    }
    fault::point("directory");
    close_intent(s, &mut map, &rec, &intent, Decision::Suspended)?;
    Ok((rec, image_len))
}

/// Reads and verifies a suspended image file.
pub fn load_image_file(path: &Path) -> Result<(Vec<u8>, CapsuleImage)> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let image = CapsuleImage::decode(&bytes, &image_key()?)
        .map_err(|e| anyhow!("{} is not a usable capsule image: {e}", path.display()))?;
    Ok((bytes, image))
}

/// `capsulectl resume FILE [--on VM] [--name NAME] [--force]`. An image
/// older than the directory's epoch for its name is a stale copy (the
/// capsule went on running, or was resumed, after it was saved): refused
/// unless `force`.
pub fn resume(
    s: &LabSession,
    path: &Path,
    on: Option<&str>,
    rename: Option<&str>,
    force: bool,
) -> Result<CapsuleRecord> {
    let (_, mut img) = load_image_file(path)?;
    if let Some(n) = rename {
        directory::validate_capsule_name(n)?;
        img.name = n.to_string();
    }
    let (_lock, mut map) = s.lock_map(Some(&img.name))?;
    let known = map.last_epoch(&img.name);
    if known > img.epoch && !force {
        bail!(
            "{} holds epoch {} of '{}', but the lab's directory has seen epoch {known}: the \
             capsule ran (or was resumed) after this image was saved. Resuming it would bring \
             back an old copy; --force does it anyway",
            path.display(),
            img.epoch,
            img.name
        );
    }
    let vm = match on {
        Some(v) => s.vm(v)?.clone(),
        None => s
            .lab
            .vms
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("lab '{}' has no VMs", s.lab.name))?,
    };
    let mut c = s.connect(&vm)?;
    if c.hello().build_id != img.build_id {
        bail!(
            "{} runs kernel build {} but the image comes from build {}; it only revives on the same build",
            vm.name,
            build_id_hex(&c.hello().build_id),
            build_id_hex(&img.build_id)
        );
    }
    let intent = Intent::new(
        IntentKind::Resume,
        None,
        Some(&vm.name),
        known.max(img.epoch),
    );
    let epoch = intent.next_epoch;
    let record = CapsuleRecord {
        name: img.name.clone(),
        program: img.program.clone(),
        args: img.args.clone(),
        locator: img.locator,
        slot: img.slot,
        vm: vm.name.clone(),
        memory_limit: img.memory_limit,
        created_unix: journal::unix_now(),
        epoch,
        intent: Some(intent.clone()),
        lost: None,
    };
    // The locator and slot are the capsule's own (its connections and its
    // memory window): they must be free in this lab. The record goes in with
    // the intent, so a resume cut short is found and undone.
    map.insert(record.clone()).context("cannot resume here")?;
    directory::save(&s.dir, &map)?;
    journal::log_intent(&s.dir, &record.name, &intent)?;
    let sealed = img.encode_for_transfer(&s.lab.image_key()?, &image_nonce()?);
    let progress = Progress::bytes(
        sealed.len() as u64,
        format!("resume '{}' {} -> {}", img.name, path.display(), vm.name),
    );
    fault::point("transfer");
    let restored = restore_image(&mut c, &vm.name, &img.name, &sealed, epoch, &progress);
    fault::point("directory");
    let decision = match &restored {
        Ok(info) if info.state == CapsuleState::Running => Decision::Complete {
            vm: vm.name.clone(),
            epoch,
            release_from: None,
        },
        _ => {
            let views = recover::views(s, &record.name, Some(&vm.name));
            recover::decide(&intent, &views, None)
        }
    };
    close_intent(s, &mut map, &record, &intent, decision)?;
    match restored {
        Ok(info) if info.state == CapsuleState::Running => {}
        Ok(info) => bail!(
            "{} restored '{}' but it is {}",
            vm.name,
            img.name,
            info.state.label()
        ),
        Err(e) => return Err(e),
    }
    let mut record = record;
    record.intent = None;
    Ok(record)
}
