//! Real guests on a real network: two nodes, each with its datapath in a namespace of its own
//! on a shared underlay bridge (as `shoal dev --netns`), boot TCG guests through libvirtd at
//! qemu:///system. Each guest gets its address by DHCP from its own node, reads its
//! `meta_data.json` from 169.254.169.254, and the one on node1 pings the one on node2 over
//! VXLAN through the eBPF datapath (its user data is the ping script; the guest image runs
//! "#!" user data as cloud-init does).
//!
//! The same with the kernel-path driver (vxlan, bridge, nftables), on the core path: a TCG guest
//! on node2 takes its address by DHCP and reads its own `meta_data.json` (served on the
//! network's bridge), a guest namespace bound to a port on node1 pings it over VXLAN, removing
//! its group's ingress rule stops the pings and adding it back restores them; that namespace
//! reaches node1's metadata service from its own address and not from another one. One TCG
//! boot instead of two keeps CI shorter.
//!
//! Needs root (libvirtd, qemu, namespaces). Outside CI it skips with a message; with CI=true
//! it runs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::guest::{self, Domains};
use common::osc::{openstack_bin, Osc};
use common::vmnet::{
    api, created, guest as ns_guest, is_root, port, readdress, wget, Netns, Underlay,
};
use common::{wait_until, Cluster};
use serde_json::json;

/// Two nodes on their own underlay namespaces with `driver`, both driving libvirtd (TCG), the
/// guest image uploaded, flavor `g.net` and network `guests` (10.7.0.0/24) made.
fn two_nodes(underlay: &Underlay, driver: &str, bin: &Path, dir: &Path) -> Cluster {
    let args = |i: usize| {
        let mut a = underlay.args_with(i, driver);
        a.extend(["--libvirt-uri", "qemu:///system", "--virt-type", "qemu"].map(String::from));
        a
    };
    let a0 = args(0);
    let mut c = Cluster::init(&a0.iter().map(String::as_str).collect::<Vec<_>>());
    let a1 = args(1);
    let join = c.create_join_token(0, 600);
    let second = c.spawn_join(&join, &a1.iter().map(String::as_str).collect::<Vec<_>>());
    wait_until("node2 to serve", Duration::from_secs(60), || {
        c.try_token(second).ok()
    });
    let osc = Osc {
        bin: bin.to_owned(),
        cluster: &c,
    };
    guest::upload(&osc, dir, "guest");
    osc.json(
        0,
        &[
            "flavor", "create", "--vcpus", "1", "--ram", "256", "--disk", "1", "g.net",
        ],
    );
    osc.json(0, &["network", "create", "guests"]);
    osc.json(
        1,
        &[
            "subnet",
            "create",
            "--network",
            "guests",
            "--subnet-range",
            "10.7.0.0/24",
            "--dns-nameserver",
            "10.7.0.53",
            "guests-v4",
        ],
    );
    c
}

/// Boots NAME through node NODE on host HOST, with EXTRA arguments; returns its id.
fn boot(
    osc: &Osc<'_>,
    domains: &mut Domains,
    node: usize,
    host: &str,
    name: &str,
    extra: &[&str],
) -> String {
    let az = format!("nova:{host}");
    let mut args = vec![
        "server",
        "create",
        "--flavor",
        "g.net",
        "--image",
        "guest",
        "--network",
        "guests",
        "--availability-zone",
        &az,
        "--wait",
    ];
    args.extend_from_slice(extra);
    args.push(name);
    let out = osc.json_as(node, &[], &args);
    if !out.ok {
        // `--wait` only says the server went to ERROR: show its fault to say why.
        let show = osc.json_as(node, &[], &["server", "show", name]);
        panic!(
            "{name} did not boot: {}\nserver show: {}",
            out.stderr, show.stdout
        );
    }
    let v = out.json();
    assert_eq!(v["status"], "ACTIVE", "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    domains.0.push(id.clone());
    id
}

/// The server's address on `guests`.
fn address(osc: &Osc<'_>, id: &str) -> String {
    let v = osc.json(0, &["server", "show", id]);
    v["addresses"]["guests"][0]
        .as_str()
        .map(str::to_owned)
        // OSC shows `addresses` as {"guests": ["10.7.0.x"]} (newer) or "guests=10.7.0.x".
        .or_else(|| {
            v["addresses"]
                .as_str()
                .and_then(|s| s.split('=').nth(1))
                .map(str::to_owned)
        })
        .expect("the server has an address")
}

/// The console log once it shows `marker`.
fn console(osc: &Osc<'_>, node: usize, id: &str, marker: &str) -> String {
    wait_until(
        &format!("{marker} on {id}'s console"),
        Duration::from_secs(180),
        || {
            let out = osc.run(node, &["console", "log", "show", id]);
            (out.ok && out.stdout.contains(marker)).then_some(out.stdout)
        },
    )
}

#[test]
fn guests_on_two_nodes_get_dhcp_metadata_and_ping_over_vxlan() {
    if !is_root("real guests on a real network") {
        return;
    }
    let Some(bin) = openstack_bin() else { return };
    let dir = guest::prepare();
    let underlay = Underlay::new("sgn", 2);
    let c = two_nodes(&underlay, "ebpf", &bin, &dir);
    let osc = Osc {
        bin: bin.clone(),
        cluster: &c,
    };
    let mut domains = Domains::default();

    // The pinged guest first, on node2; it must have its address before the other pings.
    let b_id = boot(&osc, &mut domains, 1, "node2", "gb", &[]);
    let b_ip = address(&osc, &b_id);
    let b_log = console(&osc, 0, &b_id, "SHOAL-GUEST-DONE");
    assert!(
        b_log.contains(&format!("SHOAL-GUEST-IP {b_ip}")),
        "gb got its port's address by DHCP: {b_log}"
    );
    let meta = b_log
        .lines()
        .find_map(|l| l.trim().strip_prefix("SHOAL-GUEST-METADATA "))
        .unwrap_or_else(|| panic!("gb read no metadata: {b_log}"));
    let meta: serde_json::Value = serde_json::from_str(meta).expect("meta_data.json");
    assert_eq!(meta["uuid"], b_id.as_str(), "gb read its own metadata");

    // The pinging guest on node1: its user data pings gb.
    let tmp = tempfile::tempdir().unwrap();
    let user_data = tmp.path().join("ping.sh");
    std::fs::write(
        &user_data,
        format!(
            "#!/bin/sh\nif ping -c 3 -W 2 {b_ip}; then echo SHOAL-PING-OK; else echo SHOAL-PING-FAILED; fi\n"
        ),
    )
    .unwrap();
    let a_id = boot(
        &osc,
        &mut domains,
        0,
        "node1",
        "ga",
        &["--user-data", user_data.to_str().unwrap()],
    );
    let a_log = console(&osc, 1, &a_id, "SHOAL-GUEST-DONE");
    assert!(a_log.contains("SHOAL-GUEST-IP 10.7.0."), "{a_log}");
    assert!(
        a_log.contains("SHOAL-PING-OK"),
        "ga (node1) pings gb (node2) over VXLAN: {a_log}"
    );

    for id in [&a_id, &b_id] {
        let out = osc.run(0, &["server", "delete", "--wait", id]);
        assert!(out.ok, "{}", out.stderr);
    }
    drop(domains);
    drop(c);
    drop(underlay);
}

fn ping(vm: &Netns, ip: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &vm.0, "ping", "-c", "1", "-W", "1", ip])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Pings until it answers (or not) as expected, for up to 20 s (a TCG guest answers slowly).
fn ping_becomes(vm: &Netns, ip: &str, reachable: bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if ping(vm, ip) == reachable {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_guest_on_the_kernel_driver_gets_dhcp_and_its_group_decides_who_pings_it() {
    if !is_root("a real guest on the kernel-path datapath") {
        return;
    }
    let Some(bin) = openstack_bin() else { return };
    let dir = guest::prepare();
    let pid = std::process::id();
    let underlay = Underlay::new("sgk", 2);
    let c = two_nodes(&underlay, "kernel", &bin, &dir);
    let osc = Osc {
        bin: bin.clone(),
        cluster: &c,
    };
    let mut domains = Domains::default();

    let b_id = boot(&osc, &mut domains, 1, "node2", "gk", &[]);
    let b_ip = address(&osc, &b_id);
    let b_log = console(&osc, 0, &b_id, "SHOAL-GUEST-DONE");
    assert!(
        b_log.contains(&format!("SHOAL-GUEST-IP {b_ip}")),
        "gk got its port's address by DHCP from node2's kernel-path agent: {b_log}"
    );
    let meta = b_log
        .lines()
        .find_map(|l| l.trim().strip_prefix("SHOAL-GUEST-METADATA "))
        .unwrap_or_else(|| panic!("gk read no metadata on the kernel path: {b_log}"));
    let meta: serde_json::Value = serde_json::from_str(meta).expect("meta_data.json");
    assert_eq!(meta["uuid"], b_id.as_str(), "gk read its own metadata");

    // A guest namespace on node1 behind a port of the same network and default group, bound
    // to node1 the way the compute agent binds a port.
    let token = c.token(0);
    let net = osc.json(0, &["network", "show", "guests"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let p = port(&c, &token, &net);
    let vm = ns_guest(
        format!("sgk-vm-{pid}"),
        &underlay.nodes[0],
        &format!("tap{}", &p.id[..11]),
        &p.mac,
        &p.ip,
    );
    let (status, v) = api(
        &c,
        &token,
        "PUT",
        &format!("/network/v2.0/ports/{}", p.id),
        Some(json!({"port": {"binding:host_id": "node1", "device_owner": "compute:nova"}})),
    );
    assert_eq!(status, 200, "{v}");
    assert!(
        ping_becomes(&vm, &b_ip, true),
        "node1's guest pings the TCG guest on node2 over VXLAN (kernel driver)"
    );

    // The default group's IPv4 ingress rule (from the group itself) lets the pings in.
    let (_, v) = api(
        &c,
        &token,
        "GET",
        &format!("/network/v2.0/ports/{}", p.id),
        None,
    );
    let group = v["port"]["security_groups"][0].as_str().unwrap().to_owned();
    let (_, v) = api(
        &c,
        &token,
        "GET",
        &format!("/network/v2.0/security-group-rules?security_group_id={group}"),
        None,
    );
    let ingress = v["security_group_rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["direction"] == "ingress" && r["ethertype"] == "IPv4")
        .unwrap_or_else(|| panic!("no IPv4 ingress rule in the default group: {v}"))
        .clone();
    let (status, _) = api(
        &c,
        &token,
        "DELETE",
        &format!(
            "/network/v2.0/security-group-rules/{}",
            ingress["id"].as_str().unwrap()
        ),
        None,
    );
    assert_eq!(status, 204, "rule delete");
    assert!(
        ping_becomes(&vm, &b_ip, false),
        "without the ingress rule the TCG guest is no longer reached"
    );
    created(
        &c,
        &token,
        "/network/v2.0/security-group-rules",
        json!({"security_group_rule": {
            "security_group_id": group, "direction": "ingress", "ethertype": "IPv4",
            "remote_group_id": ingress["remote_group_id"]}}),
    );
    assert!(
        ping_becomes(&vm, &b_ip, true),
        "the rule added back lets the pings in again"
    );

    // The namespace's port belongs to no server: node1's metadata service answers it with
    // Nova's 404. From an address that is not its port's, the bridge lets nothing through to
    // the node (the service would answer that with a 404 too, so silence is the proof).
    let asked = wget(&vm, "/openstack/latest/meta_data.json");
    assert!(
        asked.as_ref().is_err_and(|e| e.contains("404")),
        "node1 answers its own port on the kernel path: {asked:?}"
    );
    readdress(&vm, "10.7.0.250");
    let spoofed = wget(&vm, "/openstack/latest/meta_data.json");
    assert!(
        spoofed.as_ref().is_err_and(|e| !e.contains("404")),
        "a request from an address not the port's gets no answer: {spoofed:?}"
    );

    let out = osc.run(0, &["server", "delete", "--wait", &b_id]);
    assert!(out.ok, "{}", out.stderr);
    drop(vm);
    drop(domains);
    drop(c);
    drop(underlay);
}
