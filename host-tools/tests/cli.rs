//! The `capsulectl` binary's error paths that need no VM: usage errors exit
//! with status 2 (clap), missing tools name the package to install.

use std::process::{Command, Output};

fn capsulectl(args: &[&str], path: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_capsulectl"));
    cmd.args(args);
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    cmd.output().expect("cannot run capsulectl")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["lab", "frob"][..],
        &["lab", "up", "--mem", "lots"],
        &["vm", "ls", "--bogus"],
        &["lab", "exec"],
    ] {
        assert_eq!(capsulectl(args, None).status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn missing_tools_are_named() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let out = capsulectl(&["vm", "ls"], None);
        assert!(stderr(&out).contains("need root"), "{}", stderr(&out));
        return;
    }
    let out = capsulectl(&["lab", "up", "--name", "cli-test"], Some("/nonexistent"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("apt-get install iproute2"),
        "{}",
        stderr(&out)
    );

    // A PATH holding only `ip`: QEMU is the missing piece.
    let dir = std::env::temp_dir().join(format!("capsulectl-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("iproute2's ip is installed");
    let _ = std::os::unix::fs::symlink(ip, dir.join("ip"));
    let out = capsulectl(
        &["lab", "up", "--name", "cli-test"],
        Some(dir.to_str().unwrap()),
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("apt-get install qemu-system-x86"),
        "{}",
        stderr(&out)
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `CAPSULES_LAB` names the lab of every command that is given no `--lab`,
/// `--lab` wins over it, and the lab commands still take `--name`.
#[test]
fn capsules_lab_names_the_default_lab() {
    if !is_root() {
        return; // every lab command stops at "need root" first
    }
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capsulectl"));
        cmd.args(args).env_remove("CAPSULES_LAB");
        if let Some(lab) = env {
            cmd.env("CAPSULES_LAB", lab);
        }
        let out = cmd.output().expect("cannot run capsulectl");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        stderr(&out)
    };
    for args in [&["ps"][..], &["lab", "down"], &["vm", "ls"], &["logs", "x"]] {
        let err = run(args, Some("cli-env-lab"));
        assert!(err.contains("'cli-env-lab'"), "{args:?}: {err}");
    }
    let err = run(&["ps", "--lab", "cli-flag-lab"], Some("cli-env-lab"));
    assert!(err.contains("'cli-flag-lab'"), "{err}");
    let err = run(
        &["lab", "down", "--name", "cli-old-lab"],
        Some("cli-env-lab"),
    );
    assert!(err.contains("'cli-old-lab'"), "{err}");
    let err = run(&["ps"], None);
    assert!(err.contains("'default'"), "{err}");
}

#[test]
fn completions_and_man_page() {
    let out = capsulectl(&["completions", "bash"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("capsulectl") && script.contains("migrate"));
    // bash accepts the script's syntax.
    let dir = std::env::temp_dir().join(format!("capsulectl-compl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("capsulectl.bash");
    std::fs::write(&file, &script).unwrap();
    let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
    for shell in ["zsh", "fish"] {
        let out = capsulectl(&["completions", shell], None);
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }

    let out = capsulectl(&["man"], None);
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH capsulectl"),
        "{page}"
    );
    let pages = dir.join("man");
    let out = capsulectl(&["man", "--out-dir", pages.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", stderr(&out));
    for page in [
        "capsulectl.1",
        "capsulectl-migrate.1",
        "capsulectl-lab-up.1",
    ] {
        assert!(pages.join(page).exists(), "{page} missing");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Fault injection is for the tests' own build only: the binary users run
/// has no trace of it (host-tools/src/fault.rs).
#[test]
fn the_normal_build_has_no_fault_injection() {
    if cfg!(feature = "fault-injection") {
        return; // this very build was asked for it
    }
    let binary = std::fs::read(env!("CARGO_BIN_EXE_capsulectl")).unwrap();
    for needle in [&b"CAPSULES_FAULT"[..], b"fault injection: exiting"] {
        assert!(
            !binary.windows(needle.len()).any(|w| w == needle),
            "{} found in the binary",
            String::from_utf8_lossy(needle)
        );
    }
}
