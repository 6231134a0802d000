//! A forwarded write is classified by what it provably did: never delivered (safe to re-send),
//! refused by a non-leader, or sent with its fate unknown. `Cluster::write` relies on this to
//! decide between re-sending at once and reporting "commit status unknown".

#[path = "t50_net_fixture/mod.rs"]
mod fixture;

use std::time::{Duration, Instant};

use fixture::{ca, member_client, start_server};
use shoal_consensus::net::{ForwardError, NetError, PeerClient};
use shoal_types::{Command, KeyedTxn, Txn};

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

/// Many writes forwarded at once travel in shared batches (fewer RPCs than writes), and each
/// caller gets the answer to its own write; the leader saw every write exactly once.
#[tokio::test]
async fn concurrent_writes_share_batches_and_each_gets_its_answer() {
    use std::sync::{Arc, Mutex};
    let ca = ca();
    let server = start_server(&ca, "leader");
    let rpcs: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let seen = rpcs.clone();
    let client = PeerClient::new(
        shoal_consensus::net::client::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(),
        ca.cert_pem(),
        &ca.issue_node_cert("follower").unwrap(),
        shoal_consensus::net::NetOptions::default(),
        Some(Arc::new(
            move |_addr: &str, rpc: &'static str, _took, ok: bool| {
                assert!(ok, "{rpc} failed");
                seen.lock().unwrap().push(rpc);
            },
        )),
    )
    .unwrap();
    let addr = server.addr.to_string();
    let writes = (0..200).map(|i| {
        let client = client.clone();
        let addr = addr.clone();
        async move {
            client
                .forward_write(
                    &addr,
                    Command::Keyed(Box::new(KeyedTxn {
                        request_id: format!("r{i}"),
                        txn: Txn::new().put("kv", &format!("k{i}"), "v"),
                    })),
                    Duration::from_secs(10),
                    futures::future::pending(),
                )
                .await
        }
    });
    let answers = futures::future::join_all(writes).await;
    assert!(answers.iter().all(|a| a.as_ref().unwrap().revision == 42));
    let calls = server.handler.calls();
    for i in 0..200 {
        let want = format!("request r{i})");
        assert_eq!(
            calls
                .iter()
                .filter(|c| c.starts_with("client_write") && c.ends_with(&want))
                .count(),
            1,
            "k{i}: {calls:?}"
        );
    }
    let rpcs = rpcs.lock().unwrap().clone();
    assert!(rpcs.contains(&"client_write_batch"), "{rpcs:?}");
    assert!(rpcs.len() < 200, "{} RPCs for 200 writes", rpcs.len());
}

/// A write whose caller gave up while it waited in the queue (behind batches the leader does
/// not answer) is reported as not sent and is never delivered.
#[tokio::test]
async fn a_write_given_up_in_the_queue_is_not_sent() {
    let ca = ca();
    let server = start_server(&ca, "leader");
    let client = member_client(&ca, "follower");
    let addr = server.addr.to_string();
    // Fill every batch slot (one write each) with a write the leader never answers.
    let mut hung = Vec::new();
    for _ in 0..2 {
        let client = client.clone();
        let addr = addr.clone();
        hung.push(tokio::spawn(async move {
            let cmd = Command::Txn(Txn::new().put("hang", "k", "v"));
            let _ = client
                .forward_write(
                    &addr,
                    cmd,
                    Duration::from_secs(5),
                    futures::future::pending(),
                )
                .await;
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    let cmd = Command::Keyed(Box::new(KeyedTxn {
        request_id: "queued-one".into(),
        txn: Txn::new().put("kv", "k", "v"),
    }));
    let err = client
        .forward_write(
            &addr,
            cmd,
            Duration::from_secs(10),
            tokio::time::sleep(Duration::from_millis(200)),
        )
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, ForwardError::NotSent(NetError::Abandoned)),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!server.handler.calls().iter().any(|c| c.contains("queued")));
    for h in hung {
        h.abort();
    }
}
