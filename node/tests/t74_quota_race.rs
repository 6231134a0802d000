//! Quota checks hold under concurrency: creates sent at once to different nodes cannot all
//! pass a check that each would pass alone.

mod common;

use common::Cluster;
use serde_json::{json, Value};

const QUOTA: usize = 3;
const ATTEMPTS: usize = 12;

const PUBKEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f t@h";

/// The id of the project named `name`.
fn project_id(c: &Cluster, token: &str, name: &str) -> String {
    let v: Value = c
        .http
        .get(format!("{}/identity/v3/projects", c.nodes[0].base()))
        .header("X-Auth-Token", token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    v["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Sends `ATTEMPTS` creates at once, spread over the nodes; returns their statuses.
fn race(c: &Cluster, tokens: &[String], path: &str, body: impl Fn(usize) -> Value) -> Vec<u16> {
    let barrier = std::sync::Barrier::new(ATTEMPTS);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..ATTEMPTS)
            .map(|i| {
                let node = i % c.nodes.len();
                let (barrier, body) = (&barrier, body(i));
                s.spawn(move || {
                    let req = c
                        .http
                        .post(format!("{}{path}", c.nodes[node].base()))
                        .header("X-Auth-Token", &tokens[node])
                        .json(&body);
                    barrier.wait();
                    req.send().unwrap().status().as_u16()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Count of each status in `statuses`.
fn tally(statuses: &[u16]) -> (usize, usize) {
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let over = statuses.iter().filter(|s| **s == 403).count();
    assert_eq!(
        ok + over,
        statuses.len(),
        "unexpected statuses: {statuses:?}"
    );
    (ok, over)
}

/// With quotas of 3 key pairs and 3 server groups, 12 creates of each sent at once through
/// three nodes: exactly 3 succeed and the rest get Nova's 403 quota answer, and exactly 3
/// exist afterwards.
#[test]
fn concurrent_creates_never_exceed_the_quota() {
    let c = Cluster::start(3, &[]);
    let tokens: Vec<String> = (0..3).map(|i| c.token(i)).collect();
    let project = project_id(&c, &tokens[0], "admin");
    let set = c
        .http
        .put(format!(
            "{}/compute/v2.1/os-quota-sets/{project}",
            c.nodes[1].base()
        ))
        .header("X-Auth-Token", &tokens[1])
        .json(&json!({"quota_set": {"key_pairs": QUOTA, "server_groups": QUOTA}}))
        .send()
        .unwrap();
    assert_eq!(set.status().as_u16(), 200);

    let statuses = race(
        &c,
        &tokens,
        "/compute/v2.1/os-keypairs",
        |i| json!({"keypair": {"name": format!("k{i}"), "public_key": PUBKEY}}),
    );
    assert_eq!(tally(&statuses), (QUOTA, ATTEMPTS - QUOTA), "{statuses:?}");
    let list: Value = c
        .http
        .get(format!("{}/compute/v2.1/os-keypairs", c.nodes[2].base()))
        .header("X-Auth-Token", &tokens[2])
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(list["keypairs"].as_array().unwrap().len(), QUOTA, "{list}");

    let statuses = race(
        &c,
        &tokens,
        "/compute/v2.1/os-server-groups",
        |i| json!({"server_group": {"name": format!("g{i}"), "policies": ["affinity"]}}),
    );
    assert_eq!(tally(&statuses), (QUOTA, ATTEMPTS - QUOTA), "{statuses:?}");
    let list: Value = c
        .http
        .get(format!(
            "{}/compute/v2.1/os-server-groups",
            c.nodes[0].base()
        ))
        .header("X-Auth-Token", &tokens[0])
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        list["server_groups"].as_array().unwrap().len(),
        QUOTA,
        "{list}"
    );
}
