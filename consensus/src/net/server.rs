//! The peer server: accepts QUIC connections, serves one RPC per bidirectional stream through
//! a [`PeerHandler`], and hands `shoal-data/1` connections whole to a [`DataHandler`].
//!
//! A bad stream (malformed, oversized, truncated or slow frame, bad snapshot) is logged and
//! reset with an error code; the connection's other streams and the server carry on. A handler
//! that panics loses only its own stream.

use std::future::Future;
use std::io::SeekFrom;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use quinn::{RecvStream, SendStream, VarInt};
use sha2::{Digest, Sha256};
use shoal_types::{Command, TxnResponse};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::frame::{
    encode_frame, read_frame, read_next_frame, write_frame, JoinRequest, JoinResponse, PeerError,
    PeerRequest, PeerResponse, PeerStatus, WriteOutcome, MAX_FORWARD_BATCH, SNAPSHOT_TRAILER_LEN,
};
use super::tls::{self, NodeIdentity, ALPN_DATA, ALPN_JOIN, ALPN_PEER};
use super::{codes, NetError, NetOptions};
use crate::raft_types::{SnapshotMeta, TypeConfig, Vote};
use crate::wire::{
    WAppendEntriesResponse, WSnapshotResponse, WTransferLeaderResponse, WVoteResponse,
};

/// A boxed, sendable future: what [`PeerHandler`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the server does with each RPC. The node implements it on top of openraft
/// (`Raft::append_entries`, `vote`, `install_full_snapshot`, `client_write`, ...) and its join
/// logic. Requests arrive already decoded, validated and converted to openraft types.
pub trait PeerHandler: Send + Sync + 'static {
    fn append_entries(
        &self,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<TypeConfig>, PeerError>>;

    fn vote(
        &self,
        req: VoteRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<VoteResponse<TypeConfig>, PeerError>>;

    fn pre_vote(
        &self,
        req: VoteRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<VoteResponse<TypeConfig>, PeerError>>;

    /// `file` holds the complete snapshot, length- and hash-checked, positioned at its start.
    /// It is an unlinked temp file in the server's snapshot directory: dropping it frees it.
    fn install_snapshot(
        &self,
        vote: Vote,
        meta: SnapshotMeta,
        file: std::fs::File,
    ) -> BoxFuture<'_, Result<SnapshotResponse<TypeConfig>, PeerError>>;

    /// The leader hands leadership over (openraft's `Raft::handle_transfer_leader`). The
    /// default refuses: a server that does not take part in Raft has nothing to hand over to.
    fn transfer_leader(
        &self,
        _req: TransferLeaderRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<TypeConfig>, PeerError>> {
        Box::pin(async { Err(PeerError::BadRequest("this server runs no Raft".into())) })
    }

    /// A write forwarded by a follower; only the leader accepts it.
    fn client_write(&self, cmd: Command) -> BoxFuture<'_, Result<TxnResponse, PeerError>>;

    /// Writes a follower forwarded together: one outcome per command, in order. The default
    /// proposes them one by one, concurrently; a Raft node proposes them in one call.
    fn client_write_batch(&self, cmds: Vec<Command>) -> BoxFuture<'_, Vec<WriteOutcome>> {
        Box::pin(async move {
            futures::future::join_all(cmds.into_iter().map(|cmd| async move {
                match self.client_write(cmd).await {
                    Ok(r) => WriteOutcome::Applied(r),
                    Err(e) => WriteOutcome::Failed(e),
                }
            }))
            .await
        })
    }

    /// The read index for a linearizable read (leader only).
    fn linearizable_read(&self) -> BoxFuture<'_, Result<u64, PeerError>>;

    fn status(&self) -> BoxFuture<'_, PeerStatus>;

    /// Whether a client certificate, by the hex SHA-256 of its leaf, belongs to a removed node:
    /// its `shoal/1` and `shoal-data/1` connections are closed. The default revokes nothing.
    fn is_revoked<'a>(&'a self, _cert_sha256: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async { false })
    }

    /// Admits a joiner: checks the token, signs its CSR, adds it as a learner.
    fn join(
        &self,
        req: JoinRequest,
        peer_addr: SocketAddr,
    ) -> BoxFuture<'_, Result<JoinResponse, PeerError>>;
}

/// What the server does with a `shoal-data/1` connection: the node's bulk-data protocol
/// (image chunks), which consensus knows nothing about. `serve` owns the connection until it
/// returns; `peer_name` is the CN of the client's verified member certificate. When the server
/// shuts down, the future is dropped and the connection closed.
pub trait DataHandler: Send + Sync + 'static {
    fn serve(&self, peer_name: String, conn: quinn::Connection) -> BoxFuture<'static, ()>;
}

/// Where the node installs its [`DataHandler`], possibly after the server started: the server is
/// bound before the node's services exist. Data connections arriving while it is empty are
/// closed with [`codes::NO_DATA_HANDLER`]. Cheap to clone; clones share the slot.
#[derive(Clone, Default)]
pub struct DataSlot(Arc<RwLock<Option<Arc<dyn DataHandler>>>>);

impl std::fmt::Debug for DataSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataSlot")
            .field("set", &self.get().is_some())
            .finish()
    }
}

impl DataSlot {
    /// Installs (or replaces) the handler for connections accepted from now on.
    pub fn set(&self, handler: Arc<dyn DataHandler>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    fn get(&self) -> Option<Arc<dyn DataHandler>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The QUIC server of a node.
pub struct PeerServer {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PeerServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerServer")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

struct Shared {
    handler: Arc<dyn PeerHandler>,
    data: DataSlot,
    snapshot_dir: PathBuf,
    opts: NetOptions,
    /// Slots for unauthenticated join connections (`NetOptions::max_join_connections`).
    join_slots: Arc<tokio::sync::Semaphore>,
    /// Join connections held per source address.
    join_sources: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

/// A join connection's hold on its source address's count; released on drop.
struct SourceHold {
    sources: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl SourceHold {
    fn take(shared: &Shared, ip: std::net::IpAddr) -> Option<SourceHold> {
        let mut map = shared.join_sources.lock().expect("join sources lock");
        let n = map.entry(ip).or_insert(0);
        if *n >= shared.opts.max_join_connections_per_source {
            return None;
        }
        *n += 1;
        Some(SourceHold {
            sources: shared.join_sources.clone(),
            ip,
        })
    }
}

impl Drop for SourceHold {
    fn drop(&mut self) {
        let mut map = self.sources.lock().expect("join sources lock");
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// What a connection may do, fixed at the handshake.
#[derive(Clone, Debug)]
struct ConnCtx {
    peer_addr: SocketAddr,
    /// CN of the verified client certificate, if one was presented.
    peer_name: Option<String>,
    /// `shoal-join/1`: only the join RPC.
    join_only: bool,
}

/// Ends a stream early: resets our side and asks the peer to stop sending.
fn abort_stream(send: &mut SendStream, recv: &mut RecvStream, code: VarInt) {
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

impl PeerServer {
    /// Binds a UDP socket at `addr` and prepares to serve as the member `identity` (a chain
    /// from the CA whose certificate is `ca_cert_pem`). Incoming snapshots are written under
    /// `snapshot_dir`.
    pub fn bind(
        addr: SocketAddr,
        ca_cert_pem: &str,
        identity: &NodeIdentity,
        handler: Arc<dyn PeerHandler>,
        snapshot_dir: impl AsRef<Path>,
    ) -> Result<PeerServer, NetError> {
        Self::bind_with(
            addr,
            ca_cert_pem,
            identity,
            handler,
            snapshot_dir,
            NetOptions::default(),
        )
    }

    /// [`PeerServer::bind`] with explicit limits and timeouts.
    pub fn bind_with(
        addr: SocketAddr,
        ca_cert_pem: &str,
        identity: &NodeIdentity,
        handler: Arc<dyn PeerHandler>,
        snapshot_dir: impl AsRef<Path>,
        opts: NetOptions,
    ) -> Result<PeerServer, NetError> {
        let tls = tls::server_config(ca_cert_pem, identity)?;
        let quic =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(NetError::QuicTls)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(opts.server_transport()));
        // The reset key survives a restart, so the restarted node's stateless resets for its old
        // connections are accepted by its peers, which reconnect at once instead of timing out.
        // quinn's default CID generator drops packets whose CID fails a per-process keyed hash
        // before it would reset them, hence plain random CIDs.
        let reset_key =
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &identity.stateless_reset_key());
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        endpoint_config.cid_generator(|| Box::new(RandomCids));
        let socket = std::net::UdpSocket::bind(addr).map_err(NetError::Bind)?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(NetError::Bind)?;
        Ok(PeerServer {
            endpoint,
            shared: Arc::new(Shared {
                handler,
                data: DataSlot::default(),
                snapshot_dir: snapshot_dir.as_ref().to_owned(),
                join_slots: Arc::new(tokio::sync::Semaphore::new(opts.max_join_connections)),
                join_sources: Arc::default(),
                opts,
            }),
        })
    }

    /// The bound address (useful when binding port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.endpoint.local_addr().map_err(NetError::Bind)
    }

    /// The slot for the handler of `shoal-data/1` connections.
    pub fn data_slot(&self) -> DataSlot {
        self.shared.data.clone()
    }

    /// The endpoint, to share its UDP socket with a [`super::PeerClient`].
    pub fn endpoint(&self) -> quinn::Endpoint {
        self.endpoint.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight RPCs finish (up
    /// to the drain timeout) and closes the endpoint.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) if conns.len() >= self.shared.opts.max_connections => {
                        warn!(peer_addr = %incoming.remote_address(), "refusing connection: too many connections");
                        incoming.refuse();
                    }
                    Some(incoming) => {
                        conns.spawn(serve_connection(incoming, self.shared.clone(), stop_rx.clone()));
                    }
                    None => break,
                },
                Some(done) = conns.join_next(), if !conns.is_empty() => {
                    if let Err(e) = done {
                        warn!(error = %e, "peer connection task failed");
                    }
                }
            }
        }
        info!("peer server shutting down");
        self.endpoint.set_server_config(None);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(self.shared.opts.drain_timeout, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("in-flight peer RPCs did not finish in time; aborting them");
            conns.abort_all();
            while conns.join_next().await.is_some() {}
        }
        self.endpoint.close(codes::SHUTDOWN, b"shutdown");
        let _ =
            tokio::time::timeout(self.shared.opts.drain_timeout, self.endpoint.wait_idle()).await;
    }
}

async fn serve_connection(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let peer_addr = incoming.remote_address();
    let conn = match tokio::time::timeout(shared.opts.handshake_timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            // Includes clients whose certificate failed verification.
            debug!(%peer_addr, error = %e, "peer handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer_addr, "peer handshake timed out");
            return;
        }
    };
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    let peer_name = tls::peer_node_name(&conn);
    if matches!(alpn.as_deref(), Some(ALPN_PEER | ALPN_DATA)) {
        if let Some(fp) = tls::peer_fingerprint(&conn) {
            if shared.handler.is_revoked(&fp).await {
                warn!(%peer_addr, peer = ?peer_name, "refusing the certificate of a removed node");
                conn.close(codes::REVOKED, b"certificate revoked");
                return;
            }
        }
    }
    let join_only = match alpn.as_deref() {
        Some(ALPN_PEER) if peer_name.is_some() => {
            shared.opts.raise_for_member(&conn);
            false
        }
        Some(ALPN_PEER) => {
            warn!(%peer_addr, "refusing shoal/1 connection without a client certificate");
            conn.close(codes::UNAUTHENTICATED, b"client certificate required");
            return;
        }
        Some(ALPN_DATA) => {
            serve_data(conn, peer_addr, peer_name, &shared, stop).await;
            return;
        }
        Some(ALPN_JOIN) => true,
        _ => {
            warn!(%peer_addr, "refusing connection without a known ALPN");
            conn.close(codes::BAD_ALPN, b"unknown protocol");
            return;
        }
    };
    // A join connection is a stranger's until its join succeeds: it takes a slot from its own
    // budget, gets a small receive window and few streams, and a deadline.
    let _join_slot = if join_only {
        let Some(hold) = SourceHold::take(&shared, peer_addr.ip()) else {
            debug!(%peer_addr, "refusing join connection: this address holds its share");
            conn.close(codes::BUSY, b"too many join connections from this address");
            return;
        };
        let Ok(slot) = shared.join_slots.clone().try_acquire_owned() else {
            debug!(%peer_addr, "refusing join connection: every join slot is taken");
            conn.close(codes::BUSY, b"too many join connections; retry later");
            return;
        };
        Some((slot, hold))
    } else {
        None
    };
    let deadline =
        join_only.then(|| tokio::time::Instant::now() + shared.opts.join_connection_timeout);
    let ctx = Arc::new(ConnCtx {
        peer_addr,
        peer_name,
        join_only,
    });
    debug!(%peer_addr, peer = ?ctx.peer_name, join_only, "peer connected");
    let expired = async move {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);

    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = &mut expired => {
                debug!(%peer_addr, "closing a join connection past its time");
                streams.abort_all();
                conn.close(codes::TOO_SLOW, b"join connection timed out");
                return;
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(shared.clone(), ctx.clone(), send, recv));
                }
                Err(e) => {
                    debug!(%peer_addr, error = %e, "peer connection closed");
                    break;
                }
            },
            Some(done) = streams.join_next(), if !streams.is_empty() => {
                if let Err(e) = done {
                    warn!(%peer_addr, error = %e, "peer RPC task failed");
                }
            }
        }
    }
    // In-flight RPCs finish (the server's drain timeout bounds this), then the connection
    // closes if we are shutting down; otherwise the peer already closed it.
    while let Some(done) = streams.join_next().await {
        if let Err(e) = done {
            warn!(%peer_addr, error = %e, "peer RPC task failed");
        }
    }
    conn.close(codes::SHUTDOWN, b"shutdown");
}

/// Hands a `shoal-data/1` connection to the node's data handler, if the client is a member and
/// a handler is installed; closes it when the server stops.
async fn serve_data(
    conn: quinn::Connection,
    peer_addr: SocketAddr,
    peer_name: Option<String>,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) {
    let Some(peer_name) = peer_name else {
        warn!(%peer_addr, "refusing shoal-data/1 connection without a client certificate");
        conn.close(codes::UNAUTHENTICATED, b"client certificate required");
        return;
    };
    let Some(handler) = shared.data.get() else {
        debug!(%peer_addr, peer = %peer_name, "refusing data connection: no data handler yet");
        conn.close(codes::NO_DATA_HANDLER, b"data service not ready");
        return;
    };
    shared.opts.raise_for_member(&conn);
    debug!(%peer_addr, peer = %peer_name, "data connection");
    tokio::select! {
        _ = stop.changed() => {}
        _ = handler.serve(peer_name, conn.clone()) => {}
    }
    conn.close(codes::SHUTDOWN, b"shutdown");
}

/// Serves one stream: one request, or a pipeline of AppendEntries requests answered in order
/// (openraft's `stream_append`), until the client finishes its side.
async fn serve_stream(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let opts = &shared.opts;
    let mut first = true;
    loop {
        // The first frame must come promptly; later frames of a pipeline may wait as long as
        // the connection may idle.
        // Before authentication only a join request is possible, and it is small.
        let max_frame = if ctx.join_only {
            opts.max_join_frame
        } else {
            opts.max_frame
        };
        let next = if first {
            read_frame(&mut recv, max_frame, opts.request_timeout)
                .await
                .map(Some)
        } else {
            read_next_frame(&mut recv, max_frame, opts.idle_timeout).await
        };
        let req: PeerRequest = match next {
            Ok(Some(req)) => req,
            Ok(None) => break,
            Err(e) => {
                // Strangers can send bad frames at will: their refusals are not worth a warning.
                if ctx.join_only {
                    debug!(peer_addr = %ctx.peer_addr, error = %e, "refusing bad join frame");
                } else {
                    warn!(peer_addr = %ctx.peer_addr, peer = ?ctx.peer_name, error = %e, "refusing bad request frame");
                }
                abort_stream(&mut send, &mut recv, codes::BAD_FRAME);
                return;
            }
        };
        let kind = req.kind();
        let pipelined = matches!(req, PeerRequest::AppendEntries(_)) && !ctx.join_only;
        if !first && !pipelined {
            warn!(peer_addr = %ctx.peer_addr, rpc = kind, "refusing a second request on a non-pipelined stream");
            abort_stream(&mut send, &mut recv, codes::BAD_FRAME);
            return;
        }
        first = false;
        let resp = if ctx.join_only && !matches!(req, PeerRequest::Join(_)) {
            warn!(peer_addr = %ctx.peer_addr, rpc = kind, "refusing non-join RPC on shoal-join/1");
            PeerResponse::Error(PeerError::Unauthorized(format!(
                "{kind} needs a member certificate; only join is served on shoal-join/1"
            )))
        } else {
            match dispatch(&shared, &ctx, req, &mut recv).await {
                Ok(resp) => resp,
                Err(code) => {
                    abort_stream(&mut send, &mut recv, code);
                    return;
                }
            }
        };
        let frame = match encode_frame(&resp, opts.max_frame) {
            Ok(frame) => frame,
            Err(e) => {
                warn!(rpc = kind, error = %e, "response does not fit in a frame");
                abort_stream(&mut send, &mut recv, codes::INTERNAL);
                return;
            }
        };
        if let Err(e) = write_frame(&mut send, &frame).await {
            debug!(peer_addr = %ctx.peer_addr, rpc = kind, error = %e, "could not send response");
            return;
        }
        if !pipelined {
            break;
        }
    }
    let _ = send.finish();
}

fn bad_request(e: impl std::fmt::Display) -> PeerResponse {
    PeerResponse::Error(PeerError::BadRequest(e.to_string()))
}

/// Runs one request. `Err(code)` means the stream must be aborted with that code.
async fn dispatch(
    shared: &Shared,
    ctx: &ConnCtx,
    req: PeerRequest,
    recv: &mut RecvStream,
) -> Result<PeerResponse, VarInt> {
    let h = &shared.handler;
    let resp = match req {
        PeerRequest::AppendEntries(w) => match AppendEntriesRequest::try_from(w) {
            Ok(r) => match h.append_entries(r).await {
                Ok(resp) => PeerResponse::AppendEntries(WAppendEntriesResponse::from(&resp)),
                Err(e) => PeerResponse::Error(e),
            },
            Err(e) => bad_request(e),
        },
        PeerRequest::Vote(w) => match h.vote(VoteRequest::from(&w)).await {
            Ok(resp) => PeerResponse::Vote(WVoteResponse::from(&resp)),
            Err(e) => PeerResponse::Error(e),
        },
        PeerRequest::PreVote(w) => match h.pre_vote(VoteRequest::from(&w)).await {
            Ok(resp) => PeerResponse::Vote(WVoteResponse::from(&resp)),
            Err(e) => PeerResponse::Error(e),
        },
        PeerRequest::TransferLeader(w) => {
            match h.transfer_leader(TransferLeaderRequest::from(&w)).await {
                Ok(resp) => PeerResponse::TransferLeader(WTransferLeaderResponse::from(&resp)),
                Err(e) => PeerResponse::Error(e),
            }
        }
        PeerRequest::SnapshotBegin { vote, meta, len } => {
            let meta = match SnapshotMeta::try_from(&meta) {
                Ok(meta) => meta,
                Err(e) => return Ok(bad_request(e)),
            };
            if len > shared.opts.max_snapshot_bytes {
                warn!(peer_addr = %ctx.peer_addr, len, "refusing oversized snapshot");
                return Err(codes::BAD_SNAPSHOT);
            }
            let file = match receive_snapshot(shared, recv, len).await {
                Ok(file) => file,
                Err(SnapshotRecvError::Hash) => {
                    warn!(peer_addr = %ctx.peer_addr, "refusing snapshot whose hash does not match");
                    return Ok(bad_request(
                        "snapshot bytes do not match their SHA-256 trailer",
                    ));
                }
                Err(e) => {
                    warn!(peer_addr = %ctx.peer_addr, error = %e, "snapshot transfer failed");
                    return Err(match e {
                        SnapshotRecvError::Io(_) => codes::INTERNAL,
                        _ => codes::BAD_SNAPSHOT,
                    });
                }
            };
            match h.install_snapshot(Vote::from(&vote), meta, file).await {
                Ok(resp) => PeerResponse::Snapshot(WSnapshotResponse::from(&resp)),
                Err(e) => PeerResponse::Error(e),
            }
        }
        PeerRequest::ClientWrite(cmd) => match h.client_write(cmd).await {
            Ok(r) => PeerResponse::ClientWrite(r),
            Err(e) => PeerResponse::Error(e),
        },
        PeerRequest::ClientWriteBatch(cmds) => {
            if cmds.is_empty() || cmds.len() > MAX_FORWARD_BATCH {
                bad_request(format!(
                    "a forwarded batch holds 1 to {MAX_FORWARD_BATCH} writes, not {}",
                    cmds.len()
                ))
            } else {
                let n = cmds.len();
                let outcomes = h.client_write_batch(cmds).await;
                if outcomes.len() == n {
                    PeerResponse::ClientWriteBatch(outcomes)
                } else {
                    PeerResponse::Error(PeerError::Fatal(format!(
                        "{} outcomes for {n} forwarded writes",
                        outcomes.len()
                    )))
                }
            }
        }
        PeerRequest::LinearizableRead => match h.linearizable_read().await {
            Ok(index) => PeerResponse::ReadIndex(index),
            Err(e) => PeerResponse::Error(e),
        },
        PeerRequest::Status => PeerResponse::Status(h.status().await),
        PeerRequest::Join(req) => {
            info!(peer_addr = %ctx.peer_addr, name = %req.name, "join request");
            match h.join(req, ctx.peer_addr).await {
                Ok(r) => PeerResponse::Join(r),
                Err(e) => PeerResponse::Error(e),
            }
        }
    };
    Ok(resp)
}

#[derive(Debug, thiserror::Error)]
enum SnapshotRecvError {
    #[error("the snapshot stream ended early")]
    Truncated,
    #[error("the snapshot stream stalled")]
    Stalled,
    #[error("the snapshot stream failed")]
    Read(#[source] quinn::ReadError),
    #[error("the snapshot bytes do not match their hash")]
    Hash,
    #[error("could not write the snapshot file")]
    Io(#[source] std::io::Error),
}

/// Reads exactly `len` snapshot bytes and the SHA-256 trailer into an unlinked temp file.
async fn receive_snapshot(
    shared: &Shared,
    recv: &mut RecvStream,
    len: u64,
) -> Result<std::fs::File, SnapshotRecvError> {
    let dir = shared.snapshot_dir.clone();
    let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir))
        .await
        .map_err(|e| SnapshotRecvError::Io(std::io::Error::other(e)))?
        .map_err(SnapshotRecvError::Io)?;
    let mut file = tokio::fs::File::from_std(file);
    let chunk_timeout = shared.opts.snapshot_chunk_timeout;
    let mut hasher = Sha256::new();
    let mut remaining = len;
    while remaining > 0 {
        let max = usize::try_from(remaining).unwrap_or(usize::MAX);
        let chunk = tokio::time::timeout(chunk_timeout, recv.read_chunk(max, true))
            .await
            .map_err(|_| SnapshotRecvError::Stalled)?
            .map_err(SnapshotRecvError::Read)?
            .ok_or(SnapshotRecvError::Truncated)?;
        hasher.update(&chunk.bytes);
        file.write_all(&chunk.bytes)
            .await
            .map_err(SnapshotRecvError::Io)?;
        remaining -= chunk.bytes.len() as u64;
    }
    let mut trailer = [0u8; SNAPSHOT_TRAILER_LEN];
    tokio::time::timeout(chunk_timeout, recv.read_exact(&mut trailer))
        .await
        .map_err(|_| SnapshotRecvError::Stalled)?
        .map_err(|e| match e {
            quinn::ReadExactError::FinishedEarly(_) => SnapshotRecvError::Truncated,
            quinn::ReadExactError::ReadError(e) => SnapshotRecvError::Read(e),
        })?;
    if hasher.finalize().as_slice() != trailer {
        return Err(SnapshotRecvError::Hash);
    }
    file.flush().await.map_err(SnapshotRecvError::Io)?;
    file.seek(SeekFrom::Start(0))
        .await
        .map_err(SnapshotRecvError::Io)?;
    Ok(file.into_std().await)
}

/// 8-byte random connection IDs that any restart of this node accepts as possibly its own.
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}
