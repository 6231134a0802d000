//! Cluster formation through `init` and `join`, and the client surface scripts rely on.

mod common;

use std::time::Duration;

use common::{wait_until, Cluster};

/// Three nodes formed by init + join agree on one leader and two voters, all healthy, and
/// `status --json` carries the fields scripts depend on. A write sent to a follower is read
/// back linearizably through a third node, and `kv get` prints the value alone.
#[test]
fn three_nodes_form_a_cluster_and_serve_linearizable_reads_anywhere() {
    let mut c = Cluster::start(3, &[]);
    let status = c.wait_healthy(3);
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    let roles: Vec<&str> = members
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "leader").count(),
        1,
        "{status}"
    );
    assert_eq!(
        roles.iter().filter(|r| **r == "voter").count(),
        2,
        "{status}"
    );
    for m in members {
        for field in ["name", "role", "api", "applied_index", "healthy"] {
            assert!(!m[field].is_null(), "member lacks {field}: {m}");
        }
    }
    assert!(status["term"].as_u64().unwrap() >= 1);

    // Every node names the same leader.
    let leader = status["leader"].as_str().unwrap().to_owned();
    for i in 0..3 {
        let s = c.status(i).unwrap();
        assert_eq!(s["leader"], leader.as_str());
    }

    // Through the CLI: status --json as scripts parse it.
    let (ok, out, err) = c.cli(1, &["status", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["leader"], leader.as_str());

    // A write through a follower, read linearizably through another node.
    let li = c.leader_index();
    let follower = (0..3).find(|i| *i != li).unwrap();
    let other = (0..3).find(|i| *i != li && *i != follower).unwrap();
    let (ok, _, err) = c.cli(follower, &["kv", "put", "greeting", "hello shoal"]);
    assert!(ok, "{err}");
    let (ok, out, err) = c.cli(other, &["kv", "get", "greeting"]);
    assert!(ok, "{err}");
    assert_eq!(out, "hello shoal\n");
    // And the HTTP API agrees, on every node.
    for i in 0..3 {
        assert_eq!(
            c.kv_get(i, "greeting", "linearizable").unwrap().as_deref(),
            Some("hello shoal")
        );
    }
    let (ok, _, err) = c.cli(other, &["kv", "get", "missing"]);
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");
}

/// The admin surface is never reachable without a credential: no token or a bad token is
/// 401, a wrong password is 401, and `token create` prints the token alone on its last line.
#[test]
fn admin_surface_needs_a_credential() {
    let c = Cluster::init(&[]);
    let base = c.nodes[0].base();
    let r = c
        .http
        .get(format!("{base}/shoal/v1/status"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], 401);
    let r = c
        .http
        .put(format!("{base}/shoal/v1/kv/x"))
        .header("X-Auth-Token", "shoal.forged")
        .body("v")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    let mut env = c.openrc_env(0);
    env.retain(|(k, _)| k != "OS_PASSWORD");
    env.push(("OS_PASSWORD".into(), "wrong".into()));
    let out = std::process::Command::new(common::SHOAL)
        .args(["status"])
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    let (ok, out, err) = c.cli(0, &["token", "create"]);
    assert!(ok, "{err}");
    let last = out.lines().last().unwrap();
    assert!(last.starts_with("shoal1.") && !last.contains(' '), "{out}");

    // Malformed JSON is a 400 that says what was wrong.
    let r = c
        .http
        .post(format!("{base}/identity/v3/auth/tokens"))
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid"));

    // The metrics endpoint answers in Prometheus text.
    let text = wait_until("metrics", Duration::from_secs(10), || {
        c.http
            .get(format!("{base}/metrics"))
            .send()
            .ok()?
            .text()
            .ok()
    });
    assert!(text.contains("shoal_raft_term"), "{text}");
    assert!(
        text.contains("shoal_raft_role{role=\"leader\"} 1"),
        "{text}"
    );
}
