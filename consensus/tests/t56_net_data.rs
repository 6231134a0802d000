//! The data ALPN (`shoal-data/1`): only members reach the node's data handler, which gets the
//! whole connection and the client's verified name; before a handler is installed, data
//! connections are closed with a code saying so, and Raft traffic is unaffected either way.

#[path = "t50_net_fixture/mod.rs"]
mod fixture;

use std::sync::Arc;

use fixture::{ca, member_client, start_server};
use rustls_pki_types::pem::PemObject;
use shoal_consensus::net::tls::{self, ALPN_DATA};
use shoal_consensus::net::{codes, BoxFuture, DataHandler, NetError, NetOptions, PeerClient};

/// Echoes each stream back, prefixed with the client's node name.
struct Echo;

impl DataHandler for Echo {
    fn serve(&self, peer_name: String, conn: quinn::Connection) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let body = recv.read_to_end(1 << 20).await.unwrap();
                send.write_all(format!("{peer_name}:").as_bytes())
                    .await
                    .unwrap();
                send.write_all(&body).await.unwrap();
                let _ = send.finish();
            }
        })
    }
}

fn data_client(ca: &shoal_consensus::net::ClusterCa, name: &str) -> PeerClient {
    let identity = ca.issue_node_cert(name).unwrap();
    PeerClient::with_tls(
        shoal_consensus::net::client::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(),
        tls::data_client_config(ca.cert_pem(), &identity).unwrap(),
        NetOptions::default(),
        None,
    )
    .unwrap()
}

async fn echo(conn: &quinn::Connection, body: &[u8]) -> Result<Vec<u8>, quinn::ConnectionError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(body).await.unwrap();
    send.finish().unwrap();
    match recv.read_to_end(1 << 20).await {
        Ok(v) => Ok(v),
        Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(e))) => Err(e),
        Err(e) => panic!("unexpected read error {e:?}"),
    }
}

/// A member's data connection reaches the handler with the member's name from its certificate.
#[tokio::test]
async fn member_reaches_the_data_handler() {
    let ca = ca();
    let server = start_server(&ca, "node-a");
    server.data.set(Arc::new(Echo));
    let client = data_client(&ca, "node-b");
    let conn = client.connection(&server.addr.to_string()).await.unwrap();
    assert_eq!(tls::peer_node_name(&conn).as_deref(), Some("node-a"));
    assert_eq!(echo(&conn, b"hello").await.unwrap(), b"node-b:hello");
    // Raft RPCs go on being served on their own ALPN; the handler saw none of them.
    member_client(&ca, "node-c")
        .status(&server.addr.to_string())
        .await
        .unwrap();
    assert_eq!(server.handler.calls(), vec!["status".to_string()]);
}

/// Before the node installs a handler, a data connection is closed with `NO_DATA_HANDLER`.
#[tokio::test]
async fn data_before_a_handler_is_closed_with_its_code() {
    let ca = ca();
    let server = start_server(&ca, "node-a");
    let client = data_client(&ca, "node-b");
    let conn = client.connection(&server.addr.to_string()).await.unwrap();
    match echo(&conn, b"x").await {
        Err(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code, codes::NO_DATA_HANDLER)
        }
        other => panic!("expected the connection closed, got {other:?}"),
    }
}

/// A client without a certificate completes the handshake (the join ALPN shares the verifier)
/// but is closed as unauthenticated on the data ALPN, before the handler sees it.
#[tokio::test]
async fn no_cert_client_on_data_alpn_is_refused() {
    let ca = ca();
    let server = start_server(&ca, "node-a");
    server.data.set(Arc::new(Echo));
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
    tls.alpn_protocols = vec![ALPN_DATA.to_vec()];
    let client = fixture::raw_client(tls);
    let conn = client.connection(&server.addr.to_string()).await.unwrap();
    match echo(&conn, b"x").await {
        Err(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code, codes::UNAUTHENTICATED)
        }
        other => panic!("expected the connection closed, got {other:?}"),
    }
}

/// A certificate from another cluster's CA fails the handshake on the data ALPN too.
#[tokio::test]
async fn foreign_ca_client_on_data_alpn_fails_the_handshake() {
    let ca = ca();
    let server = start_server(&ca, "node-a");
    server.data.set(Arc::new(Echo));
    let other = fixture::ca();
    let identity = other.issue_node_cert("intruder").unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain =
        rustls_pki_types::CertificateDer::pem_slice_iter(identity.cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    tls.alpn_protocols = vec![ALPN_DATA.to_vec()];
    let client = fixture::raw_client(tls);
    let err = match client.connection(&server.addr.to_string()).await {
        // The server's rejection may arrive after the client finished its side of the
        // handshake; the first stream then fails.
        Ok(conn) => NetError::Connection("server".into(), echo(&conn, b"x").await.unwrap_err()),
        Err(e) => e,
    };
    assert!(err.is_unreachable(), "{err:?}");
}
