//! A node cut off from the cluster never refuses a valid token because its key ring is behind:
//! it cannot know whether the cluster committed a key it has not seen, so it answers 503 (ask
//! again, or ask another node), and a 401 for an unknown key comes only from a node that caught
//! up with the cluster first.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::nft::Firewall;
use common::{wait_until, Cluster};
use serde_json::Value;

/// The signing key id a token names (its payload is base64url JSON before the dot).
fn kid(token: &str) -> String {
    let payload = token.split_once('.').unwrap().0;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["kid"].as_str().unwrap().to_owned()
}

/// `token` with its key id replaced (its signature then matches nothing).
fn with_kid(token: &str, kid: &str) -> String {
    let (payload, sig) = token.split_once('.').unwrap();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["kid"] = Value::from(kid);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    format!("{payload}.{sig}")
}

/// Keys rotate every 10 s and node3 is cut off from the other two: once node1 signs with a key
/// node3 has never seen, that token through node3 is answered 503 with the reason, not 401;
/// after the partition heals node3 accepts it. A token naming a key no one has is still a 401
/// through a node that can reach the cluster.
#[test]
fn a_cut_off_node_answers_503_not_401_for_a_key_it_has_not_seen() {
    let Some(fw) = Firewall::new("t73") else {
        return;
    };
    let c = Cluster::start(3, &["--key-rotation-secs", "10", "--token-ttl-secs", "600"]);
    let before = c.token(0);
    let old_kid = kid(&before);
    let ports: Vec<u16> = c.nodes.iter().map(|n| n.listen.port()).collect();
    fw.partition(&[ports[2]], &[ports[0], ports[1]]);

    let fresh = wait_until(
        "node1 to sign with a key node3 has not seen",
        Duration::from_secs(60),
        || Some(c.token(0)).filter(|t| kid(t) != old_kid),
    );
    let (status, body) = c.api(2, "GET", "/shoal/v1/kv/k?consistency=local", &fresh, None);
    assert_eq!(
        status, 503,
        "a cut-off node refused a token signed with a committed key: {body}"
    );
    let message = body.to_string();
    assert!(
        message.contains("signing key is not known here"),
        "{message}"
    );

    fw.heal();
    wait_until(
        "node3 to accept the new key after healing",
        Duration::from_secs(30),
        || {
            (c.api(2, "GET", "/shoal/v1/kv/k?consistency=local", &fresh, None)
                .0
                == 404)
                .then_some(())
        },
    );

    let forged = with_kid(&fresh, "no-such-key");
    let (status, body) = c.api(0, "GET", "/shoal/v1/kv/k?consistency=local", &forged, None);
    assert_eq!(status, 401, "{body}");
}
