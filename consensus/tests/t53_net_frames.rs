//! A bad request frame costs only its own stream: the server resets it with `BAD_FRAME` and
//! keeps serving the same connection and new ones.

#[path = "t50_net_fixture/mod.rs"]
mod fixture;

use std::time::Duration;

use fixture::{ca, member_client, start_server, start_server_with};
use shoal_consensus::net::codes;
use shoal_consensus::net::frame::MAX_FRAME;
use shoal_consensus::net::NetOptions;

/// Sends `bytes` on a fresh stream of `conn` (finishing it if `finish`) and returns the
/// reset code the server answered with.
async fn reset_code(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> quinn::VarInt {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    // Well under the server's request timeout: the refusal must not come from waiting.
    let read = tokio::time::timeout(Duration::from_secs(3), recv.read_to_end(1 << 20))
        .await
        .expect("the server did not answer the bad frame");
    match read {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => code,
        other => panic!("expected a stream reset, got {other:?}"),
    }
}

/// Random bytes, a truncated frame and an over-limit length prefix (with no body sent) are
/// each refused; after each, the same connection and a new one still get answers, and the
/// handler saw only the good requests.
#[tokio::test]
async fn bad_frames_reset_only_their_stream() {
    let ca = ca();
    let server = start_server(&ca, "node-a");
    let addr = server.addr.to_string();
    let client = member_client(&ca, "node-b");
    let conn = client.connection(&addr).await.unwrap();

    let mut garbage = 200u32.to_be_bytes().to_vec();
    let mut x: u32 = 0x9E37_79B9;
    garbage.extend((0..200).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[0u8; 10]);
    let oversized = (MAX_FRAME + 1).to_be_bytes().to_vec();

    for (what, bytes, finish) in [
        ("garbage", garbage, true),
        ("truncated", truncated, true),
        ("oversized", oversized, false),
    ] {
        assert_eq!(
            reset_code(&conn, &bytes, finish).await,
            codes::BAD_FRAME,
            "{what}"
        );
        assert!(
            conn.close_reason().is_none(),
            "{what} closed the connection"
        );
        // Same connection.
        assert_eq!(client.status(&addr).await.unwrap().name, "node-a", "{what}");
        // New connection.
        let fresh = member_client(&ca, "node-c");
        assert_eq!(fresh.status(&addr).await.unwrap().name, "node-a", "{what}");
    }
    assert_eq!(
        client.connection(&addr).await.unwrap().stable_id(),
        conn.stable_id()
    );
    assert_eq!(server.handler.calls(), vec!["status".to_string(); 6]);
}

/// A stream that sends part of a frame and then stalls is reset after the request timeout,
/// while a request on another stream of the same connection is served meanwhile.
#[tokio::test]
async fn stalled_frame_times_out_alone() {
    let ca = ca();
    let server = start_server_with(
        &ca,
        "node-a",
        NetOptions {
            request_timeout: Duration::from_millis(300),
            ..NetOptions::default()
        },
    );
    let addr = server.addr.to_string();
    let client = member_client(&ca, "node-b");
    let conn = client.connection(&addr).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0]).await.unwrap();
    assert_eq!(client.status(&addr).await.unwrap().name, "node-a");
    let read = tokio::time::timeout(Duration::from_secs(3), recv.read_to_end(1024))
        .await
        .unwrap();
    assert!(
        matches!(read, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c))) if c == codes::BAD_FRAME),
        "{read:?}"
    );
    assert_eq!(client.status(&addr).await.unwrap().name, "node-a");
}

/// Only AppendEntries may follow a request on the same stream (the `stream_append`
/// pipeline): a Status after an AppendEntries resets the stream and never reaches the handler.
/// After a Status, the server reads nothing more from that stream.
#[tokio::test]
async fn only_append_entries_pipeline_on_one_stream() {
    use shoal_consensus::net::frame::{encode_frame, read_frame, PeerRequest, PeerResponse};
    use shoal_consensus::wire::{WAppendEntriesRequest, WVote};

    let ca = ca();
    let server = start_server(&ca, "node-a");
    let client = member_client(&ca, "node-b");
    let conn = client.connection(&server.addr.to_string()).await.unwrap();
    let append = encode_frame(
        &PeerRequest::AppendEntries(WAppendEntriesRequest {
            vote: WVote {
                term: 1,
                node_id: 2,
                committed: true,
            },
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        }),
        MAX_FRAME,
    )
    .unwrap();
    let status = encode_frame(&PeerRequest::Status, MAX_FRAME).unwrap();

    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&append).await.unwrap();
    send.write_all(&status).await.unwrap();
    // The reset may overtake the AppendEntries answer (a QUIC reset discards undelivered
    // data), so only the reset is certain.
    let read = tokio::time::timeout(Duration::from_secs(3), recv.read_to_end(1 << 20))
        .await
        .unwrap();
    assert!(
        matches!(read, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c))) if c == codes::BAD_FRAME),
        "{read:?}"
    );

    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&status).await.unwrap();
    send.write_all(&status).await.unwrap();
    send.finish().unwrap();
    let only: PeerResponse = read_frame(&mut recv, MAX_FRAME, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(matches!(only, PeerResponse::Status(_)), "{only:?}");
    assert_eq!(
        server.handler.calls(),
        vec!["append_entries:0".to_string(), "status".into()]
    );
}

/// The server serves at most `max_connections` connections; one more is refused while the
/// others keep working.
#[tokio::test]
async fn connection_limit_refuses_extra_connections() {
    let ca = ca();
    let server = start_server_with(
        &ca,
        "node-a",
        NetOptions {
            max_connections: 1,
            ..NetOptions::default()
        },
    );
    let addr = server.addr.to_string();
    let first = member_client(&ca, "node-b");
    first.status(&addr).await.unwrap();
    let second = member_client(&ca, "node-c");
    let err = second.status(&addr).await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    first.status(&addr).await.unwrap();
}
