//! The README's main command, `bash scripts/demo.sh`, run as a newcomer runs
//! it: in a fresh clone of the repository, as root, with no standard input.
//! The package step finds everything present here (run-all.sh installed it);
//! the script then builds the kernel and capsulectl and runs the demo.

use std::path::Path;
use std::process::{Command, Stdio};

use capsules_system_tests::{
    Lab, describe, repo_root, require_lab_prerequisites, scratch_dir, unique_lab_name,
};
use serde_json::Value;

/// Copies a build directory of this checkout into the clone, so that the
/// clone rebuilds only the workspace's own crates, not every dependency
/// (cargo reuses artifacts whose sources did not change).
fn seed_build_cache(from: &Path, to: &Path) {
    if !from.is_dir() {
        return;
    }
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cannot run cp");
    assert!(status.success(), "copying {} failed", from.display());
}

#[test]
fn main_command_runs_the_demo_from_a_fresh_clone() {
    require_lab_prerequisites();
    let scratch = scratch_dir("main-command");
    let clone = scratch.join("capsules");
    let out = Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(repo_root())
        .arg(&clone)
        .output()
        .expect("cannot run git (apt-get install git)");
    assert!(out.status.success(), "git clone: {}", describe(&out));
    seed_build_cache(
        &repo_root().join("kernel/target"),
        &clone.join("kernel/target"),
    );
    seed_build_cache(
        &repo_root().join("target/release"),
        &clone.join("target/release"),
    );

    let name = unique_lab_name("main");
    let _lab = Lab::guard(&name);
    let out = Command::new("bash")
        .args(["scripts/demo.sh", "--lab", &name, "--moves", "1", "--json"])
        .current_dir(&clone)
        .env_remove("CAPSULES_KERNEL")
        .env_remove("CAPSULES_LAB")
        .stdin(Stdio::null())
        .output()
        .expect("cannot run bash");
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(out.status.success(), "scripts/demo.sh: {}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("packages: everything needed is present"),
        "the package step should find everything present: {stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("demo report is not JSON ({e}): {}", describe(&out)));
    assert_eq!(report["lab"], name.as_str(), "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    let moves = report["migrations"].as_array().expect("migrations");
    assert_eq!(moves.len(), 2, "one move per capsule: {report}");
    for m in moves {
        assert!(m["downtime_ms"].as_f64().unwrap() > 0.0, "{m}");
    }
    assert!(report["kv"]["replies"].as_u64().unwrap() > 0, "{report}");
    assert!(report["http"]["replies"].as_u64().unwrap() > 0, "{report}");
}

/// As another user, the script names what to install, or that it needs root,
/// and exits non-zero without building anything.
#[test]
fn main_command_as_a_user_says_what_to_do() {
    // A copy of the scripts in a directory every user can read: the checkout
    // itself may not be readable by others.
    let scratch = scratch_dir("main-user");
    let scripts = scratch.join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    for file in ["demo.sh", "packages.sh"] {
        std::fs::copy(repo_root().join("scripts").join(file), scripts.join(file)).unwrap();
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash"])
        .arg(scripts.join("demo.sh"))
        .stdin(Stdio::null())
        .output()
        .expect("cannot run setpriv (util-linux)");
    let _ = std::fs::remove_dir_all(&scratch);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("run this as root") || stderr.contains("apt-get install"),
        "{stderr}"
    );
    assert!(!describe(&out).contains("building"), "{}", describe(&out));
}
