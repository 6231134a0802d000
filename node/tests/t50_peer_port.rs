//! The peer port of a real node under hostile input.

mod common;

use std::time::Duration;

use common::{wait_until, Cluster};
use shoal_consensus::net::client::client_endpoint;
use shoal_consensus::net::{codes, ClusterCa, NetOptions, PeerClient};

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// The cluster's CA, read from node1's data directory, as an operator with root could.
fn cluster_ca(c: &Cluster) -> ClusterCa {
    let tls = c.nodes[0].dir.join("tls");
    ClusterCa::from_pem(&read(&tls.join("ca.pem")), &read(&tls.join("ca.key"))).unwrap()
}

fn client(trusted_ca_pem: &str, ca_for_identity: &ClusterCa) -> PeerClient {
    let identity = ca_for_identity.issue_node_cert("tester").unwrap();
    PeerClient::new(
        client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(),
        trusted_ca_pem,
        &identity,
        NetOptions::default(),
        None,
    )
    .unwrap()
}

/// Sends `bytes` on a new stream and returns the code the node reset it with.
async fn reset_code(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> quinn::VarInt {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let read = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
        .await
        .expect("the node did not answer the bad frame");
    match read {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => code,
        other => panic!("expected a stream reset, got {other:?}"),
    }
}

/// A peer presenting a certificate from another CA is refused; malformed, truncated and
/// oversized frames and stray UDP datagrams are rejected; and through all of it the node keeps
/// serving its peers and its API.
#[test]
fn hostile_peers_are_refused_and_the_node_keeps_serving() {
    common::install_crypto();
    let c = Cluster::init(&[]);
    c.kv_put(0, "before", "1").unwrap();
    let ca = cluster_ca(&c);
    let peer_addr = c.nodes[0].listen.to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A certificate signed by another CA: no RPC gets through.
        let other = ClusterCa::generate("other").unwrap();
        let foreign = client(ca.cert_pem(), &other);
        assert!(foreign.status(&peer_addr).await.is_err());

        // A member-looking client with a certificate from the cluster's own CA works, and its
        // bad frames are each refused on their own stream.
        let member = client(ca.cert_pem(), &ca);
        assert_eq!(member.status(&peer_addr).await.unwrap().name, "node1");
        let conn = member.connection(&peer_addr).await.unwrap();
        let garbage: Vec<u8> = (0..300u32).map(|i| (i * 97 % 251) as u8).collect();
        let mut truncated = 100u32.to_be_bytes().to_vec();
        truncated.extend([1u8; 10]);
        let oversized = u32::MAX.to_be_bytes().to_vec();
        for (what, bytes, finish) in [
            ("garbage", garbage, true),
            ("truncated", truncated, true),
            ("oversized", oversized, false),
        ] {
            let code = reset_code(&conn, &bytes, finish).await;
            assert_eq!(code, codes::BAD_FRAME, "{what}");
        }
        // Same connection, next stream: still served.
        assert_eq!(member.status(&peer_addr).await.unwrap().name, "node1");

        // Stray datagrams on the UDP port.
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..200u32 {
            let junk: Vec<u8> = (0..(i % 1200 + 1)).map(|j| (i ^ j) as u8).collect();
            sock.send_to(&junk, c.nodes[0].listen).unwrap();
        }
        assert_eq!(member.status(&peer_addr).await.unwrap().name, "node1");
    });

    // The node still takes writes and serves reads.
    c.kv_put(0, "after", "2").unwrap();
    assert_eq!(
        c.kv_get(0, "before", "linearizable").unwrap().as_deref(),
        Some("1")
    );
    let s = wait_until("status", Duration::from_secs(10), || c.status(0));
    assert_eq!(s["leader"], "node1");
}
