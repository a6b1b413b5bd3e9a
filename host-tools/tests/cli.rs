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
