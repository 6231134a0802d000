//! Real guests on a real network: two nodes, each with its datapath in a namespace of its own
//! on a shared underlay bridge (as `shoal dev --netns`), boot TCG guests through libvirtd at
//! qemu:///system. Each guest gets its address by DHCP from its own node, reads its
//! `meta_data.json` from 169.254.169.254, and the one on node1 pings the one on node2 over
//! VXLAN through the eBPF datapath (its user data is the ping script; the guest image runs
//! "#!" user data as cloud-init does).
//!
//! Needs root (libvirtd, qemu, namespaces). Outside CI it skips with a message; with CI=true
//! it runs.

mod common;

use std::time::Duration;

use common::guest::{self, Domains};
use common::osc::{openstack_bin, Osc};
use common::vmnet::{is_root, Underlay};
use common::{wait_until, Cluster};

#[test]
fn guests_on_two_nodes_get_dhcp_metadata_and_ping_over_vxlan() {
    if !is_root("real guests on a real network") {
        return;
    }
    let Some(bin) = openstack_bin() else { return };
    let dir = guest::prepare();

    let underlay = Underlay::new("sgn", 2);
    let mut args0 = underlay.args(0);
    args0.extend(["--libvirt-uri", "qemu:///system", "--virt-type", "qemu"].map(String::from));
    let mut c = Cluster::init(&args0.iter().map(String::as_str).collect::<Vec<_>>());
    let mut args1 = underlay.args(1);
    args1.extend(["--libvirt-uri", "qemu:///system", "--virt-type", "qemu"].map(String::from));
    let join = c.create_join_token(0, 600);
    let second = c.spawn_join(&join, &args1.iter().map(String::as_str).collect::<Vec<_>>());
    wait_until("node2 to serve", Duration::from_secs(60), || {
        c.try_token(second).ok()
    });
    let osc = Osc {
        bin: bin.clone(),
        cluster: &c,
    };
    guest::upload(&osc, &dir, "guest");
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

    // Boots NAME through node NODE on host HOST, with EXTRA arguments; returns its id.
    let mut domains = Domains::default();
    let mut boot = |node: usize, host: &str, name: &str, extra: &[&str]| {
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
    };

    // The pinged guest first, on node2; it must have its address before the other pings.
    let b_id = boot(1, "node2", "gb", &[]);
    let b_ip = osc.json(0, &["server", "show", &b_id])["addresses"]["guests"][0]
        .as_str()
        .map(str::to_owned)
        .or_else(|| {
            // OSC shows `addresses` as {"guests": ["10.7.0.x"]} (newer) or "guests=10.7.0.x".
            let v = osc.json(0, &["server", "show", &b_id]);
            v["addresses"]
                .as_str()
                .and_then(|s| s.split('=').nth(1))
                .map(str::to_owned)
        })
        .expect("gb has an address");
    let console = |node: usize, id: &str, marker: &str| {
        wait_until(
            &format!("{marker} on {id}'s console"),
            Duration::from_secs(180),
            || {
                let out = osc.run(node, &["console", "log", "show", id]);
                (out.ok && out.stdout.contains(marker)).then_some(out.stdout)
            },
        )
    };
    let b_log = console(0, &b_id, "SHOAL-GUEST-DONE");
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
        0,
        "node1",
        "ga",
        &["--user-data", user_data.to_str().unwrap()],
    );
    let a_log = console(1, &a_id, "SHOAL-GUEST-DONE");
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
