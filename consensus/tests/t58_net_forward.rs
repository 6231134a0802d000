//! A forwarded write is classified by what it provably did: never delivered (safe to re-send),
//! refused by a non-leader, or sent with its fate unknown. `Cluster::write` relies on this to
//! decide between re-sending at once and reporting "commit status unknown".

#[path = "t50_net_fixture/mod.rs"]
mod fixture;

use std::time::{Duration, Instant};

use fixture::{ca, member_client, start_server};
use shoal_consensus::net::{ForwardError, NetError, PeerClient};
use shoal_types::{Command, Txn};

/// Forwards a put to `table` at `addr`; returns the error and how long it took.
async fn forward_err(
    client: &PeerClient,
    addr: &str,
    table: &str,
    timeout: Duration,
    abandon: impl std::future::Future<Output = ()>,
) -> (ForwardError, Duration) {
    let started = Instant::now();
    let cmd = Command::Txn(Txn::new().put(table, "k", "v"));
    let err = client
        .forward_write(addr, cmd, timeout, abandon)
        .await
        .unwrap_err();
    (err, started.elapsed())
}

fn dead_addr() -> String {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.local_addr().unwrap().to_string()
}

/// A leader that answers gives its answer.
#[tokio::test]
async fn answered_write_returns_the_answer() {
    let ca = ca();
    let server = start_server(&ca, "leader");
    let client = member_client(&ca, "follower");
    let resp = client
        .forward_write(
            &server.addr.to_string(),
            Command::Txn(Txn::new().put("kv", "k", "v")),
            Duration::from_secs(5),
            futures::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(resp.revision, 42);
}

/// Nothing listens at the address: the write cannot have reached any log.
#[tokio::test]
async fn unreachable_target_is_not_sent() {
    let ca = ca();
    let client = member_client(&ca, "follower");
    let (err, _) = forward_err(
        &client,
        &dead_addr(),
        "kv",
        Duration::from_millis(300),
        futures::future::pending(),
    )
    .await;
    assert!(matches!(err, ForwardError::NotSent(_)), "{err:?}");
}

/// The caller learns of a new leader while still connecting to the old one: the write was
/// not delivered, and the call returns at that moment, not at its timeout.
#[tokio::test]
async fn abandon_before_delivery_is_not_sent() {
    let ca = ca();
    let client = member_client(&ca, "follower");
    let (err, took) = forward_err(
        &client,
        &dead_addr(),
        "kv",
        Duration::from_secs(10),
        tokio::time::sleep(Duration::from_millis(100)),
    )
    .await;
    assert!(
        matches!(err, ForwardError::NotSent(NetError::Abandoned)),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// The leader received the write and never answered (it died holding it): when the caller
/// gives up, the write's fate is unknown, and the call returns at that moment.
#[tokio::test]
async fn abandon_after_delivery_is_unknown() {
    let ca = ca();
    let server = start_server(&ca, "leader");
    let client = member_client(&ca, "follower");
    let (err, took) = forward_err(
        &client,
        &server.addr.to_string(),
        "hang",
        Duration::from_secs(10),
        tokio::time::sleep(Duration::from_millis(300)),
    )
    .await;
    assert!(
        matches!(err, ForwardError::Unknown(NetError::Abandoned)),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(server
        .handler
        .calls()
        .iter()
        .any(|c| c.starts_with("client_write")));
}
