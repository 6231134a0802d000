//! The cluster: Raft wired to the RocksDB store and the QUIC transport, with the API the rest
//! of the node uses.
//!
//! - [`Cluster::write`] proposes a transaction; on a follower it is forwarded to the leader
//!   over QUIC, so a client may send writes to any node.
//! - [`Cluster::read_barrier`] makes the next local read linearizable (the leader's read
//!   index, then waiting until this replica has applied that far); plain [`Cluster::get`] and
//!   [`Cluster::list`] read the local replica and its revision.
//! - [`Cluster::watch`] follows a table prefix from a revision: the replacement for a message
//!   broker.
//! - [`Cluster::run`] serves the peer protocol and, on the leader, runs the voter manager.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use openraft::Instant as _;
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use shoal_types::{Command, Expect, KeyedTxn, NodeId, NodeInfo, Row, Txn, TxnResponse};

use crate::join::{
    self, JoinToken, TokenInfo, TokenRecord, K_VOTERS, T_CLUSTER, T_JOIN_TOKENS, T_NODES,
    T_REVOKED_CERTS,
};
use crate::membership::{self, Change, Health};
use crate::metrics::RpcMetrics;
use crate::net::client::client_endpoint;
use crate::net::tls::{self, ClusterCa, NodeIdentity, NodeKey};
use crate::net::{
    BoxFuture, DataHandler, DataSlot, ForwardError, JoinRequest, JoinResponse, NetOptions,
    PeerClient, PeerError, PeerHandler, PeerRole, PeerServer, PeerStatus, QuicNetwork,
    WriteOutcome,
};
use crate::raft_types::{Raft, SnapshotMeta, TypeConfig, Vote};
use crate::read_index::{ReadBatcher, Round};
pub use crate::store::WatchError;
use crate::store::{self, StateReader, StoreOptions, WatchStream};

/// How a node is set up; the node binary fills it from its config file.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub data_dir: PathBuf,
    pub name: String,
    pub raft_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub zone: String,
    pub voters: usize,
    pub replace_after: Duration,
    pub stabilization: Duration,
    pub snapshot_every: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    /// Run openraft's pre-vote round before a real election: a node that cannot win (cut off,
    /// or back from a partition) never raises its term and so never deposes a working leader.
    pub pre_vote: bool,
}

/// Failures callers can act on. `Unavailable` means retry (no leader, peer unreachable);
/// `Fatal` means this node must stop.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("the cluster is unavailable: {0}")]
    Unavailable(String),
    /// The write reached a leader that then failed or lost leadership before answering: it may
    /// have committed or not. Only a write without a request id can end like this (a keyed one
    /// is re-sent until it has an answer or the deadline passes); read before retrying it.
    #[error("commit status unknown: {0}")]
    CommitUnknown(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("join refused: {0}")]
    JoinRefused(String),
    #[error("cannot set up the node: {0}")]
    Setup(String),
    #[error("fatal: {0}")]
    Fatal(String),
}

/// A node's record in the `nodes` table: the desired membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub info: NodeInfo,
    pub joined_at: u64,
    /// Hex SHA-256 of the node's certificate, revoked when the node is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
}

/// One member as `shoal status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub id: NodeId,
    /// `leader`, `voter` or `learner`.
    pub role: String,
    pub api: String,
    pub raft_addr: String,
    pub zone: String,
    pub applied_index: u64,
    pub healthy: bool,
}

/// The cluster as one node sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub leader: Option<String>,
    pub term: u64,
    pub members: Vec<MemberStatus>,
    /// The node that answered.
    pub node: String,
    pub revision: u64,
}

const TLS_DIR: &str = "tls";
const DB_DIR: &str = "raft";
const NODE_ID_FILE: &str = "node_id";
/// How long a write or read barrier may take in all, waiting for a leader included, unless the
/// caller gives its own deadline.
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// How long a write or read waits for news of a leader before it tries the one it knows again.
const FORWARD_RETRY: Duration = Duration::from_millis(50);

/// Gives an unkeyed command a request id unique to this attempt, so it can be re-sent to a new
/// leader without being applied twice.
fn keyed_by_node(cmd: Command) -> Command {
    match cmd {
        Command::Txn(txn) => Command::Keyed(Box::new(KeyedTxn {
            request_id: format!("fwd-{:032x}", rand::random::<u128>()),
            txn,
        })),
        keyed => keyed,
    }
}

/// What [`ReadBatcher`] calls for a round; holds the cluster weakly, so no cycle keeps it alive.
type RoundFn = Box<dyn Fn() -> Round + Send + Sync>;

#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.inner.id)
            .field("name", &self.inner.info.name)
            .finish()
    }
}

struct Inner {
    id: NodeId,
    info: NodeInfo,
    opts: ClusterOptions,
    raft: Raft,
    sm: StateReader,
    peers: PeerClient,
    /// Connections on `shoal-data/1`, apart from the Raft ones.
    data_peers: PeerClient,
    data_slot: DataSlot,
    ca: ClusterCa,
    rpc_metrics: Arc<RpcMetrics>,
    /// Shares read-index rounds among concurrent read barriers.
    reads: Arc<ReadBatcher<RoundFn>>,
    /// Stops the peer server; taken by `run` or `shutdown`.
    server_stop: Mutex<Option<tokio::sync::watch::Sender<bool>>>,
    server_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> ClusterError + '_ {
    move |e| ClusterError::Setup(format!("{what}: {e}"))
}

fn write_private(path: &Path, text: &str) -> Result<(), ClusterError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(setup(&format!("cannot write {}", path.display())))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(setup(&format!("cannot write {}", path.display())))
}

fn read_text(path: &Path) -> Result<String, ClusterError> {
    std::fs::read_to_string(path).map_err(setup(&format!("cannot read {}", path.display())))
}

fn random_node_id() -> NodeId {
    loop {
        let id: u64 = rand::random();
        // Leave room below 2^53 so ids survive JSON tools that use doubles.
        let id = id >> 11;
        if id != 0 {
            return id;
        }
    }
}

/// openraft's election timeouts for an election timeout of `election_ms`.
///
/// A follower of openraft 0.10 stands for election only once the leader's lease has run out
/// (the lease is `election_timeout_max` after the last heartbeat) and then a randomised
/// `election_timeout_min..election_timeout_max` has passed: between `min + max` and `2 * max`
/// after the last heartbeat. Passing `election_ms` and twice it made that 3-4 times
/// `election_ms` (1.5-2 s for the default 500 ms). These bounds make it `election_ms` to 4/3
/// of it, which is what the setting promises: how long a silent leader goes unnoticed.
fn election_timeouts(election_ms: u64, heartbeat_ms: u64) -> (u64, u64) {
    // openraft wants min above the heartbeat interval and below max.
    let min = (election_ms / 3).max(heartbeat_ms + 1);
    let max = (election_ms - election_ms / 3).max(min + 1);
    (min, max)
}

impl ClusterOptions {
    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            name: self.name.clone(),
            raft_addr: self.raft_addr.to_string(),
            api_addr: self.api_addr.to_string(),
            zone: self.zone.clone(),
        }
    }

    fn raft_config(&self) -> Result<Arc<openraft::Config>, ClusterError> {
        let (election_timeout_min, election_timeout_max) =
            election_timeouts(self.election_timeout_ms, self.heartbeat_ms);
        let config = openraft::Config {
            cluster_name: "shoal".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min,
            election_timeout_max,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: 1000,
            install_snapshot_timeout: 10_000,
            enable_pre_vote: Some(self.pre_vote),
            ..Default::default()
        };
        Ok(Arc::new(
            config
                .validate()
                .map_err(setup("invalid Raft configuration"))?,
        ))
    }

    fn tls_dir(&self) -> PathBuf {
        self.data_dir.join(TLS_DIR)
    }
}

impl Cluster {
    /// Creates a new one-node cluster: the CA, this node's certificate, the Raft group.
    pub async fn init(opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        std::fs::create_dir_all(opts.tls_dir())
            .map_err(setup("cannot create the TLS directory"))?;
        let ca = ClusterCa::generate("shoal").map_err(setup("cannot create the cluster CA"))?;
        let identity = ca
            .issue_node_cert(&opts.name)
            .map_err(setup("cannot issue this node's certificate"))?;
        let id = random_node_id();
        save_identity(&opts, id, &ca, &identity)?;
        let cert_sha256 = tls::leaf_fingerprint(&identity.cert_chain_pem)
            .map_err(setup("cannot read this node's certificate"))?;
        let cluster = Self::open(opts.clone(), id, ca, identity).await?;
        let mut members = BTreeMap::new();
        members.insert(id, cluster.inner.info.clone());
        cluster
            .inner
            .raft
            .initialize(members)
            .await
            .map_err(setup("cannot initialise Raft"))?;
        cluster.wait_for_leader(Duration::from_secs(30)).await?;
        let record = NodeRecord {
            id,
            info: cluster.inner.info.clone(),
            joined_at: join::now_secs(),
            cert_sha256: Some(cert_sha256),
        };
        // The voter count is the cluster's, not each node's: whichever node leads plans the
        // membership from this row, so a joined node's own (default) setting never shrinks or
        // grows the voter set.
        cluster
            .write(
                Txn::new()
                    .when(T_NODES, &opts.name, Expect::Absent)
                    .put(T_NODES, &opts.name, json(&record))
                    .put(T_CLUSTER, K_VOTERS, json(&opts.voters)),
            )
            .await?;
        Ok(cluster)
    }

    /// Joins an existing cluster through `peer` (its QUIC address) with a join token.
    pub async fn join(
        opts: ClusterOptions,
        peer: &str,
        token: &str,
    ) -> Result<Cluster, ClusterError> {
        let token = JoinToken::parse(token).map_err(|e| ClusterError::BadRequest(e.to_string()))?;
        resolve(peer)?;
        std::fs::create_dir_all(opts.tls_dir())
            .map_err(setup("cannot create the TLS directory"))?;
        let key = NodeKey::generate().map_err(setup("cannot create this node's key"))?;
        let csr_pem = key
            .csr_pem(&opts.name)
            .map_err(setup("cannot create a certificate request"))?;
        let request = JoinRequest {
            token_id: token.id.clone(),
            secret: token.secret.clone(),
            name: opts.name.clone(),
            raft_addr: opts.raft_addr.to_string(),
            api_addr: opts.api_addr.to_string(),
            zone: opts.zone.clone(),
            csr_pem,
        };
        let endpoint = client_endpoint(SocketAddr::new(opts.raft_addr.ip(), 0))
            .map_err(setup("cannot open a QUIC endpoint"))?;
        let resp: JoinResponse = PeerClient::join(
            &endpoint,
            peer,
            &token.ca_fingerprint,
            request,
            &NetOptions::default(),
        )
        .await
        .map_err(|e| ClusterError::JoinRefused(chain(&e)))?;
        endpoint.close(crate::net::codes::SHUTDOWN, b"joined");
        let ca = ClusterCa::from_pem(&resp.ca_cert_pem, &resp.ca_key_pem)
            .map_err(|e| ClusterError::JoinRefused(format!("the cluster sent a bad CA: {e}")))?;
        if ca.fingerprint() != token.ca_fingerprint {
            return Err(ClusterError::JoinRefused(
                "the CA the cluster sent does not match the token's fingerprint".into(),
            ));
        }
        let identity = NodeIdentity {
            cert_chain_pem: resp.node_cert_chain_pem.clone(),
            key_pem: key.key_pem(),
        };
        save_identity(&opts, resp.node_id, &ca, &identity)?;
        let cluster = Self::open(opts, resp.node_id, ca, identity).await?;
        // The leader's voter manager adds us as a learner once it sees our row.
        cluster.wait_for_membership(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// Restarts a node from its data directory.
    pub async fn start(opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        let dir = opts.tls_dir();
        let ca = ClusterCa::from_pem(
            &read_text(&dir.join("ca.pem"))?,
            &read_text(&dir.join("ca.key"))?,
        )
        .map_err(setup("cannot load the cluster CA"))?;
        let identity = NodeIdentity {
            cert_chain_pem: read_text(&dir.join("node.pem"))?,
            key_pem: read_text(&dir.join("node.key"))?,
        };
        let id: NodeId = read_text(&opts.data_dir.join(NODE_ID_FILE))?
            .trim()
            .parse()
            .map_err(setup("the node_id file is not a number"))?;
        Self::open(opts, id, ca, identity).await
    }

    async fn open(
        opts: ClusterOptions,
        id: NodeId,
        ca: ClusterCa,
        identity: NodeIdentity,
    ) -> Result<Cluster, ClusterError> {
        let rpc_metrics = Arc::new(RpcMetrics::default());
        let (log_store, sm) = store::open(&opts.data_dir.join(DB_DIR), StoreOptions::default())
            .map_err(setup("cannot open the Raft store"))?;
        let reader = sm.reader();
        // The peer server starts before Raft: a joining node must answer the leader's first
        // AppendEntries before `join` returns. Requests that arrive before the cluster is
        // assembled are refused and retried by the sender.
        let slot: Arc<OnceLock<Cluster>> = Arc::new(OnceLock::new());
        let last_append_us = Arc::new(AtomicU64::new(0));
        let snapshot_dir = opts.data_dir.join("incoming-snapshots");
        std::fs::create_dir_all(&snapshot_dir)
            .map_err(setup("cannot create the incoming snapshot directory"))?;
        let server = PeerServer::bind(
            opts.raft_addr,
            ca.cert_pem(),
            &identity,
            Arc::new(Handler(slot.clone(), last_append_us.clone())),
            snapshot_dir,
        )
        .map_err(|e| {
            ClusterError::Setup(format!(
                "cannot listen on the peer address {}: {}",
                opts.raft_addr,
                chain(&e)
            ))
        })?;
        let hook = rpc_metrics.clone();
        let peers = PeerClient::new(
            server.endpoint(),
            ca.cert_pem(),
            &identity,
            NetOptions::default(),
            Some(Arc::new(
                move |_addr: &str, rpc: &'static str, d: Duration, _ok: bool| hook.observe(rpc, d),
            )),
        )
        .map_err(setup("cannot create the peer client"))?;
        let data_peers = PeerClient::with_tls(
            server.endpoint(),
            tls::data_client_config(ca.cert_pem(), &identity)
                .map_err(setup("cannot build the data TLS configuration"))?,
            NetOptions::default(),
            None,
        )
        .map_err(setup("cannot create the data client"))?;
        let data_slot = server.data_slot();
        let network = QuicNetwork::new(id, peers.clone());
        let raft = Raft::new(id, opts.raft_config()?, network, log_store, sm)
            .await
            .map_err(setup("cannot start Raft"))?;
        tokio::spawn(trace_leadership(raft.server_metrics(), id, last_append_us));
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let server_task = tokio::spawn(server.run(async move {
            let _ = stop_rx.changed().await;
        }));
        let cluster = Cluster {
            inner: Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
                let weak = weak.clone();
                let round: RoundFn = Box::new(move || {
                    let inner = weak.upgrade();
                    Box::pin(async move {
                        match inner {
                            Some(inner) => Cluster { inner }.read_index_round().await,
                            None => Err("the node is shutting down".to_owned()),
                        }
                    })
                });
                Inner {
                    id,
                    info: opts.node_info(),
                    opts,
                    raft,
                    sm: reader,
                    peers,
                    data_peers,
                    data_slot,
                    ca,
                    rpc_metrics,
                    reads: ReadBatcher::new(round),
                    server_stop: Mutex::new(Some(stop_tx)),
                    server_task: Mutex::new(Some(server_task)),
                }
            }),
        };
        let _ = slot.set(cluster.clone());
        let weak = Arc::downgrade(&cluster.inner);
        cluster.inner.peers.on_connect(Arc::new(move |addr: &str| {
            if let Some(inner) = weak.upgrade() {
                let addr = addr.to_owned();
                tokio::spawn(async move { Cluster { inner }.connected_to(&addr).await });
            }
        }));
        Ok(cluster)
    }

    /// A connection to the member at `addr` was just established: it is reachable again (after
    /// a partition, a restart, or the first time). As when it campaigns (`heard_from`), a
    /// leader whose replication to it backs off after failures retries now rather than when
    /// the backoff runs out (up to a second).
    async fn connected_to(&self, addr: &str) {
        let membership = self
            .inner
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        let id = membership
            .nodes()
            .find(|(_, n)| n.raft_addr == addr)
            .map(|(id, _)| *id);
        if let Some(id) = id {
            self.heard_from(id).await;
        }
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    pub fn node(&self) -> &NodeInfo {
        &self.inner.info
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Installs the handler of incoming `shoal-data/1` connections (the node's chunk service).
    /// Until then such connections are closed with `codes::NO_DATA_HANDLER`.
    pub fn serve_data(&self, handler: Arc<dyn DataHandler>) {
        self.inner.data_slot.set(handler);
    }

    /// A `shoal-data/1` connection to member `node` (by name, resolved through the `nodes`
    /// table), cached and shared by every caller until it closes. The server must present
    /// `node`'s own certificate.
    pub async fn data_connection(&self, node: &str) -> Result<quinn::Connection, ClusterError> {
        let row = self
            .get(T_NODES, node)
            .await?
            .ok_or_else(|| ClusterError::NotFound(format!("node {node}")))?;
        let rec: NodeRecord = parse(T_NODES, &row.value)?;
        let addr = &rec.info.raft_addr;
        let conn = self.inner.data_peers.connection(addr).await.map_err(|e| {
            ClusterError::Unavailable(format!("cannot reach node {node} at {addr}: {}", chain(&e)))
        })?;
        match tls::peer_node_name(&conn) {
            Some(name) if name == node => Ok(conn),
            other => {
                conn.close(crate::net::codes::SHUTDOWN, b"unexpected node");
                Err(ClusterError::Unavailable(format!(
                    "{addr} answered as {other:?}, not as node {node}"
                )))
            }
        }
    }

    /// Every node in the `nodes` table (this replica's view).
    pub async fn node_records(&self) -> Result<Vec<NodeRecord>, ClusterError> {
        self.list(T_NODES, "", usize::MAX)
            .await?
            .into_iter()
            .map(|(_, row)| parse(T_NODES, &row.value))
            .collect()
    }

    pub fn metrics(&self) -> crate::raft_types::RaftMetrics {
        self.inner.raft.metrics().borrow_watched().clone()
    }

    async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, ClusterError> {
        let m = self
            .inner
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map_err(|e| ClusterError::Unavailable(format!("no leader: {e}")))?;
        Ok(m.current_leader.expect("waited for a leader"))
    }

    async fn wait_for_membership(&self, timeout: Duration) -> Result<(), ClusterError> {
        let id = self.inner.id;
        self.inner
            .raft
            .wait(Some(timeout))
            .metrics(
                move |m| {
                    m.membership_config
                        .membership()
                        .nodes()
                        .any(|(n, _)| *n == id)
                },
                "this node in the membership",
            )
            .await
            .map_err(|e| {
                ClusterError::JoinRefused(format!(
                    "the cluster accepted the join but did not add this node to Raft: {e}"
                ))
            })?;
        Ok(())
    }

    /// The leader's id and peer address, if one is known.
    /// Called on every write and read barrier: reads the watched metrics in place instead of
    /// cloning them.
    fn leader(&self) -> Option<(NodeId, Option<NodeInfo>)> {
        let rx = self.inner.raft.metrics();
        let m = rx.borrow_watched();
        let leader = m.current_leader?;
        let info = m
            .membership_config
            .membership()
            .nodes()
            .find(|(id, _)| **id == leader)
            .map(|(_, n)| n.clone());
        Some((leader, info))
    }

    /// Proposes a transaction through Raft, forwarding to the leader when this node is not it.
    ///
    /// A forwarded write follows the leader: when the target turns out dead, not the leader,
    /// or is replaced while the write waits, it is sent again to the next leader as soon as
    /// this node learns of one. Forwarded writes carry a request id chosen here, so a re-sent
    /// write whose first copy did commit is answered with the first result, not applied twice.
    /// Errors: `Unavailable` when no leader answered within 10 s (nothing was applied, or the
    /// write carries its id and a retry is safe only with [`Cluster::write_keyed`]);
    /// `CommitUnknown` when a write this node proposed itself as leader lost leadership
    /// before it committed.
    pub async fn write(&self, txn: Txn) -> Result<TxnResponse, ClusterError> {
        self.write_within(txn, None, LEADER_WAIT).await
    }

    /// Like [`Cluster::write`], with a client request id: within [`shoal_types::REQUEST_WINDOW`]
    /// revisions the state machine applies one id once, and answers every repeat with the first
    /// result. A caller that got `Unavailable` or `CommitUnknown` (or no answer at all) may send
    /// the same id again, through any node, at no risk of applying it twice.
    pub async fn write_keyed(
        &self,
        request_id: &str,
        txn: Txn,
    ) -> Result<TxnResponse, ClusterError> {
        self.write_within(txn, Some(request_id.to_owned()), LEADER_WAIT)
            .await
    }

    /// [`Cluster::write`] or [`Cluster::write_keyed`] with the caller's own deadline.
    pub async fn write_within(
        &self,
        txn: Txn,
        request_id: Option<String>,
        timeout: Duration,
    ) -> Result<TxnResponse, ClusterError> {
        txn.validate()
            .map_err(|e| ClusterError::BadRequest(e.to_string()))?;
        let mut cmd = match request_id {
            Some(request_id) => {
                let keyed = KeyedTxn { request_id, txn };
                keyed
                    .validate()
                    .map_err(|e| ClusterError::BadRequest(e.to_string()))?;
                Command::Keyed(Box::new(keyed))
            }
            None => Command::Txn(txn),
        };
        let deadline = Instant::now() + timeout;
        let mut last_err = String::from("no leader elected");
        // Whether a copy of this command may be in some log with no answer yet.
        let mut unknown = false;
        // Whether an earlier attempt failed, for the failover trace.
        let mut retried = false;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(if unknown {
                    ClusterError::CommitUnknown(last_err)
                } else {
                    ClusterError::Unavailable(last_err)
                });
            }
            match self.leader() {
                Some((leader, _)) if leader == self.inner.id => {
                    match tokio::time::timeout(remaining, self.propose_here(cmd.clone(), deadline))
                        .await
                    {
                        Ok(Ok(resp)) => return Ok(resp.data),
                        // Refused before it was appended: follow the leadership. A new leader
                        // also refuses writes until a quorum has acknowledged it (its lease),
                        // so look again soon even if the leadership stays here.
                        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                            last_err = "leadership moved".into();
                            self.wait_leader_other_than_for(Some(leader), deadline, FORWARD_RETRY)
                                .await;
                        }
                        Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)))) => {
                            last_err =
                                "this node lost leadership before the write committed".into();
                            if cmd.request_id().is_none() {
                                return Err(ClusterError::CommitUnknown(last_err));
                            }
                            unknown = true;
                            self.wait_leader_other_than_for(Some(leader), deadline, FORWARD_RETRY)
                                .await;
                        }
                        Ok(Err(RaftError::APIError(e))) => {
                            return Err(ClusterError::Unavailable(e.to_string()))
                        }
                        Ok(Err(RaftError::Fatal(e))) => {
                            return Err(ClusterError::Fatal(e.to_string()))
                        }
                        Err(_) => {
                            last_err = format!("not committed within {timeout:?}");
                            return Err(ClusterError::CommitUnknown(last_err));
                        }
                    }
                }
                Some((leader, Some(info))) => {
                    // Re-sending is safe only for a keyed command, so every forwarded command
                    // carries an id (the leader's own proposals skip the cost).
                    if cmd.request_id().is_none() {
                        cmd = keyed_by_node(cmd);
                    }
                    let abandon = self.leader_moved_from(leader);
                    match self
                        .inner
                        .peers
                        .forward_write(&info.raft_addr, cmd.clone(), remaining, abandon)
                        .await
                    {
                        Ok(resp) => {
                            if retried {
                                tracing::debug!(
                                    target: "shoal::failover",
                                    event = "rerouted_write_acked",
                                    leader,
                                    unix_us = unix_us(),
                                    "a forwarded write that failed before was acknowledged"
                                );
                            }
                            self.catch_up_to(resp.revision, deadline).await;
                            return Ok(resp);
                        }
                        Err(ForwardError::NotLeader(e)) => {
                            retried = true;
                            last_err = format!("forwarding to {}: {e}", info.name);
                            self.wait_leader_other_than_for(Some(leader), deadline, FORWARD_RETRY)
                                .await;
                        }
                        Err(e @ ForwardError::NotSent(_)) => {
                            retried = true;
                            last_err = format!("forwarding to {}: {}", info.name, chain(&e));
                            // A target that cannot be reached is dead or cut off: wait for the
                            // next leader, but look again soon in case the link recovers.
                            self.wait_leader_other_than_for(Some(leader), deadline, FORWARD_RETRY)
                                .await;
                        }
                        Err(e @ ForwardError::Unknown(_)) => {
                            // The command is keyed: sending it again cannot apply it twice.
                            unknown = true;
                            retried = true;
                            last_err = format!("forwarding to {}: {}", info.name, chain(&e));
                            self.wait_leader_other_than_for(Some(leader), deadline, FORWARD_RETRY)
                                .await;
                        }
                    }
                }
                known => {
                    if let Some((_, None)) = known {
                        last_err = "the leader is not in this node's membership yet".into();
                    }
                    self.wait_leader_other_than_for(
                        known.map(|(id, _)| id),
                        deadline,
                        FORWARD_RETRY,
                    )
                    .await;
                }
            }
        }
    }

    /// A voter that campaigns is alive and can reach this node. If this node leads and its
    /// replication to that voter is backing off after failures (up to a second, see
    /// `QuicPeer::backoff`), retry it now: a node back from a partition or a restart is
    /// caught up as soon as it speaks, not when the backoff runs out.
    async fn heard_from(&self, id: NodeId) {
        if id == self.inner.id
            || self.inner.raft.metrics().borrow_watched().state != ServerState::Leader
        {
            return;
        }
        if let Err(e) = self.inner.raft.trigger().reset_backoff([id]).await {
            tracing::debug!(error = %e, "cannot reset the replication backoff");
        }
    }

    /// Proposes `cmd` on this node. A leader fresh from an election refuses writes until a
    /// quorum has acknowledged it (openraft checks its lease); while this node stays leader,
    /// such a refusal is retried as soon as the next acknowledgement arrives rather than after a
    /// fixed pause, until `deadline`. Anything else is returned as it is.
    async fn propose_here(
        &self,
        cmd: Command,
        deadline: Instant,
    ) -> Result<
        openraft::raft::ClientWriteResponse<TypeConfig>,
        RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
    > {
        let me = self.inner.id;
        loop {
            let acked = self.inner.raft.metrics().borrow_watched().last_quorum_acked;
            match self.inner.raft.client_write(cmd.clone()).await {
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
                    if f.leader_id.is_none_or(|l| l == me) && Instant::now() < deadline =>
                {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .min(FORWARD_RETRY);
                    let waited = self
                        .inner
                        .raft
                        .wait(Some(left))
                        .metrics(
                            move |m| m.current_leader != Some(me) || m.last_quorum_acked != acked,
                            "a quorum acknowledgement",
                        )
                        .await;
                    if let Ok(m) = waited {
                        if m.current_leader != Some(me) {
                            return Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)));
                        }
                    }
                }
                other => return other,
            }
        }
    }

    /// Resolves once this node's view of the leader is something other than `leader` (another
    /// node, this one, or none because an election started).
    fn leader_moved_from(&self, leader: NodeId) -> impl std::future::Future<Output = ()> {
        let raft = self.inner.raft.clone();
        async move {
            let _ = raft
                .wait(None)
                .metrics(move |m| m.current_leader != Some(leader), "a leader change")
                .await;
        }
    }

    /// Waits until a leader other than `old` is known, for at most `most` and not past
    /// `deadline`.
    async fn wait_leader_other_than_for(
        &self,
        old: Option<NodeId>,
        deadline: Instant,
        most: Duration,
    ) {
        let left = deadline.saturating_duration_since(Instant::now()).min(most);
        let _ = self
            .inner
            .raft
            .wait(Some(left))
            .metrics(
                move |m| m.current_leader.is_some() && m.current_leader != old,
                "a new leader",
            )
            .await;
    }

    /// Waits, until `deadline` at most, for this replica to apply `index`: a client that wrote
    /// through this node then reads through it sees its write (the leader answers a forwarded
    /// write once it applied it; this follower learns the commit a moment later). Past the
    /// deadline the write stands all the same, as acknowledged; the local read may lag.
    async fn catch_up_to(&self, index: u64, deadline: Instant) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let caught_up = self
            .inner
            .raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), "a forwarded write applied here")
            .await;
        if let Err(e) = caught_up {
            tracing::warn!(index, error = %e, "this replica did not apply a forwarded write in time");
        }
    }

    /// After this returns, local reads see every write acknowledged before it was called.
    /// Concurrent callers share read-index rounds (`read_index.rs`). A round whose leader is
    /// replaced while it waits is given up and asked of the next leader at once.
    pub async fn read_barrier(&self) -> Result<u64, ClusterError> {
        let deadline = Instant::now() + LEADER_WAIT;
        let mut last_err = String::from("no leader elected");
        while Instant::now() < deadline {
            let leader = self.leader().map(|(id, _)| id);
            match self.inner.reads.read_index().await {
                Ok(index) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    self.inner
                        .raft
                        .wait(Some(remaining))
                        .applied_index_at_least(Some(index), "read barrier")
                        .await
                        .map_err(|e| ClusterError::Unavailable(format!("catching up: {e}")))?;
                    return Ok(index);
                }
                Err(e) => last_err = e,
            }
            // A read index is idempotent: ask again as soon as another leader is known.
            self.wait_leader_other_than_for(leader, deadline, FORWARD_RETRY)
                .await;
        }
        Err(ClusterError::Unavailable(last_err))
    }

    /// One read-index round: from Raft if this node leads, else from the leader.
    async fn read_index_round(&self) -> Result<u64, String> {
        match self.leader() {
            Some((leader, _)) if leader == self.inner.id => self
                .inner
                .raft
                .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
                .await
                .map(|read| read.index())
                .map_err(|e| e.to_string()),
            Some((leader, Some(info))) => self
                .inner
                .peers
                .linearizable_read_unless(&info.raft_addr, self.leader_moved_from(leader))
                .await
                .map_err(|e| format!("read index from {}: {}", info.name, chain(&e))),
            _ => Err("no leader elected".to_owned()),
        }
    }

    pub async fn get(&self, table: &str, key: &str) -> Result<Option<Row>, ClusterError> {
        self.inner
            .sm
            .get(table, key)
            .await
            .map_err(|e| ClusterError::Corrupt(e.to_string()))
    }

    pub async fn list(
        &self,
        table: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Row)>, ClusterError> {
        self.inner
            .sm
            .list(table, prefix, limit)
            .await
            .map_err(|e| ClusterError::Corrupt(e.to_string()))
    }

    /// Like [`Cluster::list`], with the revision the rows are exactly as of (read from one
    /// snapshot): a watch from `revision + 1` then misses nothing and repeats nothing.
    pub async fn list_with_revision(
        &self,
        table: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<(u64, Vec<(String, Row)>), ClusterError> {
        self.inner
            .sm
            .list_with_revision(table, prefix, limit)
            .await
            .map_err(|e| ClusterError::Corrupt(e.to_string()))
    }

    /// The last revision applied to this replica.
    pub fn revision(&self) -> u64 {
        self.inner.sm.revision()
    }

    /// Changes of `table` under `prefix` from `from_revision` on. The error stays typed: a
    /// caller resuming from a compacted revision gets `WatchError::Compacted { oldest }` and
    /// must list again, then watch from the listing's revision.
    pub async fn watch(
        &self,
        table: &str,
        prefix: &str,
        from_revision: u64,
    ) -> Result<WatchStream, WatchError> {
        self.inner.sm.watch(table, prefix, from_revision).await
    }

    pub async fn create_join_token(
        &self,
        ttl: Duration,
        uses: u32,
        description: String,
        created_by: String,
    ) -> Result<(TokenInfo, String), ClusterError> {
        let (token, record) = JoinToken::generate(
            &self.inner.ca.fingerprint(),
            join::now_secs(),
            ttl.as_secs(),
            uses,
            description,
            created_by,
        );
        self.write(
            Txn::new()
                .when(T_JOIN_TOKENS, &record.id, Expect::Absent)
                .put(T_JOIN_TOKENS, &record.id, json(&record)),
        )
        .await?;
        Ok((TokenInfo::from(&record), token.to_string()))
    }

    pub async fn list_join_tokens(&self) -> Result<Vec<TokenInfo>, ClusterError> {
        let now = join::now_secs();
        self.list(T_JOIN_TOKENS, "", usize::MAX)
            .await?
            .into_iter()
            .map(|(_, row)| parse::<TokenRecord>(T_JOIN_TOKENS, &row.value))
            .filter(|r| r.as_ref().map(|r| r.expires_at > now).unwrap_or(true))
            .map(|r| r.map(|r| TokenInfo::from(&r)))
            .collect()
    }

    pub async fn revoke_join_token(&self, id: &str) -> Result<(), ClusterError> {
        let resp = self
            .write(
                Txn::new()
                    .when(T_JOIN_TOKENS, id, Expect::Present)
                    .delete(T_JOIN_TOKENS, id),
            )
            .await?;
        if resp.succeeded {
            Ok(())
        } else {
            Err(ClusterError::NotFound(format!("join token {id}")))
        }
    }

    /// Removes a node: its row goes, and the voter manager takes it out of Raft.
    pub async fn remove_node(&self, name: &str) -> Result<(), ClusterError> {
        // Deleting the row and revoking the node's certificate is one transaction, conditioned
        // on the row read here.
        for _ in 0..5 {
            self.read_barrier().await?;
            let row = self
                .get(T_NODES, name)
                .await?
                .ok_or_else(|| ClusterError::NotFound(format!("node {name}")))?;
            let rec: NodeRecord = parse(T_NODES, &row.value)?;
            let mut txn = Txn::new()
                .when(T_NODES, name, Expect::Revision(row.mod_revision))
                .delete(T_NODES, name);
            if let Some(fp) = &rec.cert_sha256 {
                txn = txn.put(T_REVOKED_CERTS, fp, name.as_bytes().to_vec());
            }
            if self.write(txn).await?.succeeded {
                return Ok(());
            }
        }
        Err(ClusterError::Conflict(format!(
            "node {name} kept changing while it was being removed"
        )))
    }

    /// Whether the certificate with this fingerprint belonged to a removed node (this replica's
    /// view).
    pub async fn is_cert_revoked(&self, cert_sha256: &str) -> Result<bool, ClusterError> {
        Ok(self.get(T_REVOKED_CERTS, cert_sha256).await?.is_some())
    }

    fn local_status(&self) -> PeerStatus {
        let m = self.metrics();
        let role = match m.state {
            ServerState::Leader => PeerRole::Leader,
            ServerState::Candidate => PeerRole::Candidate,
            ServerState::Follower => PeerRole::Follower,
            ServerState::Learner => PeerRole::Learner,
            ServerState::Shutdown => PeerRole::Shutdown,
        };
        PeerStatus {
            node_id: self.inner.id,
            name: self.inner.info.name.clone(),
            term: m.current_term,
            role,
            last_applied: m.last_applied.map(|l| l.index),
            leader_id: m.current_leader,
        }
    }

    /// Waits until every member of the membership has applied `revision`, asking each over
    /// QUIC, for at most `deadline`. Returns the names of the members that had not (down,
    /// cut off or slow) when the deadline passed. Used where a change must be in force on
    /// every node before the caller is told it is done, such as a token revocation.
    pub async fn wait_applied_everywhere(
        &self,
        revision: u64,
        deadline: Duration,
    ) -> Result<(), Vec<String>> {
        let until = tokio::time::Instant::now() + deadline;
        let membership = self.metrics().membership_config.membership().clone();
        let mut waits = Vec::new();
        for (id, info) in membership.nodes() {
            let (id, info) = (*id, info.clone());
            let this = self.clone();
            waits.push(async move {
                let mut pause = Duration::from_millis(2);
                loop {
                    let applied = if id == this.inner.id {
                        Some(this.revision())
                    } else {
                        let left = until.saturating_duration_since(tokio::time::Instant::now());
                        tokio::time::timeout(left, this.inner.peers.status(&info.raft_addr))
                            .await
                            .ok()
                            .and_then(|r| r.ok())
                            .and_then(|s| s.last_applied)
                    };
                    if applied.is_some_and(|a| a >= revision) {
                        return None;
                    }
                    if tokio::time::Instant::now() + pause >= until {
                        return Some(info.name.clone());
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
            });
        }
        let lagging: Vec<String> = futures::future::join_all(waits)
            .await
            .into_iter()
            .flatten()
            .collect();
        if lagging.is_empty() {
            Ok(())
        } else {
            Err(lagging)
        }
    }

    /// Every member's role and health, asking each over QUIC (one second each, in parallel).
    pub async fn cluster_status(&self) -> ClusterStatus {
        let m = self.metrics();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let leader_name = m.current_leader.and_then(|l| {
            membership
                .nodes()
                .find(|(id, _)| **id == l)
                .map(|(_, n)| n.name.clone())
        });
        let mut queries = Vec::new();
        for (id, info) in membership.nodes() {
            let (id, info) = (*id, info.clone());
            let this = self.clone();
            queries.push(async move {
                let status = if id == this.inner.id {
                    Some(this.local_status())
                } else {
                    tokio::time::timeout(
                        Duration::from_secs(1),
                        this.inner.peers.status(&info.raft_addr),
                    )
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                };
                (id, info, status)
            });
        }
        let results = futures::future::join_all(queries).await;
        let mut members: Vec<MemberStatus> = results
            .into_iter()
            .map(|(id, info, status)| {
                let role = if Some(id) == m.current_leader {
                    "leader"
                } else if voters.contains(&id) {
                    "voter"
                } else {
                    "learner"
                };
                MemberStatus {
                    name: info.name,
                    id,
                    role: role.into(),
                    api: info.api_addr,
                    raft_addr: info.raft_addr,
                    zone: info.zone,
                    applied_index: status.as_ref().and_then(|s| s.last_applied).unwrap_or(0),
                    healthy: status
                        .as_ref()
                        .is_some_and(|s| s.leader_id.is_some() && s.term == m.current_term),
                }
            })
            .collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        ClusterStatus {
            leader: leader_name,
            term: m.current_term,
            members,
            node: self.inner.info.name.clone(),
            revision: self.revision(),
        }
    }

    /// Runs the voter manager until `shutdown` resolves, then stops the peer server (which
    /// has been serving since the node opened) and drains its connections.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ClusterError> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let manager = tokio::spawn(self.clone().voter_manager(stop_rx));
        shutdown.await;
        // Before the peer server stops: the new leader's vote request and first AppendEntries
        // reach this node while it waits, which is how it learns the handover is done.
        self.hand_over_leadership().await;
        let _ = stop_tx.send(true);
        let _ = manager.await;
        self.stop_server().await;
        Ok(())
    }

    async fn stop_server(&self) {
        if let Some(stop) = self.inner.server_stop.lock().expect("lock").take() {
            let _ = stop.send(true);
        }
        let task = self.inner.server_task.lock().expect("lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Stops Raft and the peer server. Idempotent.
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "Raft did not shut down cleanly");
        }
        self.stop_server().await;
    }

    /// On the leader, hands leadership to the most caught-up reachable voter and waits until
    /// another node leads, for at most twice the election timeout; returns the new leader.
    /// Does nothing on a follower. Called by [`Cluster::run`] when the node is asked to stop,
    /// so a graceful stop of the leader costs the cluster one election round trip instead of
    /// a leader lease plus an election timeout.
    pub async fn hand_over_leadership(&self) -> Option<NodeId> {
        let m = self.metrics();
        if m.state != ServerState::Leader {
            return None;
        }
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let health = health_of(&m, voters.iter());
        let election = Duration::from_millis(self.inner.opts.election_timeout_ms);
        let Some(target) = membership::transfer_target(self.inner.id, &voters, &health, election)
        else {
            tracing::info!("stopping as leader: no reachable voter to hand leadership to");
            return None;
        };
        let started = Instant::now();
        tracing::info!(
            target: "shoal::failover",
            event = "transfer_started",
            to = target,
            unix_us = unix_us(),
            "stopping as leader: handing leadership over"
        );
        if let Err(e) = self.inner.raft.trigger().transfer_leader(target).await {
            tracing::warn!(error = %e, "cannot hand leadership over");
            return None;
        }
        let me = self.inner.id;
        let done = self
            .inner
            .raft
            .wait(Some(2 * election))
            .metrics(
                move |m| m.current_leader.is_some_and(|l| l != me),
                "another leader",
            )
            .await;
        match done {
            Ok(m) => {
                tracing::info!(
                    target: "shoal::failover",
                    event = "transfer_done",
                    leader = m.current_leader,
                    took_ms = started.elapsed().as_millis() as u64,
                    "leadership handed over"
                );
                m.current_leader
            }
            Err(e) => {
                tracing::warn!(error = %e, to = target, "leadership was not handed over in time");
                None
            }
        }
    }

    /// On the leader, reconciles Raft membership with the `nodes` table, one change at a time.
    async fn voter_manager(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut last_quorum_change: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            let m = self.metrics();
            if m.state != ServerState::Leader {
                continue;
            }
            match self.plan_membership(&m, last_quorum_change).await {
                Ok(Some(change)) => {
                    let quorum = !matches!(change, Change::AddLearner(..));
                    tracing::info!(?change, "membership change");
                    match self.apply_change(change).await {
                        Ok(()) if quorum => last_quorum_change = Some(Instant::now()),
                        Ok(()) => {}
                        Err(e) => tracing::warn!(error = %e, "membership change failed"),
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot plan membership"),
            }
        }
    }

    async fn plan_membership(
        &self,
        m: &crate::raft_types::RaftMetrics,
        last_quorum_change: Option<Instant>,
    ) -> Result<Option<Change>, ClusterError> {
        let membership = m.membership_config.membership();
        // Wait for a pending joint configuration to finish.
        if membership.get_joint_config().len() > 1 {
            return Ok(None);
        }
        let mut desired = BTreeMap::new();
        for (_, row) in self.list(T_NODES, "", usize::MAX).await? {
            let rec: NodeRecord = parse(T_NODES, &row.value)?;
            desired.insert(rec.id, rec.info);
        }
        let voters_wanted = self.voters_wanted().await?;
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let zones: BTreeMap<NodeId, String> = membership
            .nodes()
            .map(|(id, n)| (*id, n.zone.clone()))
            .collect();
        let health = health_of(m, voters.iter().chain(learners.iter()));
        let view = membership::View {
            leader: self.inner.id,
            desired: &desired,
            voters: &voters,
            learners: &learners,
            zones: &zones,
            health: &health,
            last_index: m.last_log_index.unwrap_or(0),
            voters_wanted,
            replace_after: self.inner.opts.replace_after,
            quorum_change_allowed: last_quorum_change
                .is_none_or(|t| t.elapsed() >= self.inner.opts.stabilization),
        };
        Ok(membership::plan(&view))
    }

    /// How many voters the cluster keeps: the count `init` committed, or this node's own
    /// setting in a cluster formed before that row existed.
    pub async fn voters_wanted(&self) -> Result<usize, ClusterError> {
        match self.get(T_CLUSTER, K_VOTERS).await? {
            Some(row) => {
                let n: usize = parse(T_CLUSTER, &row.value)?;
                if [1, 3, 5].contains(&n) {
                    Ok(n)
                } else {
                    Err(ClusterError::Corrupt(format!(
                        "{T_CLUSTER}/{K_VOTERS} is {n}; it must be 1, 3 or 5"
                    )))
                }
            }
            None => Ok(self.inner.opts.voters),
        }
    }

    async fn apply_change(&self, change: Change) -> Result<(), ClusterError> {
        let raft = &self.inner.raft;
        let result = match change {
            Change::AddLearner(id, info) => raft.add_learner(id, info, false).await.map(|_| ()),
            Change::Remove(id) => raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map(|_| ()),
            Change::SetVoters(voters) => raft
                .change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
                .await
                .map(|_| ()),
        };
        result.map_err(|e| ClusterError::Unavailable(e.to_string()))
    }

    /// Prometheus text for the cluster's own metrics.
    pub fn prometheus_text(&self) -> String {
        let m = self.metrics();
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            ));
        };
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let committed = m.cluster_committed.map(|l| l.index).unwrap_or(0);
        gauge("shoal_raft_term", "Current Raft term.", m.current_term);
        gauge(
            "shoal_raft_commit_index",
            "Highest log index known committed.",
            committed,
        );
        gauge(
            "shoal_raft_applied_index",
            "Highest log index applied.",
            applied,
        );
        gauge(
            "shoal_raft_apply_lag",
            "Committed entries not yet applied.",
            committed.saturating_sub(applied),
        );
        gauge(
            "shoal_raft_last_log_index",
            "Last index in the local log.",
            m.last_log_index.unwrap_or(0),
        );
        gauge(
            "shoal_raft_snapshot_index",
            "Last log index covered by the current snapshot.",
            m.snapshot.map(|l| l.index).unwrap_or(0),
        );
        gauge(
            "shoal_raft_snapshot_bytes",
            "Size of the current snapshot file.",
            self.inner.sm.snapshot_file_size().unwrap_or(0),
        );
        gauge(
            "shoal_raft_members",
            "Members of the Raft group (voters and learners).",
            m.membership_config.membership().nodes().count() as u64,
        );
        gauge(
            "shoal_raft_voters",
            "Voters of the Raft group.",
            m.membership_config.membership().voter_ids().count() as u64,
        );
        out.push_str("# HELP shoal_raft_role This node's role (1 for the current one).\n# TYPE shoal_raft_role gauge\n");
        for (role, st) in [
            ("leader", ServerState::Leader),
            ("follower", ServerState::Follower),
            ("candidate", ServerState::Candidate),
            ("learner", ServerState::Learner),
        ] {
            out.push_str(&format!(
                "shoal_raft_role{{role=\"{role}\"}} {}\n",
                u8::from(m.state == st)
            ));
        }
        out.push_str(&self.inner.rpc_metrics.prometheus_text());
        out
    }
}

fn save_identity(
    opts: &ClusterOptions,
    id: NodeId,
    ca: &ClusterCa,
    identity: &NodeIdentity,
) -> Result<(), ClusterError> {
    let dir = opts.tls_dir();
    let (ca_cert, ca_key) = ca.to_pem();
    write_private(&dir.join("ca.pem"), &ca_cert)?;
    write_private(&dir.join("ca.key"), &ca_key)?;
    write_private(&dir.join("node.pem"), &identity.cert_chain_pem)?;
    write_private(&dir.join("node.key"), &identity.key_pem)?;
    write_private(&opts.data_dir.join(NODE_ID_FILE), &format!("{id}\n"))
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

fn parse<T: for<'de> Deserialize<'de>>(table: &str, bytes: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ClusterError::Corrupt(format!("a row of table {table} is not valid: {e}")))
}

fn resolve(addr: &str) -> Result<SocketAddr, ClusterError> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ClusterError::BadRequest(format!("{addr:?} is not a HOST:PORT address")))
}

/// The full chain of an error's messages, for errors that cross a process boundary.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The peer protocol's server side, on top of Raft. The slot is filled once the node is
/// assembled; requests that arrive earlier are refused and retried by the sender.
/// What the leader's metrics say of each member in `ids`: time since its last acknowledgement
/// and how far its log is known to match.
fn health_of<'a>(
    m: &crate::raft_types::RaftMetrics,
    ids: impl Iterator<Item = &'a NodeId>,
) -> BTreeMap<NodeId, Health> {
    let now = <openraft::TokioInstant as openraft::Instant>::now();
    let heartbeat = m.heartbeat.clone().unwrap_or_default();
    let replication = m.replication.clone().unwrap_or_default();
    ids.map(|id| {
        let since_ack = heartbeat
            .get(id)
            .and_then(|t| t.as_ref())
            .map(|t| now.saturating_duration_since(**t));
        let matched = replication
            .get(id)
            .and_then(|l| l.as_ref())
            .map(|l| l.index)
            .unwrap_or(0);
        (*id, Health { since_ack, matched })
    })
    .collect()
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Logs this node's view of every leadership change at info level under the target
/// `shoal::failover`, with Unix timestamps in microseconds, so a failover can be taken apart
/// from the nodes' logs (docs/benchmarks.md): when this node last accepted an AppendEntries,
/// when it campaigned or granted its vote (its election timer fired), and when it learned the
/// new leader. Ends when Raft stops.
async fn trace_leadership(
    mut rx: openraft::type_config::alias::WatchReceiverOf<
        TypeConfig,
        openraft::metrics::RaftServerMetrics<TypeConfig>,
    >,
    me: NodeId,
    last_append_us: Arc<AtomicU64>,
) {
    let first = rx.borrow_watched().clone();
    let (mut leader, mut vote) = (first.current_leader, first.vote);
    let mut campaigns = 0u32;
    while rx.changed().await.is_ok() {
        let m = rx.borrow_watched().clone();
        if m.vote != vote {
            if !m.vote.committed {
                let (term, to) = (m.vote.leader_id.term, m.vote.leader_id.node_id);
                if to == me {
                    campaigns += 1;
                }
                tracing::info!(
                    target: "shoal::failover",
                    event = if to == me { "campaign" } else { "voted" },
                    term,
                    candidate = to,
                    last_append_us = last_append_us.load(Ordering::Relaxed),
                    unix_us = unix_us(),
                    "vote changed"
                );
            }
            vote = m.vote;
        }
        if m.current_leader != leader {
            if let Some(new) = m.current_leader {
                tracing::info!(
                    target: "shoal::failover",
                    event = "leader",
                    term = m.vote.leader_id.term,
                    leader = new,
                    is_me = new == me,
                    campaigns,
                    last_append_us = last_append_us.load(Ordering::Relaxed),
                    unix_us = unix_us(),
                    "leader known"
                );
                campaigns = 0;
            }
            leader = m.current_leader;
        }
    }
}

struct Handler(Arc<OnceLock<Cluster>>, Arc<AtomicU64>);

fn starting() -> PeerError {
    PeerError::Fatal("the node is still starting".into())
}

fn raft_err<E: std::fmt::Display>(e: E) -> PeerError {
    PeerError::Fatal(e.to_string())
}

fn forward(c: &Cluster) -> PeerError {
    match c.leader() {
        Some((id, info)) => PeerError::ForwardToLeader {
            leader_id: Some(id),
            leader_addr: info.map(|i| i.raft_addr),
        },
        None => PeerError::ForwardToLeader {
            leader_id: None,
            leader_addr: None,
        },
    }
}

impl PeerHandler for Handler {
    fn append_entries(
        &self,
        req: openraft::raft::AppendEntriesRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<openraft::raft::AppendEntriesResponse<TypeConfig>, PeerError>> {
        Box::pin(async move {
            let c = self.0.get().ok_or_else(starting)?;
            let resp = c.inner.raft.append_entries(req).await.map_err(raft_err)?;
            // Any answer but a higher vote means this node follows the sender.
            if !matches!(resp, openraft::raft::AppendEntriesResponse::HigherVote(_)) {
                self.1.store(unix_us(), Ordering::Relaxed);
            }
            Ok(resp)
        })
    }

    fn transfer_leader(
        &self,
        req: openraft::raft::TransferLeaderRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<openraft::raft::TransferLeaderResponse<TypeConfig>, PeerError>> {
        Box::pin(async move {
            let c = self.0.get().ok_or_else(starting)?;
            tracing::info!(
                target: "shoal::failover",
                event = "transfer_received",
                to = req.to_node_id(),
                unix_us = unix_us(),
                "the leader hands leadership over"
            );
            c.inner
                .raft
                .handle_transfer_leader(req)
                .await
                .map_err(raft_err)
        })
    }

    fn vote(
        &self,
        req: openraft::raft::VoteRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<openraft::raft::VoteResponse<TypeConfig>, PeerError>> {
        Box::pin(async move {
            let c = self.0.get().ok_or_else(starting)?;
            c.heard_from(req.vote.leader_id.node_id).await;
            c.inner.raft.vote(req).await.map_err(raft_err)
        })
    }

    fn pre_vote(
        &self,
        req: openraft::raft::VoteRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<openraft::raft::VoteResponse<TypeConfig>, PeerError>> {
        Box::pin(async move {
            let c = self.0.get().ok_or_else(starting)?;
            c.heard_from(req.vote.leader_id.node_id).await;
            c.inner.raft.pre_vote(req).await.map_err(raft_err)
        })
    }

    fn install_snapshot(
        &self,
        vote: Vote,
        meta: SnapshotMeta,
        file: std::fs::File,
    ) -> BoxFuture<'_, Result<openraft::raft::SnapshotResponse<TypeConfig>, PeerError>> {
        Box::pin(async move {
            let c = self.0.get().ok_or_else(starting)?;
            let snapshot = crate::raft_types::Snapshot {
                meta,
                snapshot: file,
            };
            c.inner
                .raft
                .install_full_snapshot(vote, snapshot)
                .await
                .map_err(raft_err)
        })
    }

    fn client_write(&self, cmd: Command) -> BoxFuture<'_, Result<TxnResponse, PeerError>> {
        Box::pin(async move {
            let c = self.0.get().ok_or_else(starting)?;
            // A fresh leader refuses writes until a quorum acknowledged it: wait for that here
            // (bounded) rather than send the follower away to retry after a pause.
            let deadline = Instant::now() + Duration::from_millis(c.inner.opts.election_timeout_ms);
            match c.propose_here(cmd, deadline).await {
                Ok(resp) => Ok(resp.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(forward(c)),
                Err(RaftError::APIError(e @ ClientWriteError::LogEntryDiscarded(_))) => {
                    Err(PeerError::CommitUnknown(e.to_string()))
                }
                Err(e) => Err(raft_err(e)),
            }
        })
    }

    /// Proposes a follower's batch in one call to openraft (one message to its core, one
    /// append), then answers each command as `client_write` would. A fresh leader's refusals
    /// (its lease not yet acknowledged) are retried one by one, as `client_write` retries them.
    fn client_write_batch(&self, cmds: Vec<Command>) -> BoxFuture<'_, Vec<WriteOutcome>> {
        Box::pin(async move {
            let n = cmds.len();
            let Some(c) = self.0.get() else {
                return vec![WriteOutcome::Failed(starting()); n];
            };
            let deadline = Instant::now() + Duration::from_millis(c.inner.opts.election_timeout_ms);
            let mut stream = match c.inner.raft.client_write_many(cmds.clone()).await {
                Ok(stream) => stream,
                Err(e) => return vec![WriteOutcome::Failed(raft_err(e)); n],
            };
            let me = c.inner.id;
            let mut outcomes = Vec::with_capacity(n);
            let mut again = Vec::new();
            for (i, cmd) in cmds.into_iter().enumerate() {
                let outcome = match stream.next().await {
                    Some(Ok(Ok(resp))) => WriteOutcome::Applied(resp.response),
                    Some(Ok(Err(ClientWriteError::ForwardToLeader(f))))
                        if f.leader_id.is_none_or(|l| l == me) =>
                    {
                        again.push((i, cmd));
                        WriteOutcome::Failed(forward(c))
                    }
                    Some(Ok(Err(ClientWriteError::ForwardToLeader(_)))) => {
                        WriteOutcome::Failed(forward(c))
                    }
                    Some(Ok(Err(e @ ClientWriteError::LogEntryDiscarded(_)))) => {
                        WriteOutcome::Failed(PeerError::CommitUnknown(e.to_string()))
                    }
                    Some(Ok(Err(e))) => WriteOutcome::Failed(raft_err(e)),
                    Some(Err(e)) => WriteOutcome::Failed(raft_err(e)),
                    None => WriteOutcome::Failed(PeerError::Fatal(
                        "Raft stopped before answering a forwarded write".into(),
                    )),
                };
                outcomes.push(outcome);
            }
            let retried = futures::future::join_all(again.into_iter().map(|(i, cmd)| async move {
                let outcome = match c.propose_here(cmd, deadline).await {
                    Ok(resp) => WriteOutcome::Applied(resp.data),
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                        WriteOutcome::Failed(forward(c))
                    }
                    Err(RaftError::APIError(e @ ClientWriteError::LogEntryDiscarded(_))) => {
                        WriteOutcome::Failed(PeerError::CommitUnknown(e.to_string()))
                    }
                    Err(e) => WriteOutcome::Failed(raft_err(e)),
                };
                (i, outcome)
            }))
            .await;
            for (i, outcome) in retried {
                outcomes[i] = outcome;
            }
            outcomes
        })
    }

    fn linearizable_read(&self) -> BoxFuture<'_, Result<u64, PeerError>> {
        Box::pin(async move {
            let c = self.0.get().ok_or_else(starting)?;
            match c
                .inner
                .raft
                .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
                .await
            {
                Ok(read) => Ok(read.index()),
                Err(RaftError::APIError(
                    openraft::error::LinearizableReadError::ForwardToLeader(_),
                )) => Err(forward(c)),
                Err(e) => Err(raft_err(e)),
            }
        })
    }

    fn is_revoked<'a>(&'a self, cert_sha256: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let Some(c) = self.0.get() else {
                // Still starting: the state that could say so is not open yet.
                return false;
            };
            c.is_cert_revoked(cert_sha256).await.unwrap_or_else(|e| {
                // Fail closed: a replica that cannot read its state admits nobody new.
                tracing::warn!(error = %e, "cannot check certificate revocation; refusing");
                true
            })
        })
    }

    fn status(&self) -> BoxFuture<'_, PeerStatus> {
        Box::pin(async move {
            match self.0.get() {
                Some(c) => c.local_status(),
                None => PeerStatus {
                    node_id: 0,
                    name: String::new(),
                    term: 0,
                    role: PeerRole::Shutdown,
                    last_applied: None,
                    leader_id: None,
                },
            }
        })
    }

    fn join(
        &self,
        req: JoinRequest,
        peer_addr: SocketAddr,
    ) -> BoxFuture<'_, Result<JoinResponse, PeerError>> {
        Box::pin(async move {
            let c = self.0.get().ok_or_else(starting)?;
            tracing::info!(name = %req.name, from = %peer_addr, "join request");
            do_join(c, req).await
        })
    }
}

async fn do_join(c: &Cluster, req: JoinRequest) -> Result<JoinResponse, PeerError> {
    tls::validate_node_name(&req.name).map_err(|e| PeerError::BadRequest(e.to_string()))?;
    resolve(&req.raft_addr).map_err(|e| PeerError::BadRequest(e.to_string()))?;
    let fatal = |e: ClusterError| PeerError::Fatal(e.to_string());
    // A token created (or used) through another node a moment ago must be visible here.
    c.read_barrier().await.map_err(fatal)?;
    let mut signed: Option<(String, NodeRecord)> = None;
    let mut joined = false;
    for _ in 0..5 {
        let row = c
            .get(T_JOIN_TOKENS, &req.token_id)
            .await
            .map_err(fatal)?
            .ok_or_else(|| PeerError::Unauthorized(join::TokenError::Unknown.to_string()))?;
        let token: TokenRecord = parse(T_JOIN_TOKENS, &row.value).map_err(fatal)?;
        let now = join::now_secs();
        token
            .check(&req.secret, now)
            .map_err(|e| PeerError::Unauthorized(e.to_string()))?;
        if c.get(T_NODES, &req.name).await.map_err(fatal)?.is_some() {
            return Err(PeerError::BadRequest(format!(
                "a node named {:?} is already in the cluster",
                req.name
            )));
        }
        // Signed once the token checked out, so a refused joiner gets nothing from the CA.
        if signed.is_none() {
            let chain = c
                .inner
                .ca
                .sign_csr(&req.csr_pem, &req.name)
                .map_err(|e| PeerError::BadRequest(format!("bad certificate request: {e}")))?;
            let record = NodeRecord {
                id: random_node_id(),
                info: NodeInfo {
                    name: req.name.clone(),
                    raft_addr: req.raft_addr.clone(),
                    api_addr: req.api_addr.clone(),
                    zone: req.zone.clone(),
                },
                joined_at: now,
                cert_sha256: Some(
                    tls::leaf_fingerprint(&chain).map_err(|e| PeerError::Fatal(e.to_string()))?,
                ),
            };
            signed = Some((chain, record));
        }
        let (_, record) = signed.as_ref().expect("signed above");
        // The node's row and the token's use commit together, conditioned on the token as
        // read: a concurrent join that used the token first makes this one re-check it.
        let txn = Txn::new()
            .when(
                T_JOIN_TOKENS,
                &req.token_id,
                Expect::Revision(row.mod_revision),
            )
            .when(T_NODES, &req.name, Expect::Absent)
            .put(
                T_JOIN_TOKENS,
                &req.token_id,
                json(&token.used(&req.name, now)),
            )
            .put(T_NODES, &req.name, json(record));
        let resp = c.write(txn).await.map_err(fatal)?;
        if resp.succeeded {
            joined = true;
            break;
        }
        if resp.failed_precondition == Some(1) {
            return Err(PeerError::BadRequest(format!(
                "a node named {:?} joined at the same moment",
                req.name
            )));
        }
        // The token changed under us (another join used it): re-read it and check again.
        c.read_barrier().await.map_err(fatal)?;
    }
    let (node_cert_chain_pem, record) = match signed {
        Some(s) if joined => s,
        _ => {
            return Err(PeerError::BadRequest(
                "the join token kept changing under concurrent joins; retry".into(),
            ))
        }
    };
    let id = record.id;
    tracing::info!(name = %req.name, id, "node joined");
    let (ca_cert_pem, ca_key_pem) = c.inner.ca.to_pem();
    let members = c
        .metrics()
        .membership_config
        .membership()
        .nodes()
        .map(|(id, n)| (*id, n.clone()))
        .collect();
    Ok(JoinResponse {
        node_id: id,
        ca_cert_pem,
        ca_key_pem,
        node_cert_chain_pem,
        members,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A follower stands for election `min + max` to `2 * max` after the last heartbeat (the
    /// lease, then the random timeout): that must be the configured timeout to 4/3 of it, and
    /// openraft must accept the bounds down to the smallest setting the node allows (3×).
    #[test]
    fn election_window_is_the_configured_timeout_to_four_thirds() {
        let (min, max) = election_timeouts(500, 100);
        assert_eq!((min + max, 2 * max), (500, 668));
        for (election, heartbeat) in [(500, 100), (300, 100), (30, 10), (60_000, 10_000)] {
            let (min, max) = election_timeouts(election, heartbeat);
            assert!(
                heartbeat < min && min < max,
                "{election}/{heartbeat}: {min}..{max}"
            );
            assert!(
                min + max >= election,
                "{election}/{heartbeat}: {min}..{max}"
            );
            let config = openraft::Config {
                heartbeat_interval: heartbeat,
                election_timeout_min: min,
                election_timeout_max: max,
                ..Default::default()
            };
            assert!(config.validate().is_ok(), "{election}/{heartbeat}");
        }
    }
}
