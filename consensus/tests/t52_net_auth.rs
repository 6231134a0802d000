//! Who may talk to a member: only clients certified by the cluster CA on `shoal/1`; clients
//! without a certificate only on `shoal-join/1` and only to join; a joiner only to a server
//! whose chain carries the CA its token pins.

#[path = "t50_net_fixture/mod.rs"]
mod fixture;

use std::sync::Arc;

use fixture::{ca, member_client, raw_client, start_server, JOIN_SECRET};
use rustls_pki_types::pem::PemObject;
use shoal_consensus::net::client::client_endpoint;
use shoal_consensus::net::frame::{PeerRequest, PeerResponse};
use shoal_consensus::net::tls::{self, ALPN_PEER};
use shoal_consensus::net::{JoinRequest, NetError, NetOptions, NodeKey, PeerClient, PeerError};

fn join_request(name: &str, secret: &str) -> (NodeKey, JoinRequest) {
    let key = NodeKey::generate().unwrap();
    let csr_pem = key.csr_pem(name).unwrap();
    let req = JoinRequest {
        token_id: "t1".into(),
        secret: secret.into(),
        name: name.into(),
        raft_addr: "127.0.0.1:1".into(),
        api_addr: "127.0.0.1:2".into(),
        zone: "az1".into(),
        csr_pem,
    };
    (key, req)
}

/// A client whose certificate comes from another cluster's CA fails the handshake; the handler
/// sees nothing.
#[tokio::test]
async fn foreign_ca_client_is_refused() {
    let ca = ca();
    let server = start_server(&ca, "node-a");
    let other = fixture::ca();
    let identity = other.issue_node_cert("intruder").unwrap();
    // It trusts our CA (so the server side is the one refusing) but presents the other's cert.
    let tls = {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let chain =
            rustls_pki_types::CertificateDer::pem_slice_iter(identity.cert_chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap();
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        c.alpn_protocols = vec![ALPN_PEER.to_vec()];
        c
    };
    let client = raw_client(tls);
    let err = client.status(&server.addr.to_string()).await.unwrap_err();
    assert!(
        err.is_unreachable(),
        "expected a refused connection, got {err:?}"
    );
    assert!(server.handler.calls().is_empty());

    // The same cluster's member is served, so the refusal above is about the CA.
    let member = member_client(&ca, "node-b");
    member.status(&server.addr.to_string()).await.unwrap();
}

/// A client without a certificate on `shoal/1` completes the handshake (the join ALPN needs
/// that) but the server closes the connection before serving anything.
#[tokio::test]
async fn no_cert_client_on_peer_alpn_is_refused() {
    let ca = ca();
    let server = start_server(&ca, "node-a");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_PEER.to_vec()];
    let client = raw_client(tls);
    let err = client.status(&server.addr.to_string()).await.unwrap_err();
    assert!(
        matches!(
            &err,
            NetError::Connection(_, quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code == shoal_consensus::net::codes::UNAUTHENTICATED
        ),
        "expected the server to close the connection, got {err:?}"
    );
    assert!(server.handler.calls().is_empty());
}

/// On `shoal-join/1` a client without a certificate can join, but a Vote on that same
/// connection is refused as unauthorized and never reaches the handler.
#[tokio::test]
async fn join_alpn_serves_only_join() {
    let ca = ca();
    let server = start_server(&ca, "node-a");
    let client = raw_client(tls::join_client_config(&ca.fingerprint()).unwrap());
    let addr = server.addr.to_string();
    let vote = PeerRequest::Vote(shoal_consensus::wire::WVoteRequest {
        vote: shoal_consensus::wire::WVote {
            term: 9,
            node_id: 1,
            committed: false,
        },
        last_log_id: None,
        leadership_transfer: false,
    });
    match client
        .call(&addr, &vote, NetOptions::default().rpc_timeout)
        .await
    {
        Ok(PeerResponse::Error(PeerError::Unauthorized(_))) => {}
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    match client
        .call(
            &addr,
            &PeerRequest::Status,
            NetOptions::default().rpc_timeout,
        )
        .await
    {
        Ok(PeerResponse::Error(PeerError::Unauthorized(_))) => {}
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    let (_key, req) = join_request("node-j", JOIN_SECRET);
    match client
        .call(
            &addr,
            &PeerRequest::Join(req),
            NetOptions::default().rpc_timeout,
        )
        .await
    {
        Ok(PeerResponse::Join(r)) => assert_eq!(r.node_id, 7),
        other => panic!("expected a join response, got {other:?}"),
    }
    assert_eq!(server.handler.calls(), vec!["join:node-j".to_string()]);
}

/// A joiner pinning the right CA fingerprint completes the handshake and joins; with a wrong
/// fingerprint the handshake fails and the server's handler sees nothing at all.
#[tokio::test]
async fn joiner_pins_the_ca_fingerprint() {
    let ca = ca();
    let server = start_server(&ca, "node-a");
    let endpoint = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.addr.to_string();
    let opts = NetOptions::default();

    let wrong = fixture::ca().fingerprint();
    let (_key, req) = join_request("node-j", JOIN_SECRET);
    let err = PeerClient::join(&endpoint, &addr, &wrong, req, &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            NetError::Connection(_, quinn::ConnectionError::TransportError(_))
        ),
        "expected a failed handshake, got {err:?}"
    );
    assert!(server.handler.calls().is_empty(), "a request was sent");

    let (_key, req) = join_request("node-j", JOIN_SECRET);
    let resp = PeerClient::join(&endpoint, &addr, &ca.fingerprint(), req, &opts)
        .await
        .unwrap();
    assert_eq!(resp.ca_cert_pem, ca.cert_pem());
    assert_eq!(server.handler.calls(), vec!["join:node-j".to_string()]);

    // A bad secret is the handler's call, and comes back typed.
    let (_key, req) = join_request("node-k", "wrong");
    let err = PeerClient::join(&endpoint, &addr, &ca.fingerprint(), req, &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(err, NetError::Remote(PeerError::Unauthorized(_))),
        "{err:?}"
    );
}
