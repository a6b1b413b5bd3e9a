//! Routed labs (`lab up --subnets N`, N ≥ 2): N VM subnets, each its own
//! namespace with its own bridge, a client subnet with a capsule-unaware
//! Linux host, and the router VM — our kernel in `role=router` — with one NIC
//! per subnet, which alone joins them (no namespace forwards IP).
//!
//! ```text
//!  capsules-LAB        br0 192.0.2.1/24 ─┬─ tap1 ── vm1 192.0.2.11   (gw .254)
//!                                        └─ rtap1 ─┐
//!  capsules-LAB-s2     br0 198.51.100.1/24 ┬─ tap2 ── vm2 198.51.100.12
//!                                          └─ rtap2 ─┤ router VM: .254 on each
//!  capsules-LAB-client br0 203.0.113.10/24 ── rtapc ─┘ (client host = the namespace)
//! ```
//!
//! The router's translation table (locator → care-of address, with epoch)
//! is fed from the directory: [`publish`] runs after every write of the
//! locator map (run, kill, resume, the record of a move, recovery) and
//! pushes the whole table; a move also pushes its new entry right after the
//! commit ([`push_entry`]).

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use capsules_wire::bootcfg::{BootConfig, Ipv4Cidr, LogLevel, Role};
use capsules_wire::control::{Request, Response, Translation};

use crate::directory::{CapsuleRange, DirectoryMap};
use crate::netns;
use crate::state::{LabState, Routed, RouterNic, SubnetRecord, VmRecord};

/// The VM subnets of a routed lab unless `--subnet-list` says otherwise:
/// the two documentation networks, then 10.99.K.0/24.
pub fn default_subnets(n: usize) -> Vec<Ipv4Cidr> {
    (1..=n)
        .map(|k| {
            let addr = match k {
                1 => Ipv4Addr::new(192, 0, 2, 0),
                2 => Ipv4Addr::new(198, 51, 100, 0),
                k => Ipv4Addr::new(10, 99, k as u8, 0),
            };
            Ipv4Cidr { addr, prefix: 24 }
        })
        .collect()
}

/// The client subnet and the client host's address on it.
pub const CLIENT_NETWORK: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(203, 0, 113, 0),
    prefix: 24,
};
const CLIENT_HOST: u8 = 10;
/// The host side's address on each VM subnet (.1) and the router's (.254).
const HOST_SIDE: u8 = 1;
const ROUTER_HOST: u8 = 254;
pub const MAX_SUBNETS: usize = 7;
pub const ROUTER_NAME: &str = "router";

fn host_in(net: Ipv4Cidr, host: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.addr) | u32::from(host))
}

/// The namespace of subnet `k` (1 is the lab namespace itself). The dot
/// cannot appear in a lab name, so these never name another lab's
/// namespace (lab `a`'s subnet 2 is not lab `a-s2`).
pub fn subnet_netns(lab_netns: &str, k: usize) -> String {
    if k == 1 {
        lab_netns.to_string()
    } else {
        format!("{lab_netns}.s{k}")
    }
}

pub fn client_netns(lab_netns: &str) -> String {
    format!("{lab_netns}.client")
}

/// Checks the subnets asked for: /24s (host numbers .1, .10+i and .254 are
/// handed out), disjoint from each other, the client subnet and the
/// capsule range.
pub fn check_subnets(subnets: &[Ipv4Cidr], range: CapsuleRange) -> Result<()> {
    if !(2..=MAX_SUBNETS).contains(&subnets.len()) {
        bail!("a routed lab has 2 to {MAX_SUBNETS} subnets");
    }
    // Subnet 1 is the lab namespace, whose host side (the directory's DNS,
    // VM 1's address plan) is 192.0.2.0/24 in every lab.
    let first = crate::lab::LAB_GATEWAY.octets();
    if subnets[0].addr != Ipv4Addr::new(first[0], first[1], first[2], 0) {
        bail!(
            "subnet 1 must be 192.0.2.0/24 (the lab namespace's own network), not {}",
            subnets[0]
        );
    }
    let locators = Ipv4Cidr {
        addr: range.base,
        prefix: range.prefix,
    };
    for (i, s) in subnets.iter().enumerate() {
        if s.prefix != 24 || !s.is_network() {
            bail!("subnet {s}: give a network address with prefix /24");
        }
        let clash = |o: &Ipv4Cidr| o.contains(s.addr) || s.contains(o.addr);
        if subnets[..i].iter().any(clash) || clash(&CLIENT_NETWORK) || clash(&locators) {
            bail!("subnet {s} overlaps another subnet, the client subnet or the capsule range");
        }
    }
    Ok(())
}

/// The plan of a routed lab: subnets, client, router. `lab_netns` is the
/// lab namespace (subnet 1).
pub fn plan(lab: &str, lab_netns: &str, dir: &Path, subnets: &[Ipv4Cidr]) -> Routed {
    let subnet_records: Vec<SubnetRecord> = subnets
        .iter()
        .enumerate()
        .map(|(i, net)| SubnetRecord {
            index: i + 1,
            netns: subnet_netns(lab_netns, i + 1),
            network: net.addr,
            prefix: net.prefix,
            host: host_in(*net, HOST_SIDE),
            router: host_in(*net, ROUTER_HOST),
        })
        .collect();
    let client_netns = client_netns(lab_netns);
    let mut router_nics: Vec<RouterNic> = subnet_records
        .iter()
        .map(|s| RouterNic {
            netns: s.netns.clone(),
            tap: format!("rtap{}", s.index),
            mac: format!("52:54:00:c5:fe:{:02x}", s.index),
            addr: s.router,
            prefix: s.prefix,
        })
        .collect();
    router_nics.push(RouterNic {
        netns: client_netns.clone(),
        tap: "rtapc".into(),
        mac: "52:54:00:c5:fe:c0".into(),
        addr: host_in(CLIENT_NETWORK, ROUTER_HOST),
        prefix: CLIENT_NETWORK.prefix,
    });
    let _ = lab;
    let router = VmRecord {
        name: ROUTER_NAME.into(),
        ip: router_nics[0].addr,
        prefix: router_nics[0].prefix,
        mac: router_nics[0].mac.clone(),
        tap: router_nics[0].tap.clone(),
        control_port: capsules_wire::bootcfg::DEFAULT_CONTROL_PORT,
        pid: None,
        serial_log: dir.join(format!("{ROUTER_NAME}.serial.log")),
        qemu_log: dir.join(format!("{ROUTER_NAME}.qemu.log")),
        subnet: 1,
        netns: None,
    };
    Routed {
        subnets: subnet_records,
        client_netns,
        client: host_in(CLIENT_NETWORK, CLIENT_HOST),
        client_network: CLIENT_NETWORK.addr,
        client_prefix: CLIENT_NETWORK.prefix,
        client_router: host_in(CLIENT_NETWORK, ROUTER_HOST),
        router,
        router_nics,
    }
}

/// Where VM `index` (from 1) goes: round-robin over the subnets; its
/// address keeps the host number .(10+index) of a single-subnet lab.
pub fn place(routed: &Routed, index: usize) -> (usize, Ipv4Addr, Option<String>) {
    let subnet = &routed.subnets[(index - 1) % routed.subnets.len()];
    let ip = Ipv4Addr::from(u32::from(subnet.network) | (10 + index as u32));
    let netns = (subnet.index != 1).then(|| subnet.netns.clone());
    (subnet.index, ip, netns)
}

/// The gateway of a VM on `subnet`: the router's address there.
pub fn gateway_of(routed: &Routed, subnet: usize) -> Option<Ipv4Addr> {
    routed
        .subnets
        .iter()
        .find(|s| s.index == subnet)
        .map(|s| s.router)
}

/// The router's kernel command line.
pub fn router_cmdline(routed: &Routed, range: CapsuleRange) -> String {
    BootConfig {
        control_port: routed.router.control_port,
        log_level: LogLevel::Info,
        name: Some(ROUTER_NAME.into()),
        locators: Ipv4Cidr {
            addr: range.base,
            prefix: range.prefix,
        },
        role: Role::Router,
        router_nics: routed
            .router_nics
            .iter()
            .map(|n| Ipv4Cidr {
                addr: n.addr,
                prefix: n.prefix,
            })
            .collect(),
        ..BootConfig::default()
    }
    .to_cmdline()
}

/// Creates the namespaces of subnets 2… and of the client, with their
/// bridges and routes (subnet 1's namespace, the lab namespace, exists
/// already), and the router's taps in the lab namespace: QEMU opens them
/// there, then [`move_router_taps`] puts each on its subnet's bridge.
/// No namespace forwards IP (a new namespace's default): the router is the
/// only path between subnets.
pub fn create_networks(lab: &LabState, routed: &Routed) -> Result<()> {
    for s in routed.subnets.iter().filter(|s| s.index != 1) {
        netns::create_lab_network(&s.netns, s.host, s.prefix)?;
    }
    netns::create_lab_network(&routed.client_netns, routed.client, routed.client_prefix)?;
    for nic in &routed.router_nics {
        if nic.netns == lab.netns {
            netns::add_tap(&lab.netns, &nic.tap)?;
        } else {
            netns::add_bare_tap(&lab.netns, &nic.tap)?;
        }
    }
    let range = lab.capsule_range.to_string();
    // Each subnet's host side reaches the capsule range, the other subnets
    // and the client subnet through the router.
    for s in &routed.subnets {
        let via = s.router.to_string();
        let mut dests = vec![range.clone()];
        dests.extend(
            routed
                .subnets
                .iter()
                .filter(|o| o.index != s.index)
                .map(|o| format!("{}/{}", o.network, o.prefix)),
        );
        dests.push(format!(
            "{}/{}",
            routed.client_network, routed.client_prefix
        ));
        for dest in dests {
            netns::ip(&["-n", &s.netns, "route", "add", &dest, "via", &via])?;
        }
    }
    // The client host routes the locator range (and the VM subnets, for
    // DNS on subnet 1's host side) via the router.
    let via = routed.client_router.to_string();
    let mut dests = vec![range];
    dests.extend(
        routed
            .subnets
            .iter()
            .map(|s| format!("{}/{}", s.network, s.prefix)),
    );
    for dest in dests {
        netns::ip(&[
            "-n",
            &routed.client_netns,
            "route",
            "add",
            &dest,
            "via",
            &via,
        ])?;
    }
    Ok(())
}

/// After the router's QEMU has opened its taps (in the lab namespace), each
/// but the first (subnet 1's, on the lab bridge from the start) goes to its
/// subnet's namespace and onto the bridge there. The open tap keeps working
/// across the move.
pub fn move_router_taps(lab: &LabState, routed: &Routed) -> Result<()> {
    for nic in routed.router_nics.iter().filter(|n| n.netns != lab.netns) {
        netns::ip(&[
            "-n", &lab.netns, "link", "set", &nic.tap, "netns", &nic.netns,
        ])?;
        netns::enslave_tap(&nic.netns, &nic.tap)?;
    }
    Ok(())
}

/// Deletes the namespaces of subnets 2… and of the client (their devices
/// go with them).
pub fn delete_networks(routed: &Routed) -> Result<()> {
    for ns in routed
        .subnets
        .iter()
        .filter(|s| s.index != 1)
        .map(|s| s.netns.as_str())
        .chain([routed.client_netns.as_str()])
    {
        netns::delete_lab_network(ns, &[])?;
    }
    Ok(())
}

/// The translation table the directory implies: every capsule that runs
/// somewhere, at its VM's machine address, with its epoch.
pub fn table(lab: &LabState, map: &DirectoryMap) -> Vec<Translation> {
    map.capsules
        .values()
        .filter(|c| c.lost.is_none())
        .filter_map(|c| {
            let vm = lab.vms.iter().find(|v| v.name == c.vm)?;
            Some(Translation {
                locator: c.locator,
                care_of: Some(vm.ip),
                epoch: c.epoch,
            })
        })
        .collect()
}

/// Sends a translation update to the router of a routed lab (nothing for
/// other labs).
pub fn push(lab: &LabState, replace: bool, entries: Vec<Translation>) -> Result<()> {
    let Some(routed) = &lab.routed else {
        return Ok(());
    };
    let key = lab.key()?;
    let mut router = routed.router.clone();
    // Reached from the lab namespace (its first NIC is on subnet 1).
    router.netns = Some(lab.netns.clone());
    let mut client = crate::lab::connect(&router, &key).context("cannot reach the router")?;
    match client.call(&Request::UpdateTranslations { replace, entries })? {
        Response::Done => Ok(()),
        Response::Error { code, message } => {
            bail!(
                "the router refused the update: {message} ({})",
                code.as_str()
            )
        }
        other => bail!("unexpected answer from the router: {other:?}"),
    }
}

/// After a write of the locator map: the router gets the whole table. A
/// failure is reported, never fatal (the capsule command did its work; the
/// next write or `lab up` pushes again).
pub fn publish(lab_dir: &Path, map: &DirectoryMap) {
    let lab = match crate::state::load(lab_dir) {
        Ok(Some(lab)) if lab.routed.is_some() => lab,
        _ => return,
    };
    if let Err(e) = push(&lab, true, table(&lab, map)) {
        eprintln!("capsulectl: warning: translation table not pushed to the router: {e:#}");
    }
}

/// One entry right after a move's commit: the router sends the capsule's
/// traffic to its new VM from now on.
pub fn push_entry(lab_dir: &Path, locator: Ipv4Addr, care_of: Ipv4Addr, epoch: u64) {
    let lab = match crate::state::load(lab_dir) {
        Ok(Some(lab)) if lab.routed.is_some() => lab,
        _ => return,
    };
    let entry = Translation {
        locator,
        care_of: Some(care_of),
        epoch,
    };
    if let Err(e) = push(&lab, false, vec![entry]) {
        eprintln!("capsulectl: warning: translation entry not pushed to the router: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_plan_and_placement() {
        let subnets = default_subnets(3);
        assert_eq!(subnets[0].to_string(), "192.0.2.0/24");
        assert_eq!(subnets[1].to_string(), "198.51.100.0/24");
        assert_eq!(subnets[2].to_string(), "10.99.3.0/24");
        check_subnets(&subnets, CapsuleRange::default()).unwrap();
        let routed = plan("t", "capsules-t", Path::new("/tmp/t"), &subnets[..2]);
        assert_eq!(routed.subnets[1].netns, "capsules-t.s2");
        assert_eq!(routed.subnets[1].host, Ipv4Addr::new(198, 51, 100, 1));
        assert_eq!(routed.subnets[1].router, Ipv4Addr::new(198, 51, 100, 254));
        assert_eq!(routed.client_netns, "capsules-t.client");
        assert_eq!(routed.client, Ipv4Addr::new(203, 0, 113, 10));
        assert_eq!(routed.router_nics.len(), 3);
        assert_eq!(routed.router.ip, Ipv4Addr::new(192, 0, 2, 254));
        assert_eq!(place(&routed, 1), (1, Ipv4Addr::new(192, 0, 2, 11), None));
        assert_eq!(
            place(&routed, 2),
            (
                2,
                Ipv4Addr::new(198, 51, 100, 12),
                Some("capsules-t.s2".into())
            )
        );
        assert_eq!(place(&routed, 3).0, 1);
        assert_eq!(
            gateway_of(&routed, 2),
            Some(Ipv4Addr::new(198, 51, 100, 254))
        );
        let line = router_cmdline(&routed, CapsuleRange::default());
        let cfg = BootConfig::parse(&line).unwrap();
        assert_eq!(cfg.role, Role::Router);
        assert_eq!(cfg.router_nics.len(), 3);
        assert_eq!(cfg.router_nics[2].addr, Ipv4Addr::new(203, 0, 113, 254));
    }

    #[test]
    fn bad_subnets_are_refused() {
        let range = CapsuleRange::default();
        let net = |s: &str| {
            let (a, p) = s.split_once('/').unwrap();
            Ipv4Cidr {
                addr: a.parse().unwrap(),
                prefix: p.parse().unwrap(),
            }
        };
        for bad in [
            vec![net("192.0.2.0/24")],
            vec![net("192.0.2.0/24"), net("192.0.2.0/24")],
            vec![net("192.0.2.0/24"), net("203.0.113.0/24")],
            vec![net("192.0.2.0/24"), net("198.18.5.0/24")],
            vec![net("192.0.2.0/24"), net("10.0.0.0/16")],
            vec![net("192.0.2.0/24"), net("10.0.0.1/24")],
            // Subnet 1 is the lab namespace's own 192.0.2.0/24.
            vec![net("10.5.1.0/24"), net("192.0.2.0/24")],
        ] {
            assert!(check_subnets(&bad, range).is_err(), "{bad:?}");
        }
    }
}
