//! Network v2.0 (Neutron's L2 part) against a three-node cluster: the real `openstack` client
//! for what users type, raw HTTP for error bodies and for a race through all three nodes.
//!
//! The client is found through `SHOAL_OPENSTACK_BIN` or `~/.cache/shoal/osc-venv`. Without it
//! the client tests print why and pass, unless `CI=true`, where a missing client fails them.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::thread;

use common::osc::{names, openstack_bin, Osc};
use common::Cluster;
use serde_json::{json, Value};

/// The command failed with `status` and said `text`.
fn refused(out: &common::osc::Out, status: u16, text: &str) {
    out.failed_with(status);
    assert!(out.stderr.contains(text), "{}", out.stderr);
}

fn field(list: &Value, key: &str, name: &str) -> Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|r| r["Resource"] == key)
        .unwrap_or_else(|| panic!("no {key} ({name}) in {list}"))["Limit"]
        .clone()
}

/// A user creates a network, a subnet with pools, a gateway and DNS servers, ports and
/// security groups, each command through another node, and reads them back everywhere; the
/// errors a user makes (a bad CIDR, a pool outside it, an overlapping subnet, an address in
/// use, a duplicate rule, a network still in use) get Neutron's status codes.
#[test]
fn network_commands_work_against_every_node() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    assert!(osc.catalog_has(0, "network", "neutron"));

    let net = osc.json(0, &["network", "create", "blue"]);
    assert_eq!(net["name"], "blue");
    assert_eq!(net["mtu"], 1450, "VXLAN: the underlay MTU less 50");
    assert_eq!(net["provider:network_type"], "vxlan");
    assert!(net["provider:segmentation_id"]
        .as_u64()
        .is_some_and(|v| (1..=65535).contains(&v)));
    assert_eq!(net["status"], "ACTIVE");
    assert_eq!(names(&osc.json(1, &["network", "list"]), "Name"), ["blue"]);
    assert_eq!(osc.json(2, &["network", "show", "blue"])["id"], net["id"]);
    // Tags go through their own calls (`PUT .../tags`), and filter listings.
    let tagged = osc.json(
        1,
        &["network", "create", "--tag", "prod", "--tag", "eu", "green"],
    );
    assert_eq!(tagged["tags"], json!(["eu", "prod"]));
    assert!(osc.run(2, &["network", "unset", "--tag", "eu", "green"]).ok);
    assert_eq!(
        names(&osc.json(0, &["network", "list", "--tags", "prod"]), "Name"),
        ["green"]
    );
    assert!(osc
        .json(1, &["network", "list", "--tags", "eu"])
        .as_array()
        .unwrap()
        .is_empty());
    assert!(osc.run(2, &["network", "delete", "green"]).ok);

    let sub = osc.json(
        1,
        &[
            "subnet",
            "create",
            "--network",
            "blue",
            "--subnet-range",
            "10.20.0.0/24",
            "--gateway",
            "10.20.0.254",
            "--allocation-pool",
            "start=10.20.0.10,end=10.20.0.19",
            "--dns-nameserver",
            "192.0.2.53",
            "blue-v4",
        ],
    );
    assert_eq!(sub["cidr"], "10.20.0.0/24");
    assert_eq!(sub["gateway_ip"], "10.20.0.254");
    assert_eq!(
        sub["allocation_pools"],
        json!([{"start": "10.20.0.10", "end": "10.20.0.19"}])
    );
    assert_eq!(sub["dns_nameservers"], json!(["192.0.2.53"]));
    assert_eq!(sub["enable_dhcp"], true);
    let shown = osc.json(0, &["network", "show", "blue"]);
    assert_eq!(shown["subnets"], json!([sub["id"]]));
    assert_eq!(
        names(
            &osc.json(2, &["subnet", "list", "--network", "blue"]),
            "Name"
        ),
        ["blue-v4"]
    );

    // Bad layouts.
    osc.run(
        0,
        &[
            "subnet",
            "create",
            "--network",
            "blue",
            "--subnet-range",
            "10.30.0.7/24",
            "x",
        ],
    )
    .failed_with(400);
    osc.run(
        1,
        &[
            "subnet",
            "create",
            "--network",
            "blue",
            "--subnet-range",
            "10.30.0.0/24",
            "--allocation-pool",
            "start=10.30.0.10,end=10.31.0.5",
            "x",
        ],
    )
    .failed_with(400);
    let overlap = osc.run(
        2,
        &[
            "subnet",
            "create",
            "--network",
            "blue",
            "--subnet-range",
            "10.20.0.0/16",
            "x",
        ],
    );
    refused(&overlap, 400, "overlaps with another subnet");

    // Ports, each step through another node.
    let p1 = osc.json(0, &["port", "create", "--network", "blue", "web-1"]);
    let ip1 = p1["fixed_ips"][0]["ip_address"]
        .as_str()
        .unwrap()
        .to_owned();
    let last: u8 = ip1.rsplit('.').next().unwrap().parse().unwrap();
    assert!((10..=19).contains(&last), "{ip1} is outside the pool");
    assert!(p1["mac_address"].as_str().unwrap().starts_with("fa:16:3e:"));
    assert_eq!(p1["status"], "DOWN");
    // Addresses are picked at random from the pool: ask for one web-1 did not get.
    let fixed = if ip1 == "10.20.0.15" {
        "10.20.0.16"
    } else {
        "10.20.0.15"
    };
    let fixed_arg = format!("subnet=blue-v4,ip-address={fixed}");
    let by_ip_arg = format!("ip-address={fixed}");
    let default_sg = osc.json(1, &["security", "group", "show", "default"]);
    assert_eq!(p1["security_group_ids"], json!([default_sg["id"]]));
    let p2 = osc.json(
        1,
        &[
            "port",
            "create",
            "--network",
            "blue",
            "--fixed-ip",
            &fixed_arg,
            "web-2",
        ],
    );
    assert_eq!(p2["fixed_ips"][0]["ip_address"], fixed);
    let taken = osc.run(
        2,
        &[
            "port",
            "create",
            "--network",
            "blue",
            "--fixed-ip",
            &fixed_arg,
            "web-3",
        ],
    );
    refused(&taken, 409, "already allocated");
    assert_eq!(
        names(&osc.json(2, &["port", "list"]), "Name"),
        ["web-1", "web-2"]
    );
    let by_ip = osc.json(0, &["port", "list", "--fixed-ip", &by_ip_arg]);
    assert_eq!(names(&by_ip, "Name"), ["web-2"]);
    assert_eq!(osc.json(1, &["port", "show", "web-1"])["id"], p1["id"]);
    let renamed = osc.run(2, &["port", "set", "--name", "web-2b", "web-2"]);
    assert!(renamed.ok, "{}", renamed.stderr);
    assert_eq!(
        osc.json(0, &["port", "show", "web-2b"])["revision_number"],
        2
    );

    // Security groups and rules.
    let sg = osc.json(2, &["security", "group", "create", "ssh"]);
    let rule = osc.json(
        0,
        &[
            "security",
            "group",
            "rule",
            "create",
            "--protocol",
            "tcp",
            "--dst-port",
            "22",
            "ssh",
        ],
    );
    assert_eq!(rule["port_range_min"], 22);
    assert_eq!(rule["security_group_id"], sg["id"]);
    let dup = osc.run(
        1,
        &[
            "security",
            "group",
            "rule",
            "create",
            "--protocol",
            "tcp",
            "--dst-port",
            "22",
            "ssh",
        ],
    );
    refused(&dup, 409, "already exists");
    let rules = osc.json(2, &["security", "group", "rule", "list", "ssh"]);
    assert_eq!(
        rules.as_array().unwrap().len(),
        3,
        "two egress rules and ssh: {rules}"
    );
    assert!(
        osc.run(
            0,
            &[
                "security",
                "group",
                "rule",
                "delete",
                rule["id"].as_str().unwrap()
            ]
        )
        .ok
    );
    assert_eq!(
        osc.json(1, &["security", "group", "rule", "list", "ssh"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let used = osc.run(2, &["port", "set", "--security-group", "ssh", "web-1"]);
    assert!(used.ok, "{}", used.stderr);
    osc.run(0, &["security", "group", "delete", "ssh"])
        .failed_with(409);

    // A network with ports stays; without them it goes, its subnet with it.
    osc.run(1, &["network", "delete", "blue"]).failed_with(409);
    assert!(osc.run(2, &["port", "delete", "web-1", "web-2b"]).ok);
    assert!(osc
        .json(0, &["port", "list"])
        .as_array()
        .unwrap()
        .is_empty());
    assert!(osc.run(1, &["security", "group", "delete", "ssh"]).ok);
    assert!(osc.run(1, &["network", "delete", "blue"]).ok);
    assert!(osc
        .json(2, &["network", "list"])
        .as_array()
        .unwrap()
        .is_empty());
    assert!(osc
        .json(0, &["subnet", "list"])
        .as_array()
        .unwrap()
        .is_empty());
}

/// Two projects do not see each other's networks, ports or groups; a shared network is seen
/// by both; provider attributes are an administrator's; a project's port quota holds.
/// The modified EUI-64 address of `mac` in the /64 whose first half is `prefix` (RFC 4291),
/// computed here independently of the service.
fn eui64(prefix: &str, mac: &str) -> std::net::Ipv6Addr {
    let b: Vec<u8> = mac
        .split(':')
        .map(|o| u8::from_str_radix(o, 16).unwrap())
        .collect();
    let net: std::net::Ipv6Addr = prefix.parse().unwrap();
    let iid = [b[0] ^ 2, b[1], b[2], 0xff, 0xfe, b[3], b[4], b[5]];
    let mut octets = net.octets();
    octets[8..].copy_from_slice(&iid);
    octets.into()
}

#[test]
fn ipv6_subnets_give_ports_their_addresses() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    osc.json(0, &["network", "create", "dual"]);
    let v6 = |node: usize, range: &str, mode: Option<&str>, name: &str| {
        let mut args = vec![
            "subnet",
            "create",
            "--network",
            "dual",
            "--ip-version",
            "6",
            "--subnet-range",
            range,
        ];
        if let Some(m) = mode {
            args.extend(["--ipv6-ra-mode", m, "--ipv6-address-mode", m]);
        }
        args.push(name);
        osc.run(node, &args)
    };
    assert!(v6(0, "2001:db8:7::/64", Some("slaac"), "auto").ok);
    let auto = osc.json(1, &["subnet", "show", "auto"]);
    assert_eq!(auto["ip_version"], 6);
    assert_eq!(auto["gateway_ip"], "2001:db8:7::1");
    assert_eq!(auto["ipv6_address_mode"], "slaac");
    assert!(v6(1, "2001:db8:8::/64", None, "stateful").ok);
    let stateful = osc.json(2, &["subnet", "show", "stateful"]);
    let v4 = osc.json(
        2,
        &[
            "subnet",
            "create",
            "--network",
            "dual",
            "--subnet-range",
            "10.70.0.0/24",
            "four",
        ],
    );

    // A port with no fixed_ips: one IPv4, one stateful IPv6 and its SLAAC address.
    let p = osc.json(1, &["port", "create", "--network", "dual", "p1"]);
    let mac = p["mac_address"].as_str().unwrap();
    let on = |port: &Value, subnet: &Value| -> Vec<String> {
        port["fixed_ips"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["subnet_id"] == subnet["id"])
            .map(|f| f["ip_address"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(on(&p, &auto), [eui64("2001:db8:7::", mac).to_string()]);
    let from_pool: std::net::Ipv6Addr = on(&p, &stateful)[0].parse().unwrap();
    assert_eq!(from_pool.segments()[..4], [0x2001, 0xdb8, 8, 0]);
    assert!(on(&p, &v4)[0].starts_with("10.70.0."));

    // Refused as Neutron refuses them.
    osc.run(
        0,
        &[
            "port",
            "create",
            "--network",
            "dual",
            "--fixed-ip",
            "subnet=auto,ip-address=2001:db8:7::99",
            "p2",
        ],
    )
    .failed_with(400);
    assert!(!v6(0, "10.71.0.0/24", None, "mixed").ok);
    assert!(!v6(0, "2001:db8:9::/80", Some("slaac"), "short").ok);
    assert!(
        !v6(0, "2001:db8:7:0:1::/80", None, "inside").ok,
        "overlaps 'auto'"
    );

    // The SLAAC subnet goes while the port holds its address; the port keeps the others.
    assert!(osc.run(2, &["subnet", "delete", "auto"]).ok);
    let after = osc.json(0, &["port", "show", "p1"]);
    assert_eq!(after["fixed_ips"].as_array().unwrap().len(), 2, "{after}");
    assert!(on(&after, &auto).is_empty());
    // A stateful subnet with a port on it stays.
    assert!(!osc.run(1, &["subnet", "delete", "stateful"]).ok);

    // Nova's deprecated network proxies read the same network (its IPv4 prefix as `cidr`).
    let token = c.token(0);
    let (status, body) = c.api(2, "GET", "/compute/v2.1/os-tenant-networks", &token, None);
    assert_eq!(status, 200, "{body}");
    let dual = osc.json(0, &["network", "show", "dual"]);
    let listed: Vec<&Value> = body["networks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["id"] == dual["id"])
        .collect();
    assert_eq!(listed.len(), 1, "{body}");
    assert_eq!(listed[0]["label"], "dual");
    assert_eq!(listed[0]["cidr"], "10.70.0.0/24");
    let path = format!("/compute/v2.1/os-networks/{}", dual["id"].as_str().unwrap());
    let (status, body) = c.api(1, "GET", &path, &token, None);
    assert_eq!(
        (status, &body["network"]["label"]),
        (200, &json!("dual")),
        "{body}"
    );
    let (status, body) = c.api(1, "GET", "/compute/v2.1/os-networks/nope", &token, None);
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        body["itemNotFound"]["code"], 404,
        "Nova's error shape: {body}"
    );
    let (status, _) = c.api(
        0,
        "POST",
        "/compute/v2.1/os-networks",
        &token,
        Some(json!({})),
    );
    assert_eq!(status, 410, "nova-network's calls are gone, as in Nova");
}

#[test]
fn projects_are_isolated_and_bounded_by_quotas() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    let red_id = osc.json(0, &["project", "create", "red"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let green_id = osc.json(0, &["project", "create", "green"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    osc.user_with_role(1, "alice", "alice-pw-1", "red", "member");
    osc.user_with_role(2, "bob", "bob-pw-12", "green", "member");
    let alice = [
        ("OS_USERNAME", "alice"),
        ("OS_PASSWORD", "alice-pw-1"),
        ("OS_PROJECT_NAME", "red"),
    ];
    let bob = [
        ("OS_USERNAME", "bob"),
        ("OS_PASSWORD", "bob-pw-12"),
        ("OS_PROJECT_NAME", "green"),
    ];
    let run = |node, who: &[(&str, &str)], args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["-f", "json"]);
        osc.run_as(node, who, &a)
    };

    let net = run(0, &alice, &["network", "create", "alice-net"]).json();
    assert!(
        net.get("provider:network_type").is_none_or(Value::is_null),
        "provider attributes are admin-only: {net}"
    );
    assert!(
        run(
            1,
            &alice,
            &[
                "subnet",
                "create",
                "--network",
                "alice-net",
                "--subnet-range",
                "10.0.0.0/24",
                "a4"
            ]
        )
        .ok
    );
    let port = run(
        2,
        &alice,
        &["port", "create", "--network", "alice-net", "alice-port"],
    )
    .json();
    let sg = run(0, &alice, &["security", "group", "create", "alice-sg"]).json();

    // Bob sees none of it, by name or by id, and cannot use it.
    assert!(run(1, &bob, &["network", "list"])
        .json()
        .as_array()
        .unwrap()
        .is_empty());
    for (kind, id) in [("network", &net["id"]), ("port", &port["id"])] {
        let out = run(2, &bob, &[kind, "show", id.as_str().unwrap()]);
        assert!(
            !out.ok && out.stderr.contains("No ") && out.stderr.contains("found"),
            "{kind}: {}",
            out.stderr
        );
    }
    let out = run(
        0,
        &bob,
        &["security", "group", "show", sg["id"].as_str().unwrap()],
    );
    assert!(!out.ok, "{}", out.stdout);
    assert!(run(1, &bob, &["port", "list"])
        .json()
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        names(&run(2, &bob, &["security", "group", "list"]).json(), "Name"),
        ["default"]
    );
    run(
        0,
        &bob,
        &["network", "create", "--provider-network-type", "vxlan", "x"],
    )
    .failed_with(403);
    run(1, &bob, &["network", "create", "--share", "x"]).failed_with(403);

    // A shared network is everyone's to see and attach to, its owner's to change.
    let shared = osc.json(2, &["network", "create", "--share", "public-net"]);
    assert_eq!(
        shared["provider:network_type"], "vxlan",
        "an admin sees provider attributes"
    );
    assert!(
        osc.run(
            0,
            &[
                "subnet",
                "create",
                "--network",
                "public-net",
                "--subnet-range",
                "10.0.0.0/24",
                "p4"
            ]
        )
        .ok,
        "CIDRs may overlap across networks"
    );
    assert_eq!(
        names(&run(1, &bob, &["network", "list"]).json(), "Name"),
        ["public-net"]
    );
    let bobs = run(
        2,
        &bob,
        &["port", "create", "--network", "public-net", "bob-port"],
    )
    .json();
    assert_eq!(
        bobs["project_id"],
        run(0, &bob, &["token", "issue"]).json()["project_id"]
    );
    osc.run_as(0, &bob, &["network", "delete", "public-net"])
        .failed_with(403);

    // Quotas: the defaults, then a port limit that holds.
    let q = osc.json(1, &["quota", "show", "--network", "green"]);
    for (resource, limit) in [
        ("networks", 100),
        ("subnets", 100),
        ("ports", 500),
        // python-openstackclient 10 prints Neutron's own names.
        ("security_groups", 10),
        ("security_group_rules", 100),
        ("routers", 10),
        ("floating_ips", 50),
    ] {
        assert_eq!(field(&q, resource, "quota show"), limit, "{resource}: {q}");
    }
    let set = osc.run(2, &["quota", "set", "--ports", "3", "green"]);
    assert!(set.ok, "{}", set.stderr);
    assert_eq!(
        field(
            &osc.json(0, &["quota", "show", "--network", "green"]),
            "ports",
            "after set"
        ),
        3
    );
    assert_eq!(
        field(
            // A member names projects by id: listing projects by name is for admins (as in
            // Keystone), so the client cannot resolve a name for bob.
            &run(1, &bob, &["quota", "show", "--network", &green_id]).json(),
            "ports",
            "own"
        ),
        3
    );
    assert!(
        run(
            1,
            &bob,
            &["port", "create", "--network", "public-net", "b2"]
        )
        .ok
    );
    assert!(
        run(
            2,
            &bob,
            &["port", "create", "--network", "public-net", "b3"]
        )
        .ok
    );
    let over = run(
        0,
        &bob,
        &["port", "create", "--network", "public-net", "b4"],
    );
    refused(&over, 409, "Quota exceeded for resources: ['port']");
    // Bob may not raise it, nor read red's.
    osc.run_as(1, &bob, &["quota", "set", "--ports", "9", &green_id])
        .failed_with(403);
    assert!(!run(2, &bob, &["quota", "show", "--network", &red_id]).ok);
    // Deleting a port frees a slot.
    assert!(osc.run_as(0, &bob, &["port", "delete", "b3"]).ok);
    assert!(
        run(
            1,
            &bob,
            &["port", "create", "--network", "public-net", "b4"]
        )
        .ok
    );
}

/// Errors reach raw HTTP clients in Neutron's body (`NeutronError` with `type`, `message`
/// and `detail`) and status, through any node; the versions document and the extension
/// list are served as the client expects them.
#[test]
fn errors_come_in_neutrons_shape() {
    let c = Cluster::start(3, &[]);
    let token = c.token(0);
    let (s, v) = c.api(1, "GET", "/network/", &token, None);
    assert_eq!(s, 200);
    assert_eq!(v["versions"][0]["id"], "v2.0");
    let (_, ext) = c.api(2, "GET", "/network/v2.0/extensions", &token, None);
    let aliases: BTreeSet<&str> = ext["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["alias"].as_str().unwrap())
        .collect();
    for needed in [
        "security-group",
        "quotas",
        "quota_details",
        "provider",
        "external-net",
        "port-security",
        "binding",
        "standard-attr-tag",
        "router",
        "extraroute",
        "ext-gw-mode",
    ] {
        assert!(aliases.contains(needed), "{needed} missing: {aliases:?}");
    }
    for absent in ["dvr", "l3-ha", "l3_agent_scheduler"] {
        assert!(!aliases.contains(absent), "{absent}: no such routers here");
    }

    let expect = |(status, body): (u16, Value), want: u16, kind: &str| {
        assert_eq!(status, want, "{body}");
        let e = &body["NeutronError"];
        assert_eq!(e["type"], kind, "{body}");
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(e.get("detail").is_some(), "{body}");
    };
    let missing = "2b5c1a5e-0000-4000-8000-000000000000";
    expect(
        c.api(
            0,
            "GET",
            &format!("/network/v2.0/networks/{missing}"),
            &token,
            None,
        ),
        404,
        "NetworkNotFound",
    );
    expect(
        c.api(
            1,
            "POST",
            "/network/v2.0/ports",
            &token,
            Some(json!({"port": {"network_id": missing}})),
        ),
        404,
        "NetworkNotFound",
    );
    expect(
        c.api(
            2,
            "POST",
            "/network/v2.0/networks",
            &token,
            Some(json!({"network": {"colour": "red"}})),
        ),
        400,
        "HTTPBadRequest",
    );
    let (s, net) = c.api(
        0,
        "POST",
        "/network/v2.0/networks",
        &token,
        Some(json!({"network": {"name": "n"}})),
    );
    assert_eq!(s, 201, "{net}");
    let net_id = net["network"]["id"].as_str().unwrap();
    let subnet = |cidr: &str, extra: Value| {
        let mut b = json!({"network_id": net_id, "ip_version": 4, "cidr": cidr});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({ "subnet": b })
    };
    expect(
        c.api(
            1,
            "POST",
            "/network/v2.0/subnets",
            &token,
            Some(subnet("10.0.0.0/33", json!({}))),
        ),
        400,
        "HTTPBadRequest",
    );
    expect(
        c.api(
            2,
            "POST",
            "/network/v2.0/subnets",
            &token,
            Some(subnet(
                "10.0.0.0/24",
                json!({"allocation_pools": [{"start": "10.0.0.5", "end": "10.0.1.5"}]}),
            )),
        ),
        400,
        "OutOfBoundsAllocationPool",
    );
    expect(
        c.api(0,
            "POST",
            "/network/v2.0/subnets",
            &token,
            Some(subnet(
                "10.0.0.0/24",
                json!({"gateway_ip": "10.0.0.7", "allocation_pools": [{"start": "10.0.0.5", "end": "10.0.0.9"}]}),
            )),
        ),
        409,
        "GatewayConflictWithAllocationPools",
    );
    let (s, sub) = c.api(
        1,
        "POST",
        "/network/v2.0/subnets",
        &token,
        Some(subnet("10.0.0.0/24", json!({}))),
    );
    assert_eq!(s, 201, "{sub}");
    let sub_id = sub["subnet"]["id"].as_str().unwrap();
    let at = |ip: &str| json!({"port": {"network_id": net_id, "fixed_ips": [{"subnet_id": sub_id, "ip_address": ip}]}});
    let (s, _) = c.api(
        2,
        "POST",
        "/network/v2.0/ports",
        &token,
        Some(at("10.0.0.40")),
    );
    assert_eq!(s, 201);
    expect(
        c.api(
            0,
            "POST",
            "/network/v2.0/ports",
            &token,
            Some(at("10.0.0.40")),
        ),
        409,
        "IpAddressAlreadyAllocated",
    );
    expect(
        c.api(
            1,
            "POST",
            "/network/v2.0/ports",
            &token,
            Some(at("10.9.9.9")),
        ),
        400,
        "InvalidInput",
    );
    expect(
        c.api(
            2,
            "DELETE",
            &format!("/network/v2.0/networks/{net_id}"),
            &token,
            None,
        ),
        409,
        "NetworkInUse",
    );
    expect(
        c.api(
            0,
            "DELETE",
            &format!("/network/v2.0/subnets/{sub_id}"),
            &token,
            None,
        ),
        409,
        "SubnetInUse",
    );
    // Neutron's path shapes for things that do not exist here are 404s in the same body.
    let (s, v) = c.api(1, "GET", "/network/v2.0/qos/policies", &token, None);
    assert_eq!(s, 404, "{v}");
    assert!(v["NeutronError"].is_object(), "{v}");
    // The details the client's `quota show --usage` reads.
    let (s, d) = c.api(
        2,
        "GET",
        &format!(
            "/network/v2.0/quotas/{}/details.json",
            net["network"]["project_id"].as_str().unwrap()
        ),
        &token,
        None,
    );
    assert_eq!(s, 200, "{d}");
    assert_eq!(
        d["quota"]["port"],
        json!({"limit": 500, "used": 1, "reserved": 0})
    );
    assert_eq!(d["quota"]["network"]["used"], 1);
    assert_eq!(d["quota"]["subnet"]["used"], 1);
    // The default group and its four rules.
    assert_eq!(d["quota"]["security_group"]["used"], 1);
    assert_eq!(d["quota"]["security_group_rule"]["used"], 4);
}

/// IPAM never hands one address (or one MAC) to two ports: twelve clients create ports at once
/// through all three nodes on a subnet whose pool is smaller than the number of creates. Every
/// create that succeeds holds an address no other port holds, every one that fails says the
/// pool is exhausted, every node lists the same ports, and deleted ports' addresses come back.
#[test]
fn concurrent_port_creates_through_three_nodes_never_share_an_address() {
    const POOL: usize = 30;
    const CREATES_PER_CLIENT: usize = 4;
    const CLIENTS_PER_NODE: usize = 4;
    let c = Arc::new(Cluster::start(3, &[]));
    let token = c.token(0);
    let (_, net) = c.api(
        0,
        "POST",
        "/network/v2.0/networks",
        &token,
        Some(json!({"network": {"name": "race"}})),
    );
    let net_id = net["network"]["id"].as_str().unwrap().to_owned();
    let (s, sub) = c.api(1,
        "POST",
        "/network/v2.0/subnets",
        &token,
        Some(
            json!({"subnet": {"network_id": net_id, "ip_version": 4, "cidr": "10.7.0.0/24",
            "allocation_pools": [{"start": "10.7.0.100", "end": format!("10.7.0.{}", 100 + POOL - 1)}]}}),
        ),
    );
    assert_eq!(s, 201, "{sub}");

    let mut clients = Vec::new();
    for node in 0..3 {
        for _ in 0..CLIENTS_PER_NODE {
            let (c, token, net_id) = (c.clone(), c.token(node), net_id.clone());
            clients.push(thread::spawn(move || {
                (0..CREATES_PER_CLIENT)
                    .map(|_| {
                        c.api(
                            node,
                            "POST",
                            "/network/v2.0/ports",
                            &token,
                            Some(json!({"port": {"network_id": net_id}})),
                        )
                    })
                    .collect::<Vec<_>>()
            }));
        }
    }
    let (mut ips, mut macs, mut exhausted) = (BTreeSet::new(), BTreeSet::new(), 0);
    for t in clients {
        for (status, body) in t.join().unwrap() {
            match status {
                201 => {
                    let p = &body["port"];
                    let ip = p["fixed_ips"][0]["ip_address"].as_str().unwrap().to_owned();
                    assert!(ips.insert(ip.clone()), "{ip} handed out twice");
                    assert!(
                        macs.insert(p["mac_address"].as_str().unwrap().to_owned()),
                        "MAC handed out twice: {p}"
                    );
                }
                409 => {
                    assert_eq!(
                        body["NeutronError"]["type"], "IpAddressGenerationFailure",
                        "{body}"
                    );
                    exhausted += 1;
                }
                other => panic!("unexpected {other}: {body}"),
            }
        }
    }
    let total = 3 * CLIENTS_PER_NODE * CREATES_PER_CLIENT;
    assert_eq!(ips.len(), POOL, "every address of the pool is used once");
    assert_eq!(exhausted, total - POOL);
    for node in 0..3 {
        let (_, list) = c.api(
            node,
            "GET",
            &format!("/network/v2.0/ports?network_id={net_id}"),
            &token,
            None,
        );
        let seen: BTreeSet<String> = list["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["fixed_ips"][0]["ip_address"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(seen, ips, "node {node} lists other ports");
    }
    // Deleted ports' addresses return to the pool.
    let (_, list) = c.api(
        2,
        "GET",
        "/network/v2.0/ports?fixed_ips=ip_address=10.7.0.105",
        &token,
        None,
    );
    let victim = list["ports"][0]["id"].as_str().unwrap().to_owned();
    let (s, _) = c.api(
        0,
        "DELETE",
        &format!("/network/v2.0/ports/{victim}"),
        &token,
        None,
    );
    assert_eq!(s, 204);
    let (s, again) = c.api(
        1,
        "POST",
        "/network/v2.0/ports",
        &token,
        Some(json!({"port": {"network_id": net_id}})),
    );
    assert_eq!(s, 201, "{again}");
    assert_eq!(again["port"]["fixed_ips"][0]["ip_address"], "10.7.0.105");
}

/// A user makes a subnet pool and carves subnets from it with the real client, through other
/// nodes; then twelve creates race through all three nodes for the eight /27s a second pool
/// holds: each block goes once, the rest are refused, and nothing is lost.
#[test]
fn subnet_pools_carve_subnets_through_every_node() {
    let Some(bin) = openstack_bin() else { return };
    let c = Arc::new(Cluster::start(3, &[]));
    let osc = Osc { bin, cluster: &c };
    let pool = osc.json(
        0,
        &[
            "subnet",
            "pool",
            "create",
            "--pool-prefix",
            "10.50.0.0/24",
            "--pool-prefix",
            "10.50.1.0/24",
            "--default-prefix-length",
            "26",
            "--tag",
            "lab",
            "pool1",
        ],
    );
    assert_eq!(pool["prefixes"], json!(["10.50.0.0/23"]), "{pool}");
    assert_eq!(pool["default_prefixlen"], 26, "{pool}");
    assert_eq!(pool["min_prefixlen"], 8, "{pool}");
    assert_eq!(pool["max_prefixlen"], 32, "{pool}");
    assert_eq!(pool["ip_version"], 4, "{pool}");
    osc.json(1, &["network", "create", "carved"]);
    let a = osc.json(
        2,
        &[
            "subnet",
            "create",
            "--network",
            "carved",
            "--subnet-pool",
            "pool1",
            "a",
        ],
    );
    assert_eq!(a["cidr"], "10.50.0.0/26", "{a}");
    assert_eq!(a["gateway_ip"], "10.50.0.1", "{a}");
    assert_eq!(a["subnetpool_id"], pool["id"], "{a}");
    let b = osc.json(
        0,
        &[
            "subnet",
            "create",
            "--network",
            "carved",
            "--subnet-pool",
            "pool1",
            "--prefix-length",
            "24",
            "b",
        ],
    );
    assert_eq!(b["cidr"], "10.50.1.0/24", "{b}");
    refused(
        &osc.run(
            1,
            &[
                "subnet",
                "create",
                "--network",
                "carved",
                "--subnet-pool",
                "pool1",
                "--prefix-length",
                "24",
                "c",
            ],
        ),
        409,
        "Insufficient prefix space",
    );
    refused(
        &osc.run(
            1,
            &[
                "subnet",
                "create",
                "--network",
                "carved",
                "--subnet-pool",
                "pool1",
                "--prefix-length",
                "6",
                "d",
            ],
        ),
        400,
        "minimum allowed prefix is 8",
    );
    // The client's `set --pool-prefix` sends the old prefixes and the new one.
    assert!(
        osc.run(
            2,
            &[
                "subnet",
                "pool",
                "set",
                "--pool-prefix",
                "10.60.0.0/16",
                "pool1"
            ]
        )
        .ok
    );
    let shown = osc.json(0, &["subnet", "pool", "show", "pool1"]);
    assert_eq!(
        shown["prefixes"],
        json!(["10.50.0.0/23", "10.60.0.0/16"]),
        "{shown}"
    );
    assert_eq!(shown["tags"], json!(["lab"]), "{shown}");
    refused(
        &osc.run(1, &["subnet", "pool", "delete", "pool1"]),
        400,
        "existing allocations",
    );
    assert!(osc.run(1, &["subnet", "delete", "a", "b"]).ok);
    assert!(osc.run(2, &["subnet", "pool", "delete", "pool1"]).ok);
    assert!(osc
        .json(0, &["subnet", "pool", "list"])
        .as_array()
        .unwrap()
        .is_empty());

    // The race: 12 creates, 4 through each node, for eight /27s.
    let token = c.token(0);
    let (s, p) = c.api(
        1,
        "POST",
        "/network/v2.0/subnetpools",
        &token,
        Some(json!({"subnetpool": {"name": "race", "prefixes": ["10.70.0.0/24"], "default_prefixlen": 27}})),
    );
    assert_eq!(s, 201, "{p}");
    let pool_id = p["subnetpool"]["id"].as_str().unwrap().to_owned();
    let (_, net) = c.api(
        2,
        "POST",
        "/network/v2.0/networks",
        &token,
        Some(json!({"network": {"name": "race"}})),
    );
    let net_id = net["network"]["id"].as_str().unwrap().to_owned();
    let clients: Vec<_> = (0..12)
        .map(|i| {
            let (c, token, pool_id, net_id) = (c.clone(), c.token(i % 3), pool_id.clone(), net_id.clone());
            thread::spawn(move || {
                c.api(
                    i % 3,
                    "POST",
                    "/network/v2.0/subnets",
                    &token,
                    Some(json!({"subnet": {"network_id": net_id, "ip_version": 4, "subnetpool_id": pool_id}})),
                )
            })
        })
        .collect();
    let mut cidrs = BTreeSet::new();
    for t in clients {
        let (status, body) = t.join().unwrap();
        match status {
            201 => assert!(
                cidrs.insert(body["subnet"]["cidr"].as_str().unwrap().to_owned()),
                "carved twice: {body}"
            ),
            409 => assert_eq!(
                body["NeutronError"]["type"], "SubnetAllocationError",
                "{body}"
            ),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let want: BTreeSet<String> = (0..8).map(|i| format!("10.70.0.{}/27", i * 32)).collect();
    assert_eq!(cidrs, want);
    for node in 0..3 {
        let (_, list) = c.api(
            node,
            "GET",
            &format!("/network/v2.0/subnets?subnetpool_id={pool_id}"),
            &token,
            None,
        );
        let seen: BTreeSet<String> = list["subnets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["cidr"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(seen, want, "node {node}");
    }
}

/// PXE-style options on a port with the real client: created, changed, one removed with a
/// `null` value over raw HTTP; every node shows the same list.
#[test]
fn ports_carry_extra_dhcp_options() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    osc.json(0, &["network", "create", "pxe"]);
    osc.json(
        1,
        &[
            "subnet",
            "create",
            "--network",
            "pxe",
            "--subnet-range",
            "10.80.0.0/24",
            "pxe4",
        ],
    );
    let p = osc.json(
        2,
        &[
            "port",
            "create",
            "--network",
            "pxe",
            "--extra-dhcp-option",
            "name=tftp-server,value=10.80.0.9",
            "--extra-dhcp-option",
            "name=bootfile-name,value=pxelinux.0",
            "boot",
        ],
    );
    let id = p["id"].as_str().unwrap().to_owned();
    let opts = |node: usize| -> BTreeSet<(String, String, u64)> {
        let (_, v) = c.api(
            node,
            "GET",
            &format!("/network/v2.0/ports/{id}"),
            &c.token(node),
            None,
        );
        v["port"]["extra_dhcp_opts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["opt_name"].as_str().unwrap().to_owned(),
                    o["opt_value"].as_str().unwrap().to_owned(),
                    o["ip_version"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let want = |list: &[(&str, &str)]| -> BTreeSet<(String, String, u64)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string(), 4))
            .collect()
    };
    assert_eq!(
        opts(0),
        want(&[
            ("tftp-server", "10.80.0.9"),
            ("bootfile-name", "pxelinux.0")
        ])
    );
    assert!(
        osc.run(
            0,
            &[
                "port",
                "set",
                "--extra-dhcp-option",
                "name=bootfile-name,value=ipxe.efi",
                "boot"
            ]
        )
        .ok
    );
    assert_eq!(
        opts(1),
        want(&[("tftp-server", "10.80.0.9"), ("bootfile-name", "ipxe.efi")])
    );
    let (s, body) = c.api(
        2,
        "PUT",
        &format!("/network/v2.0/ports/{id}"),
        &c.token(2),
        Some(
            json!({"port": {"extra_dhcp_opts": [{"opt_name": "tftp-server", "opt_value": null}]}}),
        ),
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(opts(2), want(&[("bootfile-name", "ipxe.efi")]));
    let (s, body) = c.api(
        0,
        "PUT",
        &format!("/network/v2.0/ports/{id}"),
        &c.token(0),
        Some(json!({"port": {"extra_dhcp_opts": [{"opt_name": "", "opt_value": "x"}]}})),
    );
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["NeutronError"]["type"], "HTTPBadRequest", "{body}");
}
