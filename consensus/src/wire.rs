//! rkyv mirrors of openraft's types, for the log store, snapshots and the peer protocol.
//!
//! openraft's own types are serde-only. Everything Shoal writes to disk or sends to a peer is
//! rkyv-encoded through these mirrors and decoded through [`shoal_types::codec::decode`], which
//! validates the archive first. Conversions back into openraft types that can fail (a membership
//! with a voter missing from its node map) are `TryFrom` and return [`WireError`].

use std::collections::{BTreeMap, BTreeSet};

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderError,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use shoal_types::{Command, NodeId, NodeInfo};

use crate::raft_types::{
    Entry, EntryPayload, LeaderId, LogId, Membership, SnapshotMeta, StoredMembership, TypeConfig,
    Vote,
};

/// A decoded value was well-formed rkyv but not a valid openraft value.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("invalid membership in peer data: {0}")]
    Membership(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WLogId {
    pub term: u64,
    pub node_id: NodeId,
    pub index: u64,
}

impl From<&LogId> for WLogId {
    fn from(l: &LogId) -> Self {
        WLogId {
            term: l.leader_id.term,
            node_id: l.leader_id.node_id,
            index: l.index,
        }
    }
}

impl From<&WLogId> for LogId {
    fn from(w: &WLogId) -> Self {
        LogId::new(
            <LeaderId as openraft::vote::RaftLeaderId>::new(w.term, w.node_id),
            w.index,
        )
    }
}

pub fn opt_log_id(l: &Option<LogId>) -> Option<WLogId> {
    l.as_ref().map(WLogId::from)
}

pub fn from_opt_log_id(w: &Option<WLogId>) -> Option<LogId> {
    w.as_ref().map(LogId::from)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WVote {
    pub term: u64,
    pub node_id: NodeId,
    pub committed: bool,
}

impl From<&Vote> for WVote {
    fn from(v: &Vote) -> Self {
        WVote {
            term: v.leader_id.term,
            node_id: v.leader_id.node_id,
            committed: v.committed,
        }
    }
}

impl From<&WVote> for Vote {
    fn from(w: &WVote) -> Self {
        if w.committed {
            Vote::new_committed(w.term, w.node_id)
        } else {
            Vote::new(w.term, w.node_id)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WMembership {
    /// Joint configs: one set of voter ids normally, two during a change.
    pub configs: Vec<Vec<NodeId>>,
    pub nodes: Vec<(NodeId, NodeInfo)>,
}

impl From<&Membership> for WMembership {
    fn from(m: &Membership) -> Self {
        WMembership {
            configs: m
                .get_joint_config()
                .iter()
                .map(|c| c.iter().copied().collect())
                .collect(),
            nodes: m.nodes().map(|(id, n)| (*id, n.clone())).collect(),
        }
    }
}

impl TryFrom<&WMembership> for Membership {
    type Error = WireError;

    fn try_from(w: &WMembership) -> Result<Self, WireError> {
        let configs: Vec<BTreeSet<NodeId>> = w
            .configs
            .iter()
            .map(|c| c.iter().copied().collect())
            .collect();
        let nodes: BTreeMap<NodeId, NodeInfo> = w.nodes.iter().cloned().collect();
        Membership::new(configs, nodes).map_err(|e| WireError::Membership(e.to_string()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WStoredMembership {
    pub log_id: Option<WLogId>,
    pub membership: WMembership,
}

impl From<&StoredMembership> for WStoredMembership {
    fn from(m: &StoredMembership) -> Self {
        WStoredMembership {
            log_id: opt_log_id(m.log_id()),
            membership: m.membership().into(),
        }
    }
}

impl TryFrom<&WStoredMembership> for StoredMembership {
    type Error = WireError;

    fn try_from(w: &WStoredMembership) -> Result<Self, WireError> {
        Ok(StoredMembership::new(
            from_opt_log_id(&w.log_id),
            (&w.membership).try_into()?,
        ))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WPayload {
    Blank,
    Normal(Command),
    Membership(WMembership),
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WEntry {
    pub log_id: WLogId,
    pub payload: WPayload,
}

impl From<&Entry> for WEntry {
    fn from(e: &Entry) -> Self {
        let payload = match &e.payload {
            EntryPayload::Blank => WPayload::Blank,
            EntryPayload::Normal(c) => WPayload::Normal(c.clone()),
            EntryPayload::Membership(m) => WPayload::Membership(m.into()),
        };
        WEntry {
            log_id: (&e.log_id).into(),
            payload,
        }
    }
}

impl TryFrom<WEntry> for Entry {
    type Error = WireError;

    fn try_from(w: WEntry) -> Result<Self, WireError> {
        let payload = match w.payload {
            WPayload::Blank => EntryPayload::Blank,
            WPayload::Normal(c) => EntryPayload::Normal(c),
            WPayload::Membership(m) => EntryPayload::Membership((&m).try_into()?),
        };
        Ok(Entry {
            log_id: (&w.log_id).into(),
            payload,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WSnapshotMeta {
    pub last_log_id: Option<WLogId>,
    pub last_membership: WStoredMembership,
}

impl From<&SnapshotMeta> for WSnapshotMeta {
    fn from(m: &SnapshotMeta) -> Self {
        WSnapshotMeta {
            last_log_id: opt_log_id(&m.last_log_id),
            last_membership: (&m.last_membership).into(),
        }
    }
}

impl TryFrom<&WSnapshotMeta> for SnapshotMeta {
    type Error = WireError;

    fn try_from(w: &WSnapshotMeta) -> Result<Self, WireError> {
        Ok(SnapshotMeta {
            last_log_id: from_opt_log_id(&w.last_log_id),
            last_membership: (&w.last_membership).try_into()?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WVoteRequest {
    pub vote: WVote,
    pub last_log_id: Option<WLogId>,
    pub leadership_transfer: bool,
}

impl From<&VoteRequest<TypeConfig>> for WVoteRequest {
    fn from(r: &VoteRequest<TypeConfig>) -> Self {
        WVoteRequest {
            vote: (&r.vote).into(),
            last_log_id: opt_log_id(&r.last_log_id),
            leadership_transfer: r.leadership_transfer,
        }
    }
}

impl From<&WVoteRequest> for VoteRequest<TypeConfig> {
    fn from(w: &WVoteRequest) -> Self {
        VoteRequest {
            vote: (&w.vote).into(),
            last_log_id: from_opt_log_id(&w.last_log_id),
            leadership_transfer: w.leadership_transfer,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WVoteResponse {
    pub vote: WVote,
    pub vote_granted: bool,
    pub last_log_id: Option<WLogId>,
}

impl From<&VoteResponse<TypeConfig>> for WVoteResponse {
    fn from(r: &VoteResponse<TypeConfig>) -> Self {
        WVoteResponse {
            vote: (&r.vote).into(),
            vote_granted: r.vote_granted,
            last_log_id: opt_log_id(&r.last_log_id),
        }
    }
}

impl From<&WVoteResponse> for VoteResponse<TypeConfig> {
    fn from(w: &WVoteResponse) -> Self {
        VoteResponse {
            vote: (&w.vote).into(),
            vote_granted: w.vote_granted,
            last_log_id: from_opt_log_id(&w.last_log_id),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WAppendEntriesRequest {
    pub vote: WVote,
    pub prev_log_id: Option<WLogId>,
    pub entries: Vec<WEntry>,
    pub leader_commit: Option<WLogId>,
}

impl From<&AppendEntriesRequest<TypeConfig>> for WAppendEntriesRequest {
    fn from(r: &AppendEntriesRequest<TypeConfig>) -> Self {
        WAppendEntriesRequest {
            vote: (&r.vote).into(),
            prev_log_id: opt_log_id(&r.prev_log_id),
            entries: r.entries.iter().map(WEntry::from).collect(),
            leader_commit: opt_log_id(&r.leader_commit),
        }
    }
}

impl TryFrom<WAppendEntriesRequest> for AppendEntriesRequest<TypeConfig> {
    type Error = WireError;

    fn try_from(w: WAppendEntriesRequest) -> Result<Self, WireError> {
        Ok(AppendEntriesRequest {
            vote: (&w.vote).into(),
            prev_log_id: from_opt_log_id(&w.prev_log_id),
            entries: w
                .entries
                .into_iter()
                .map(Entry::try_from)
                .collect::<Result<_, _>>()?,
            leader_commit: from_opt_log_id(&w.leader_commit),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WAppendEntriesResponse {
    Success,
    PartialSuccess(Option<WLogId>),
    Conflict,
    HigherVote(WVote),
}

impl From<&AppendEntriesResponse<TypeConfig>> for WAppendEntriesResponse {
    fn from(r: &AppendEntriesResponse<TypeConfig>) -> Self {
        match r {
            AppendEntriesResponse::Success => WAppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(l) => {
                WAppendEntriesResponse::PartialSuccess(opt_log_id(l))
            }
            AppendEntriesResponse::Conflict => WAppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(v) => WAppendEntriesResponse::HigherVote(v.into()),
        }
    }
}

impl From<&WAppendEntriesResponse> for AppendEntriesResponse<TypeConfig> {
    fn from(w: &WAppendEntriesResponse) -> Self {
        match w {
            WAppendEntriesResponse::Success => AppendEntriesResponse::Success,
            WAppendEntriesResponse::PartialSuccess(l) => {
                AppendEntriesResponse::PartialSuccess(from_opt_log_id(l))
            }
            WAppendEntriesResponse::Conflict => AppendEntriesResponse::Conflict,
            WAppendEntriesResponse::HigherVote(v) => AppendEntriesResponse::HigherVote(v.into()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WSnapshotResponse {
    pub vote: WVote,
}

impl From<&SnapshotResponse<TypeConfig>> for WSnapshotResponse {
    fn from(r: &SnapshotResponse<TypeConfig>) -> Self {
        WSnapshotResponse {
            vote: (&r.vote).into(),
        }
    }
}

impl From<&WSnapshotResponse> for SnapshotResponse<TypeConfig> {
    fn from(w: &WSnapshotResponse) -> Self {
        SnapshotResponse::new((&w.vote).into())
    }
}

#[cfg(test)]
mod tests {
    use shoal_types::codec::{decode, encode};
    use shoal_types::Txn;

    use super::*;

    fn node(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            raft_addr: "127.0.0.1:1".into(),
            api_addr: "127.0.0.1:2".into(),
            zone: "az1".into(),
        }
    }

    /// An AppendEntries request with every payload kind survives encode/decode.
    #[test]
    fn append_entries_round_trips() {
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2])],
            BTreeMap::from([(1, node("a")), (2, node("b")), (3, node("c"))]),
        )
        .unwrap();
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(
                <LeaderId as openraft::vote::RaftLeaderId>::new(2, 1),
                7,
            )),
            entries: vec![
                Entry {
                    log_id: LogId::new(<LeaderId as openraft::vote::RaftLeaderId>::new(3, 1), 8),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: LogId::new(<LeaderId as openraft::vote::RaftLeaderId>::new(3, 1), 9),
                    payload: EntryPayload::Normal(Command::Txn(Txn::new().put("kv", "k", "v"))),
                },
                Entry {
                    log_id: LogId::new(<LeaderId as openraft::vote::RaftLeaderId>::new(3, 1), 10),
                    payload: EntryPayload::Membership(membership),
                },
            ],
            leader_commit: None,
        };
        let bytes = encode(&WAppendEntriesRequest::from(&req));
        let back: AppendEntriesRequest<TypeConfig> = decode::<WAppendEntriesRequest>(&bytes)
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(back.vote, req.vote);
        assert_eq!(back.prev_log_id, req.prev_log_id);
        assert_eq!(back.entries, req.entries);
        assert_eq!(encode(&WAppendEntriesRequest::from(&back)), bytes);
    }

    /// A membership whose voter is missing from its node map is refused, not trusted.
    #[test]
    fn membership_with_unknown_voter_is_refused() {
        let w = WMembership {
            configs: vec![vec![1, 9]],
            nodes: vec![(1, node("a"))],
        };
        assert!(Membership::try_from(&w).is_err());
    }

    /// Truncated frames are errors, never panics.
    #[test]
    fn truncated_frames_are_errors() {
        let req = WVoteRequest {
            vote: WVote {
                term: 1,
                node_id: 2,
                committed: false,
            },
            last_log_id: Some(WLogId {
                term: 1,
                node_id: 2,
                index: 3,
            }),
            leadership_transfer: false,
        };
        let bytes = encode(&req);
        for cut in 0..bytes.len() {
            assert!(
                decode::<WVoteRequest>(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }
}

/// openraft's `TransferLeaderRequest`: the leader that hands over, the node it names, and the
/// last log id that node must hold before it campaigns.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WTransferLeaderRequest {
    pub from_leader: WVote,
    pub to_node_id: NodeId,
    pub last_log_id: Option<WLogId>,
}

impl From<&TransferLeaderRequest<TypeConfig>> for WTransferLeaderRequest {
    fn from(r: &TransferLeaderRequest<TypeConfig>) -> Self {
        WTransferLeaderRequest {
            from_leader: r.from_leader().into(),
            to_node_id: *r.to_node_id(),
            last_log_id: r.last_log_id().map(WLogId::from),
        }
    }
}

impl From<&WTransferLeaderRequest> for TransferLeaderRequest<TypeConfig> {
    fn from(w: &WTransferLeaderRequest) -> Self {
        TransferLeaderRequest::new(
            (&w.from_leader).into(),
            w.to_node_id,
            from_opt_log_id(&w.last_log_id),
        )
    }
}

/// openraft's `TransferLeaderResponse`: accepted, or why the receiver refused it.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WTransferLeaderResponse {
    Accepted,
    VoteChanged {
        expected: WVote,
        actual: WVote,
    },
    LogNotFlushed {
        expected: Option<WLogId>,
        actual: Option<WLogId>,
    },
}

impl From<&TransferLeaderResponse<TypeConfig>> for WTransferLeaderResponse {
    fn from(r: &TransferLeaderResponse<TypeConfig>) -> Self {
        match r {
            Ok(()) => WTransferLeaderResponse::Accepted,
            Err(TransferLeaderError::VoteChanged { expected, actual }) => {
                WTransferLeaderResponse::VoteChanged {
                    expected: expected.into(),
                    actual: actual.into(),
                }
            }
            Err(TransferLeaderError::LogNotFlushed { expected, actual }) => {
                WTransferLeaderResponse::LogNotFlushed {
                    expected: opt_log_id(expected),
                    actual: opt_log_id(actual),
                }
            }
        }
    }
}

impl From<&WTransferLeaderResponse> for TransferLeaderResponse<TypeConfig> {
    fn from(w: &WTransferLeaderResponse) -> Self {
        match w {
            WTransferLeaderResponse::Accepted => Ok(()),
            WTransferLeaderResponse::VoteChanged { expected, actual } => {
                Err(TransferLeaderError::VoteChanged {
                    expected: expected.into(),
                    actual: actual.into(),
                })
            }
            WTransferLeaderResponse::LogNotFlushed { expected, actual } => {
                Err(TransferLeaderError::LogNotFlushed {
                    expected: from_opt_log_id(expected),
                    actual: from_opt_log_id(actual),
                })
            }
        }
    }
}
