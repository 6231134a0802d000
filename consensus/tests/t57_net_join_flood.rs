//! A stranger on the peer port cannot exhaust a node: on the join ALPN, the only one open to
//! clients without a certificate, frames are capped before they are read, streams and the
//! receive window are small, connections come out of their own budget with a share per
//! source address, and members keep connecting whatever strangers hold.

#[path = "t50_net_fixture/mod.rs"]
mod fixture;

use std::sync::Arc;
use std::time::Duration;

use fixture::{ca, member_client, start_server, JOIN_SECRET};
use shoal_consensus::net::client::client_endpoint;
use shoal_consensus::net::tls::join_client_config;
use shoal_consensus::net::{JoinRequest, NetOptions, NodeKey, PeerClient};

/// What the attacker pushes on every stream (shared, so the attacker's own memory stays out
/// of the measurement).
static JUNK: [u8; 1 << 20] = [0; 1 << 20];

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

/// Opens join connections from `bind` and, on each, as many streams as the server allows,
/// each announcing a 15 MiB frame and pushing what the flow control lets through. Returns the
/// connections that were accepted (kept open by the caller).
async fn flood(addr: std::net::SocketAddr, fingerprint: &str, bind: &str, conns: usize) -> usize {
    let mut endpoint = client_endpoint(bind.parse().unwrap()).unwrap();
    let tls = join_client_config(fingerprint).unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let endpoint = endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(Ok(conn)) = tokio::time::timeout(
                Duration::from_secs(5),
                endpoint.connect(addr, "shoal").unwrap(),
            )
            .await
            else {
                return false;
            };
            let mut streams = Vec::new();
            for _ in 0..128 {
                let Ok(Ok((mut send, recv))) =
                    tokio::time::timeout(Duration::from_millis(200), conn.open_bi()).await
                else {
                    break;
                };
                let _ = send.write_all(&(15u32 << 20).to_be_bytes()).await;
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), send.write_all(&JUNK)).await;
                streams.push((send, recv));
            }
            // Hold everything open for a while, as an attacker would.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let alive = conn.close_reason().is_none();
            drop(streams);
            alive
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        if t.await.unwrap() {
            accepted += 1;
        }
    }
    accepted
}

/// 100 join connections from one address, each opening streams that announce 15 MiB frames and
/// push a MiB each: the node's memory stays within 200 MiB of where it started, at most the
/// per-source share of connections stays open, a member connects and gets answers meanwhile,
/// and a real joiner from another address is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_flood_neither_exhausts_the_node_nor_cuts_off_members() {
    let ca = ca();
    let server = start_server(&ca, "node-a");
    let addr = server.addr;
    let fingerprint = ca.fingerprint();
    let before = rss_mib();

    let attack = tokio::spawn({
        let fingerprint = fingerprint.clone();
        async move { flood(addr, &fingerprint, "127.0.0.1:0", 100).await }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;

    // A member connects and is served while the flood holds its connections.
    let member = member_client(&ca, "node-b");
    let status = tokio::time::timeout(Duration::from_secs(5), member.status(&addr.to_string()))
        .await
        .expect("a member got no answer during the flood")
        .unwrap();
    assert_eq!(status.name, "node-a");

    // A real joiner on another loopback address is admitted.
    let key = NodeKey::generate().unwrap();
    let req = JoinRequest {
        token_id: "t1".into(),
        secret: JOIN_SECRET.into(),
        name: "node-j".into(),
        raft_addr: "127.0.0.2:1".into(),
        api_addr: "127.0.0.2:2".into(),
        zone: "az1".into(),
        csr_pem: key.csr_pem("node-j").unwrap(),
    };
    let endpoint = client_endpoint("127.0.0.2:0".parse().unwrap()).unwrap();
    let joined = PeerClient::join(
        &endpoint,
        &addr.to_string(),
        &fingerprint,
        req,
        &NetOptions::default(),
    )
    .await;
    assert!(joined.is_ok(), "a real joiner was refused: {joined:?}");

    let peak = rss_mib();
    let accepted = attack.await.unwrap();
    assert!(
        accepted <= NetOptions::default().max_join_connections_per_source,
        "{accepted} join connections from one address stayed open"
    );
    assert!(
        peak < before + 200,
        "the node grew from {before} MiB to {peak} MiB under the flood"
    );
}
