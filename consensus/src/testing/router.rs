//! An in-process network with fault injection.
//!
//! Every RPC goes through the same rkyv mirrors as the QUIC transport (encode, then validated
//! decode, both ways), so the codec is exercised by every test that uses the router.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{Raft, RaftNetworkV2};
use rand::Rng;
use shoal_types::codec::{decode, encode};
use shoal_types::{NodeId, NodeInfo};

use crate::raft_types::{Snapshot, SnapshotMeta, TypeConfig, Vote};
use crate::store::{StateMachineStore, StateReader};
use crate::wire::{
    WAppendEntriesRequest, WAppendEntriesResponse, WSnapshotMeta, WSnapshotResponse,
    WTransferLeaderRequest, WTransferLeaderResponse, WVote, WVoteRequest, WVoteResponse,
};

/// A Raft node as the router sees it.
pub type TestRaft = Raft<TypeConfig, StateMachineStore>;

#[derive(Default)]
struct Faults {
    /// Nodes cut off in both directions.
    isolated: BTreeSet<NodeId>,
    /// Directed links that lose every message: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    /// If set, only nodes in the same group can talk.
    groups: Option<Vec<BTreeSet<NodeId>>>,
    /// Probability that a request or a response is lost.
    drop_rate: f64,
    /// Extra latency for every message to or from a node.
    delays: BTreeMap<NodeId, Duration>,
}

impl Faults {
    fn can_send(&self, from: NodeId, to: NodeId) -> bool {
        if self.isolated.contains(&from) || self.isolated.contains(&to) {
            return false;
        }
        if self.cut.contains(&(from, to)) {
            return false;
        }
        if let Some(groups) = &self.groups {
            return groups.iter().any(|g| g.contains(&from) && g.contains(&to));
        }
        true
    }
}

#[derive(Default)]
struct RouterInner {
    nodes: Mutex<HashMap<NodeId, (TestRaft, StateReader)>>,
    faults: Mutex<Faults>,
}

/// Routes Raft RPCs between in-process nodes and injects faults. Cheap to clone.
#[derive(Clone, Default)]
pub struct Router {
    inner: Arc<RouterInner>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<NodeId> = self.lock_nodes().keys().copied().collect();
        f.debug_struct("Router").field("nodes", &nodes).finish()
    }
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, (TestRaft, StateReader)>> {
        self.inner.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.inner.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The network factory node `id` hands to `Raft::new`: its RPCs leave from `id`.
    pub fn for_node(&self, id: NodeId) -> NodeRouter {
        NodeRouter {
            router: self.clone(),
            id,
        }
    }

    /// Makes `id` reachable through the router.
    pub fn register(&self, id: NodeId, raft: TestRaft, reader: StateReader) {
        self.lock_nodes().insert(id, (raft, reader));
    }

    /// Makes `id` unreachable, as if its process were gone.
    pub fn unregister(&self, id: NodeId) -> Option<TestRaft> {
        self.lock_nodes().remove(&id).map(|(r, _)| r)
    }

    /// Cuts `node` off from every other node, both ways.
    pub fn isolate(&self, node: NodeId) {
        self.faults().isolated.insert(node);
    }

    /// Loses every message from `from` to `to`; the other direction still works.
    pub fn cut_one_way(&self, from: NodeId, to: NodeId) {
        self.faults().cut.insert((from, to));
    }

    /// Cuts `node`'s outgoing messages only: it hears everyone, nobody hears it.
    pub fn isolate_outgoing(&self, node: NodeId, all: &[NodeId]) {
        let mut f = self.faults();
        for to in all {
            if *to != node {
                f.cut.insert((node, *to));
            }
        }
    }

    /// Splits the nodes into groups that cannot reach each other. A node in no group reaches
    /// nobody.
    pub fn partition(&self, groups: &[&[NodeId]]) {
        self.faults().groups = Some(groups.iter().map(|g| g.iter().copied().collect()).collect());
    }

    /// Removes every isolation, cut, partition, drop rate and delay.
    pub fn heal(&self) {
        *self.faults() = Faults::default();
    }

    /// Loses each request and each response with probability `p`.
    pub fn drop_rate(&self, p: f64) {
        self.faults().drop_rate = p.clamp(0.0, 1.0);
    }

    /// Adds `dur` of latency to every message to or from `node`.
    pub fn delay(&self, node: NodeId, dur: Duration) {
        self.faults().delays.insert(node, dur);
    }

    /// Decides the fate of one message: Err if it is lost, else the latency to apply.
    fn transmit(&self, from: NodeId, to: NodeId) -> Result<Duration, Unreachable<TypeConfig>> {
        let f = self.faults();
        if !f.can_send(from, to) {
            return Err(Unreachable::from_string(format!(
                "router: link {from} -> {to} is cut"
            )));
        }
        if f.drop_rate > 0.0 && rand::rng().random_bool(f.drop_rate) {
            return Err(Unreachable::from_string(format!(
                "router: message {from} -> {to} dropped"
            )));
        }
        let d = f.delays.get(&from).copied().unwrap_or_default()
            + f.delays.get(&to).copied().unwrap_or_default();
        Ok(d)
    }

    async fn hop(&self, from: NodeId, to: NodeId) -> Result<(), Unreachable<TypeConfig>> {
        let d = self.transmit(from, to)?;
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        Ok(())
    }

    fn target(&self, to: NodeId) -> Result<(TestRaft, StateReader), Unreachable<TypeConfig>> {
        self.lock_nodes()
            .get(&to)
            .cloned()
            .ok_or_else(|| Unreachable::from_string(format!("router: node {to} is down")))
    }

    /// Sends a request from `from` to `to` and carries the answer back, losing either according
    /// to the faults in force.
    async fn call<Req, Resp, F, Fut>(
        &self,
        from: NodeId,
        to: NodeId,
        req: Req,
        f: F,
    ) -> Result<Resp, Unreachable<TypeConfig>>
    where
        F: FnOnce(TestRaft, StateReader, Req) -> Fut,
        Fut: Future<Output = Result<Resp, String>>,
    {
        self.hop(from, to).await?;
        let (raft, reader) = self.target(to)?;
        let resp = f(raft, reader, req)
            .await
            .map_err(|e| Unreachable::from_string(format!("router: node {to} failed: {e}")))?;
        // The answer travels back; a one-way cut or a drop loses it after the target acted.
        self.hop(to, from).await?;
        Ok(resp)
    }
}

fn codec_err(e: impl fmt::Display) -> String {
    format!("codec: {e}")
}

/// The factory one node uses: knows which node it speaks for.
#[derive(Clone, Debug)]
pub struct NodeRouter {
    pub(crate) router: Router,
    pub(crate) id: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for NodeRouter {
    type Network = RouterClient;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> Self::Network {
        RouterClient {
            router: self.router.clone(),
            from: self.id,
            target,
        }
    }
}

/// A connection from one node to another through the router.
#[derive(Debug)]
pub struct RouterClient {
    router: Router,
    from: NodeId,
    target: NodeId,
}

impl RaftNetworkV2<TypeConfig> for RouterClient {
    type SnapshotData = std::fs::File;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let bytes = encode(&WAppendEntriesRequest::from(&rpc));
        let out = self
            .router
            .call(self.from, self.target, bytes, |raft, _, bytes| async move {
                let w: WAppendEntriesRequest = decode(&bytes).map_err(codec_err)?;
                let req = AppendEntriesRequest::try_from(w).map_err(codec_err)?;
                let resp = raft.append_entries(req).await.map_err(|e| e.to_string())?;
                Ok(encode(&WAppendEntriesResponse::from(&resp)))
            })
            .await?;
        let w: WAppendEntriesResponse =
            decode(&out).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        Ok((&w).into())
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        vote_rpc(self, rpc, false).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        vote_rpc(self, rpc, true).await
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let bytes = encode(&WTransferLeaderRequest::from(&rpc));
        let out = self
            .router
            .call(self.from, self.target, bytes, |raft, _, bytes| async move {
                let w: WTransferLeaderRequest = decode(&bytes).map_err(codec_err)?;
                let resp = raft
                    .handle_transfer_leader(TransferLeaderRequest::from(&w))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(encode(&WTransferLeaderResponse::from(&resp)))
            })
            .await?;
        let w: WTransferLeaderResponse =
            decode(&out).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        Ok((&w).into())
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut file = snapshot.snapshot;
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            file.seek(SeekFrom::Start(0))?;
            file.read_to_end(&mut buf)?;
            Ok::<_, std::io::Error>(buf)
        })
        .await
        .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?
        .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
        let head = encode(&(WVote::from(&vote), WSnapshotMeta::from(&snapshot.meta)));
        let out = self
            .router
            .call(
                self.from,
                self.target,
                (head, data),
                |raft, reader, (head, data)| async move {
                    let (v, m): (WVote, WSnapshotMeta) = decode(&head).map_err(codec_err)?;
                    let meta = SnapshotMeta::try_from(&m).map_err(codec_err)?;
                    let file = tokio::task::spawn_blocking(move || {
                        let mut f = reader.incoming_snapshot_file()?;
                        f.write_all(&data)?;
                        f.seek(SeekFrom::Start(0))?;
                        Ok::<_, std::io::Error>(f)
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                    let resp = raft
                        .install_full_snapshot(
                            Vote::from(&v),
                            Snapshot {
                                meta,
                                snapshot: file,
                            },
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(encode(&WSnapshotResponse::from(&resp)))
                },
            )
            .await?;
        let w: WSnapshotResponse =
            decode(&out).map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
        Ok((&w).into())
    }
}

async fn vote_rpc(
    c: &RouterClient,
    rpc: VoteRequest<TypeConfig>,
    pre: bool,
) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
    let bytes = encode(&WVoteRequest::from(&rpc));
    let out = c
        .router
        .call(c.from, c.target, bytes, |raft, _, bytes| async move {
            let w: WVoteRequest = decode(&bytes).map_err(codec_err)?;
            let req = VoteRequest::from(&w);
            let resp = if pre {
                raft.pre_vote(req).await
            } else {
                raft.vote(req).await
            }
            .map_err(|e| e.to_string())?;
            Ok(encode(&WVoteResponse::from(&resp)))
        })
        .await?;
    let w: WVoteResponse = decode(&out).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
    Ok((&w).into())
}
