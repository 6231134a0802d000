//! The client side: [`PeerClient`] (cached connections, app RPCs, join) and [`QuicNetwork`],
//! openraft's network over it.
//!
//! One QUIC connection per peer address, opened lazily, shared by every RPC to that peer and
//! replaced when it closes. Each RPC opens its own bidirectional stream, so a slow snapshot
//! does not hold up heartbeats.

use std::collections::HashMap;
use std::future::Future;
use std::io::SeekFrom;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use quinn::{Connection, Endpoint};
use sha2::{Digest, Sha256};
use shoal_types::{Command, NodeId, NodeInfo, TxnResponse};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::frame::{
    encode_frame, read_frame, write_frame, FrameError, JoinRequest, JoinResponse, PeerError,
    PeerRequest, PeerResponse, PeerStatus,
};
use super::tls::{self, NodeIdentity, SERVER_NAME};
use super::{NetError, NetOptions};
use crate::raft_types::{LogId, Snapshot, TypeConfig, Vote};
use crate::wire::{
    WAppendEntriesRequest, WSnapshotMeta, WTransferLeaderRequest, WVote, WVoteRequest,
};

/// Receives the latency of every RPC: peer address, RPC name, elapsed time, success. Meant for
/// a Prometheus histogram; it is called on the RPC's task, so it must be cheap.
pub type RpcObserver = Arc<dyn Fn(&str, &'static str, Duration, bool) + Send + Sync>;

/// Told the peer address of every connection a [`PeerClient`] establishes (see
/// [`PeerClient::on_connect`]).
pub type ConnectObserver = Arc<dyn Fn(&str) + Send + Sync>;

/// Makes QUIC client endpoints (a joiner has no server yet).
pub fn client_endpoint(bind: SocketAddr) -> Result<Endpoint, NetError> {
    Endpoint::client(bind).map_err(NetError::Bind)
}

pub(super) fn response_name(resp: &PeerResponse) -> &'static str {
    match resp {
        PeerResponse::AppendEntries(_) => "append_entries",
        PeerResponse::Vote(_) => "vote",
        PeerResponse::Snapshot(_) => "snapshot",
        PeerResponse::ClientWrite(_) => "client_write",
        PeerResponse::ClientWriteBatch(_) => "client_write_batch",
        PeerResponse::ReadIndex(_) => "read_index",
        PeerResponse::Status(_) => "status",
        PeerResponse::Join(_) => "join",
        PeerResponse::Error(_) => "error",
        PeerResponse::TransferLeader(_) => "transfer_leader",
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, NetError> {
    tokio::net::lookup_host(addr)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| NetError::Resolve(addr.to_owned()))
}

async fn connect(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    addr: &str,
    timeout: Duration,
) -> Result<Connection, NetError> {
    let sock = resolve(addr).await?;
    let connecting = endpoint
        .connect_with(config, sock, SERVER_NAME)
        .map_err(|e| NetError::Connect(addr.to_owned(), e))?;
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| NetError::ConnectTimeout(addr.to_owned(), timeout))?
        .map_err(|e| NetError::Connection(addr.to_owned(), e))
}

/// Frames we sent that the peer must acknowledge (RFC 9000 §13.2.1), as counted by quinn.
fn ack_eliciting_sent(stats: &quinn::ConnectionStats) -> u64 {
    let f = &stats.frame_tx;
    f.stream
        + f.ping
        + f.reset_stream
        + f.stop_sending
        + f.max_data
        + f.max_stream_data
        + f.max_streams_bidi
}

/// Closes `conn` (code `SILENT`) once we have sent it something that asks for an
/// acknowledgement and then received nothing at all for `limit`. A blackholed path or a dead or
/// paused peer leaves QUIC in loss recovery, whose probes back off exponentially, so after the
/// path comes back the old connection could stay mute for seconds; a fresh handshake needs
/// one round trip. In-flight RPCs on the closed connection fail as unreachable. Ends when the
/// connection closes for any reason.
async fn close_when_silent(conn: Connection, addr: String, limit: Duration) {
    let tick = (limit / 5).max(Duration::from_millis(10));
    let stats = conn.stats();
    let (mut received, mut sent) = (stats.udp_rx.datagrams, ack_eliciting_sent(&stats));
    let mut waiting_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let stats = conn.stats();
        let (now_received, now_sent) = (stats.udp_rx.datagrams, ack_eliciting_sent(&stats));
        if now_received != received {
            (received, sent, waiting_since) = (now_received, now_sent, None);
            continue;
        }
        if now_sent != sent && waiting_since.is_none() {
            // Set at the first tick after the send, so never earlier than it.
            waiting_since = Some(Instant::now());
        }
        if waiting_since.is_some_and(|t| t.elapsed() >= limit) {
            tracing::info!(peer = %addr, silent_ms = limit.as_millis() as u64,
                "closing a connection whose peer went silent");
            conn.close(super::codes::SILENT, b"peer silent");
            return;
        }
    }
}

/// Sends one request frame on a new stream and reads the response frame.
async fn call_on(
    conn: &Connection,
    addr: &str,
    req: &PeerRequest,
    max_frame: u32,
    timeout: Duration,
) -> Result<PeerResponse, NetError> {
    let frame = encode_frame(req, max_frame)?;
    let rpc = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| NetError::Connection(addr.to_owned(), e))?;
        write_frame(&mut send, &frame).await?;
        // Finishing only fails if the stream was already reset; the read below reports that.
        let _ = send.finish();
        Ok::<_, NetError>(read_frame(&mut recv, max_frame, timeout).await?)
    };
    let result = tokio::time::timeout(timeout, rpc)
        .await
        .map_err(|_| NetError::Timeout(timeout))?;
    // A stream that failed because the whole connection went away (peer closed it, refused our
    // certificate, vanished) is a connection failure, not a bad RPC.
    match (result, conn.close_reason()) {
        (Err(NetError::Frame(_)), Some(reason)) => {
            Err(NetError::Connection(addr.to_owned(), reason))
        }
        (Err(NetError::Frame(FrameError::Timeout(d))), None) => Err(NetError::Timeout(d)),
        (result, _) => result,
    }
}

/// One peer address: the connection every RPC to it shares, and its handshake attempts.
struct Slot {
    /// Replaced when it closes; callers waiting for a connection watch it.
    conn: tokio::sync::watch::Sender<Option<Connection>>,
    /// When the latest handshake attempt started, while it may still be running.
    attempt: Mutex<Option<Instant>>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            conn: tokio::sync::watch::Sender::new(None),
            attempt: Mutex::new(None),
        }
    }

    fn attempt(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.attempt.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One handshake with `target`, for as long as `connect_timeout`. A connection that comes up
/// while the slot has none open becomes the slot's (watched for silence, reported to the
/// `on_connect` hook); one that loses the race to another attempt is closed.
async fn attempt(
    inner: Arc<ClientInner>,
    slot: Arc<Slot>,
    target: String,
    started: Instant,
) -> Result<Connection, NetError> {
    let opts = &inner.opts;
    let conn = match connect(
        &inner.endpoint,
        inner.config.clone(),
        &target,
        opts.connect_timeout,
    )
    .await
    {
        Ok(conn) => conn,
        Err(e) => {
            // The next caller starts over at once (a refused handshake is not retried on a
            // timer), unless a later attempt is running.
            let mut attempt = slot.attempt();
            if *attempt == Some(started) {
                *attempt = None;
            }
            return Err(e);
        }
    };
    let mut winner = None;
    slot.conn.send_if_modified(|current| match current {
        Some(open) if open.close_reason().is_none() => {
            winner = Some(open.clone());
            false
        }
        _ => {
            *current = Some(conn.clone());
            true
        }
    });
    if let Some(open) = winner {
        conn.close(super::codes::SHUTDOWN, b"duplicate");
        return Ok(open);
    }
    *slot.attempt() = None;
    tokio::spawn(close_when_silent(
        conn.clone(),
        target.clone(),
        opts.silent_peer,
    ));
    if let Some(f) = inner.on_connect.get() {
        f(&target);
    }
    Ok(conn)
}

/// Cached peer connections and the app RPCs. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct PeerClient {
    pub(super) inner: Arc<ClientInner>,
}

pub(super) struct ClientInner {
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    pub(super) opts: NetOptions,
    /// One slot per peer address; the async lock makes concurrent callers share one connect.
    conns: Mutex<HashMap<String, Arc<Slot>>>,
    observer: Option<RpcObserver>,
    on_connect: OnceLock<ConnectObserver>,
    /// The forwarded-write batchers, one per leader address (`forward.rs`).
    pub(super) forwarders: super::forward::Forwarders,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("local_addr", &self.inner.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl PeerClient {
    /// A member's client: presents `identity`, trusts servers certified by the CA.
    /// `endpoint` may be the server's ([`super::PeerServer::endpoint`]) or [`client_endpoint`].
    pub fn new(
        endpoint: Endpoint,
        ca_cert_pem: &str,
        identity: &NodeIdentity,
        opts: NetOptions,
        observer: Option<RpcObserver>,
    ) -> Result<PeerClient, NetError> {
        let rustls = tls::peer_client_config(ca_cert_pem, identity)?;
        Self::with_tls(endpoint, rustls, opts, observer)
    }

    /// A client with an explicit rustls configuration (tests use it to present foreign or no
    /// certificates).
    pub fn with_tls(
        endpoint: Endpoint,
        rustls: rustls::ClientConfig,
        opts: NetOptions,
        observer: Option<RpcObserver>,
    ) -> Result<PeerClient, NetError> {
        let quic =
            quinn::crypto::rustls::QuicClientConfig::try_from(rustls).map_err(NetError::QuicTls)?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(opts.transport()));
        Ok(PeerClient {
            inner: Arc::new(ClientInner {
                endpoint,
                config,
                opts,
                conns: Mutex::new(HashMap::new()),
                observer,
                on_connect: OnceLock::new(),
                forwarders: Default::default(),
            }),
        })
    }

    /// Calls `f` with the peer address of every connection established from now on (the
    /// cluster uses it to retry replication to a peer as soon as it can be reached again,
    /// instead of when openraft's backoff runs out). Only the first call takes effect.
    pub fn on_connect(&self, f: ConnectObserver) {
        let _ = self.inner.on_connect.set(f);
    }

    fn slot(&self, addr: &str) -> Arc<Slot> {
        let mut conns = self.inner.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .entry(addr.to_owned())
            .or_insert_with(|| Arc::new(Slot::new()))
            .clone()
    }

    /// Whether an open connection to `addr` is cached.
    pub async fn is_connected(&self, addr: &str) -> bool {
        self.slot(addr)
            .conn
            .borrow()
            .as_ref()
            .is_some_and(|c| c.close_reason().is_none())
    }

    /// The cached connection to `addr`, or a new one if there is none or it closed.
    ///
    /// Handshakes run in tasks of their own: a caller whose TTL (a heartbeat's is tens of
    /// milliseconds) runs out must not abort a handshake that the next RPC can use. A handshake
    /// still running after `connect_retry_after` is joined by a fresh one, and the first to
    /// complete wins: the earlier one keeps going (on a loaded machine a handshake may be slow,
    /// not lost), but to an unreachable peer QUIC resends its Initial packet at doubling
    /// intervals, so a peer that comes back would otherwise wait for the next resend, seconds
    /// away after a long partition; a fresh attempt sends at once.
    pub async fn connection(&self, addr: &str) -> Result<Connection, NetError> {
        let slot = self.slot(addr);
        let mut changed = slot.conn.subscribe();
        let every = self.inner.opts.connect_retry_after;
        loop {
            if let Some(conn) = changed.borrow_and_update().as_ref() {
                if conn.close_reason().is_none() {
                    return Ok(conn.clone());
                }
            }
            let (start, wait) = {
                let mut latest = slot.attempt();
                match *latest {
                    Some(t) if t.elapsed() < every => (None, every - t.elapsed()),
                    _ => {
                        let now = Instant::now();
                        *latest = Some(now);
                        (Some(now), every)
                    }
                }
            };
            match start {
                Some(started) => {
                    let mut task = tokio::spawn(attempt(
                        self.inner.clone(),
                        slot.clone(),
                        addr.to_owned(),
                        started,
                    ));
                    tokio::select! {
                        r = &mut task => {
                            return r.map_err(|_| NetError::ConnectTask(addr.to_owned()))?;
                        }
                        _ = changed.changed() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                None => {
                    tokio::select! {
                        _ = changed.changed() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    pub(super) fn observe(&self, addr: &str, rpc: &'static str, started: Instant, ok: bool) {
        if let Some(observer) = &self.inner.observer {
            observer(addr, rpc, started.elapsed(), ok);
        }
    }

    /// The connection to `addr`, within `timeout` (or the connect timeout if shorter). Failing
    /// to connect, in time or at all, means the peer is unreachable.
    pub(super) async fn connection_within(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> Result<Connection, NetError> {
        let limit = timeout.min(self.inner.opts.connect_timeout);
        tokio::time::timeout(limit, self.connection(addr))
            .await
            .unwrap_or_else(|_| Err(NetError::ConnectTimeout(addr.to_owned(), limit)))
    }

    /// One RPC to `addr` within `timeout` (connection included).
    pub async fn call(
        &self,
        addr: &str,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, NetError> {
        let started = Instant::now();
        let result = async {
            let conn = self.connection_within(addr, timeout).await?;
            let remaining = timeout.saturating_sub(started.elapsed());
            call_on(&conn, addr, req, self.inner.opts.max_frame, remaining).await
        }
        .await;
        let ok = matches!(&result, Ok(r) if !matches!(r, PeerResponse::Error(_)));
        self.observe(addr, req.kind(), started, ok);
        result
    }

    /// Forwards a write to the leader at `addr`.
    pub async fn client_write(&self, addr: &str, cmd: Command) -> Result<TxnResponse, NetError> {
        match self
            .call(
                addr,
                &PeerRequest::ClientWrite(cmd),
                self.inner.opts.rpc_timeout,
            )
            .await?
        {
            PeerResponse::ClientWrite(r) => Ok(r),
            other => Err(unexpected("client_write", other)),
        }
    }

    /// Asks the leader at `addr` for a read index, giving up when `abandon` resolves.
    pub async fn linearizable_read_unless(
        &self,
        addr: &str,
        abandon: impl Future<Output = ()>,
    ) -> Result<u64, NetError> {
        tokio::select! {
            r = self.linearizable_read(addr) => r,
            _ = abandon => Err(NetError::Abandoned),
        }
    }

    /// Asks the leader at `addr` for a read index.
    pub async fn linearizable_read(&self, addr: &str) -> Result<u64, NetError> {
        match self
            .call(
                addr,
                &PeerRequest::LinearizableRead,
                self.inner.opts.rpc_timeout,
            )
            .await?
        {
            PeerResponse::ReadIndex(i) => Ok(i),
            other => Err(unexpected("linearizable_read", other)),
        }
    }

    /// A peer's status.
    pub async fn status(&self, addr: &str) -> Result<PeerStatus, NetError> {
        match self
            .call(addr, &PeerRequest::Status, self.inner.opts.rpc_timeout)
            .await?
        {
            PeerResponse::Status(s) => Ok(s),
            other => Err(unexpected("status", other)),
        }
    }

    /// Joins a cluster through the member at `addr`. The joiner has no certificate: it trusts
    /// the server only if its chain carries the CA with SHA-256 `ca_fingerprint` (from the join
    /// token); otherwise the handshake fails and nothing is sent.
    pub async fn join(
        endpoint: &Endpoint,
        addr: &str,
        ca_fingerprint: &str,
        req: JoinRequest,
        opts: &NetOptions,
    ) -> Result<JoinResponse, NetError> {
        let rustls = tls::join_client_config(ca_fingerprint)?;
        let quic =
            quinn::crypto::rustls::QuicClientConfig::try_from(rustls).map_err(NetError::QuicTls)?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(opts.transport()));
        let conn = connect(endpoint, config, addr, opts.connect_timeout).await?;
        let result = call_on(
            &conn,
            addr,
            &PeerRequest::Join(req),
            opts.max_frame,
            opts.rpc_timeout,
        )
        .await;
        conn.close(super::codes::SHUTDOWN, b"joined");
        match result? {
            PeerResponse::Join(r) => Ok(r),
            other => Err(unexpected("join", other)),
        }
    }
}

/// Why a forwarded write failed, by what the caller may do about it.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The request cannot have reached the leader's log: retrying is safe.
    #[error("the write was not delivered")]
    NotSent(#[source] NetError),
    /// The target is not the leader and appended nothing: retry at the leader it names.
    #[error("the target is not the leader")]
    NotLeader(#[source] PeerError),
    /// The request was sent and no answer says what became of it: it may commit or not.
    #[error("the write's fate is unknown")]
    Unknown(#[source] NetError),
}

fn unexpected(rpc: &'static str, resp: PeerResponse) -> NetError {
    match resp {
        PeerResponse::Error(e) => NetError::Remote(e),
        other => NetError::UnexpectedResponse {
            rpc,
            got: response_name(&other),
        },
    }
}

/// openraft's network: a [`PeerClient`] per node, one [`QuicPeer`] per replication target.
#[derive(Clone, Debug)]
pub struct QuicNetwork {
    local_id: NodeId,
    client: PeerClient,
}

impl QuicNetwork {
    /// `local_id` is this node's id (openraft's timeout errors name both ends).
    pub fn new(local_id: NodeId, client: PeerClient) -> QuicNetwork {
        QuicNetwork { local_id, client }
    }
}

impl RaftNetworkFactory<TypeConfig> for QuicNetwork {
    type Network = QuicPeer;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> QuicPeer {
        QuicPeer {
            local_id: self.local_id,
            target,
            addr: node.raft_addr.clone(),
            client: self.client.clone(),
        }
    }
}

/// The client to one replication target.
#[derive(Clone, Debug)]
pub struct QuicPeer {
    local_id: NodeId,
    target: NodeId,
    addr: String,
    client: PeerClient,
}

impl QuicPeer {
    fn timeout(&self, action: RPCTypes, timeout: Duration) -> Timeout<TypeConfig> {
        Timeout {
            action,
            id: self.local_id,
            target: self.target,
            timeout,
        }
    }

    fn rpc_error(&self, e: NetError, action: RPCTypes) -> RPCError<TypeConfig> {
        match e {
            NetError::Timeout(d) => RPCError::Timeout(self.timeout(action, d)),
            e if e.is_unreachable() => RPCError::Unreachable(Unreachable::new(&e)),
            e => RPCError::Network(NetworkError::new(&e)),
        }
    }

    fn streaming_error(&self, e: NetError) -> StreamingError<TypeConfig> {
        match e {
            NetError::Timeout(d) => {
                StreamingError::Timeout(self.timeout(RPCTypes::InstallSnapshot, d))
            }
            e if e.is_unreachable() => StreamingError::Unreachable(Unreachable::new(&e)),
            e => StreamingError::Network(NetworkError::new(&e)),
        }
    }

    async fn send_snapshot(
        &self,
        vote: Vote,
        snapshot: Snapshot,
        ttl: Duration,
    ) -> Result<SnapshotResponse<TypeConfig>, NetError> {
        let opts = &self.client.inner.opts;
        let conn = self.client.connection_within(&self.addr, ttl).await?;
        let mut file = tokio::fs::File::from_std(snapshot.snapshot);
        file.seek(SeekFrom::Start(0))
            .await
            .map_err(NetError::SnapshotFile)?;
        let len = file.metadata().await.map_err(NetError::SnapshotFile)?.len();
        let begin = encode_frame(
            &PeerRequest::SnapshotBegin {
                vote: WVote::from(&vote),
                meta: WSnapshotMeta::from(&snapshot.meta),
                len,
            },
            opts.max_frame,
        )?;
        let with_ttl = |fut| async move {
            tokio::time::timeout(ttl, fut)
                .await
                .map_err(|_| NetError::Timeout(ttl))
        };
        let (mut send, mut recv) = with_ttl(conn.open_bi())
            .await?
            .map_err(|e| NetError::Connection(self.addr.clone(), e))?;
        tokio::time::timeout(ttl, write_frame(&mut send, &begin))
            .await
            .map_err(|_| NetError::Timeout(ttl))??;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; opts.snapshot_chunk_bytes.max(1)];
        let mut remaining = len;
        while remaining > 0 {
            let want = buf
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let n = file
                .read(&mut buf[..want])
                .await
                .map_err(NetError::SnapshotFile)?;
            if n == 0 {
                return Err(NetError::SnapshotSize);
            }
            hasher.update(&buf[..n]);
            // The hard TTL bounds each chunk, not the whole transfer: a large snapshot may take
            // longer than one RPC timeout, a stalled one must not.
            tokio::time::timeout(ttl, send.write_all(&buf[..n]))
                .await
                .map_err(|_| NetError::Timeout(ttl))?
                .map_err(|e| NetError::Frame(super::frame::FrameError::Io(e.into())))?;
            remaining -= n as u64;
        }
        let trailer: [u8; 32] = hasher.finalize().into();
        tokio::time::timeout(ttl, send.write_all(&trailer))
            .await
            .map_err(|_| NetError::Timeout(ttl))?
            .map_err(|e| NetError::Frame(super::frame::FrameError::Io(e.into())))?;
        let _ = send.finish();
        // The receiver installs the snapshot before it answers, which takes time in proportion
        // to its size: openraft's TTL (install_snapshot_timeout, 200 ms by default) is meant for
        // one segment, not for that.
        let install = ttl.max(opts.snapshot_install_timeout);
        let resp: PeerResponse = match read_frame(&mut recv, opts.max_frame, install).await {
            Ok(resp) => resp,
            Err(FrameError::Timeout(d)) => return Err(NetError::Timeout(d)),
            Err(e) => {
                return Err(match conn.close_reason() {
                    Some(reason) => NetError::Connection(self.addr.clone(), reason),
                    None => NetError::Frame(e),
                })
            }
        };
        match resp {
            PeerResponse::Snapshot(w) => Ok(SnapshotResponse::from(&w)),
            other => Err(unexpected("install_snapshot", other)),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for QuicPeer {
    type SnapshotData = std::fs::File;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = PeerRequest::AppendEntries(WAppendEntriesRequest::from(&rpc));
        match self.client.call(&self.addr, &req, option.hard_ttl()).await {
            Ok(PeerResponse::AppendEntries(w)) => Ok(AppendEntriesResponse::from(&w)),
            Ok(other) => {
                Err(self.rpc_error(unexpected("append_entries", other), RPCTypes::AppendEntries))
            }
            Err(e) => Err(self.rpc_error(e, RPCTypes::AppendEntries)),
        }
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, AppendItem>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let ttl = option.hard_ttl();
            let conn = self
                .client
                .connection_within(&self.addr, ttl)
                .await
                .map_err(|e| self.rpc_error(e, RPCTypes::AppendEntries))?;
            // Opening waits for stream credit when the peer has all its streams busy.
            let (send, recv) = tokio::time::timeout(ttl, conn.open_bi())
                .await
                .map_err(|_| self.rpc_error(NetError::Timeout(ttl), RPCTypes::AppendEntries))?
                .map_err(|e| {
                    self.rpc_error(
                        NetError::Connection(self.addr.clone(), e),
                        RPCTypes::AppendEntries,
                    )
                })?;
            let opts = &self.client.inner.opts;
            // Connecting and opening keep openraft's TTL (a dead peer is found out fast);
            // writing and answering get at least the floor (a slow disk is not a dead peer).
            let ttl = ttl.max(opts.append_response_floor);
            let (tx, rx) = tokio::sync::mpsc::channel(opts.append_pipeline_depth.max(1));
            let writer = tokio::spawn(pipeline_writer(input, send, tx, opts.max_frame, ttl));
            let state = Pipeline {
                peer: self.clone(),
                conn,
                recv,
                rx,
                _writer: AbortOnDrop(writer),
                ttl,
                done: false,
            };
            let responses = futures::stream::unfold(state, |mut p| async move {
                if p.done {
                    return None;
                }
                let sent = p.rx.recv().await?;
                let item = p.next_response(sent).await;
                p.done = !matches!(item, Ok(Continue::Yes(_)));
                Some((item.map(Continue::into_result), p))
            });
            Ok(Box::pin(responses) as BoxStream<'s, AppendItem>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = PeerRequest::Vote(WVoteRequest::from(&rpc));
        match self.client.call(&self.addr, &req, option.hard_ttl()).await {
            Ok(PeerResponse::Vote(w)) => Ok(VoteResponse::from(&w)),
            Ok(other) => Err(self.rpc_error(unexpected("vote", other), RPCTypes::Vote)),
            Err(e) => Err(self.rpc_error(e, RPCTypes::Vote)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = PeerRequest::PreVote(WVoteRequest::from(&rpc));
        match self.client.call(&self.addr, &req, option.hard_ttl()).await {
            Ok(PeerResponse::Vote(w)) => Ok(VoteResponse::from(&w)),
            Ok(other) => Err(self.rpc_error(unexpected("pre_vote", other), RPCTypes::Vote)),
            Err(e) => Err(self.rpc_error(e, RPCTypes::Vote)),
        }
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = PeerRequest::TransferLeader(WTransferLeaderRequest::from(&rpc));
        match self.client.call(&self.addr, &req, option.hard_ttl()).await {
            Ok(PeerResponse::TransferLeader(w)) => Ok(TransferLeaderResponse::from(&w)),
            Ok(other) => Err(self.rpc_error(
                unexpected("transfer_leader", other),
                RPCTypes::TransferLeader,
            )),
            Err(e) => Err(self.rpc_error(e, RPCTypes::TransferLeader)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let started = Instant::now();
        // Dropping the transfer on cancel drops its stream mid-way: the receiver sees fewer
        // bytes than announced and discards them.
        let result = tokio::select! {
            r = self.send_snapshot(vote, snapshot, option.hard_ttl()) => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        self.client
            .observe(&self.addr, "install_snapshot", started, result.is_ok());
        result.map_err(|e| self.streaming_error(e))
    }

    fn backoff(&self) -> Option<Backoff> {
        // After `Unreachable`: 100 ms, doubling up to 1 s. A dead peer costs one connection
        // attempt a second; a peer back from a partition waits at most a second (less if it
        // campaigns first: the leader then resets the backoff, `Cluster::heard_from`).
        Some(Backoff::new(std::iter::successors(
            Some(Duration::from_millis(100)),
            |d| Some((*d * 2).min(Duration::from_secs(1))),
        )))
    }
}

type AppendItem = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

/// A request the pipeline writer has sent, awaiting its response.
struct Sent {
    prev: Option<LogId>,
    last: Option<LogId>,
    at: Instant,
}

/// Aborts the pipeline writer when openraft drops the response stream.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether the pipeline goes on after a response, as openraft's sequential `stream_append`
/// decides: not after an error, a conflict, a higher vote or a partial success short of the
/// request's last entry.
enum Continue {
    Yes(StreamAppendResult<TypeConfig>),
    No(StreamAppendResult<TypeConfig>),
}

impl Continue {
    fn into_result(self) -> StreamAppendResult<TypeConfig> {
        match self {
            Continue::Yes(r) | Continue::No(r) => r,
        }
    }
}

struct Pipeline {
    peer: QuicPeer,
    conn: Connection,
    recv: quinn::RecvStream,
    rx: tokio::sync::mpsc::Receiver<Result<Sent, NetError>>,
    _writer: AbortOnDrop,
    ttl: Duration,
    done: bool,
}

impl Pipeline {
    async fn next_response(
        &mut self,
        sent: Result<Sent, NetError>,
    ) -> Result<Continue, RPCError<TypeConfig>> {
        let peer = &self.peer;
        let rpc_error = |e| peer.rpc_error(e, RPCTypes::AppendEntries);
        let sent = sent.map_err(rpc_error)?;
        let max_frame = peer.client.inner.opts.max_frame;
        let read = read_frame::<PeerResponse, _>(&mut self.recv, max_frame, self.ttl).await;
        let ok = matches!(read, Ok(PeerResponse::AppendEntries(_)));
        peer.client
            .observe(&peer.addr, "append_entries", sent.at, ok);
        let resp = match read {
            Ok(PeerResponse::AppendEntries(w)) => AppendEntriesResponse::from(&w),
            Ok(other) => return Err(rpc_error(unexpected("append_entries", other))),
            Err(FrameError::Timeout(d)) => return Err(rpc_error(NetError::Timeout(d))),
            Err(e) => {
                return Err(rpc_error(match self.conn.close_reason() {
                    Some(reason) => NetError::Connection(peer.addr.clone(), reason),
                    None => NetError::Frame(e),
                }))
            }
        };
        if matches!(resp, AppendEntriesResponse::Conflict) && sent.prev.is_none() {
            // openraft's conversion expects a conflict to name the request's prev_log_id.
            return Err(rpc_error(NetError::UnexpectedResponse {
                rpc: "append_entries without prev_log_id",
                got: "conflict",
            }));
        }
        let go_on = match &resp {
            AppendEntriesResponse::Success => true,
            AppendEntriesResponse::PartialSuccess(matched) => *matched == sent.last,
            AppendEntriesResponse::Conflict | AppendEntriesResponse::HigherVote(_) => false,
        };
        let result = resp.into_stream_result(sent.prev, sent.last);
        Ok(if go_on {
            Continue::Yes(result)
        } else {
            Continue::No(result)
        })
    }
}

/// Writes the leader's AppendEntries requests on one stream, at most the channel's capacity
/// ahead of the responses read, then finishes the stream when openraft's input ends.
async fn pipeline_writer<S>(
    mut input: S,
    mut send: quinn::SendStream,
    tx: tokio::sync::mpsc::Sender<Result<Sent, NetError>>,
    max_frame: u32,
    ttl: Duration,
) where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    while let Some(req) = input.next().await {
        // Take the in-flight slot before writing: this is what bounds the pipeline.
        let Ok(permit) = tx.reserve().await else {
            return;
        };
        let prev = req.prev_log_id;
        let last = req.entries.last().map(|e| e.log_id).or(prev);
        let req = PeerRequest::AppendEntries(WAppendEntriesRequest::from(&req));
        let frame = match encode_frame(&req, max_frame) {
            Ok(frame) => frame,
            Err(e) => {
                permit.send(Err(e.into()));
                return;
            }
        };
        let at = Instant::now();
        match tokio::time::timeout(ttl, write_frame(&mut send, &frame)).await {
            Ok(Ok(())) => permit.send(Ok(Sent { prev, last, at })),
            Ok(Err(e)) => {
                permit.send(Err(e.into()));
                return;
            }
            Err(_) => {
                permit.send(Err(NetError::Timeout(ttl)));
                return;
            }
        }
    }
    let _ = send.finish();
}
