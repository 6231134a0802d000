//! Network v2.0's L3 model (routers and floating IPs) against a three-node cluster: the real
//! `openstack` client for what users type, raw HTTP for Neutron's error bodies.
//!
//! The client is found through `SHOAL_OPENSTACK_BIN` or `~/.cache/shoal/osc-venv`. Without it
//! the tests print why and pass, unless `CI=true`, where a missing client fails them.

mod common;

use common::osc::{login, names, openstack_bin, Osc, Out};
use common::Cluster;
use serde_json::{json, Value};

/// The command failed with `status` and said `text`.
fn refused(out: &Out, status: u16, text: &str) {
    out.failed_with(status);
    assert!(out.stderr.contains(text), "{}", out.stderr);
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// A member builds the L3 model with the client, each command through another node: a router
/// with a gateway on an external network (its address from that network's subnet), an
/// interface on the member's subnet (the subnet's gateway address), extra routes, a floating IP
/// associated with a port and released again. What is in use cannot be removed (409), what is
/// malformed is refused (400), what is unreachable is 404, another project sees nothing, and
/// the `router` and `floatingip` quotas hold.
#[test]
fn routers_and_floating_ips_through_the_client() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };

    // The administrator's external network.
    let public = osc.json(0, &["network", "create", "--external", "public"]);
    assert_eq!(public["router:external"], true);
    osc.json(
        1,
        &[
            "subnet",
            "create",
            "--network",
            "public",
            "--subnet-range",
            "203.0.113.0/24",
            "--no-dhcp",
            "public-v4",
        ],
    );
    let red_id = text(&osc.json(0, &["project", "create", "red"])["id"]).to_owned();
    osc.json(0, &["project", "create", "green"]);
    osc.user_with_role(1, "alice", "alice-pw-1", "red", "member");
    osc.user_with_role(2, "bob", "bob-pw-12", "green", "member");
    let alice = login("alice", "alice-pw-1", "red");
    let bob = login("bob", "bob-pw-12", "green");
    let run = |node, who: &[(&str, &str)], args: &[&str]| osc.json_as(node, who, args);
    let quiet = |node, who: &[(&str, &str)], args: &[&str]| osc.run_as(node, who, args);

    run(0, &alice, &["network", "create", "alice-net"]).json();
    run(
        1,
        &alice,
        &[
            "subnet",
            "create",
            "--network",
            "alice-net",
            "--subnet-range",
            "10.1.0.0/24",
            "a4",
        ],
    )
    .json();

    // A router, then its gateway.
    let r1 = run(2, &alice, &["router", "create", "r1"]).json();
    assert_eq!(r1["status"], "ACTIVE");
    assert!(r1["external_gateway_info"].is_null(), "{r1}");
    assert!(r1.get("distributed").is_none(), "admin-only: {r1}");
    let r1_id = text(&r1["id"]).to_owned();
    refused(
        &quiet(
            0,
            &alice,
            &[
                "router",
                "set",
                "--external-gateway",
                "public",
                "--disable-snat",
                "r1",
            ],
        ),
        403,
        "enable_snat",
    );
    refused(
        &quiet(
            1,
            &alice,
            &["router", "set", "--external-gateway", "alice-net", "r1"],
        ),
        400,
        "is not an external network",
    );
    assert!(
        quiet(
            1,
            &alice,
            &["router", "set", "--external-gateway", "public", "r1"]
        )
        .ok
    );
    let shown = run(2, &alice, &["router", "show", "r1"]).json();
    let gw = &shown["external_gateway_info"];
    assert_eq!(gw["network_id"], public["id"], "{shown}");
    assert_eq!(gw["enable_snat"], true);
    let gw_ip = text(&gw["external_fixed_ips"][0]["ip_address"]).to_owned();
    assert!(gw_ip.starts_with("203.0.113."), "{gw_ip}");

    // An interface on alice's subnet takes the subnet's gateway address.
    assert!(quiet(0, &alice, &["router", "add", "subnet", "r1", "a4"]).ok);
    let ports = run(1, &alice, &["port", "list", "--router", "r1", "--long"]).json();
    let iface = ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["Device Owner"] == "network:router_interface")
        .unwrap_or_else(|| panic!("no interface port in {ports}"))
        .clone();
    assert!(
        iface["Fixed IP Addresses"].to_string().contains("10.1.0.1"),
        "{iface}"
    );
    let iface_id = text(&iface["ID"]).to_owned();
    refused(
        &quiet(2, &alice, &["router", "add", "subnet", "r1", "a4"]),
        400,
        "already has a port on subnet",
    );

    // Extra routes: a nexthop on a connected subnet, not elsewhere.
    assert!(
        quiet(
            0,
            &alice,
            &[
                "router",
                "set",
                "--route",
                "destination=10.9.0.0/24,gateway=10.1.0.5",
                "r1"
            ]
        )
        .ok
    );
    assert_eq!(
        run(1, &alice, &["router", "show", "r1"]).json()["routes"],
        json!([{"destination": "10.9.0.0/24", "nexthop": "10.1.0.5"}])
    );
    refused(
        &quiet(
            2,
            &alice,
            &[
                "router",
                "set",
                "--route",
                "destination=10.8.0.0/24,gateway=192.0.2.1",
                "r1",
            ],
        ),
        400,
        "not connected with router",
    );
    assert!(
        quiet(
            0,
            &alice,
            &[
                "router",
                "unset",
                "--route",
                "destination=10.9.0.0/24,gateway=10.1.0.5",
                "r1"
            ]
        )
        .ok
    );

    // A floating IP, then its association with a port behind the router.
    let vm = run(
        1,
        &alice,
        &["port", "create", "--network", "alice-net", "vm"],
    )
    .json();
    let vm_ip = text(&vm["fixed_ips"][0]["ip_address"]).to_owned();
    let fip = run(2, &alice, &["floating", "ip", "create", "public"]).json();
    let fip_id = text(&fip["id"]).to_owned();
    let address = text(&fip["floating_ip_address"]).to_owned();
    assert!(
        address.starts_with("203.0.113.") && address != gw_ip,
        "{fip}"
    );
    assert!(fip["port_id"].is_null());
    refused(
        &quiet(0, &alice, &["floating", "ip", "create", "alice-net"]),
        400,
        "is not a valid external network",
    );
    assert!(
        quiet(
            0,
            &alice,
            &["floating", "ip", "set", "--port", "vm", &fip_id]
        )
        .ok
    );
    let shown = run(1, &alice, &["floating", "ip", "show", &fip_id]).json();
    assert_eq!(shown["port_id"], vm["id"], "{shown}");
    assert_eq!(shown["fixed_ip_address"], vm_ip.as_str());
    assert_eq!(shown["router_id"], r1_id.as_str());
    assert_eq!(shown["floating_network_id"], public["id"]);

    // What is in use stays.
    refused(&quiet(2, &alice, &["subnet", "delete", "a4"]), 409, "");
    refused(&quiet(0, &alice, &["router", "delete", "r1"]), 409, "");
    refused(
        &quiet(1, &c_admin(), &["port", "delete", &iface_id]),
        409,
        "",
    );
    refused(
        &quiet(2, &alice, &["router", "remove", "subnet", "r1", "a4"]),
        409,
        "",
    );
    refused(
        &quiet(0, &alice, &["router", "unset", "--external-gateway", "r1"]),
        409,
        "",
    );
    let token = c.token(0);
    let (status, body) = c.api(
        1,
        "DELETE",
        &format!("/network/v2.0/routers/{r1_id}"),
        &token,
        None,
    );
    assert_eq!(status, 409);
    assert_eq!(body["NeutronError"]["type"], "RouterInUse", "{body}");
    let (status, body) = c.api(
        2,
        "DELETE",
        &format!("/network/v2.0/ports/{iface_id}"),
        &token,
        None,
    );
    assert_eq!(status, 409);
    assert_eq!(body["NeutronError"]["type"], "ServicePortInUse", "{body}");

    // Another project sees none of it; an admin sees all, with `distributed` and `ha`.
    let out = quiet(1, &bob, &["router", "show", &r1_id]);
    assert!(
        !out.ok && out.stderr.contains("No Router found"),
        "{}",
        out.stderr
    );
    assert!(!quiet(0, &bob, &["floating", "ip", "show", &fip_id]).ok);
    let lists: [(usize, &[&str]); 2] = [(2, &["router", "list"]), (1, &["floating", "ip", "list"])];
    for (node, what) in lists {
        let list = run(node, &bob, what).json();
        assert_eq!(list, json!([]), "{what:?}");
    }
    let all = osc.json(2, &["router", "list", "--long"]);
    assert_eq!(names(&all, "Name"), ["r1"]);
    let admin_view = osc.json(0, &["router", "show", &r1_id]);
    assert_eq!(admin_view["distributed"], false, "{admin_view}");
    assert_eq!(admin_view["ha"], false);

    // Disassociated, the interface and the gateway may go.
    assert!(quiet(1, &alice, &["floating", "ip", "unset", "--port", &fip_id]).ok);
    let shown = run(2, &alice, &["floating", "ip", "show", &fip_id]).json();
    assert!(
        shown["port_id"].is_null() && shown["router_id"].is_null(),
        "{shown}"
    );
    assert!(quiet(0, &alice, &["router", "remove", "subnet", "r1", "a4"]).ok);
    // Without the interface the port is unreachable from the external network.
    refused(
        &quiet(
            1,
            &alice,
            &["floating", "ip", "set", "--port", "vm", &fip_id],
        ),
        404,
        "is not reachable from subnet",
    );
    assert!(quiet(2, &alice, &["router", "unset", "--external-gateway", "r1"]).ok);
    assert!(run(0, &alice, &["router", "show", "r1"]).json()["external_gateway_info"].is_null());
    let gateway_ports = osc.json(
        1,
        &["port", "list", "--device-owner", "network:router_gateway"],
    );
    assert!(
        gateway_ports.as_array().unwrap().is_empty(),
        "{gateway_ports}"
    );

    // A deleted floating IP's address goes back to the pool: an admin may name it again.
    assert!(quiet(2, &alice, &["floating", "ip", "delete", &fip_id]).ok);
    let again = osc.json(
        0,
        &[
            "floating",
            "ip",
            "create",
            "--floating-ip-address",
            &address,
            "public",
        ],
    );
    assert_eq!(again["floating_ip_address"], address.as_str());
    refused(
        &quiet(
            1,
            &alice,
            &[
                "floating",
                "ip",
                "create",
                "--floating-ip-address",
                &address,
                "public",
            ],
        ),
        403,
        "",
    );

    // Quotas: one router and one floating IP for red.
    assert!(
        osc.run(
            2,
            &[
                "quota",
                "set",
                "--routers",
                "1",
                "--floating-ips",
                "1",
                "red"
            ]
        )
        .ok
    );
    refused(
        &quiet(0, &alice, &["router", "create", "r2"]),
        409,
        "Quota exceeded for resources: ['router']",
    );
    run(1, &alice, &["floating", "ip", "create", "public"]).json();
    refused(
        &quiet(2, &alice, &["floating", "ip", "create", "public"]),
        409,
        "Quota exceeded for resources: ['floatingip']",
    );
    // What the client's `quota show --usage` reads.
    let (status, d) = c.api(
        0,
        "GET",
        &format!("/network/v2.0/quotas/{red_id}/details.json"),
        &token,
        None,
    );
    assert_eq!(status, 200, "{d}");
    assert_eq!(
        d["quota"]["router"],
        json!({"limit": 1, "used": 1, "reserved": 0})
    );
    assert_eq!(d["quota"]["floatingip"]["used"], 1, "{d}");

    assert!(quiet(1, &alice, &["router", "delete", "r1"]).ok);
    assert!(!quiet(2, &alice, &["router", "show", "r1"]).ok);

    // An external network goes with its unassociated floating IPs, as in Neutron.
    osc.json(0, &["network", "create", "--external", "spare"]);
    osc.json(
        1,
        &[
            "subnet",
            "create",
            "--network",
            "spare",
            "--subnet-range",
            "198.51.100.0/24",
            "spare-v4",
        ],
    );
    let spare_fip = osc.json(2, &["floating", "ip", "create", "spare"]);
    assert!(osc.run(0, &["network", "delete", "spare"]).ok);
    assert!(
        !osc.run(1, &["floating", "ip", "show", text(&spare_fip["id"])])
            .ok
    );
}

/// Admin credentials: the cluster's own (nothing to override).
fn c_admin() -> [(&'static str, &'static str); 0] {
    []
}
