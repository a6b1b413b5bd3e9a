//! `capsulectl inspect`: what a suspended image file or a capsule in the
//! lab holds (tasks, sockets, memory).

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use capsules_wire::control::{Request, Response};
use capsules_wire::image::{SocketSummary, TaskSummary};
use serde::Serialize;

use super::build_id_hex;
use super::files::load_image_file;
use crate::capsules::LabSession;

/// What `inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
    pub locator: String,
    pub slot: u32,
    pub vm: Option<String>,
    pub build_id: Option<String>,
    pub state: Option<String>,
    pub memory_mapped_bytes: Option<u64>,
    pub memory_in_image_bytes: Option<u64>,
    pub segments: Option<usize>,
    pub clock_ms: Option<u64>,
    pub image_bytes: Option<u64>,
    pub tasks: Vec<TaskView>,
    pub sockets: Vec<SocketView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    pub id: u32,
    pub name: String,
    pub state: String,
    pub rip: String,
    pub rsp: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SocketView {
    pub protocol: String,
    pub local: String,
    pub remote: String,
    pub state: String,
    pub send_queue: u32,
    pub recv_queue: u32,
}

fn task_views(tasks: &[TaskSummary]) -> Vec<TaskView> {
    tasks
        .iter()
        .map(|t| TaskView {
            id: t.id,
            name: t.name.clone(),
            state: t.state.clone(),
            rip: format!("{:#x}", t.rip),
            rsp: format!("{:#x}", t.rsp),
        })
        .collect()
}

fn socket_views(sockets: &[SocketSummary]) -> Vec<SocketView> {
    sockets
        .iter()
        .map(|s| SocketView {
            protocol: s.protocol.clone(),
            local: s.local.clone(),
            remote: s.remote.clone(),
            state: s.state.clone(),
            send_queue: s.send_queue,
            recv_queue: s.recv_queue,
        })
        .collect()
}

/// `capsulectl inspect FILE`.
pub fn inspect_file(path: &Path) -> Result<Inspection> {
    let (bytes, img) = load_image_file(path)?;
    Ok(Inspection {
        name: img.name.clone(),
        program: img.program.clone(),
        args: img.args.clone(),
        locator: img.locator.to_string(),
        slot: img.slot,
        vm: None,
        build_id: Some(build_id_hex(&img.build_id)),
        state: Some("suspended".into()),
        memory_mapped_bytes: Some(img.arena_len),
        memory_in_image_bytes: Some(img.segments.iter().map(|s| s.data.len() as u64).sum()),
        segments: Some(img.segments.len()),
        clock_ms: Some(img.clock_ns / 1_000_000),
        image_bytes: Some(bytes.len() as u64),
        tasks: task_views(&img.tasks),
        sockets: socket_views(&img.sockets),
    })
}

/// `capsulectl inspect NAME` (a capsule in the lab).
pub fn inspect_capsule(s: &LabSession, name: &str) -> Result<Inspection> {
    let map = s.load_map()?;
    let rec = map.get(name).cloned().ok_or_else(|| {
        anyhow!(
            "no capsule named '{name}' in lab '{}' and no such file",
            s.lab.name
        )
    })?;
    let vm = s.vm(&rec.vm)?.clone();
    let mut c = s.connect(&vm)?;
    let build_id = Some(build_id_hex(&c.hello().build_id));
    let info = match c.call(&Request::ListCapsules)? {
        Response::Capsules(list) => list.into_iter().find(|i| i.name == rec.name),
        _ => None,
    };
    let (tasks, sockets) = match c.call(&Request::InspectCapsule {
        name: rec.name.clone(),
    })? {
        Response::Inspection { tasks, sockets } => (tasks, sockets),
        Response::Error { message, .. } => bail!("{} cannot inspect '{name}': {message}", vm.name),
        other => bail!("unexpected answer to InspectCapsule: {other:?}"),
    };
    Ok(Inspection {
        name: rec.name.clone(),
        program: rec.program.clone(),
        args: rec.args.clone(),
        locator: rec.locator.to_string(),
        slot: rec.slot,
        vm: Some(vm.name.clone()),
        build_id,
        state: info.as_ref().map(|i| i.state.label().to_string()),
        memory_mapped_bytes: info.as_ref().map(|i| i.memory_bytes),
        memory_in_image_bytes: None,
        segments: None,
        clock_ms: info.as_ref().map(|i| i.uptime_ns / 1_000_000),
        image_bytes: None,
        tasks: task_views(&tasks),
        sockets: socket_views(&sockets),
    })
}

/// Human-readable rendering of an inspection.
pub fn render_inspection(i: &Inspection) -> String {
    let mut out = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "capsule   {} ({} {})",
        i.name,
        i.program,
        i.args.join(" ")
    );
    let _ = writeln!(out, "locator   {}   slot {}", i.locator, i.slot);
    if let Some(vm) = &i.vm {
        let _ = writeln!(out, "vm        {vm}");
    }
    if let Some(state) = &i.state {
        let _ = writeln!(out, "state     {state}");
    }
    if let Some(b) = &i.build_id {
        let _ = writeln!(out, "build     {b}");
    }
    if let Some(m) = i.memory_mapped_bytes {
        let _ = write!(out, "memory    {} KiB mapped", m / 1024);
        if let (Some(img), Some(segs)) = (i.memory_in_image_bytes, i.segments) {
            let _ = write!(
                out,
                ", {} KiB in {segs} segments (zero pages skipped)",
                img / 1024
            );
        }
        let _ = writeln!(out);
    }
    if let Some(c) = i.clock_ms {
        let _ = writeln!(out, "clock     {c} ms");
    }
    if let Some(b) = i.image_bytes {
        let _ = writeln!(out, "image     {b} bytes");
    }
    let _ = writeln!(out, "tasks ({}):", i.tasks.len());
    for t in &i.tasks {
        let _ = writeln!(
            out,
            "  {:>3} {:<12} {:<24} rip {} rsp {}",
            t.id, t.name, t.state, t.rip, t.rsp
        );
    }
    let _ = writeln!(out, "sockets ({}):", i.sockets.len());
    for s in &i.sockets {
        let _ = writeln!(
            out,
            "  {:<4} {:<22} {:<22} {:<12} send {} recv {}",
            s.protocol, s.local, s.remote, s.state, s.send_queue, s.recv_queue
        );
    }
    out
}
