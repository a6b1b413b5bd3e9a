//! Text tables and JSON for what capsulectl prints.

use crate::lab::VmInfo;
use crate::state::LabState;

/// Left-aligned columns separated by two spaces, header first.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// The table `lab up` prints.
pub fn lab_table(lab: &LabState) -> String {
    let rows: Vec<Vec<String>> = lab
        .vms
        .iter()
        .map(|vm| {
            vec![
                vm.name.clone(),
                format!("{}/{}", vm.ip, vm.prefix),
                vm.mac.clone(),
                vm.pid.map_or("-".into(), |p| p.to_string()),
                lab.accel.clone(),
            ]
        })
        .collect();
    table(&["VM", "ADDRESS", "MAC", "PID", "ACCEL"], &rows)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn seconds(ns: u64) -> String {
    format!("{:.1}s", ns as f64 / 1e9)
}

/// The table `vm ls` prints.
pub fn vm_table(vms: &[VmInfo]) -> String {
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.ip.to_string(),
                v.mac.clone(),
                v.pid.map_or_else(dash, |p| p.to_string()),
                v.state.clone(),
                v.accel.clone(),
                v.uptime_ns.map_or_else(dash, seconds),
                match (v.mem_used_bytes, v.mem_total_bytes) {
                    (Some(u), Some(t)) => format!("{}/{} MiB", mib(u), mib(t)),
                    _ => dash(),
                },
                v.nic
                    .as_ref()
                    .map_or_else(dash, |n| format!("{}/{}", n.rx_packets, n.tx_packets)),
                v.switch.as_ref().map_or_else(dash, |s| {
                    format!("{} ({} evicted)", s.neighbours, s.neighbour_evictions)
                }),
                v.switch.as_ref().map_or_else(dash, |s| {
                    format!("{}/{}/{}", s.capsule_queue_drops, s.held_drops, s.tx_drops)
                }),
                v.switch
                    .as_ref()
                    .map_or_else(dash, |s| s.arp_conflicts.to_string()),
                match (&v.build_id, v.build_id_matches) {
                    (Some(id), Some(false)) => format!("{id} (MISMATCH)"),
                    (Some(id), _) => id.clone(),
                    _ => dash(),
                },
            ]
        })
        .collect();
    let mut out = table(
        &[
            "VM",
            "ADDRESS",
            "MAC",
            "PID",
            "STATE",
            "ACCEL",
            "UPTIME",
            "MEMORY",
            "RX/TX PKTS",
            "NEIGHBOURS",
            "DROPS Q/HOLD/TX",
            "ARP CONFLICTS",
            "BUILD ID",
        ],
        &rows,
    );
    for v in vms {
        if let Some(e) = &v.error {
            out.push_str(&format!("{}: {e}\n", v.name));
        }
    }
    out
}

/// The table `ps` prints.
pub fn ps_table(rows: &[crate::capsules::PsRow]) -> String {
    let dash = || "-".to_string();
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.program.clone(),
                r.locator.to_string(),
                r.vm.clone(),
                {
                    let state = match &r.reason {
                        Some(why) => format!("{}: {why}", r.state),
                        None => r.state.clone(),
                    };
                    // A copy the directory does not name, or an operation
                    // under way (or left half done), is said next to it.
                    match (&r.intent, r.recorded) {
                        (Some(intent), _) => format!("{state} ({intent})"),
                        (None, false) => format!("{state} (not the recorded copy)"),
                        (None, true) => state,
                    }
                },
                r.epoch
                    .or(r.directory_epoch)
                    .map_or_else(dash, |e| e.to_string()),
                r.tasks.map_or_else(dash, |t| t.to_string()),
                r.memory_bytes
                    .map_or_else(dash, |b| format!("{} MiB", mib(b))),
                r.sockets.map_or_else(dash, |n| n.to_string()),
                r.uptime_ns.map_or_else(dash, seconds),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "PROGRAM", "LOCATOR", "VM", "STATE", "EPOCH", "TASKS", "MEMORY", "SOCKETS",
            "UPTIME",
        ],
        &body,
    )
}

pub fn vm_json(vms: &[VmInfo]) -> String {
    serde_json::to_string_pretty(vms).expect("VmInfo always serialises")
}

/// A writer that turns a log's bytes into JSON lines, one object per line of
/// text: `{"capsule":"web","line":"listening on 80"}`. A line cut between two
/// writes is joined first; `finish` prints a last line without a newline.
pub struct JsonLines<'a, W: std::io::Write> {
    capsule: &'a str,
    pending: Vec<u8>,
    out: W,
}

impl<'a, W: std::io::Write> JsonLines<'a, W> {
    pub fn new(capsule: &'a str, out: W) -> Self {
        Self {
            capsule,
            pending: Vec::new(),
            out,
        }
    }

    fn emit(&mut self, line: &[u8]) -> std::io::Result<()> {
        let line = String::from_utf8_lossy(line);
        let object = serde_json::json!({
            "capsule": self.capsule,
            "line": line.trim_end_matches('\r'),
        });
        writeln!(self.out, "{object}")
    }

    /// Prints what is left after the last newline, if anything.
    pub fn finish(mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.emit(&rest)?;
        }
        self.out.flush()
    }
}

impl<W: std::io::Write> std::io::Write for JsonLines<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.emit(&line[..end])?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22\n");
    }

    #[test]
    fn lab_table_shows_every_vm() {
        let lab = crate::state::tests::sample_state(Path::new("/tmp/x"));
        let t = lab_table(&lab);
        assert!(t.starts_with("VM   ADDRESS"));
        assert!(t.contains("vm1  192.0.2.11/24  52:54:00:c5:00:01  1234  tcg"));
    }

    fn info(state: &str, build_id: Option<&str>) -> VmInfo {
        VmInfo {
            name: "vm0".into(),
            ip: "192.0.2.10".parse().unwrap(),
            subnet: 1,
            mac: "52:54:00:c5:00:00".into(),
            pid: Some(7),
            state: state.into(),
            accel: "tcg".into(),
            build_id: build_id.map(Into::into),
            build_id_matches: build_id.map(|_| true),
            uptime_ns: build_id.map(|_| 2_500_000_000),
            boot_ns: None,
            mem_used_bytes: Some(1024 * 1024),
            mem_total_bytes: Some(256 * 1024 * 1024),
            nic: None,
            switch: build_id.map(|_| crate::lab::SwitchInfo {
                neighbours: 3,
                neighbour_evictions: 1,
                capsule_queue_drops: 44,
                held_drops: 2,
                tx_drops: 0,
                arp_conflicts: 5,
            }),
            error: (state == "unreachable").then(|| "timed out".into()),
        }
    }

    #[test]
    fn vm_table_and_json() {
        let vms = [info("running", Some("ab01")), info("unreachable", None)];
        let t = vm_table(&vms);
        let first = t.lines().nth(1).unwrap();
        let cells: Vec<&str> = first.split_whitespace().collect();
        assert_eq!(
            cells[4..],
            [
                "running",
                "tcg",
                "2.5s",
                "1.0/256.0",
                "MiB",
                "-",
                "3",
                "(1",
                "evicted)",
                "44/2/0",
                "5",
                "ab01"
            ]
        );
        assert!(t.contains("ab01"));
        assert!(t.contains("vm0: timed out"));
        let v: serde_json::Value = serde_json::from_str(&vm_json(&vms)).unwrap();
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 2);
        for key in ["name", "ip", "state", "pid", "build_id"] {
            assert!(arr[0].get(key).is_some(), "{key} missing");
        }
        assert_eq!(arr[0]["build_id"], "ab01");
        assert_eq!(arr[0]["ip"], "192.0.2.10");
        assert_eq!(arr[1]["build_id"], serde_json::Value::Null);
        assert_eq!(arr[0]["switch"]["capsule_queue_drops"], 44);
        assert_eq!(arr[0]["switch"]["neighbour_evictions"], 1);
        assert_eq!(arr[0]["switch"]["arp_conflicts"], 5);
        assert!(t.starts_with("VM ") && t.lines().next().unwrap().contains("ARP CONFLICTS"));
    }

    #[test]
    fn log_bytes_become_one_json_object_per_line() {
        use std::io::Write;
        let mut out = Vec::new();
        let mut lines = JsonLines::new("web", &mut out);
        lines.write_all(b"listening on 80\r\nhalf a ").unwrap();
        lines.write_all(b"line\n\"quoted\"").unwrap();
        lines.finish().unwrap();
        let text = String::from_utf8(out).unwrap();
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let texts: Vec<&str> = parsed.iter().map(|v| v["line"].as_str().unwrap()).collect();
        assert_eq!(texts, ["listening on 80", "half a line", "\"quoted\""]);
        assert!(parsed.iter().all(|v| v["capsule"] == "web"));
    }
}
