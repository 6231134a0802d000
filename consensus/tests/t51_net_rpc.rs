//! Members with certificates from the same CA exchange Raft and app RPCs over real QUIC.

#[path = "t50_net_fixture/mod.rs"]
mod fixture;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fixture::{ca, node_info, start_server};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest};
use shoal_consensus::net::client::client_endpoint;
use shoal_consensus::net::tls::peer_node_name;
use shoal_consensus::net::{NetError, NetOptions, PeerClient, PeerError, PeerRole, QuicNetwork};
use shoal_consensus::raft_types::{Entry, EntryPayload, LeaderId, LogId, TypeConfig, Vote};
use shoal_types::{Command, Txn};

fn opt() -> RPCOption {
    RPCOption::new(Duration::from_secs(5))
}

fn entry(index: u64) -> Entry {
    Entry {
        log_id: LogId::new(<LeaderId as openraft::vote::RaftLeaderId>::new(2, 1), index),
        payload: EntryPayload::Normal(Command::Txn(Txn::new().put("kv", "k", "v"))),
    }
}

/// Two members, each serving and each calling the other: Vote and AppendEntries through
/// openraft's network trait, ClientWrite, Status and a typed ForwardToLeader error through the
/// app client. Each side sees the other's verified node name.
#[tokio::test]
async fn two_members_exchange_rpcs() {
    let ca = ca();
    let a = start_server(&ca, "node-a");
    let b = start_server(&ca, "node-b");
    let a_id = ca.issue_node_cert("node-a").unwrap();
    let b_id = ca.issue_node_cert("node-b").unwrap();
    // Each member's client shares its server's UDP socket, as a node does.
    let a_client = PeerClient::new(
        a.endpoint.clone(),
        ca.cert_pem(),
        &a_id,
        NetOptions::default(),
        None,
    )
    .unwrap();
    let b_client = PeerClient::new(
        b.endpoint.clone(),
        ca.cert_pem(),
        &b_id,
        NetOptions::default(),
        None,
    )
    .unwrap();

    for (client, target, target_id, from) in
        [(&a_client, &b, 2u64, 1u64), (&b_client, &a, 1u64, 2u64)]
    {
        let mut net = QuicNetwork::new(from, client.clone());
        let mut peer = net
            .new_client(target_id, &node_info("x", &target.addr.to_string()))
            .await;
        let vote = peer
            .vote(VoteRequest::new(Vote::new(5, from), None), opt())
            .await
            .unwrap();
        assert!(vote.vote_granted);
        assert_eq!(vote.vote, Vote::new(5, from));
        let resp = peer
            .append_entries(
                AppendEntriesRequest {
                    vote: Vote::new_committed(5, from),
                    prev_log_id: None,
                    entries: vec![entry(1), entry(2)],
                    leader_commit: None,
                },
                opt(),
            )
            .await
            .unwrap();
        assert!(matches!(resp, AppendEntriesResponse::Success));
        let pre = peer
            .pre_vote(VoteRequest::new(Vote::new(6, from), None), opt())
            .await
            .unwrap();
        assert!(
            !pre.vote_granted,
            "pre-vote must reach the handler, not openraft's default"
        );

        let target_addr = target.addr.to_string();
        let w = client
            .client_write(&target_addr, Command::Txn(Txn::new().put("kv", "a", "1")))
            .await
            .unwrap();
        assert_eq!((w.succeeded, w.revision), (true, 42));
        let status = client.status(&target_addr).await.unwrap();
        assert_eq!(status.role, PeerRole::Leader);
        assert_eq!(status.name, target.handler.name);
        match client.linearizable_read(&target_addr).await {
            Err(NetError::Remote(PeerError::ForwardToLeader {
                leader_id,
                leader_addr,
            })) => {
                assert_eq!(leader_id, Some(9));
                assert_eq!(leader_addr.as_deref(), Some("127.0.0.1:9"));
            }
            other => panic!("expected ForwardToLeader, got {other:?}"),
        }
        let conn = client.connection(&target_addr).await.unwrap();
        assert_eq!(
            peer_node_name(&conn).as_deref(),
            Some(target.handler.name.as_str())
        );

        assert_eq!(
            target.handler.calls(),
            vec![
                "vote:5".to_string(),
                "append_entries:2".into(),
                "pre_vote".into(),
                "client_write:txn(0 preconditions, 1 ops)".into(),
                "status".into(),
                "linearizable_read".into(),
            ]
        );
    }
}

/// RPCs to one peer share one cached connection, many can be in flight at once on separate
/// streams, and the latency hook sees every one of them.
#[tokio::test]
async fn concurrent_rpcs_share_one_connection() {
    let ca = ca();
    let b = start_server(&ca, "node-b");
    let seen = Arc::new(AtomicUsize::new(0));
    let hook = seen.clone();
    let client = PeerClient::new(
        client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(),
        ca.cert_pem(),
        &ca.issue_node_cert("node-a").unwrap(),
        NetOptions::default(),
        Some(Arc::new(
            move |_peer: &str, rpc: &'static str, _d: Duration, ok: bool| {
                assert_eq!(rpc, "append_entries");
                assert!(ok);
                hook.fetch_add(1, Ordering::SeqCst);
            },
        )),
    )
    .unwrap();
    let net = QuicNetwork::new(1, client.clone());
    let addr = b.addr.to_string();
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let mut net = net.clone();
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut peer = net.new_client(2, &node_info("node-b", &addr)).await;
            peer.append_entries(
                AppendEntriesRequest {
                    vote: Vote::new_committed(5, 1),
                    prev_log_id: None,
                    entries: vec![entry(i + 1)],
                    leader_commit: None,
                },
                opt(),
            )
            .await
        }));
    }
    let first = client.connection(&addr).await.unwrap().stable_id();
    for t in tasks {
        assert!(matches!(
            t.await.unwrap().unwrap(),
            AppendEntriesResponse::Success
        ));
    }
    assert_eq!(client.connection(&addr).await.unwrap().stable_id(), first);
    assert_eq!(seen.load(Ordering::SeqCst), 32);
    assert_eq!(b.handler.calls().len(), 32);
}

/// A peer that is down is reported as Unreachable (so openraft backs off), not as a network
/// error; once it is back, the client reconnects by itself.
#[tokio::test]
async fn down_peer_is_unreachable_then_reconnects() {
    let ca = ca();
    let b = start_server(&ca, "node-b");
    let addr = b.addr;
    let client = fixture::member_client_with(
        &ca,
        "node-a",
        NetOptions {
            connect_timeout: Duration::from_millis(500),
            ..NetOptions::default()
        },
    );
    let mut net = QuicNetwork::new(1, client.clone());
    let mut peer = net
        .new_client(2, &node_info("node-b", &addr.to_string()))
        .await;
    peer.vote(VoteRequest::new(Vote::new(1, 1), None), opt())
        .await
        .unwrap();
    b.shutdown().await;

    let err = peer
        .vote(VoteRequest::new(Vote::new(2, 1), None), opt())
        .await
        .unwrap_err();
    assert!(
        matches!(err, openraft::errors::RPCError::Unreachable(_)),
        "expected Unreachable, got {err:?}"
    );
    assert!(RaftNetworkV2::backoff(&peer).is_some());

    // A new server on the same port: the closed connection is replaced.
    let again = fixture::start_server_at(&ca, "node-b", addr);
    let vote = peer
        .vote(VoteRequest::new(Vote::new(3, 1), None), opt())
        .await
        .unwrap();
    assert!(vote.vote_granted);
    assert_eq!(again.handler.calls(), vec!["vote:3".to_string()]);
}

fn append(prev: Option<u64>, first: u64, n: u64) -> AppendEntriesRequest<TypeConfig> {
    AppendEntriesRequest {
        vote: Vote::new_committed(2, 1),
        prev_log_id: prev
            .map(|i| LogId::new(<LeaderId as openraft::vote::RaftLeaderId>::new(2, 1), i)),
        entries: (first..first + n).map(entry).collect(),
        leader_commit: None,
    }
}

/// openraft's `stream_append` is pipelined on one stream: 20 requests (more than the pipeline
/// depth) reach the handler in order and their acknowledgements come back in order.
#[tokio::test]
async fn stream_append_pipelines_in_order() {
    use futures::StreamExt;

    let ca = ca();
    let b = start_server(&ca, "node-b");
    let mut net = QuicNetwork::new(1, fixture::member_client(&ca, "node-a"));
    let mut peer = net
        .new_client(2, &node_info("node-b", &b.addr.to_string()))
        .await;
    let mut reqs = Vec::new();
    let mut next = 1;
    for n in 1..=20u64 {
        reqs.push(append(
            if next == 1 { None } else { Some(next - 1) },
            next,
            n,
        ));
        next += n;
    }
    let lasts: Vec<_> = reqs
        .iter()
        .map(|r| r.entries.last().unwrap().log_id)
        .collect();
    let results: Vec<_> = peer
        .stream_append(futures::stream::iter(reqs), opt())
        .await
        .unwrap()
        .collect()
        .await;
    let acked: Vec<_> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
    assert_eq!(acked, lasts.into_iter().map(Some).collect::<Vec<_>>());
    let expected: Vec<String> = (1..=20).map(|n| format!("append_entries:{n}")).collect();
    assert_eq!(b.handler.calls(), expected);
}

/// A conflict ends the pipeline: its result is the conflict, and nothing after it is
/// reported.
#[tokio::test]
async fn stream_append_stops_at_conflict() {
    use futures::StreamExt;

    let ca = ca();
    let b = start_server(&ca, "node-b");
    let mut net = QuicNetwork::new(1, fixture::member_client(&ca, "node-a"));
    let mut peer = net
        .new_client(2, &node_info("node-b", &b.addr.to_string()))
        .await;
    let reqs = vec![
        append(Some(997), 998, 2),
        append(Some(999), 1000, 1),
        append(Some(1000), 1001, 1),
    ];
    let results: Vec<_> = peer
        .stream_append(futures::stream::iter(reqs), opt())
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(results[0].as_ref().unwrap().is_ok());
    assert!(
        matches!(results[1], Ok(Err(openraft::raft::StreamAppendError::Conflict(l))) if l.index == 999),
        "{:?}",
        results[1]
    );
}

/// A UDP relay standing between a client and a server whose backend can be switched: to the
/// client, the peer's address never changes while the process behind it does.
struct Relay {
    addr: std::net::SocketAddr,
    target: Arc<std::sync::Mutex<std::net::SocketAddr>>,
    /// While set, every packet either way is dropped, as by a network partition.
    cut: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(backend: std::net::SocketAddr) -> Relay {
        Self::start_delayed(backend, Duration::ZERO).await
    }

    /// A relay that holds every packet from the server back for `delay`, so a handshake takes
    /// at least that long whatever the machine's speed.
    async fn start_delayed(backend: std::net::SocketAddr, delay: Duration) -> Relay {
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let target = Arc::new(std::sync::Mutex::new(backend));
        let client = Arc::new(std::sync::Mutex::new(None));
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (f, b, t, c) = (front.clone(), back.clone(), target.clone(), client.clone());
        let x = cut.clone();
        let up = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                if x.load(Ordering::Relaxed) {
                    continue;
                }
                *c.lock().unwrap() = Some(from);
                let to = *t.lock().unwrap();
                let _ = b.send_to(&buf[..n], to).await;
            }
        });
        let (f, b, t, c) = (front.clone(), back, target.clone(), client);
        let x = cut.clone();
        let down = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = b.recv_from(&mut buf).await {
                if x.load(Ordering::Relaxed) {
                    continue;
                }
                // Whatever the old backend still says is lost, as if it had crashed.
                if from != *t.lock().unwrap() {
                    continue;
                }
                let to = *c.lock().unwrap();
                if let Some(to) = to {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let _ = f.send_to(&buf[..n], to).await;
                }
            }
        });
        Relay {
            addr: front.local_addr().unwrap(),
            target,
            cut,
            tasks: vec![up, down],
        }
    }

    fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }

    fn switch(&self, backend: std::net::SocketAddr) {
        *self.target.lock().unwrap() = backend;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// When a peer crashes and comes back as the same node (same identity, same address), its
/// QUIC stateless reset closes the client's stale connection: the next RPC fails as
/// Unreachable instead of timing out, and the one after reconnects. A different
/// node at that address (another reset key) cannot do that: the stale connection just times out.
#[tokio::test]
async fn restarted_peer_resets_stale_connection() {
    let ca = ca();
    let identity = ca.issue_node_cert("node-b").unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let first = fixture::start_server_as(&ca, &identity, "node-b", NetOptions::default(), any);
    let relay = Relay::start(first.addr).await;
    let addr = relay.addr.to_string();
    // This test is about the reset alone: the client does not give up on a silent peer.
    let opts = NetOptions {
        silent_peer: Duration::from_secs(600),
        ..NetOptions::default()
    };
    let client = fixture::member_client_with(&ca, "node-a", opts);
    client.status(&addr).await.unwrap();

    // Control: a server with another identity cannot reset the connection.
    let stranger = start_server(&ca, "node-x");
    relay.switch(stranger.addr);
    let err = client
        .call(
            &addr,
            &shoal_consensus::net::frame::PeerRequest::Status,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::Timeout(_)), "{err:?}");

    let restarted = fixture::start_server_as(&ca, &identity, "node-b", NetOptions::default(), any);
    relay.switch(restarted.addr);
    let started = std::time::Instant::now();
    let err = client
        .call(
            &addr,
            &shoal_consensus::net::frame::PeerRequest::Status,
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    // Not a timeout: the reset closed the connection (quickly, though the client's loss
    // recovery may hold its next packet back for a while after the silent phase above).
    assert!(err.is_unreachable(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(client.status(&addr).await.unwrap().name, "node-b");
    assert_eq!(restarted.handler.calls(), vec!["status".to_string()]);
    assert_eq!(first.handler.calls(), vec!["status".to_string()]);
}

/// A caller whose TTL is shorter than a handshake fails as Unreachable, but the handshake it
/// started goes on and the next RPC uses its connection: a heartbeat's short TTL cannot keep
/// a peer from ever connecting.
#[tokio::test]
async fn short_ttl_does_not_abort_the_handshake() {
    let ca = ca();
    let b = start_server(&ca, "node-b");
    // Every server packet is held back 20 ms, so no handshake can finish within the 5 ms TTL
    // (a bare loopback handshake can finish inside tokio's 1 ms timer granularity).
    let relay = Relay::start_delayed(b.addr, Duration::from_millis(20)).await;
    let addr = relay.addr.to_string();
    let client = fixture::member_client(&ca, "node-a");
    let err = client
        .call(
            &addr,
            &shoal_consensus::net::frame::PeerRequest::Status,
            Duration::from_millis(5),
        )
        .await
        .unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !client.is_connected(&addr).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the handshake was abandoned"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(client.status(&addr).await.unwrap().name, "node-b");
    assert_eq!(b.handler.calls(), vec!["status".to_string()]);
}

/// A peer cut off for a few seconds (every packet both ways dropped, as by a partition) is
/// served again within a second of the path coming back, while the client kept calling it the
/// whole time. QUIC alone would leave the old connection in loss recovery, whose probe timeout
/// doubles with every unanswered probe, so its next packet could be seconds away: the client
/// closes a connection whose peer stays silent and starts fresh handshakes instead.
#[tokio::test]
async fn a_peer_back_from_a_partition_is_served_within_a_second() {
    let ca = ca();
    let b = start_server(&ca, "node-b");
    let relay = Relay::start(b.addr).await;
    let addr = relay.addr.to_string();
    let client = fixture::member_client(&ca, "node-a");
    client.status(&addr).await.unwrap();
    let status = || async {
        client
            .call(
                &addr,
                &shoal_consensus::net::frame::PeerRequest::Status,
                Duration::from_millis(50),
            )
            .await
    };

    relay.cut(true);
    let cut_until = std::time::Instant::now() + Duration::from_secs(4);
    // A leader's traffic: a heartbeat every 50 ms and entries to replicate, more than the
    // congestion window holds, so new data waits for the loss recovery's probes.
    let entries = Command::Txn(Txn::new().put("kv", "k", vec![7u8; 16 << 10]));
    while std::time::Instant::now() < cut_until {
        let write = shoal_consensus::net::frame::PeerRequest::ClientWrite(entries.clone());
        assert!(client
            .call(&addr, &write, Duration::from_millis(50))
            .await
            .is_err());
        assert!(status().await.is_err());
    }
    relay.cut(false);
    let healed = std::time::Instant::now();
    while status().await.is_err() {
        assert!(
            healed.elapsed() < Duration::from_secs(10),
            "still unreachable 10 s after the path came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = healed.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "served again {took:?} after healing"
    );
}
