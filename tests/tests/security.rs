//! System tests of the control plane's security (docs/architecture.md,
//! "Security"): the cluster key never appears on a command line, reaches the
//! VMs through a root-only file, and connections that do not prove the key
//! cannot hold the control service's slots.
//! Run one at a time (`--test-threads=1`): every TCG guest keeps a core busy.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use capsules_system_tests::Lab;
use capsules_system_tests::host::control::ControlClient;
use capsules_system_tests::host::netns::NetnsGuard;
use capsules_system_tests::host::state;

/// The control service's connection slots (kernel/src/control/mod.rs).
const SLOTS: usize = 8;

fn lab_state(lab: &Lab) -> state::LabState {
    state::load(&state::lab_dir(&lab.name))
        .expect("readable lab state")
        .expect("lab state exists")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether an authenticated `Version` through `capsulectl` succeeds now.
fn capsulectl_is_served(lab: &Lab, vm: &str) -> bool {
    let out = lab.ctl(&["debug", "control", "--vm", vm, "--check", "version"]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"ok\"")
}

#[test]
fn the_key_is_off_the_command_line_and_in_a_root_only_file() {
    let lab = Lab::up("key", 2);
    let st = lab_state(&lab);
    let key = st.key().unwrap();
    let key_hex = st.key_hex.clone();
    let key_file = state::lab_dir(&lab.name).join(state::KEY_FILE);
    let fw_cfg_arg = format!("name=opt/capsules/key,file={}", key_file.display());

    for vm in &st.vms {
        let pid = vm.pid.expect("QEMU pid recorded");
        // What every local user can read.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!contains(&cmdline, b"key="), "key= in {shown}");
        assert!(
            !contains(&cmdline, key_hex.as_bytes())
                && !contains(&cmdline, key_hex.to_uppercase().as_bytes())
                && !contains(&cmdline, &key),
            "the cluster key is in QEMU's command line: {shown}"
        );
        // The file is named instead.
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        assert!(
            args.windows(2)
                .any(|w| w[0] == b"-fw_cfg" && w[1] == fw_cfg_arg.as_bytes()),
            "no `-fw_cfg {fw_cfg_arg}` in {shown}"
        );
        // Nor does the kernel print it.
        let serial = std::fs::read(&vm.serial_log).unwrap();
        assert!(
            !contains(&serial, key_hex.as_bytes()),
            "key in the serial log"
        );
    }

    // Root's alone, and exactly the key.
    let meta = std::fs::metadata(&key_file).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "{}", key_file.display());
    assert_eq!(meta.uid(), 0);
    assert_eq!(std::fs::read(&key_file).unwrap(), key);

    // The VMs got the key: they answer authenticated control, and refuse a
    // wrong key.
    for vm in ["vm1", "vm2"] {
        let r = lab.control_check(vm, "version");
        assert_eq!(r["outcome"], "ok", "{vm}: {r}");
        let r = lab.control_check(vm, "wrong-key");
        assert_eq!(r["outcome"], "refused", "{vm}: {r}");
        assert_eq!(r["code"], "unauthenticated", "{vm}: {r}");
        assert_eq!(r["still_serving"], true, "{vm}: {r}");
    }
}

/// Opens TCP connections to `addr` from inside the lab namespace and sends
/// nothing, until one is refused or `max` are open.
fn idle_connections(ns: &str, addr: SocketAddr, max: usize) -> Vec<TcpStream> {
    let _inside = NetnsGuard::enter(ns).unwrap();
    let mut open = Vec::new();
    while open.len() < max {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => open.push(s),
            Err(_) => break,
        }
    }
    open
}

#[test]
fn connections_that_do_not_prove_the_key_lose_their_slots() {
    let lab = Lab::up("slots", 1);
    let st = lab_state(&lab);
    let vm = &st.vms[0];
    let addr = SocketAddr::from((vm.ip, vm.control_port));

    // More idle connections than there are slots: every slot is taken, and
    // a connection beyond them is refused.
    let opened_at = Instant::now();
    let mut idle = idle_connections(&st.netns, addr, 2 * SLOTS);
    assert!(
        idle.len() >= SLOTS,
        "only {} idle connections were accepted",
        idle.len()
    );
    assert!(
        !capsulectl_is_served(&lab, "vm1"),
        "capsulectl was served while {} idle connections held the slots",
        idle.len()
    );

    // The VM closes them after its handshake deadline (2 s), and capsulectl
    // is served again within a few seconds.
    let served_after = loop {
        if capsulectl_is_served(&lab, "vm1") {
            break opened_at.elapsed();
        }
        assert!(
            opened_at.elapsed() < Duration::from_secs(8),
            "capsulectl was not served within 8 s of {} idle connections",
            idle.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("capsulectl served {served_after:?} after the idle connections opened");
    assert!(
        served_after >= Duration::from_millis(1500),
        "served after {served_after:?}: were the slots ever held?"
    );
    for (i, conn) in idle.iter_mut().enumerate() {
        // The hello may be there; after it, the server has closed (EOF or
        // reset), never left the connection open.
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut sink = Vec::new();
        let result = conn.read_to_end(&mut sink);
        let closed = match &result {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(closed, "idle connection {i} still open: {result:?}");
    }
    assert!(
        opened_at.elapsed() < Duration::from_secs(10),
        "the idle connections were closed only after {:?}",
        opened_at.elapsed()
    );

    // A client with the key that connects and waits longer than the
    // deadline before its first request is still served: the client hello,
    // sent at once, is what the deadline asks for.
    let _inside = NetnsGuard::enter(&st.netns).unwrap();
    let key = st.key().unwrap();
    let mut patient = ControlClient::connect(addr, &key, Duration::from_secs(2)).unwrap();
    std::thread::sleep(Duration::from_millis(3000));
    let (_, _, name) = patient.version().unwrap();
    assert_eq!(name, "vm1");
}
