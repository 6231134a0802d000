//! A cluster of in-process nodes on RocksDB stores in a temporary directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::raft::ClientWriteResponse;
use openraft::{Config, ServerState};
use shoal_types::{Command, NodeId, NodeInfo, Txn};

use super::router::{Router, TestRaft};
use crate::raft_types::{RaftMetrics, TypeConfig};
use crate::store::{self, StateReader, StoreError, StoreOptions};

/// Why a cluster operation did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("node {0} is not running")]
    NotRunning(NodeId),
    #[error("no leader was elected within {0:?}")]
    NoLeader(Duration),
    #[error("the write did not complete within {0:?}")]
    Timeout(Duration),
    #[error("the write was refused: {0}")]
    Write(String),
    #[error("condition not reached within {0:?}: {1}")]
    Wait(Duration, String),
    #[error("the node's store could not be opened")]
    Store(#[from] StoreError),
    #[error("Raft refused to start: {0}")]
    Raft(String),
}

/// A running node: its Raft handle and its local read view.
#[derive(Clone)]
pub struct TestNode {
    pub raft: TestRaft,
    pub reader: StateReader,
}

impl std::fmt::Debug for TestNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNode")
            .field("revision", &self.reader.revision())
            .finish()
    }
}

/// n nodes, each with its own store under one temporary directory, talking through a
/// fault-injecting [`Router`]. Nodes can be killed and restarted from their directory.
#[derive(Debug)]
pub struct TestCluster {
    pub router: Router,
    config: Arc<Config>,
    store_opts: StoreOptions,
    dir: tempfile::TempDir,
    ids: Vec<NodeId>,
    running: BTreeMap<NodeId, TestNode>,
}

/// Raft timing for tests: heartbeat 50 ms, election timeout 150-300 ms (re-sampled per
/// election by openraft 0.10).
pub fn test_config() -> Config {
    Config {
        cluster_name: "shoal-test".into(),
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Config::default()
    }
}

fn node_info(id: NodeId) -> NodeInfo {
    NodeInfo {
        name: format!("n{id}"),
        raft_addr: format!("in-process:{id}"),
        api_addr: format!("in-process:{id}"),
        zone: format!("az{}", id % 3),
    }
}

impl TestCluster {
    /// Starts nodes 1..=n, not yet initialized, with [`test_config`].
    pub async fn new(n: u64) -> Result<Self, ClusterError> {
        Self::with_config(n, test_config(), StoreOptions::default()).await
    }

    /// Starts nodes 1..=n with the given Raft config and store options.
    pub async fn with_config(
        n: u64,
        config: Config,
        store_opts: StoreOptions,
    ) -> Result<Self, ClusterError> {
        let config = Arc::new(
            config
                .validate()
                .map_err(|e| ClusterError::Raft(e.to_string()))?,
        );
        let dir = tempfile::tempdir().map_err(StoreError::Io)?;
        let mut c = TestCluster {
            router: Router::new(),
            config,
            store_opts,
            dir,
            ids: (1..=n).collect(),
            running: BTreeMap::new(),
        };
        for id in 1..=n {
            c.start(id).await?;
        }
        Ok(c)
    }

    /// Starts n nodes and makes them one cluster with every node a voter.
    pub async fn new_initialized(n: u64) -> Result<Self, ClusterError> {
        let c = Self::new(n).await?;
        c.initialize().await?;
        c.wait_for_leader(Duration::from_secs(10)).await?;
        Ok(c)
    }

    pub fn ids(&self) -> &[NodeId] {
        &self.ids
    }

    fn node_dir(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("n{id}"))
    }

    /// Starts (or restarts) node `id` from its directory.
    pub async fn start(&mut self, id: NodeId) -> Result<(), ClusterError> {
        let dir = self.node_dir(id);
        let opts = self.store_opts.clone();
        // A killed node's RocksDB lock is released once its last blocking task finishes.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (log, sm) = loop {
            let (d, o) = (dir.clone(), opts.clone());
            match tokio::task::spawn_blocking(move || store::open(&d, o))
                .await
                .map_err(StoreError::Join)?
            {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, node = id, "store busy, retrying open");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let reader = sm.reader();
        let network = self.router.for_node(id);
        let raft = TestRaft::new(id, self.config.clone(), network, log, sm)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        self.router.register(id, raft.clone(), reader.clone());
        self.running.insert(id, TestNode { raft, reader });
        Ok(())
    }

    /// Stops node `id` as a crash would look to its peers: it vanishes from the router and
    /// its Raft shuts down. Its directory is kept for [`TestCluster::start`].
    pub async fn kill(&mut self, id: NodeId) -> Result<(), ClusterError> {
        self.router.unregister(id);
        let node = self
            .running
            .remove(&id)
            .ok_or(ClusterError::NotRunning(id))?;
        node.raft
            .shutdown()
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        Ok(())
    }

    /// Kills then restarts node `id` from the same directory.
    pub async fn restart(&mut self, id: NodeId) -> Result<(), ClusterError> {
        self.kill(id).await?;
        self.start(id).await
    }

    /// Initializes the cluster from node 1 with every node a voter.
    pub async fn initialize(&self) -> Result<(), ClusterError> {
        let members: BTreeMap<NodeId, NodeInfo> =
            self.ids.iter().map(|id| (*id, node_info(*id))).collect();
        self.node(self.ids[0])?
            .raft
            .initialize(members)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))
    }

    pub fn node(&self, id: NodeId) -> Result<&TestNode, ClusterError> {
        self.running.get(&id).ok_or(ClusterError::NotRunning(id))
    }

    pub fn running(&self) -> impl Iterator<Item = (NodeId, &TestNode)> {
        self.running.iter().map(|(id, n)| (*id, n))
    }

    pub fn metrics(&self, id: NodeId) -> Result<RaftMetrics, ClusterError> {
        Ok(self.node(id)?.raft.metrics().borrow_watched().clone())
    }

    /// The node that is leader by its own metrics, among running nodes in `among` (or all).
    pub fn leader_among(&self, among: Option<&[NodeId]>) -> Option<NodeId> {
        self.running
            .iter()
            .filter(|(id, _)| among.is_none_or(|a| a.contains(id)))
            .filter(|(_, n)| n.raft.metrics().borrow_watched().state == ServerState::Leader)
            .map(|(id, _)| *id)
            .max_by_key(|id| self.metrics(*id).map(|m| m.current_term).unwrap_or(0))
    }

    /// Waits until some running node is leader and a majority of running nodes agree on it.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, ClusterError> {
        self.wait_for_leader_among(None, timeout).await
    }

    /// Waits for a leader among `among` (or all running nodes) that those nodes acknowledge.
    pub async fn wait_for_leader_among(
        &self,
        among: Option<&[NodeId]>,
        timeout: Duration,
    ) -> Result<NodeId, ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader_among(among) {
                let term = self.metrics(l)?.current_term;
                let agree = self
                    .running
                    .iter()
                    .filter(|(id, _)| among.is_none_or(|a| a.contains(id)))
                    .filter(|(_, n)| {
                        let m = n.raft.metrics().borrow_watched().clone();
                        m.current_leader == Some(l) && m.current_term == term
                    })
                    .count();
                let total = among.map_or(self.ids.len(), |a| a.len());
                if agree * 2 > total.min(self.ids.len()) || agree == total {
                    return Ok(l);
                }
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::NoLeader(timeout));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Proposes `txn` through node `via` and waits for it to be applied there.
    pub async fn write_via(
        &self,
        via: NodeId,
        txn: Txn,
        timeout: Duration,
    ) -> Result<ClientWriteResponse<TypeConfig>, ClusterError> {
        let raft = self.node(via)?.raft.clone();
        match tokio::time::timeout(timeout, raft.client_write(Command::Txn(txn))).await {
            Err(_) => Err(ClusterError::Timeout(timeout)),
            Ok(Err(e)) => Err(ClusterError::Write(e.to_string())),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Proposes `txn` through whichever node is leader, retrying across leader changes until
    /// `timeout`.
    pub async fn write(
        &self,
        txn: Txn,
        timeout: Duration,
    ) -> Result<ClientWriteResponse<TypeConfig>, ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClusterError::Timeout(timeout));
            }
            let leader = self.wait_for_leader(left).await?;
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .write_via(leader, txn.clone(), left.min(Duration::from_secs(2)))
                .await
            {
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::debug!(error = %e, leader, "write failed, retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Waits until every running node in `nodes` (or all) has applied up to `index`.
    pub async fn wait_applied(
        &self,
        nodes: Option<&[NodeId]>,
        index: u64,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            let lagging: BTreeSet<NodeId> = self
                .running
                .iter()
                .filter(|(id, _)| nodes.is_none_or(|a| a.contains(id)))
                .filter(|(_, n)| n.reader.revision() < index)
                .map(|(id, _)| *id)
                .collect();
            if lagging.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Wait(
                    timeout,
                    format!("nodes {lagging:?} have not applied index {index}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Shuts every node down.
    pub async fn shutdown(mut self) {
        let ids: Vec<NodeId> = self.running.keys().copied().collect();
        for id in ids {
            let _ = self.kill(id).await;
        }
    }
}
