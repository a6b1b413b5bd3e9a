//! Streaming a capsule between VMs: the image read in chunks from one VM
//! and written to another by two threads (neither waits for the whole
//! image), and the pre-copy (the base image and the pages, sent while the
//! capsule keeps running).

use std::sync::mpsc;

use anyhow::{Context, Result, anyhow, bail};
use capsules_wire::control::{MAX_IMAGE_CHUNK, PageBatch, Request, Response};

use super::{call_at, expect_done};
use crate::control::Transport;
use crate::fault;
use crate::progress::Progress;

/// Reads a frozen capsule's image from `client` and hands each chunk to `sink`
/// as it arrives.
pub(super) fn read_image(
    client: &mut dyn Transport,
    vm: &str,
    name: &str,
    len: u64,
    fault_phase: Option<&str>,
    mut sink: impl FnMut(u64, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let delay = fault::chunk_delay();
    let mut offset = 0;
    while offset < len {
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        // Only the first request of the stream may lose its answer.
        let phase = fault_phase.filter(|_| offset == 0);
        let resp = call_at(
            client,
            phase,
            "ReadImage",
            &Request::ReadImage {
                name: name.into(),
                offset,
                len: MAX_IMAGE_CHUNK as u32,
            },
        )?;
        let data = match resp {
            Response::ImageChunk { data } if !data.is_empty() => data,
            Response::ImageChunk { .. } => bail!("{vm} ended the image at {offset} of {len} bytes"),
            Response::Error { code, message } => bail!(
                "{vm} refused to send the image: {message} ({})",
                code.as_str()
            ),
            other => bail!("unexpected answer to ReadImage from {vm}: {other:?}"),
        };
        let n = data.len() as u64;
        sink(offset, data)?;
        offset += n;
    }
    Ok(())
}

/// Streams the image of `name` that the source holds (`len` bytes) to the
/// destination: one thread reads chunks from the source while this one
/// writes them, so neither waits for the whole image.
pub(super) fn stream_image(
    src_c: &mut dyn Transport,
    dst_c: &mut dyn Transport,
    src: &str,
    dst: &str,
    name: &str,
    len: u64,
    faults: bool,
) -> Result<()> {
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(8);
    std::thread::scope(|scope| -> Result<()> {
        // Owned by this closure: if writing to the destination fails, the
        // receiver goes away with it, the reader's next send fails, and the
        // scope can end (else the reader would wait forever on a full channel).
        let rx = rx;
        // The sender moves into the reader, so the channel closes when it ends.
        let reader = scope.spawn(move || {
            let phase = faults.then_some("transfer");
            read_image(src_c, src, name, len, phase, |off, data| {
                tx.send((off, data))
                    .map_err(|_| anyhow!("the destination stopped taking the image"))
            })
        });
        for (offset, data) in rx.iter() {
            // The last chunk is where a test may lose the answer at `restore`.
            let last = offset + data.len() as u64 >= len;
            let phase = (faults && last).then_some("restore");
            expect_done(
                call_at(
                    dst_c,
                    phase,
                    "the last RestoreChunk",
                    &Request::RestoreChunk {
                        name: name.into(),
                        offset,
                        data,
                    },
                )?,
                "an image chunk",
                dst,
            )?;
        }
        reader
            .join()
            .map_err(|_| anyhow!("image reader panicked"))?
            .with_context(|| format!("reading the image from the source {}", src))
    })
}

/// Pre-copy: the whole capsule goes to the destination while it keeps
/// running; returns the base image's length. Afterwards only the pages it
/// writes until the freeze need to move while it stands still.
pub(super) fn precopy(
    src_c: &mut dyn Transport,
    dst_c: &mut dyn Transport,
    src: &str,
    dst: &str,
    name: &str,
    admission_len: u64,
) -> Result<u64> {
    let base_len = match call_at(
        src_c,
        Some("precopy"),
        "PrecopyCapsule",
        &Request::PrecopyCapsule { name: name.into() },
    )? {
        Response::Frozen { image_len } => image_len,
        Response::Error { code, message } => bail!(
            "{} refused to pre-copy '{name}': {message} ({})",
            src,
            code.as_str()
        ),
        other => bail!(
            "unexpected answer to PrecopyCapsule from {}: {other:?}",
            src
        ),
    };
    // The base is the capsule's identity: the destination admits it and
    // maps its window, then the pages follow while the capsule runs on.
    stream_image(src_c, dst_c, src, dst, name, base_len, false)?;
    expect_done(
        dst_c.call(&Request::RestoreStage { name: name.into() })?,
        "the base image",
        dst,
    )?;
    let progress = Progress::bytes(0, format!("pre-copy of '{name}' {} -> {}", src, dst));
    let page_bytes = stream_pages(src_c, dst_c, src, dst, name, &progress)?;
    progress.finish();
    // The delta comes as a second image of the same name.
    expect_done(
        dst_c.call(&Request::RestoreBegin {
            name: name.into(),
            image_len: admission_len,
        })?,
        "the delta image",
        dst,
    )?;
    Ok(base_len + page_bytes)
}

/// Pre-copy of the pages: one thread asks the source for batch after batch
/// (each answer is a short kernel-loop round there, so the capsule keeps
/// serving) while this one lays them into the destination's window.
/// Returns the bytes of page data moved. `progress` follows the source's
/// scan through the arena (zero pages are scanned, not sent).
fn stream_pages(
    src_c: &mut dyn Transport,
    dst_c: &mut dyn Transport,
    src: &str,
    dst: &str,
    name: &str,
    progress: &Progress,
) -> Result<u64> {
    let (tx, rx) = mpsc::sync_channel::<PageBatch>(4);
    std::thread::scope(|scope| -> Result<u64> {
        let rx = rx;
        let reader = scope.spawn(move || -> Result<()> {
            let delay = fault::chunk_delay();
            let mut from = 0;
            loop {
                if let Some(d) = delay {
                    std::thread::sleep(d);
                }
                let batch = match src_c.call(&Request::ReadPages {
                    name: name.into(),
                    from,
                })? {
                    Response::Pages(batch) => batch,
                    Response::Error { code, message } => bail!(
                        "{} refused to read pages of '{name}': {message} ({})",
                        src,
                        code.as_str()
                    ),
                    other => bail!("unexpected answer to ReadPages from {}: {other:?}", src),
                };
                if batch.next <= from && batch.next < batch.end {
                    bail!("{} did not advance its page scan at {from}", src);
                }
                from = batch.next;
                let done = batch.next >= batch.end;
                if !batch.offsets.is_empty() {
                    tx.send(batch)
                        .map_err(|_| anyhow!("the destination stopped taking pages"))?;
                }
                if done {
                    return Ok(());
                }
            }
        });
        let mut bytes = 0;
        for batch in rx.iter() {
            bytes += batch.data.len() as u64;
            let (next, end) = (batch.next, batch.end);
            expect_done(
                dst_c.call(&Request::StagePages {
                    name: name.into(),
                    batch,
                })?,
                "pre-copied pages",
                dst,
            )?;
            progress.set_length(end);
            progress.set_position(next);
        }
        reader
            .join()
            .map_err(|_| anyhow!("page reader panicked"))?
            .with_context(|| format!("reading pages from the source {}", src))?;
        Ok(bytes)
    })
}
