//! Voters and learners: joins beyond the voter count, replacement of a dead voter, removal.

mod common;

use std::time::Duration;

use common::{wait_until, Cluster};
use serde_json::Value;
use shoal_consensus::net::client::client_endpoint;
use shoal_consensus::net::{codes, NetError, NetOptions, NodeIdentity, PeerClient};

/// A `status` RPC to `addr` presenting the certificate and key in `dir`'s `tls/` (a node's own
/// files, as a removed machine still has them).
fn status_with_cert_of(dir: &std::path::Path, addr: &str) -> Result<String, NetError> {
    let read = |f: &str| std::fs::read_to_string(dir.join("tls").join(f)).unwrap();
    let identity = NodeIdentity {
        cert_chain_pem: read("node.pem"),
        key_pem: read("node.key"),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = PeerClient::new(
            client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(),
            &read("ca.pem"),
            &identity,
            NetOptions::default(),
            None,
        )
        .unwrap();
        client.status(addr).await.map(|s| s.name)
    })
}

fn role_of<'a>(status: &'a Value, name: &str) -> Option<&'a str> {
    status["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)?["role"]
        .as_str()
}

/// A 4th and 5th node join as learners while three voters are kept; a voter killed for longer
/// than the replacement time is replaced by a learner; `node remove` takes a node out.
#[test]
fn learners_join_dead_voter_is_replaced_and_nodes_can_be_removed() {
    let mut c = Cluster::start(
        3,
        &["--replace-after-secs", "3", "--stabilization-secs", "1"],
    );
    c.join_new();
    c.join_new();
    let status = c.wait_healthy(5);
    assert_eq!(role_of(&status, "node4"), Some("learner"), "{status}");
    assert_eq!(role_of(&status, "node5"), Some("learner"), "{status}");
    let voters = |s: &Value| {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "leader" || m["role"] == "voter")
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(voters(&status).len(), 3, "{status}");

    // A learner serves reads and writes too.
    c.kv_put(4, "from-learner", "yes").unwrap();
    assert_eq!(
        c.kv_get(3, "from-learner", "linearizable")
            .unwrap()
            .as_deref(),
        Some("yes")
    );

    // Kill a voter that is not the leader; a learner takes its place.
    let leader = c.leader_index();
    let victim = (0..3).find(|i| *i != leader).unwrap();
    let victim_name = c.nodes[victim].name.clone();
    c.nodes[victim].kill9();
    let status = wait_until(
        "the dead voter to be replaced",
        Duration::from_secs(60),
        || {
            let s = c.status(leader)?;
            let v = voters(&s);
            (v.len() == 3 && !v.contains(&victim_name)).then_some(s)
        },
    );
    assert!(
        voters(&status).iter().any(|n| n == "node4" || n == "node5"),
        "a learner was promoted: {status}"
    );
    // Writes still work with the new voter set.
    c.kv_put(leader, "after-replacement", "ok").unwrap();

    // The dead node's certificate still opens a peer connection...
    common::install_crypto();
    let leader_addr = c.nodes[leader].listen.to_string();
    let victim_dir = c.nodes[victim].dir.clone();
    status_with_cert_of(&victim_dir, &leader_addr).expect("a member's certificate is accepted");
    // ...until the node is removed for good: then its certificate is revoked everywhere.
    let (ok, _, err) = c.cli(leader, &["node", "remove", &victim_name]);
    assert!(ok, "{err}");
    wait_until("the removed node to leave", Duration::from_secs(30), || {
        let s = c.status(leader)?;
        role_of(&s, &victim_name).is_none().then_some(())
    });
    for (i, node) in c.nodes.iter().enumerate() {
        if i == victim {
            continue;
        }
        let addr = node.listen.to_string();
        wait_until(
            "the removed node's certificate to be refused",
            Duration::from_secs(10),
            || match status_with_cert_of(&victim_dir, &addr) {
                Err(NetError::Connection(_, quinn::ConnectionError::ApplicationClosed(close)))
                    if close.error_code == codes::REVOKED =>
                {
                    Some(())
                }
                _ => None,
            },
        );
    }
    let (ok, _, err) = c.cli(leader, &["node", "remove", "no-such-node"]);
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");
}

/// The voter count set at `init` is the cluster's: after the leader from `init` dies, a joined
/// node that was started without `--voters` (its own default is 3) leads and keeps all five
/// voters instead of demoting two.
#[test]
fn a_joined_leader_keeps_the_voter_count_set_at_init() {
    let timing = ["--replace-after-secs", "600", "--stabilization-secs", "1"];
    let mut init_args = vec!["--voters", "5"];
    init_args.extend(timing);
    let mut c = Cluster::init(&init_args);
    // Joiners get the timing flags only.
    c.extra_args = timing.iter().map(|s| s.to_string()).collect();
    for _ in 0..4 {
        c.join_new();
    }
    let voters = |s: &Value| -> Vec<String> {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "leader" || m["role"] == "voter")
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect()
    };
    wait_until("five voters", Duration::from_secs(60), || {
        c.status(0).filter(|s| voters(s).len() == 5)
    });

    // Make a joiner lead: stop node1 (and whichever node leads, if not node1).
    let leader = c.leader_index();
    c.nodes[0].kill9();
    if leader != 0 {
        c.nodes[leader].kill9();
    }
    let asker = (1..5).find(|i| *i != leader).unwrap();
    let new_leader = wait_until("a joined node to lead", Duration::from_secs(30), || {
        let s = c.status(asker)?;
        let l = s["leader"].as_str()?.to_owned();
        (l != "node1" && Some(l.as_str()) != Some(c.nodes[leader].name.as_str())).then_some(l)
    });
    // Several planning rounds (every 0.5 s, one quorum change per second) with a joined leader.
    std::thread::sleep(Duration::from_secs(6));
    let status = c.status(asker).unwrap();
    assert_eq!(
        voters(&status).len(),
        5,
        "{new_leader} changed the voter set planned at init: {status}"
    );
    // And the cluster writes with its two dead voters.
    c.kv_put(asker, "five-voters", "kept").unwrap();
}
