//! The openraft type configuration: which of our types Raft carries.

use shoal_types::{Command, NodeId, NodeInfo, TxnResponse};

openraft::declare_raft_types!(
    /// Shoal's Raft: commands are transactions, nodes carry their addresses and zone, leader
    /// ids are (term, node) so a term can hold at most one leader.
    pub TypeConfig:
        D = Command,
        R = TxnResponse,
        NodeId = NodeId,
        Node = NodeInfo,
        Term = u64,
        LeaderId = openraft::impls::leader_id_adv::LeaderId<u64, NodeId>,
        Vote = openraft::impls::Vote<Self::LeaderId>,
        Entry = openraft::impls::Entry<
            openraft::impls::leader_id_adv::LeaderId<u64, NodeId>,
            openraft::impls::EntryPayload<Command, NodeId, NodeInfo>,
        >,
);

pub type LeaderId = openraft::impls::leader_id_adv::LeaderId<u64, NodeId>;
pub type Vote = openraft::impls::Vote<LeaderId>;
pub type LogId = openraft::LogId<LeaderId>;
pub type Entry = <TypeConfig as openraft::RaftTypeConfig>::Entry;
pub type EntryPayload = openraft::impls::EntryPayload<Command, NodeId, NodeInfo>;
pub type Membership = openraft::Membership<NodeId, NodeInfo>;
pub type StoredMembership = openraft::StoredMembership<LeaderId, NodeId, NodeInfo>;
pub type SnapshotMeta = openraft::SnapshotMeta<LeaderId, NodeId, NodeInfo>;
/// Snapshots are files: a snapshot of a large cluster need not fit in memory, and QUIC streams
/// them in chunks.
pub type SnapshotData = std::fs::File;
pub type Snapshot = openraft::Snapshot<LeaderId, NodeId, NodeInfo, SnapshotData>;
pub type RaftMetrics = openraft::RaftMetrics<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig, crate::store::StateMachineStore>;
