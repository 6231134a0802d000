//! The cluster CA, node certificates and the rustls configurations of the peer transport.
//!
//! `shoal init` creates a self-signed ECDSA P-256 CA. Every member holds the CA key so any node
//! can admit a joiner (there is no master). A member's certificate is a leaf for both server and
//! client authentication with the DNS names `shoal` and `<name>.shoal` and the node name as CN.
//!
//! Three ALPNs share one UDP port:
//! - [`ALPN_PEER`] (`shoal/1`): mutual TLS; the server refuses the connection if the client
//!   presented no certificate (the handshake itself accepts that, for the join ALPN's sake).
//! - [`ALPN_DATA`] (`shoal-data/1`): mutual TLS like `shoal/1`, for bulk data (image chunks) on
//!   connections of their own, served by the node's data handler.
//! - [`ALPN_JOIN`] (`shoal-join/1`): a joiner without a certificate yet. It pins the CA by the
//!   fingerprint in its join token and may only send the join RPC.
//!
//! The ring provider is used explicitly everywhere: nothing here depends on a process-wide
//! default provider, and nothing pulls in aws-lc.

use std::fmt;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// ALPN of member-to-member traffic (Raft and app RPCs); requires a client certificate.
pub const ALPN_PEER: &[u8] = b"shoal/1";
/// ALPN of bulk data between members (image chunks); requires a client certificate. Its own
/// connections, so a chunk transfer never queues behind or ahead of Raft traffic.
pub const ALPN_DATA: &[u8] = b"shoal-data/1";
/// ALPN of a joiner that has no certificate yet; only the join RPC is served.
pub const ALPN_JOIN: &[u8] = b"shoal-join/1";
/// The server name every member's certificate carries and every client verifies.
pub const SERVER_NAME: &str = "shoal";

/// Longest node name accepted in a certificate (a DNS label).
const MAX_NODE_NAME: usize = 63;

/// A certificate, key or TLS configuration could not be built or parsed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("node name {0:?} is invalid: use 1 to 63 lowercase letters, digits and '-', not starting or ending with '-'")]
    NodeName(String),
    #[error("could not generate a key or certificate")]
    Generate(#[source] rcgen::Error),
    #[error("the certificate signing request is malformed or its signature is invalid")]
    Csr(#[source] rcgen::Error),
    #[error("no certificate found in the PEM input")]
    NoCertificate,
    #[error("the certificate PEM is malformed")]
    CertPem(#[source] rustls_pki_types::pem::Error),
    #[error("the private key PEM is malformed")]
    KeyPem(#[source] rustls_pki_types::pem::Error),
    #[error("the CA key is malformed")]
    CaKey(#[source] rcgen::Error),
    #[error("the CA key does not belong to the CA certificate")]
    CaKeyMismatch,
    #[error(
        "CA fingerprint {0:?} is invalid: expected 64 hex digits (SHA-256 of the CA certificate)"
    )]
    Fingerprint(String),
    #[error("could not build the rustls configuration")]
    Rustls(#[source] rustls::Error),
    #[error("could not build the certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks that a node name is usable as a DNS label (it becomes `<name>.shoal` in the SAN).
pub fn validate_node_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(TlsError::NodeName(name.to_owned()))
    }
}

/// Hex SHA-256 of a DER certificate.
pub fn fingerprint_of(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn parse_fingerprint(fp: &str) -> Result<[u8; 32], TlsError> {
    let bad = || TlsError::Fingerprint(fp.to_owned());
    let bytes = hex::decode(fp.trim()).map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(TlsError::CertPem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(TlsError::KeyPem)
}

/// Certificate parameters of a member: one leaf for both ends of a connection.
fn node_params(node_name: &str) -> Result<CertificateParams, TlsError> {
    validate_node_name(node_name)?;
    let mut params = CertificateParams::new(vec![
        SERVER_NAME.to_owned(),
        format!("{node_name}.{SERVER_NAME}"),
    ])
    .map_err(TlsError::Generate)?;
    params
        .distinguished_name
        .push(DnType::CommonName, node_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// The cluster's certificate authority. Every member holds it (cert and key) so any member can
/// sign a joiner's certificate.
pub struct ClusterCa {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("ClusterCa")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Creates a self-signed ECDSA P-256 CA for a new cluster.
    pub fn generate(cluster_name: &str) -> Result<ClusterCa, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(TlsError::Generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("shoal cluster CA {cluster_name}"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
        Ok(ClusterCa {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA certificate and key as PEM, for the node's data directory and the join response.
    pub fn to_pem(&self) -> (String, String) {
        (self.cert_pem.clone(), self.key.serialize_pem())
    }

    /// Loads a CA saved with [`ClusterCa::to_pem`]. Checks that the key signs for the cert.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, TlsError> {
        let cert_der = certs_from_pem(cert_pem)?.swap_remove(0);
        let key = KeyPair::from_pem(key_pem).map_err(TlsError::CaKey)?;
        let ca = ClusterCa {
            cert_der,
            cert_pem: cert_pem.to_owned(),
            key,
        };
        // A key that does not belong to the certificate would issue certs nobody accepts.
        let probe = ca.issue_node_cert("probe")?;
        verify_node_cert(&ca.cert_pem, &probe.cert_chain_pem)
            .map_err(|_| TlsError::CaKeyMismatch)?;
        Ok(ca)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Hex SHA-256 of the CA certificate's DER: what a join token pins.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.cert_der)
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, TlsError> {
        Issuer::from_ca_cert_der(&self.cert_der, &self.key).map_err(TlsError::Generate)
    }

    /// Issues a certificate and a fresh key for a member (used by `shoal init` for itself).
    pub fn issue_node_cert(&self, node_name: &str) -> Result<NodeIdentity, TlsError> {
        let key = NodeKey::generate()?;
        let cert = node_params(node_name)?
            .signed_by(&key.key, &self.issuer()?)
            .map_err(TlsError::Generate)?;
        Ok(NodeIdentity {
            cert_chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.key_pem(),
        })
    }

    /// Signs a joiner's CSR for `node_name` and returns the chain (leaf then CA), PEM.
    ///
    /// Only the CSR's public key is used (after its self-signature is checked): the names,
    /// key usages and validity are ours, so a joiner cannot ask for a CA certificate or for
    /// another node's name.
    pub fn sign_csr(&self, csr_pem: &str, node_name: &str) -> Result<String, TlsError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(TlsError::Csr)?;
        let cert = node_params(node_name)?
            .signed_by(&csr.public_key, &self.issuer()?)
            .map_err(TlsError::Generate)?;
        Ok(format!("{}{}", cert.pem(), self.cert_pem))
    }
    /// Issues an HTTPS server certificate and a fresh key for a node's API, valid for `names`
    /// (DNS names or IP addresses, as clients will type them into `OS_AUTH_URL`).
    ///
    /// Unlike a member certificate it is for server authentication only: it cannot be used to
    /// join the peer transport as a client.
    pub fn issue_https_cert(
        &self,
        node_name: &str,
        names: Vec<String>,
    ) -> Result<NodeIdentity, TlsError> {
        validate_node_name(node_name)?;
        let key = NodeKey::generate()?;
        let mut params = CertificateParams::new(names).map_err(TlsError::Generate)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{node_name} API"));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key.key, &self.issuer()?)
            .map_err(TlsError::Generate)?;
        Ok(NodeIdentity {
            cert_chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.key_pem(),
        })
    }
}

/// A member's certificate chain (leaf then CA) and private key, PEM.
#[derive(Clone)]
pub struct NodeIdentity {
    pub cert_chain_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("cert_chain_pem", &self.cert_chain_pem)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// The key of QUIC stateless resets, derived from the node's private key so that it survives
    /// a restart: after a crash, the restarted node's resets for the old connections are
    /// accepted by its peers, which then reconnect at once instead of waiting out the idle
    /// timeout. One-way: the reset key reveals nothing of the private key.
    pub fn stateless_reset_key(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"shoal quic stateless reset v1\0");
        h.update(self.key_pem.as_bytes());
        h.finalize().into()
    }
}

/// A joiner's private key: generated locally, only its CSR leaves the machine.
pub struct NodeKey {
    key: KeyPair,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey").finish_non_exhaustive()
    }
}

impl NodeKey {
    /// A fresh ECDSA P-256 key.
    pub fn generate() -> Result<NodeKey, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(TlsError::Generate)?;
        Ok(NodeKey { key })
    }

    /// A certificate signing request for `node_name`, signed with this key. It carries only
    /// the names: the signer decides everything else.
    pub fn csr_pem(&self, node_name: &str) -> Result<String, TlsError> {
        validate_node_name(node_name)?;
        let mut params = CertificateParams::new(vec![
            SERVER_NAME.to_owned(),
            format!("{node_name}.{SERVER_NAME}"),
        ])
        .map_err(TlsError::Generate)?;
        params
            .distinguished_name
            .push(DnType::CommonName, node_name);
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(TlsError::Generate)
    }

    /// The private key, PKCS#8 PEM, for the node's data directory.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Combines this key with the chain the cluster signed for it.
    pub fn into_identity(self, cert_chain_pem: String) -> NodeIdentity {
        NodeIdentity {
            cert_chain_pem,
            key_pem: self.key.serialize_pem(),
        }
    }
}

fn ca_roots(ca_cert_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_cert_pem)? {
        roots.add(cert).map_err(TlsError::Rustls)?;
    }
    Ok(Arc::new(roots))
}

/// Checks that a member's chain (leaf first) verifies against the CA for the name `shoal`.
pub fn verify_node_cert(ca_cert_pem: &str, cert_chain_pem: &str) -> Result<(), TlsError> {
    let chain = certs_from_pem(cert_chain_pem)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(ca_roots(ca_cert_pem)?, provider())
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(SERVER_NAME).expect("static server name is valid"),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(TlsError::Rustls)
}

/// Server configuration: presents the member's chain, verifies client certificates against the
/// CA, accepts clients without one (the join ALPN), speaks `shoal/1`, `shoal-data/1` and
/// `shoal-join/1`.
///
/// Accepting an unauthenticated client here is only half the policy: the server closes any
/// `shoal/1` or `shoal-data/1` connection whose client presented no certificate (see
/// `server.rs`).
pub fn server_config(
    ca_cert_pem: &str,
    identity: &NodeIdentity,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(ca_roots(ca_cert_pem)?, provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(TlsError::Verifier)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(
            certs_from_pem(&identity.cert_chain_pem)?,
            key_from_pem(&identity.key_pem)?,
        )
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![ALPN_PEER.to_vec(), ALPN_DATA.to_vec(), ALPN_JOIN.to_vec()];
    Ok(config)
}

/// Server configuration of the HTTPS API: presents `cert_chain_pem` (leaf first), asks for no
/// client certificate, speaks HTTP/1.1 over TLS 1.2 or 1.3 with the ring provider.
///
/// A key that does not belong to the leaf is refused here (`rustls::Error::InconsistentKeys`),
/// so a mismatched pair fails at start rather than at the first handshake.
pub fn https_server_config(
    cert_chain_pem: &str,
    key_pem: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(certs_from_pem(cert_chain_pem)?, key_from_pem(key_pem)?)
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Client configuration of a member: presents its chain and verifies the server against the CA
/// for the name `shoal`.
pub fn peer_client_config(
    ca_cert_pem: &str,
    identity: &NodeIdentity,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_root_certificates(ca_roots(ca_cert_pem)?)
        .with_client_auth_cert(
            certs_from_pem(&identity.cert_chain_pem)?,
            key_from_pem(&identity.key_pem)?,
        )
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![ALPN_PEER.to_vec()];
    Ok(config)
}

/// [`peer_client_config`] for the data ALPN (`shoal-data/1`).
pub fn data_client_config(
    ca_cert_pem: &str,
    identity: &NodeIdentity,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = peer_client_config(ca_cert_pem, identity)?;
    config.alpn_protocols = vec![ALPN_DATA.to_vec()];
    Ok(config)
}

/// Client configuration of a joiner: no client certificate; the server is trusted only if its
/// chain carries the CA whose SHA-256 is `ca_fingerprint` and the leaf verifies against it.
pub fn join_client_config(ca_fingerprint: &str) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = PinnedCaVerifier {
        fingerprint: parse_fingerprint(ca_fingerprint)?,
        provider: provider.clone(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_JOIN.to_vec()];
    Ok(config)
}

/// Trusts a server whose presented chain includes the pinned CA and whose leaf that CA signed.
///
/// The pin replaces a trust store the joiner does not have yet. Verification fails inside the
/// handshake, so a joiner talking to the wrong cluster sends no token and no CSR.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref()).as_slice() == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The CN of a DER certificate: a verified member's node name.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The node name of the verified client (or server) at the other end of a QUIC connection, if
/// it presented a certificate. rustls has already verified the chain against the CA.
/// Hex SHA-256 of the leaf certificate of a PEM chain (what the `nodes` table records and
/// `revoked_certs` is keyed by).
pub fn leaf_fingerprint(cert_chain_pem: &str) -> Result<String, TlsError> {
    let chain = certs_from_pem(cert_chain_pem)?;
    Ok(fingerprint_of(&chain[0]))
}

/// Hex SHA-256 of the certificate the peer of `conn` presented, if any.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    Some(fingerprint_of(certs.first()?))
}

pub fn peer_node_name(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    common_name(certs.first()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Node names become DNS labels; anything else is refused.
    #[test]
    fn node_names_are_dns_labels() {
        for ok in ["a", "node-1", "n0"] {
            validate_node_name(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a b", &"x".repeat(64)] {
            assert!(validate_node_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// A saved CA loads back with the same fingerprint, and a key from another CA is refused.
    #[test]
    fn ca_pem_round_trip() {
        let ca = ClusterCa::generate("c").unwrap();
        let (cert, key) = ca.to_pem();
        let back = ClusterCa::from_pem(&cert, &key).unwrap();
        assert_eq!(ca.fingerprint(), back.fingerprint());
        let other = ClusterCa::generate("d").unwrap();
        assert!(ClusterCa::from_pem(&cert, &other.to_pem().1).is_err());
    }

    /// An issued cert verifies against its CA, carries the node name, and fails against
    /// another CA.
    #[test]
    fn issued_cert_verifies_only_against_its_ca() {
        let ca = ClusterCa::generate("c").unwrap();
        let id = ca.issue_node_cert("node-1").unwrap();
        verify_node_cert(ca.cert_pem(), &id.cert_chain_pem).unwrap();
        let leaf = certs_from_pem(&id.cert_chain_pem).unwrap().swap_remove(0);
        assert_eq!(common_name(&leaf).as_deref(), Some("node-1"));
        let other = ClusterCa::generate("d").unwrap();
        assert!(verify_node_cert(other.cert_pem(), &id.cert_chain_pem).is_err());
    }

    /// An API certificate verifies for the names it was issued for and no other (in particular
    /// not for the member name `shoal`), and a key from another pair is refused at setup.
    #[test]
    fn https_cert_covers_its_names_only() {
        let ca = ClusterCa::generate("c").unwrap();
        let id = ca
            .issue_https_cert("node-1", vec!["127.0.0.1".into(), "api.example".into()])
            .unwrap();
        let chain = certs_from_pem(&id.cert_chain_pem).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(
            ca_roots(ca.cert_pem()).unwrap(),
            provider(),
        )
        .build()
        .unwrap();
        let verify = |name: &str| {
            verifier.verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
        };
        verify("127.0.0.1").unwrap();
        verify("api.example").unwrap();
        assert!(verify("10.0.0.1").is_err());
        assert!(verify(SERVER_NAME).is_err());
        https_server_config(&id.cert_chain_pem, &id.key_pem).unwrap();
        let other = ca.issue_https_cert("node-2", vec!["a".into()]).unwrap();
        assert!(matches!(
            https_server_config(&id.cert_chain_pem, &other.key_pem),
            Err(TlsError::Rustls(rustls::Error::InconsistentKeys(_)))
        ));
    }

    /// Fingerprints must be 64 hex digits.
    #[test]
    fn fingerprint_parsing() {
        let ca = ClusterCa::generate("c").unwrap();
        assert_eq!(parse_fingerprint(&ca.fingerprint()).unwrap().len(), 32);
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }
}
