//! Snapshots stream over one QUIC stream and reach the handler byte-identical, or not at all.

#[path = "t50_net_fixture/mod.rs"]
mod fixture;

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use fixture::{ca, member_client, node_info, start_server};
use openraft::errors::{ReplicationClosed, StreamingError};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use sha2::{Digest, Sha256};
use shoal_consensus::net::frame::{encode_frame, read_frame, PeerRequest, PeerResponse, MAX_FRAME};
use shoal_consensus::net::{codes, PeerError, QuicNetwork};
use shoal_consensus::raft_types::{Snapshot, SnapshotMeta, StoredMembership, Vote};
use shoal_consensus::wire::{WSnapshotMeta, WVote};

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn meta() -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: None,
        last_membership: StoredMembership::default(),
    }
}

fn snapshot_file(bytes: &[u8]) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    // Leave the cursor at the end: the sender must rewind it itself.
    f.seek(SeekFrom::End(0)).unwrap();
    f
}

/// A multi-MiB snapshot sent through openraft's `full_snapshot` arrives with the same length
/// and SHA-256, and the handler's answer comes back.
#[tokio::test]
async fn multi_mib_snapshot_arrives_identical() {
    let ca = ca();
    let server = start_server(&ca, "node-b");
    let bytes = pseudo_random(5 * 1024 * 1024 + 123);
    let mut net = QuicNetwork::new(1, member_client(&ca, "node-a"));
    let mut peer = net
        .new_client(2, &node_info("node-b", &server.addr.to_string()))
        .await;
    let vote = Vote::new_committed(4, 1);
    let resp = peer
        .full_snapshot(
            vote,
            Snapshot {
                meta: meta(),
                snapshot: snapshot_file(&bytes),
            },
            std::future::pending::<ReplicationClosed>(),
            RPCOption::new(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    assert_eq!(resp.vote, vote);
    let digest: [u8; 32] = Sha256::digest(&bytes).into();
    assert_eq!(
        *server.handler.snapshots.lock().unwrap(),
        vec![(bytes.len() as u64, digest)]
    );
}

/// A transfer cancelled by openraft returns `Closed` at once and the handler is never called
/// (a transfer cut mid-way is the truncated case below).
#[tokio::test]
async fn cancelled_snapshot_is_discarded() {
    let ca = ca();
    let server = start_server(&ca, "node-b");
    let mut net = QuicNetwork::new(1, member_client(&ca, "node-a"));
    let mut peer = net
        .new_client(2, &node_info("node-b", &server.addr.to_string()))
        .await;
    let err = peer
        .full_snapshot(
            Vote::new_committed(4, 1),
            Snapshot {
                meta: meta(),
                snapshot: snapshot_file(&pseudo_random(4 << 20)),
            },
            async { ReplicationClosed::new("test cancel") },
            RPCOption::new(Duration::from_secs(10)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StreamingError::Closed(_)), "{err:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.handler.calls().is_empty());
}

async fn raw_snapshot(
    conn: &quinn::Connection,
    announced: u64,
    body: &[u8],
    trailer: &[u8],
) -> quinn::RecvStream {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let begin = PeerRequest::SnapshotBegin {
        vote: WVote {
            term: 4,
            node_id: 1,
            committed: true,
        },
        meta: WSnapshotMeta::from(&meta()),
        len: announced,
    };
    send.write_all(&encode_frame(&begin, MAX_FRAME).unwrap())
        .await
        .unwrap();
    send.write_all(body).await.unwrap();
    send.write_all(trailer).await.unwrap();
    send.finish().unwrap();
    recv
}

/// Bytes whose SHA-256 trailer does not match are refused with a typed error and never
/// reach the handler.
#[tokio::test]
async fn corrupted_trailer_is_refused() {
    let ca = ca();
    let server = start_server(&ca, "node-b");
    let conn = member_client(&ca, "node-a")
        .connection(&server.addr.to_string())
        .await
        .unwrap();
    let body = pseudo_random(100_000);
    let mut trailer: [u8; 32] = Sha256::digest(&body).into();
    trailer[0] ^= 1;
    let mut recv = raw_snapshot(&conn, body.len() as u64, &body, &trailer).await;
    let resp: PeerResponse = read_frame(&mut recv, MAX_FRAME, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        matches!(resp, PeerResponse::Error(PeerError::BadRequest(_))),
        "{resp:?}"
    );
    assert!(server.handler.calls().is_empty());

    // The intact version of the same transfer is accepted.
    let trailer: [u8; 32] = Sha256::digest(&body).into();
    let mut recv = raw_snapshot(&conn, body.len() as u64, &body, &trailer).await;
    let resp: PeerResponse = read_frame(&mut recv, MAX_FRAME, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(resp, PeerResponse::Snapshot(_)), "{resp:?}");
    assert_eq!(server.handler.calls(), vec!["install_snapshot".to_string()]);
}

/// A snapshot that ends before its announced length is reset and never reaches the handler.
#[tokio::test]
async fn truncated_snapshot_is_refused() {
    let ca = ca();
    let server = start_server(&ca, "node-b");
    let conn = member_client(&ca, "node-a")
        .connection(&server.addr.to_string())
        .await
        .unwrap();
    let body = pseudo_random(1000);
    let mut recv = raw_snapshot(&conn, 2000, &body, &[]).await;
    let read = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
        .await
        .unwrap();
    assert!(
        matches!(read, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c))) if c == codes::BAD_SNAPSHOT),
        "{read:?}"
    );
    assert!(server.handler.calls().is_empty());
}

/// openraft's snapshot TTL (200 ms by default) bounds each chunk, not the receiver's install:
/// an install that takes longer than the TTL still gets its answer through.
#[tokio::test]
async fn slow_install_outlasts_the_rpc_ttl() {
    let ca = ca();
    let server = start_server(&ca, "node-b");
    server
        .handler
        .install_delay_ms
        .store(700, std::sync::atomic::Ordering::SeqCst);
    let mut net = QuicNetwork::new(1, member_client(&ca, "node-a"));
    let mut peer = net
        .new_client(2, &node_info("node-b", &server.addr.to_string()))
        .await;
    let vote = Vote::new_committed(4, 1);
    let resp = peer
        .full_snapshot(
            vote,
            Snapshot {
                meta: meta(),
                snapshot: snapshot_file(&pseudo_random(1 << 20)),
            },
            std::future::pending::<ReplicationClosed>(),
            RPCOption::new(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    assert_eq!(resp.vote, vote);
    assert_eq!(server.handler.calls(), vec!["install_snapshot".to_string()]);
}
