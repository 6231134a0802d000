//! Shared fixture of the transport tests: a recording [`PeerHandler`] and real QUIC servers on
//! 127.0.0.1 with OS-picked ports.

#![allow(dead_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use sha2::{Digest, Sha256};
use shoal_consensus::net::client::client_endpoint;
use shoal_consensus::net::{
    BoxFuture, ClusterCa, DataSlot, JoinRequest, JoinResponse, NetOptions, NodeIdentity,
    PeerClient, PeerError, PeerHandler, PeerRole, PeerServer, PeerStatus,
};
use shoal_consensus::raft_types::{SnapshotMeta, TypeConfig, Vote};
use shoal_types::{Command, NodeInfo, TxnResponse};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const JOIN_SECRET: &str = "s3cret";

/// Records every call it serves, in order.
pub struct Recorder {
    pub name: String,
    pub ca: ClusterCa,
    pub calls: Mutex<Vec<String>>,
    /// (length, SHA-256) of every snapshot handed over, read back from the file.
    pub snapshots: Mutex<Vec<(u64, [u8; 32])>>,
    /// How long installing a snapshot takes, in milliseconds.
    pub install_delay_ms: AtomicU64,
}

impl Recorder {
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, call: impl Into<String>) {
        self.calls.lock().unwrap().push(call.into());
    }
}

impl PeerHandler for Recorder {
    fn append_entries(
        &self,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<TypeConfig>, PeerError>> {
        self.record(format!("append_entries:{}", req.entries.len()));
        // A request whose prev_log_id is at index 999 is answered as a log conflict.
        let conflict = req.prev_log_id.is_some_and(|l| l.index == 999);
        Box::pin(async move {
            Ok(if conflict {
                AppendEntriesResponse::Conflict
            } else {
                AppendEntriesResponse::Success
            })
        })
    }

    fn vote(
        &self,
        req: VoteRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<VoteResponse<TypeConfig>, PeerError>> {
        self.record(format!("vote:{}", req.vote.leader_id.term));
        Box::pin(async move { Ok(VoteResponse::new(req.vote, req.last_log_id, true)) })
    }

    fn pre_vote(
        &self,
        req: VoteRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<VoteResponse<TypeConfig>, PeerError>> {
        self.record("pre_vote");
        Box::pin(async move { Ok(VoteResponse::new(req.vote, req.last_log_id, false)) })
    }

    fn install_snapshot(
        &self,
        vote: Vote,
        _meta: SnapshotMeta,
        mut file: std::fs::File,
    ) -> BoxFuture<'_, Result<SnapshotResponse<TypeConfig>, PeerError>> {
        self.record("install_snapshot");
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        self.snapshots
            .lock()
            .unwrap()
            .push((bytes.len() as u64, Sha256::digest(&bytes).into()));
        let delay = Duration::from_millis(self.install_delay_ms.load(Ordering::SeqCst));
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok(SnapshotResponse::new(vote))
        })
    }

    fn client_write(&self, cmd: Command) -> BoxFuture<'_, Result<TxnResponse, PeerError>> {
        self.record(format!("client_write:{cmd}"));
        // A write to table `hang` is never answered: a leader that died holding it.
        let hang = cmd.txn().ops.iter().any(|op| op.table() == "hang");
        Box::pin(async move {
            if hang {
                futures::future::pending::<()>().await;
            }
            Ok(TxnResponse {
                succeeded: true,
                revision: 42,
                failed_precondition: None,
            })
        })
    }

    fn linearizable_read(&self) -> BoxFuture<'_, Result<u64, PeerError>> {
        self.record("linearizable_read");
        Box::pin(async {
            Err(PeerError::ForwardToLeader {
                leader_id: Some(9),
                leader_addr: Some("127.0.0.1:9".into()),
            })
        })
    }

    fn status(&self) -> BoxFuture<'_, PeerStatus> {
        self.record("status");
        Box::pin(async {
            PeerStatus {
                node_id: 1,
                name: self.name.clone(),
                term: 3,
                role: PeerRole::Leader,
                last_applied: Some(10),
                leader_id: Some(1),
            }
        })
    }

    fn join(
        &self,
        req: JoinRequest,
        _peer_addr: SocketAddr,
    ) -> BoxFuture<'_, Result<JoinResponse, PeerError>> {
        self.record(format!("join:{}", req.name));
        Box::pin(async move {
            if req.secret != JOIN_SECRET {
                return Err(PeerError::Unauthorized("bad join secret".into()));
            }
            let chain = self
                .ca
                .sign_csr(&req.csr_pem, &req.name)
                .map_err(|e| PeerError::BadRequest(e.to_string()))?;
            let (ca_cert_pem, ca_key_pem) = self.ca.to_pem();
            Ok(JoinResponse {
                node_id: 7,
                ca_cert_pem,
                ca_key_pem,
                node_cert_chain_pem: chain,
                members: vec![(1, node_info(&self.name, "127.0.0.1:1"))],
            })
        })
    }
}

pub fn node_info(name: &str, raft_addr: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        raft_addr: raft_addr.into(),
        api_addr: "127.0.0.1:0".into(),
        zone: "az1".into(),
    }
}

/// A running server; dropping it shuts it down.
pub struct Server {
    pub addr: SocketAddr,
    pub handler: Arc<Recorder>,
    pub endpoint: quinn::Endpoint,
    /// Where a test installs a handler for `shoal-data/1` connections.
    pub data: DataSlot,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Stops the server and waits for it to drain.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn ca() -> ClusterCa {
    ClusterCa::generate("test").unwrap()
}

/// Starts a member named `name` with a certificate from `ca`.
pub fn start_server(ca: &ClusterCa, name: &str) -> Server {
    start_server_with(ca, name, NetOptions::default())
}

/// Starts a member at a given address (to restart one on the same port).
pub fn start_server_at(ca: &ClusterCa, name: &str, addr: SocketAddr) -> Server {
    start_server_full(ca, name, NetOptions::default(), addr)
}

pub fn start_server_with(ca: &ClusterCa, name: &str, opts: NetOptions) -> Server {
    start_server_full(ca, name, opts, "127.0.0.1:0".parse().unwrap())
}

fn start_server_full(ca: &ClusterCa, name: &str, opts: NetOptions, addr: SocketAddr) -> Server {
    start_server_as(ca, &ca.issue_node_cert(name).unwrap(), name, opts, addr)
}

/// Starts a member with a given identity (to restart "the same" node).
pub fn start_server_as(
    ca: &ClusterCa,
    identity: &NodeIdentity,
    name: &str,
    opts: NetOptions,
    addr: SocketAddr,
) -> Server {
    let (cert, key) = ca.to_pem();
    let handler = Arc::new(Recorder {
        name: name.into(),
        ca: ClusterCa::from_pem(&cert, &key).unwrap(),
        calls: Mutex::new(Vec::new()),
        snapshots: Mutex::new(Vec::new()),
        install_delay_ms: AtomicU64::new(0),
    });
    let dir = tempfile::tempdir().unwrap();
    let server = PeerServer::bind_with(
        addr,
        ca.cert_pem(),
        identity,
        handler.clone(),
        dir.path(),
        opts,
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let endpoint = server.endpoint();
    let data = server.data_slot();
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        handler,
        endpoint,
        data,
        stop: Some(stop),
        task: Some(task),
        _dir: dir,
    }
}

/// A member's client with a certificate from `ca`, on its own endpoint.
pub fn member_client(ca: &ClusterCa, name: &str) -> PeerClient {
    member_client_with(ca, name, NetOptions::default())
}

pub fn member_client_with(ca: &ClusterCa, name: &str, opts: NetOptions) -> PeerClient {
    let identity = ca.issue_node_cert(name).unwrap();
    PeerClient::new(
        client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(),
        ca.cert_pem(),
        &identity,
        opts,
        None,
    )
    .unwrap()
}

/// A client with an arbitrary rustls configuration.
pub fn raw_client(tls: rustls::ClientConfig) -> PeerClient {
    PeerClient::with_tls(
        client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(),
        tls,
        NetOptions::default(),
        None,
    )
    .unwrap()
}
