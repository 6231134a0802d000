//! The metadata service answering real guests' requests: a one-node cluster (libvirt's test
//! hypervisor) holds a network, a subnet, ports and servers made through the API; the metadata
//! service (the binary's own module, compiled here as it is) reads them through a learner
//! replica this test joins to the cluster, and serves a "node" network namespace whose veth
//! ends are named as the ports' taps. Guests are "vm" namespaces holding the other ends with
//! the ports' MACs and addresses, and ask with busybox wget as a cloud image would.
//!
//! Root only (namespaces, veth, binding port 80): when not root the test prints why and
//! passes, unless `CI=true`, where it fails.

mod common;

#[allow(dead_code)]
#[path = "../src/metadata.rs"]
mod metadata;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::vmnet::*;
use common::{free_tcp, free_udp, wait_until, Cluster};
use serde_json::{json, Value};
use shoal_consensus::cluster::{Cluster as Replica, ClusterOptions};

/// Joins a learner replica to the cluster in this process: the metadata service reads rows
/// through it as it does through a node's own replica.
async fn learner(c: &Cluster, token: String) -> Replica {
    let opts = ClusterOptions {
        data_dir: c.tmp.path().join("metadata-learner"),
        name: "metadata-learner".into(),
        raft_addr: free_udp(),
        api_addr: free_tcp(),
        zone: "nova".into(),
        voters: 1,
        replace_after: Duration::from_secs(30),
        stabilization: Duration::from_secs(10),
        snapshot_every: 10_000,
        heartbeat_ms: 100,
        election_timeout_ms: 500,
        pre_vote: true,
    };
    let peer: SocketAddr = c.nodes[0].listen;
    Replica::join(opts, &peer.to_string(), &token)
        .await
        .expect("the learner joins")
}

/// A guest gets its own instance's documents (uuid, name, key, project, user data, EC2 ids)
/// from 169.254.169.254 through its port's device; a rename shows on the next read; a guest
/// that sends from an address its port does not hold gets a 404 and none of the data, and
/// gets its own data once it uses its own address.
#[test]
fn guests_get_their_own_metadata_and_spoofers_get_none() {
    if !is_root("the metadata test") {
        return;
    }
    let c = Cluster::init(&["--voters", "1"]);
    let token = c.token(0);
    let ids = setup(&c, &token);
    let net = created(
        &c,
        &token,
        "/network/v2.0/networks",
        json!({"network": {"name": "md-net"}}),
    )["network"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    created(
        &c,
        &token,
        "/network/v2.0/subnets",
        json!({"subnet": {"network_id": net, "cidr": "10.77.0.0/24", "ip_version": 4,
                          "dns_nameservers": ["10.77.0.53"]}}),
    );
    let p1 = port(&c, &token, &net);
    let p2 = port(&c, &token, &net);
    let vm1 = server(&c, &token, "Meta VM_1", &p1, &ids);
    let vm2 = server(&c, &token, "meta-vm-2", &p2, &ids);
    let (_, project) = api(
        &c,
        &token,
        "GET",
        &format!("/compute/v2.1/servers/{vm1}"),
        None,
    );
    let project = project["server"]["tenant_id"].as_str().unwrap().to_owned();

    let tag = std::process::id();
    let node = Netns::new(format!("md{tag}node"));
    // A strict reverse-path filter, as many distributions set: the service must cope.
    sysctl(&node, "net.ipv4.conf.all.rp_filter=1");
    sysctl(&node, "net.ipv4.conf.default.rp_filter=0");
    let tap1 = shoal_compute::domain::tap_name(&p1.id);
    let tap2 = shoal_compute::domain::tap_name(&p2.id);
    let g1 = guest(format!("md{tag}vm1"), &node, &tap1, &p1.mac, &p1.ip);
    // The second guest sends from the first one's address.
    let g2 = guest(format!("md{tag}vm2"), &node, &tap2, &p2.mac, &p1.ip);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let join_token = c.create_join_token(0, 600);
    let replica = rt.block_on(learner(&c, join_token));
    let state = shoal_state::State::new(Arc::new(replica.clone()));
    let svc = rt
        .block_on(metadata::MetadataService::start(state, Some(node.path())))
        .expect("the service starts");
    for p in [&p1, &p2] {
        rt.block_on(svc.serve(
            &shoal_compute::domain::tap_name(&p.id),
            &p.id,
            p.ip.parse::<Ipv4Addr>().unwrap(),
            &p.mac,
        ))
        .expect("serving the device");
    }
    assert_eq!(svc.devices().len(), 2);
    // Every other device keeps the filtering `all` gave it; the served taps take none.
    for (key, want) in [
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "1"),
        ("net.ipv4.conf.lo.rp_filter", "1"),
    ] {
        assert_eq!(sysctl(&node, key), want, "{key}");
    }
    assert_eq!(
        sysctl(&node, &format!("net.ipv4.conf.{tap1}.rp_filter")),
        "0"
    );

    // The learner catches up with the rows within a moment.
    let md = wait_until("vm1's meta_data.json", Duration::from_secs(30), || {
        wget(&g1, "/openstack/latest/meta_data.json")
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    });
    assert_eq!(md["uuid"], vm1.as_str(), "{md}");
    assert_eq!(md["name"], "Meta VM_1");
    assert_eq!(md["hostname"], "meta-vm-1.novalocal");
    assert_eq!(md["public_keys"], json!({"mdkey": KEY}));
    assert_eq!(md["keys"][0]["data"], KEY);
    assert_eq!(md["project_id"], project.as_str());
    assert_eq!(md["availability_zone"], "nova");
    assert_eq!(md["launch_index"], 0);
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(md["random_seed"].as_str().unwrap())
            .unwrap()
            .len(),
        512
    );
    assert_eq!(wget(&g1, "/openstack/latest/user_data").unwrap(), USER_DATA);
    assert_eq!(wget(&g1, "/latest/user-data").unwrap(), USER_DATA);
    let nd = wget_json(&g1, "/openstack/latest/network_data.json");
    assert_eq!(nd["links"][0]["id"], tap1.as_str(), "{nd}");
    assert_eq!(nd["links"][0]["ethernet_mac_address"], p1.mac.as_str());
    assert_eq!(nd["links"][0]["mtu"], 1450);
    assert_eq!(nd["networks"][0]["ip_address"], p1.ip.as_str());
    assert_eq!(nd["networks"][0]["netmask"], "255.255.255.0");
    assert_eq!(nd["networks"][0]["network_id"], net.as_str());
    assert_eq!(nd["networks"][0]["routes"][0]["gateway"], "10.77.0.1");
    assert_eq!(
        nd["services"],
        json!([{"type": "dns", "address": "10.77.0.53"}])
    );
    assert_eq!(
        wget_json(&g1, "/openstack/latest/vendor_data2.json"),
        json!({})
    );
    assert!(wget_text(&g1, "/openstack").ends_with("2020-10-14\nlatest"));

    // EC2's tree.
    let instance_id = wget_text(&g1, "/latest/meta-data/instance-id");
    assert!(
        instance_id.starts_with("i-") && instance_id.len() == 10,
        "{instance_id}"
    );
    assert_eq!(wget_text(&g1, "/latest/meta-data/local-ipv4"), p1.ip);
    assert_eq!(wget_text(&g1, "/latest/meta-data/instance-type"), "m1.md");
    assert_eq!(wget_text(&g1, "/latest/meta-data/public-keys/"), "0=mdkey");
    assert_eq!(
        wget_text(&g1, "/latest/meta-data/public-keys/0/openssh-key"),
        KEY
    );
    assert_eq!(
        wget_text(&g1, "/latest/meta-data/placement/availability-zone"),
        "nova"
    );

    // Unknown paths are Nova's 404.
    let e = wget(&g1, "/openstack/latest/nope").unwrap_err();
    assert!(e.contains("404"), "{e}");

    // A rename shows on the next read.
    let (status, _) = api(
        &c,
        &token,
        "PUT",
        &format!("/compute/v2.1/servers/{vm1}"),
        Some(json!({"server": {"name": "renamed"}})),
    );
    assert_eq!(status, 200);
    wait_until("the new name", Duration::from_secs(30), || {
        (wget_json(&g1, "/openstack/latest/meta_data.json")["name"] == "renamed").then_some(())
    });

    // The second guest claims the first one's address: nothing, not even its own data.
    for path in [
        "/openstack/latest/meta_data.json",
        "/openstack/latest/user_data",
        "/latest/meta-data/instance-id",
    ] {
        match wget(&g2, path) {
            Ok(body) => panic!("{path} answered: {}", String::from_utf8_lossy(&body)),
            Err(e) => assert!(e.contains("404"), "{path}: {e}"),
        }
    }
    // With its own address it gets its own instance.
    readdress(&g2, &p2.ip);
    let md2 = wget_json(&g2, "/openstack/latest/meta_data.json");
    assert_eq!(md2["uuid"], vm2.as_str(), "{md2}");
    assert_ne!(md2["uuid"], md["uuid"]);

    // Stopped: the guest's requests find no listener.
    rt.block_on(svc.stop_serving(&tap2));
    assert_eq!(svc.devices(), vec![tap1.clone()]);
    assert!(wget(&g2, "/openstack/latest/meta_data.json").is_err());
    rt.block_on(svc.shutdown());
    rt.block_on(replica.shutdown());
    drop((g1, g2, node));
}
