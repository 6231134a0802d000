//! The peer transport: QUIC (quinn) with mutual TLS between members.
//!
//! - [`tls`]: the cluster CA, node certificates and CSRs, rustls configurations, the pinned-CA
//!   verifier a joiner uses.
//! - [`frame`]: the request and response messages (rkyv) and their length-prefixed framing.
//! - [`server`]: [`PeerServer`], which serves every RPC through a [`PeerHandler`] and hands
//!   `shoal-data/1` connections to the node's [`DataHandler`].
//! - [`client`]: [`QuicNetwork`] (openraft's network factory) and [`PeerClient`] for the app
//!   RPCs and the join.
//!
//! One QUIC connection per peer, one bidirectional stream per RPC. See `docs/consensus.md`,
//! "Transport and TLS".

use std::time::Duration;

pub mod client;
mod forward;
pub mod frame;
pub mod server;
pub mod tls;

pub use client::{ForwardError, PeerClient, QuicNetwork, RpcObserver};
pub use frame::{JoinRequest, JoinResponse, PeerError, PeerRole, PeerStatus, WriteOutcome};
pub use server::{BoxFuture, DataHandler, DataSlot, PeerHandler, PeerServer};
pub use tls::{ClusterCa, NodeIdentity, NodeKey, TlsError};

use self::frame::FrameError;

/// Application error codes carried by QUIC CONNECTION_CLOSE and RESET_STREAM/STOP_SENDING.
pub mod codes {
    use quinn::VarInt;

    /// Orderly shutdown.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// A `shoal/1` client presented no certificate.
    pub const UNAUTHENTICATED: VarInt = VarInt::from_u32(1);
    /// The client negotiated no ALPN we serve.
    pub const BAD_ALPN: VarInt = VarInt::from_u32(2);
    /// The request frame was malformed, truncated, too large or too slow.
    pub const BAD_FRAME: VarInt = VarInt::from_u32(3);
    /// The snapshot bytes were truncated, too large or failed their hash.
    pub const BAD_SNAPSHOT: VarInt = VarInt::from_u32(4);
    /// The server could not process the request (local I/O failure).
    pub const INTERNAL: VarInt = VarInt::from_u32(5);
    /// A `shoal-data/1` connection arrived before the node installed its data handler.
    pub const NO_DATA_HANDLER: VarInt = VarInt::from_u32(6);
    /// The client's certificate belonged to a node that was removed from the cluster.
    pub const REVOKED: VarInt = VarInt::from_u32(7);
    /// Every slot for unauthenticated (join) connections is taken; try again later.
    pub const BUSY: VarInt = VarInt::from_u32(8);
    /// An unauthenticated (join) connection outlived its time.
    pub const TOO_SLOW: VarInt = VarInt::from_u32(9);
    /// The client dropped a connection whose peer went silent (`NetOptions::silent_peer`).
    pub const SILENT: VarInt = VarInt::from_u32(10);
}

/// A transport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("could not bind the QUIC endpoint")]
    Bind(#[source] std::io::Error),
    #[error("the TLS configuration cannot be used for QUIC")]
    QuicTls(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("could not build the TLS configuration")]
    Tls(#[from] TlsError),
    #[error("could not resolve peer address {0:?}")]
    Resolve(String),
    #[error("could not start a connection to {0}")]
    Connect(String, #[source] quinn::ConnectError),
    #[error("the task connecting to {0} stopped")]
    ConnectTask(String),
    #[error("the connection to {0} failed")]
    Connection(String, #[source] quinn::ConnectionError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("could not connect to {0} within {1:?}")]
    ConnectTimeout(String, Duration),
    #[error("the request or response could not be framed")]
    Frame(#[from] FrameError),
    #[error("the peer refused the request")]
    Remote(#[source] PeerError),
    #[error("the peer answered {got} to a {rpc} request")]
    UnexpectedResponse {
        rpc: &'static str,
        got: &'static str,
    },
    #[error("could not read the local snapshot file")]
    SnapshotFile(#[source] std::io::Error),
    #[error("the snapshot file changed size while it was sent")]
    SnapshotSize,
    #[error("the caller stopped waiting: another node leads now")]
    Abandoned,
    /// One failure reported to every write of a forwarded batch.
    #[error(transparent)]
    Shared(std::sync::Arc<NetError>),
}

impl NetError {
    /// Whether the peer could not be reached at all (so openraft should back off), as opposed
    /// to an RPC that failed on a working connection.
    pub fn is_unreachable(&self) -> bool {
        if let NetError::Shared(e) = self {
            return e.is_unreachable();
        }
        matches!(
            self,
            NetError::Resolve(_)
                | NetError::Connect(..)
                | NetError::ConnectTimeout(..)
                | NetError::ConnectTask(_)
                | NetError::Connection(..)
        )
    }
}

/// Limits and timeouts of the transport. The defaults suit a LAN cluster.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Largest request or response frame.
    pub max_frame: u32,
    /// How long the server waits for a complete request frame on a new stream.
    pub request_timeout: Duration,
    /// How long a snapshot transfer may stall between chunks.
    pub snapshot_chunk_timeout: Duration,
    /// Largest snapshot the server accepts.
    pub max_snapshot_bytes: u64,
    /// How long a sender waits for the receiver to install a snapshot it has fully sent (the
    /// RPC TTL, if longer, wins).
    pub snapshot_install_timeout: Duration,
    /// Size of the chunks a snapshot is sent in.
    pub snapshot_chunk_bytes: usize,
    /// Concurrent RPC streams a peer may open on one connection.
    pub max_streams_per_connection: u32,
    /// Connections the server serves at once (members and joiners); more are refused.
    pub max_connections: usize,
    /// AppendEntries requests a leader keeps in flight on one pipelined stream.
    pub append_pipeline_depth: usize,
    /// Least time a follower has to answer a pipelined AppendEntries. openraft asks for the
    /// heartbeat interval (50 ms by default), but a follower answers only once the entries are
    /// synced, which on a busy disk takes longer; timing it out restarts the stream and sends
    /// the same entries again, so a slow but live quorum could never commit (found by
    /// `shoal-loadtest faults`: 11-13 s without writes, docs/benchmarks.md).
    pub append_response_floor: Duration,
    /// A connection with no traffic (keep-alives included) for this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alive interval; well under `idle_timeout`.
    pub keep_alive: Duration,
    /// How long establishing a connection may take.
    pub connect_timeout: Duration,
    /// A handshake still running after this long is joined by a fresh attempt (the first to
    /// complete wins; each may run for `connect_timeout`). A handshake to an unreachable peer
    /// backs off (its Initial packet is sent again after about 3 × `initial_rtt`, then twice
    /// that, ...), so a peer that comes back would be found only at the next resend; a fresh
    /// attempt sends at once.
    pub connect_retry_after: Duration,
    /// QUIC's RTT estimate before the first sample (RFC 9002 says 333 ms for the Internet). It
    /// sets when a lost handshake packet is sent again.
    pub initial_rtt: Duration,
    /// A connection on which we sent something the peer must acknowledge and then heard
    /// nothing at all for this long is closed (code `SILENT`) and the next RPC opens a fresh
    /// one. A live peer acknowledges within its ack delay (25 ms) plus the RTT, but a process
    /// starved of CPU can go quiet for longer: at 500 ms, debug builds under a load average of
    /// 18 closed live connections about once a second and elections churned (docs/benchmarks.md),
    /// hence 2 s, still well under the seconds QUIC's backed-off probes can take. Without this a
    /// connection through a partition, or to a paused or killed process, stays in QUIC's loss
    /// recovery after the path comes back, and its next probe may be seconds away: the probe
    /// timeout doubles with every unanswered probe (found by `shoal-loadtest faults`: a
    /// minority partition that healed after 4.5 s served again 5.4 s later).
    pub silent_peer: Duration,
    /// Timeout of an app RPC made through [`PeerClient`].
    pub rpc_timeout: Duration,
    /// How long shutdown waits for in-flight RPCs.
    pub drain_timeout: Duration,
    /// Bytes a peer may send on one stream ahead of our reads. Above a 4 MiB image chunk, so a
    /// chunk never waits for a window update on a LAN.
    pub stream_receive_window: u32,
    /// Bytes we keep unacknowledged across all streams of a connection.
    pub send_window: u64,
    /// How long a QUIC handshake may take before the attempt is dropped.
    pub handshake_timeout: Duration,
    /// Largest request frame on `shoal-join/1`, checked before the frame is read: a join
    /// request is a token and a CSR, a few KiB.
    pub max_join_frame: u32,
    /// Unauthenticated `shoal-join/1` connections served at once, from everyone together; more
    /// are closed at once. They come out of their own budget, so strangers holding every join
    /// slot leave member connections (`shoal/1`, `shoal-data/1`) untouched.
    pub max_join_connections: usize,
    /// `shoal-join/1` connections one source address may hold at once, so one stranger cannot
    /// take every join slot from a real joiner elsewhere.
    pub max_join_connections_per_source: usize,
    /// A `shoal-join/1` connection is closed this long after it was accepted.
    pub join_connection_timeout: Duration,
    /// Bytes a `shoal-join/1` peer may have in flight on its whole connection.
    pub join_receive_window: u32,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            max_frame: frame::MAX_FRAME,
            request_timeout: Duration::from_secs(10),
            snapshot_chunk_timeout: Duration::from_secs(30),
            max_snapshot_bytes: 64 << 30,
            snapshot_install_timeout: Duration::from_secs(120),
            snapshot_chunk_bytes: 256 << 10,
            max_streams_per_connection: 128,
            max_connections: 256,
            append_pipeline_depth: 8,
            append_response_floor: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            connect_retry_after: Duration::from_millis(500),
            initial_rtt: Duration::from_millis(100),
            silent_peer: Duration::from_secs(2),
            rpc_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            stream_receive_window: 8 << 20,
            send_window: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            max_join_frame: 64 << 10,
            max_join_connections: 64,
            max_join_connections_per_source: 8,
            join_connection_timeout: Duration::from_secs(30),
            join_receive_window: 256 << 10,
        }
    }
}

impl NetOptions {
    pub(crate) fn transport(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.max_streams_per_connection))
            .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
            .keep_alive_interval(Some(self.keep_alive))
            .stream_receive_window(quinn::VarInt::from_u32(self.stream_receive_window))
            .send_window(self.send_window)
            .initial_rtt(self.initial_rtt);
        // An idle timeout too large for QUIC's varint keeps quinn's default rather than "never".
        if let Ok(idle) = quinn::IdleTimeout::try_from(self.idle_timeout) {
            t.max_idle_timeout(Some(idle));
        }
        t
    }

    /// The server's transport: what a client gets before anyone knows who it is. The handshake
    /// grants its flow-control credit before the ALPN and the certificate are checked, so it is
    /// a stranger's: a few streams and a small connection window. A member's connection is
    /// raised to the full budget as soon as its certificate checked out
    /// ([`NetOptions::raise_for_member`]); a join connection keeps the stranger's.
    pub(crate) fn server_transport(&self) -> quinn::TransportConfig {
        let mut t = self.transport();
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(2))
            .receive_window(quinn::VarInt::from_u32(self.join_receive_window));
        t
    }

    /// Gives an authenticated member's connection the full stream and window budget.
    pub(crate) fn raise_for_member(&self, conn: &quinn::Connection) {
        conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(
            self.max_streams_per_connection,
        ));
        conn.set_receive_window(quinn::VarInt::MAX);
    }
}
