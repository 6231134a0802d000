//! The join flow's certificate half: the joiner's key never leaves it, the cluster signs its
//! CSR, and the result is a working member identity.

#[path = "t50_net_fixture/mod.rs"]
mod fixture;

use fixture::{ca, start_server, JOIN_SECRET};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use shoal_consensus::net::client::client_endpoint;
use shoal_consensus::net::tls::{common_name, peer_node_name, verify_node_cert};
use shoal_consensus::net::{JoinRequest, NetOptions, NodeKey, PeerClient, TlsError};

fn leaf_cn(chain_pem: &str) -> Option<String> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    common_name(&leaf)
}

/// A joiner sends only its CSR; the signed chain verifies against the CA, names the joiner,
/// and together with the key that stayed local it is accepted on `shoal/1` by the server.
#[tokio::test]
async fn csr_join_yields_a_working_identity() {
    let ca = ca();
    let server = start_server(&ca, "node-a");
    let addr = server.addr.to_string();
    let key = NodeKey::generate().unwrap();
    let key_pem = key.key_pem();
    let csr_pem = key.csr_pem("node-j").unwrap();
    let req = JoinRequest {
        token_id: "t1".into(),
        secret: JOIN_SECRET.into(),
        name: "node-j".into(),
        raft_addr: "127.0.0.1:1".into(),
        api_addr: "127.0.0.1:2".into(),
        zone: "az1".into(),
        csr_pem: csr_pem.clone(),
    };
    // Nothing that leaves the joiner carries its private key.
    assert!(!csr_pem.contains("PRIVATE KEY"));
    let key_body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!csr_pem.replace('\n', "").contains(&key_body));
    assert!(
        !format!("{req:?}").contains(JOIN_SECRET),
        "Debug leaks the secret"
    );

    let endpoint = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let resp = PeerClient::join(
        &endpoint,
        &addr,
        &ca.fingerprint(),
        req,
        &NetOptions::default(),
    )
    .await
    .unwrap();
    verify_node_cert(&resp.ca_cert_pem, &resp.node_cert_chain_pem).unwrap();
    assert_eq!(
        leaf_cn(&resp.node_cert_chain_pem).as_deref(),
        Some("node-j")
    );
    assert!(
        !format!("{resp:?}").contains("PRIVATE KEY"),
        "Debug leaks the CA key"
    );

    // The joined node is now a member: its identity opens shoal/1 and the server names it.
    let identity = key.into_identity(resp.node_cert_chain_pem);
    let member = PeerClient::new(
        endpoint,
        &resp.ca_cert_pem,
        &identity,
        NetOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(member.status(&addr).await.unwrap().name, "node-a");
    let conn = member.connection(&addr).await.unwrap();
    assert_eq!(peer_node_name(&conn).as_deref(), Some("node-a"));
}

/// The signer decides the names: a CSR asking for another name gets the name the cluster
/// assigns. A malformed CSR and an invalid node name are typed errors.
#[test]
fn signer_controls_names_and_rejects_bad_csrs() {
    let ca = ca();
    let key = NodeKey::generate().unwrap();
    let chain = ca
        .sign_csr(&key.csr_pem("evil").unwrap(), "node-j")
        .unwrap();
    verify_node_cert(ca.cert_pem(), &chain).unwrap();
    assert_eq!(leaf_cn(&chain).as_deref(), Some("node-j"));

    let garbage = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
    assert!(matches!(
        ca.sign_csr(garbage, "node-j"),
        Err(TlsError::Csr(_))
    ));
    assert!(matches!(
        ca.sign_csr("not pem", "node-j"),
        Err(TlsError::Csr(_))
    ));
    // A CSR whose signature does not match its key (tampered) is refused.
    let csr = key.csr_pem("node-j").unwrap();
    let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
    let mid = lines.len() / 2;
    let flipped: String = lines[mid]
        .chars()
        .map(|c| {
            if c == 'A' {
                'B'
            } else if c == 'B' {
                'A'
            } else {
                c
            }
        })
        .collect();
    assert_ne!(flipped, lines[mid]);
    lines[mid] = flipped;
    assert!(matches!(
        ca.sign_csr(&lines.join("\n"), "node-j"),
        Err(TlsError::Csr(_))
    ));
    assert!(matches!(
        ca.sign_csr(&key.csr_pem("node-j").unwrap(), "Bad Name"),
        Err(TlsError::NodeName(_))
    ));
}
