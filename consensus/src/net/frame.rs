//! The peer protocol's messages and their framing.
//!
//! One RPC is one QUIC bidirectional stream: the client writes one request frame (and, for a
//! snapshot, the raw snapshot bytes and a 32-byte SHA-256 trailer), finishes its side, and reads
//! one response frame. A frame is a big-endian `u32` length followed by that many bytes of rkyv
//! archive. The length is checked against a limit before anything is allocated, and the archive
//! is validated (bytecheck) by [`shoal_types::codec::decode`] before it is read: a peer's bytes
//! are untrusted.

use std::fmt;
use std::time::Duration;

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use shoal_types::codec::{decode, encode, DecodeError};
use shoal_types::{Command, NodeId, NodeInfo, TxnResponse};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{
    WAppendEntriesRequest, WAppendEntriesResponse, WSnapshotMeta, WSnapshotResponse,
    WTransferLeaderRequest, WTransferLeaderResponse, WVote, WVoteRequest, WVoteResponse,
};

/// Largest frame accepted or sent: 16 MiB. AppendEntries batches are bounded well below this by
/// openraft's `max_payload_entries`; snapshots do not travel in frames.
pub const MAX_FRAME: u32 = 16 * 1024 * 1024;

type Ser<'a> = HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>;
type Val<'a> = HighValidator<'a, rancor::Error>;
type De = HighDeserializer<rancor::Error>;

/// Length of the SHA-256 trailer that follows a snapshot's bytes.
pub const SNAPSHOT_TRAILER_LEN: usize = 32;

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u32 },
    #[error("the stream ended inside a frame")]
    Truncated,
    #[error("timed out after {0:?} waiting for a frame")]
    Timeout(Duration),
    #[error("stream I/O failed")]
    Io(#[source] std::io::Error),
    #[error("the frame is not a valid message")]
    Decode(#[source] DecodeError),
    #[error("the frame has bytes that are not part of its message")]
    NonCanonical,
}

fn io_error(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Truncated
    } else {
        FrameError::Io(e)
    }
}

/// Reads one frame and decodes it, all within `timeout`.
///
/// Besides bytecheck's validation, the payload must be exactly the encoding of the value it
/// decodes to. bytecheck checks that what the root points at is valid, not that every byte is
/// used, so random bytes can pass it (a unit variant is one tag byte). Re-encoding costs one
/// serialisation and turns "valid somewhere inside" into "is this message".
pub async fn read_frame<T, R>(recv: &mut R, max: u32, timeout: Duration) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: rkyv::Archive + for<'a> rkyv::Serialize<Ser<'a>>,
    T::Archived: for<'a> CheckBytes<Val<'a>> + rkyv::Deserialize<T, De>,
{
    read_next_frame(recv, max, timeout)
        .await?
        .ok_or(FrameError::Truncated)
}

/// Like [`read_frame`], but a stream that ends cleanly before the next frame gives `None`
/// (a pipelined stream's normal end).
pub async fn read_next_frame<T, R>(
    recv: &mut R,
    max: u32,
    timeout: Duration,
) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: rkyv::Archive + for<'a> rkyv::Serialize<Ser<'a>>,
    T::Archived: for<'a> CheckBytes<Val<'a>> + rkyv::Deserialize<T, De>,
{
    let Some(bytes) = tokio::time::timeout(timeout, read_frame_bytes(recv, max))
        .await
        .map_err(|_| FrameError::Timeout(timeout))??
    else {
        return Ok(None);
    };
    let value = decode(&bytes).map_err(FrameError::Decode)?;
    if encode(&value) != bytes {
        return Err(FrameError::NonCanonical);
    }
    Ok(Some(value))
}

async fn read_frame_bytes<R: AsyncRead + Unpin>(
    recv: &mut R,
    max: u32,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    // End of stream on a frame boundary is not an error; anywhere else it is.
    if recv.read(&mut len[..1]).await.map_err(io_error)? == 0 {
        return Ok(None);
    }
    recv.read_exact(&mut len[1..]).await.map_err(io_error)?;
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(FrameError::TooLarge {
            len: len.into(),
            max,
        });
    }
    // Memory grows with the bytes that actually arrive, not with the length a peer announces:
    // a peer that declares 16 MiB and sends nothing costs nothing.
    let mut buf = Vec::with_capacity((len as usize).min(64 << 10));
    (&mut *recv)
        .take(len.into())
        .read_to_end(&mut buf)
        .await
        .map_err(io_error)?;
    if buf.len() != len as usize {
        return Err(io_error(std::io::Error::from(
            std::io::ErrorKind::UnexpectedEof,
        )));
    }
    Ok(Some(buf))
}

/// Encodes a message into a frame, refusing one over `max`.
pub fn encode_frame<T>(value: &T, max: u32) -> Result<Vec<u8>, FrameError>
where
    T: for<'a> rkyv::Serialize<Ser<'a>>,
{
    let payload = encode(value);
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= max)
        .ok_or(FrameError::TooLarge {
            len: payload.len() as u64,
            max,
        })?;
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Writes an encoded frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    send: &mut W,
    frame: &[u8],
) -> Result<(), FrameError> {
    send.write_all(frame).await.map_err(io_error)
}

/// A request from one node to another. Raft messages travel as the rkyv mirrors of `wire`.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum PeerRequest {
    AppendEntries(WAppendEntriesRequest),
    Vote(WVoteRequest),
    PreVote(WVoteRequest),
    /// Followed on the same stream by exactly `len` raw bytes and a SHA-256 trailer of them.
    SnapshotBegin {
        vote: WVote,
        meta: WSnapshotMeta,
        len: u64,
    },
    /// A write a follower forwards to the leader.
    ClientWrite(Command),
    /// Several writes a follower forwards together (at most [`MAX_FORWARD_BATCH`]); the leader
    /// proposes them in one call and answers one [`WriteOutcome`] per command, in order.
    ClientWriteBatch(Vec<Command>),
    /// Asks the leader for a read index: the log index a linearizable read must wait for.
    LinearizableRead,
    Status,
    Join(JoinRequest),
    /// The leader hands leadership over (openraft's `TransferLeader`, sent to every voter):
    /// the receiver drops the old leader's lease, and the named node campaigns at once.
    TransferLeader(WTransferLeaderRequest),
}

impl PeerRequest {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerRequest::AppendEntries(_) => "append_entries",
            PeerRequest::Vote(_) => "vote",
            PeerRequest::PreVote(_) => "pre_vote",
            PeerRequest::SnapshotBegin { .. } => "install_snapshot",
            PeerRequest::ClientWrite(_) => "client_write",
            PeerRequest::ClientWriteBatch(_) => "client_write_batch",
            PeerRequest::LinearizableRead => "linearizable_read",
            PeerRequest::Status => "status",
            PeerRequest::Join(_) => "join",
            PeerRequest::TransferLeader(_) => "transfer_leader",
        }
    }
}

/// The answer to a [`PeerRequest`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum PeerResponse {
    AppendEntries(WAppendEntriesResponse),
    Vote(WVoteResponse),
    Snapshot(WSnapshotResponse),
    ClientWrite(TxnResponse),
    ClientWriteBatch(Vec<WriteOutcome>),
    ReadIndex(u64),
    Status(PeerStatus),
    Join(JoinResponse),
    Error(PeerError),
    TransferLeader(WTransferLeaderResponse),
}

/// Most commands one [`PeerRequest::ClientWriteBatch`] may carry.
pub const MAX_FORWARD_BATCH: usize = 256;

/// What became of one command of a [`PeerRequest::ClientWriteBatch`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WriteOutcome {
    Applied(TxnResponse),
    Failed(PeerError),
}

/// Why a peer refused or could not serve a request. The handler returns these; they travel
/// back to the caller as [`PeerResponse::Error`].
#[derive(
    Clone, Debug, PartialEq, Eq, thiserror::Error, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum PeerError {
    /// This node is not the leader; retry at the leader if one is known.
    #[error("not the leader; the leader is {leader_id:?} at {leader_addr:?}")]
    ForwardToLeader {
        leader_id: Option<NodeId>,
        leader_addr: Option<String>,
    },
    /// The node cannot serve anymore (storage lost, Raft stopped).
    #[error("the peer failed: {0}")]
    Fatal(String),
    /// The request was well-framed but not acceptable.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The caller is not allowed to make this request (no client certificate, bad join secret).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The leader appended the write but lost leadership before it committed: it may still
    /// commit through the next leader, or not.
    #[error("commit status unknown: {0}")]
    CommitUnknown(String),
}

/// A node's Raft role as `shoal status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum PeerRole {
    Leader,
    Candidate,
    Follower,
    Learner,
    Shutdown,
}

/// A small summary of a node, answered to [`PeerRequest::Status`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PeerStatus {
    pub node_id: NodeId,
    pub name: String,
    pub term: u64,
    pub role: PeerRole,
    pub last_applied: Option<u64>,
    pub leader_id: Option<NodeId>,
}

/// A joiner asks to be admitted. Sent only on the `shoal-join/1` ALPN (or by a member).
#[derive(Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JoinRequest {
    pub token_id: String,
    pub secret: String,
    pub name: String,
    pub raft_addr: String,
    pub api_addr: String,
    pub zone: String,
    /// The joiner's CSR; its private key never leaves the joiner.
    pub csr_pem: String,
}

impl fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinRequest")
            .field("token_id", &self.token_id)
            .field("secret", &"<redacted>")
            .field("name", &self.name)
            .field("raft_addr", &self.raft_addr)
            .field("api_addr", &self.api_addr)
            .field("zone", &self.zone)
            .finish_non_exhaustive()
    }
}

/// What an admitted joiner needs to become a member.
#[derive(Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JoinResponse {
    pub node_id: NodeId,
    pub ca_cert_pem: String,
    /// Every member can sign joins (there is no master), so every member holds the CA key.
    pub ca_key_pem: String,
    /// The joiner's certificate signed from its CSR, then the CA certificate.
    pub node_cert_chain_pem: String,
    pub members: Vec<(NodeId, NodeInfo)>,
}

impl fmt::Debug for JoinResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinResponse")
            .field("node_id", &self.node_id)
            .field("ca_key_pem", &"<redacted>")
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(req: &PeerRequest) -> Vec<u8> {
        encode_frame(req, MAX_FRAME).unwrap()
    }

    /// A request survives framing and decoding.
    #[tokio::test]
    async fn round_trip() {
        let req = PeerRequest::Status;
        let bytes = frame_of(&req);
        let got: PeerRequest = read_frame(&mut &bytes[..], MAX_FRAME, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(got, req);
    }

    /// A length prefix over the limit is refused before the body is read or allocated.
    #[tokio::test]
    async fn oversized_prefix_is_refused() {
        let bytes = (MAX_FRAME + 1).to_be_bytes();
        let err = read_frame::<PeerRequest, _>(&mut &bytes[..], MAX_FRAME, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    /// A stream that ends on a frame boundary ends a pipeline cleanly; inside a frame it is an
    /// error.
    #[tokio::test]
    async fn clean_end_between_frames() {
        let mut bytes = frame_of(&PeerRequest::Status);
        bytes.extend(frame_of(&PeerRequest::LinearizableRead));
        let mut r = &bytes[..];
        let t = Duration::from_secs(1);
        let a: Option<PeerRequest> = read_next_frame(&mut r, MAX_FRAME, t).await.unwrap();
        let b: Option<PeerRequest> = read_next_frame(&mut r, MAX_FRAME, t).await.unwrap();
        let c: Option<PeerRequest> = read_next_frame(&mut r, MAX_FRAME, t).await.unwrap();
        assert_eq!(
            (a, b, c),
            (
                Some(PeerRequest::Status),
                Some(PeerRequest::LinearizableRead),
                None
            )
        );
        let empty: &[u8] = &[];
        assert!(matches!(
            read_frame::<PeerRequest, _>(&mut &empty[..], MAX_FRAME, t).await,
            Err(FrameError::Truncated)
        ));
    }

    /// A frame cut short is reported as truncated, not as a decode error or a hang.
    #[tokio::test]
    async fn truncated_frame_is_refused() {
        let bytes = frame_of(&PeerRequest::Status);
        let cut = &bytes[..bytes.len() - 1];
        let err = read_frame::<PeerRequest, _>(&mut &cut[..], MAX_FRAME, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
    }

    /// Random bytes with a valid length prefix fail validation.
    #[tokio::test]
    async fn garbage_is_refused() {
        let mut bytes = 64u32.to_be_bytes().to_vec();
        bytes.extend((0..64u8).map(|i| i.wrapping_mul(37).wrapping_add(0xA5)));
        let err = read_frame::<PeerRequest, _>(&mut &bytes[..], MAX_FRAME, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, FrameError::Decode(_) | FrameError::NonCanonical),
            "{err}"
        );
    }

    /// A valid message with extra bytes in front of it, inside the same frame, is refused
    /// (bytecheck alone accepts it: rkyv's root sits at the end of the buffer).
    #[tokio::test]
    async fn padded_message_is_refused() {
        let mut payload = encode(&PeerRequest::Status);
        payload.splice(0..0, [0u8; 16]);
        assert_eq!(
            decode::<PeerRequest>(&payload).unwrap(),
            PeerRequest::Status
        );
        let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        let err = read_frame::<PeerRequest, _>(&mut &bytes[..], MAX_FRAME, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::NonCanonical), "{err}");
    }

    /// A frame that would be larger than the limit is not sent.
    #[test]
    fn oversized_encode_is_refused() {
        let err = encode_frame(&PeerRequest::Status, 2).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
    }
}
