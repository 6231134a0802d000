//! Token signing keys rotate in a running cluster without breaking the tokens already issued.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{wait_until, Cluster};
use serde_json::Value;

/// The signing key id a token names (its payload is base64url JSON before the dot).
fn kid(token: &str) -> String {
    let payload = token.split_once('.').unwrap().0;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["kid"].as_str().unwrap().to_owned()
}

/// The status of `GET /identity/v3/projects` at node `i` with `token`.
fn projects_status(c: &Cluster, i: usize, token: &str) -> u16 {
    c.http
        .get(format!("{}/identity/v3/projects", c.nodes[i].base()))
        .header("X-Auth-Token", token)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

/// With a 10 s rotation period the cluster replaces its signing key on its own (no node is
/// told to): a token issued before the rotation still works on another node afterwards,
/// tokens issued afterwards on every node name a new key, and they work everywhere.
#[test]
fn rotation_keeps_earlier_tokens_valid_and_signs_with_the_new_key() {
    let c = Cluster::start(3, &["--key-rotation-secs", "10", "--token-ttl-secs", "600"]);
    let before = c.token(0);
    let old_kid = kid(&before);
    assert_eq!(projects_status(&c, 2, &before), 200);

    let after = wait_until(
        "node2 to sign with a new key",
        Duration::from_secs(40),
        || Some(c.token(1)).filter(|t| kid(t) != old_kid),
    );
    assert_eq!(
        projects_status(&c, 2, &before),
        200,
        "a token signed before the rotation is refused after it"
    );
    for i in [0, 2] {
        // The new key reaches each node through its watch, within moments.
        let t = wait_until(
            &format!("node{} to sign with a new key", i + 1),
            Duration::from_secs(5),
            || Some(c.token(i)).filter(|t| kid(t) != old_kid),
        );
        assert_eq!(projects_status(&c, (i + 1) % 3, &t), 200);
    }
    assert_eq!(projects_status(&c, 0, &after), 200);
}

/// A node that just restarted answers before its key ring has loaded from its replica; a
/// valid token sent to it at that moment is checked against the keys the cluster committed
/// (a read barrier, then the keys), never refused as "signed with an unknown key".
#[test]
fn a_restarted_node_never_refuses_a_valid_token() {
    let mut c = Cluster::start(3, &[]);
    let token = c.token(0);
    for round in 0..3 {
        c.nodes[2].kill9();
        c.restart(2);
        // The first answer the restarted node gives to this token must be a success.
        let status = wait_until("node3 to answer", Duration::from_secs(60), || {
            c.http
                .get(format!("{}/identity/v3/projects", c.nodes[2].base()))
                .header("X-Auth-Token", &token)
                .send()
                .ok()
                .map(|r| r.status().as_u16())
        });
        assert_eq!(
            status, 200,
            "round {round}: a valid token was refused after a restart"
        );
        assert_eq!(projects_status(&c, 2, &token), 200);
    }
}
