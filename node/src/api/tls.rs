//! HTTPS on the API address: the certificate (an operator's PEM files, or one the node issues
//! itself from the cluster CA) and a listener that completes TLS handshakes off the accept
//! loop, so that a slow or silent client cannot hold up the others.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use shoal_consensus::net::tls::{https_server_config, ClusterCa, TlsError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Files the cluster-CA certificate is kept in, under `<data-dir>/tls/`.
pub const ISSUED_CERT: &str = "api.pem";
pub const ISSUED_KEY: &str = "api_tls.key";
/// The cluster CA certificate, written by the consensus layer at init or join.
pub const CLUSTER_CA: &str = "ca.pem";

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the API's TLS setup failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiTlsError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the private key {key} does not belong to the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{cert} and {key} are not a usable certificate chain and key")]
    Files {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: TlsError,
    },
    #[error("cannot issue the API certificate from the cluster CA")]
    Issue(#[source] TlsError),
}

fn read(what: &'static str, path: &Path) -> Result<String, ApiTlsError> {
    std::fs::read_to_string(path).map_err(|source| ApiTlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn server_config(
    chain: &str,
    key: &str,
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, ApiTlsError> {
    https_server_config(chain, key)
        .map(Arc::new)
        .map_err(|source| match source {
            TlsError::Rustls(rustls::Error::InconsistentKeys(_)) => ApiTlsError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            },
            source => ApiTlsError::Files {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
                source,
            },
        })
}

/// The operator's certificate and key (`api_tls.mode = "file"`), checked to be a matching pair, and
/// the CA bundle for clients checked to be readable.
pub fn load_operator_files(
    cert: &Path,
    key: &Path,
    cacert: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, ApiTlsError> {
    let chain = read("the API certificate", cert)?;
    let key_pem = read("the API private key", key)?;
    if let Some(ca) = cacert {
        read("the API CA bundle", ca)?;
    }
    server_config(&chain, &key_pem, cert, key)
}

/// The names a cluster-CA certificate covers: the address in the node's URL, the API address
/// if it is a specific one, loopback, and the machine's host name.
pub fn certificate_names(url_ip: IpAddr, api: SocketAddr) -> Vec<String> {
    let mut names = vec![
        url_ip.to_string(),
        IpAddr::V4(Ipv4Addr::LOCALHOST).to_string(),
        IpAddr::V6(Ipv6Addr::LOCALHOST).to_string(),
        "localhost".to_owned(),
    ];
    if !api.ip().is_unspecified() {
        names.push(api.ip().to_string());
    }
    if let Some(host) = host_name() {
        names.push(host);
    }
    names.sort();
    names.dedup();
    names
}

/// The kernel's host name if it is a usable DNS name.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    ok.then(|| name.to_ascii_lowercase())
}

/// Issues this node a fresh API certificate from the cluster CA held in `tls_dir`, stores it
/// there (`api.pem`, `api.key`), and returns the server configuration. Done at every start,
/// so a changed address is covered.
pub fn issue_from_cluster_ca(
    tls_dir: &Path,
    node_name: &str,
    names: Vec<String>,
) -> Result<Arc<rustls::ServerConfig>, ApiTlsError> {
    let ca = ClusterCa::from_pem(
        &read("the cluster CA certificate", &tls_dir.join(CLUSTER_CA))?,
        &read("the cluster CA key", &tls_dir.join("ca.key"))?,
    )
    .map_err(ApiTlsError::Issue)?;
    let issued = ca
        .issue_https_cert(node_name, names)
        .map_err(ApiTlsError::Issue)?;
    let cert_path = tls_dir.join(ISSUED_CERT);
    let key_path = tls_dir.join(ISSUED_KEY);
    write_private(&cert_path, &issued.cert_chain_pem)?;
    write_private(&key_path, &issued.key_pem)?;
    server_config(
        &issued.cert_chain_pem,
        &issued.key_pem,
        &cert_path,
        &key_path,
    )
}

fn write_private(path: &Path, text: &str) -> Result<(), ApiTlsError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let write = || -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|source| ApiTlsError::Write {
        path: path.to_owned(),
        source,
    })
}

/// A TCP listener that hands axum connections whose TLS handshake has completed.
///
/// The accept loop runs in its own task and spawns one task per handshake (bounded by
/// [`HANDSHAKE_TIMEOUT`]); finished streams reach [`axum::serve::Listener::accept`] through a
/// channel. Dropping the listener (axum does when it shuts down) stops the accept loop.
#[derive(Debug)]
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let accept_loop = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "cannot accept an API connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            local,
            ready,
            accept_loop,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `cert` and `key` and loads them as operator files.
    fn load(dir: &Path, cert: &str, key: &str, cacert: Option<&Path>) -> Result<(), ApiTlsError> {
        let c = dir.join("cert.pem");
        let k = dir.join("key.pem");
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        load_operator_files(&c, &k, cacert).map(drop)
    }

    /// Operator files: a matching pair loads; a missing file, a key from another pair, and a
    /// file that holds no certificate are each refused with the path at fault.
    #[test]
    fn operator_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("t").unwrap();
        let a = ca.issue_https_cert("a", vec!["127.0.0.1".into()]).unwrap();
        let b = ca.issue_https_cert("b", vec!["127.0.0.1".into()]).unwrap();

        load(dir.path(), &a.cert_chain_pem, &a.key_pem, None).unwrap();

        let msg = load(dir.path(), &a.cert_chain_pem, &b.key_pem, None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            format!(
                "the private key {} does not belong to the certificate {}",
                dir.path().join("key.pem").display(),
                dir.path().join("cert.pem").display()
            )
        );

        let nope = dir.path().join("nope.pem");
        let msg = load(dir.path(), &a.cert_chain_pem, &a.key_pem, Some(&nope))
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("cannot read the API CA bundle "), "{msg}");
        assert!(msg.ends_with("nope.pem"), "{msg}");

        let err = load(dir.path(), &a.key_pem, &a.cert_chain_pem, None).unwrap_err();
        assert!(matches!(err, ApiTlsError::Files { .. }), "{err}");
    }

    #[test]
    fn certificate_names_cover_url_loopback_and_api_address() {
        let names = certificate_names(
            "10.1.2.3".parse().unwrap(),
            "10.1.2.4:8774".parse().unwrap(),
        );
        for n in ["10.1.2.3", "10.1.2.4", "127.0.0.1", "::1", "localhost"] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        let any = certificate_names("10.1.2.3".parse().unwrap(), "0.0.0.0:80".parse().unwrap());
        assert!(!any.iter().any(|x| x == "0.0.0.0"), "{any:?}");
    }
}
