//! Joins that must be refused: forged, expired, revoked and foreign tokens.

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
