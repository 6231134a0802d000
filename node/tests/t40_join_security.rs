//! Joins that must be refused: forged, expired, revoked, foreign and spent tokens.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{free_tcp, free_udp, Cluster, SHOAL};

/// Runs `shoal join` with `token` against node1 and returns (success, stderr).
fn try_join(c: &Cluster, name: &str, token: &str) -> (bool, String) {
    let dir = c.tmp.path().join(name);
    let out = Command::new(SHOAL)
        .args([
            "join",
            "--data-dir",
            &dir.display().to_string(),
            "--name",
            name,
            "--listen",
            &free_udp().to_string(),
            "--api",
            &free_tcp().to_string(),
            "--token",
            token,
            &c.nodes[0].listen.to_string(),
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn member_count(c: &Cluster) -> usize {
    c.status(0).unwrap()["members"].as_array().unwrap().len()
}

/// A node with a forged secret, an expired token, a revoked token, or a token naming another
/// cluster's CA is refused, and the cluster's membership is unchanged.
#[test]
fn bad_tokens_are_refused() {
    let c = Cluster::init(&[]);
    let good = c.create_join_token(0, 3600);

    // Forged: right id and fingerprint, wrong secret.
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!("{}.{}.{}.{}", parts[0], parts[1], "ab".repeat(32), parts[3]);
    let (ok, err) = try_join(&c, "forged", &forged);
    assert!(!ok);
    assert!(err.contains("secret does not match"), "{err}");

    // Expired.
    let short = c.create_join_token(0, 1);
    std::thread::sleep(Duration::from_secs(2));
    let (ok, err) = try_join(&c, "expired", &short);
    assert!(!ok);
    assert!(err.contains("expired"), "{err}");

    // Revoked.
    let revoked = c.create_join_token(0, 3600);
    let id = revoked.split('.').nth(1).unwrap();
    let (ok, _, err) = c.cli(0, &["token", "revoke", id]);
    assert!(ok, "{err}");
    let (ok, err) = try_join(&c, "revoked", &revoked);
    assert!(!ok);
    assert!(err.contains("unknown or was revoked"), "{err}");

    // Another cluster's token: the joiner refuses this cluster's certificate.
    let other = Cluster::init(&[]);
    let foreign = other.create_join_token(0, 3600);
    let (ok, err) = try_join(&c, "foreign", &foreign);
    assert!(!ok);
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("fingerprint"),
        "{err}"
    );

    // Malformed token: refused locally with the expected format in the message.
    let (ok, err) = try_join(&c, "garbage", "not-a-token");
    assert!(!ok);
    assert!(
        err.contains("shoal1.<id>.<secret>.<ca-fingerprint>"),
        "{err}"
    );

    assert_eq!(member_count(&c), 1);
}

/// A token is spent by its first join: a second node presenting it is refused and told which
/// node used it, and `token list` records that node. A token made with `--uses 2` admits two
/// nodes and then no more. A token given with `--token` works but warns that it is visible.
#[test]
fn a_token_admits_as_many_nodes_as_its_uses() {
    let mut c = Cluster::init(&[]);
    let once = c.create_join_token(0, 3600);
    let first = c.spawn_join(&once, &[]);
    common::wait_until("node2 to serve", Duration::from_secs(60), || {
        c.try_token(first).ok()
    });
    let (ok, err) = try_join(&c, "rogue", &once);
    assert!(!ok, "a spent token admitted a second node");
    assert!(err.contains("already used by node2"), "{err}");
    assert!(err.contains("warning: --token"), "{err}");

    let (ok, out, err) = c.cli(0, &["token", "list", "--json"]);
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = once.split('.').nth(1).unwrap();
    let rec = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(rec["uses"], 1);
    assert_eq!(rec["used_by"][0]["node"], "node2", "{rec}");

    let (ok, out, err) = c.cli(0, &["token", "create", "--uses", "2"]);
    assert!(ok, "{err}");
    let twice = out.lines().last().unwrap().trim().to_owned();
    for _ in 0..2 {
        let i = c.spawn_join(&twice, &[]);
        common::wait_until("a node to serve", Duration::from_secs(60), || {
            c.try_token(i).ok()
        });
    }
    let (ok, err) = try_join(&c, "fourth", &twice);
    assert!(!ok);
    assert!(err.contains("already used by node3, node4"), "{err}");
    assert_eq!(member_count(&c), 4);
}
