//! The chunk protocol between members, on `shoal-data/1` connections (see
//! `Cluster::data_connection` and `docs/images.md`, "The data transport").
//!
//! One bidirectional stream per request. The payload is raw bytes after a fixed header, never a
//! serialised message, so a 4 MiB chunk is not copied through a codec:
//!
//! ```text
//! request:  op u8 | sha256 [32] | (PUT only) len u32 BE | (PUT only) len bytes
//! response: status u8 | len u32 BE | len bytes (GET: the chunk; an error: a UTF-8 message)
//! ```
//!
//! - `GET` answers the bytes of the chunk file as they are on disk. The server does not hash
//!   them: the client checks every chunk against its digest anyway, and a damaged copy is then
//!   its reason to ask another holder.
//! - `PUT` (replication) carries at most [`MAX_CHUNK`] bytes; the receiver hashes them, stores
//!   the chunk durably and only then answers `OK`.
//!
//! A malformed or oversized request resets its own stream (code [`BAD_REQUEST_CODE`]); the
//! connection and its other streams go on.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use shoal_consensus::cluster::{Cluster, ClusterError};
use shoal_consensus::net::{BoxFuture, DataHandler};
use shoal_disk::uring::Digest;
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use super::chunks::{ChunkError, ChunkStore};

/// The largest chunk either side accepts: the largest `[images] chunk_bytes` allowed.
pub const MAX_CHUNK: usize = 64 << 20;
/// How long a peer has to send a request header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one chunk may take to cross, either way. A peer that stalls longer is given up on
/// and the chunk is asked of another.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a holder has to start answering a GET. A chunk file is opened and its length sent
/// before any byte of it, so a live peer answers in milliseconds; one that does not is most
/// likely dead with its connection not yet timed out (QUIC notices only after the idle
/// timeout), and waiting [`CHUNK_TIMEOUT`] for it would stall the pull.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection close code for a peer given up on because it did not answer.
const NO_ANSWER_CODE: VarInt = VarInt::from_u32(0x11);
/// Stream reset code for a request the server refuses to parse.
pub const BAD_REQUEST_CODE: VarInt = VarInt::from_u32(0x10);
/// Piece size in which a chunk file is read and handed to QUIC.
const SEND_PIECE: usize = 1 << 20;

const OP_GET: u8 = 1;
const OP_PUT: u8 = 2;
/// The tail of a server's serial console log on the node it runs on: the 32 bytes after the
/// op are the server's uuid (16 bytes) and 16 zero bytes. It rides on this transport because it
/// is the members' authenticated byte channel; `os-getConsoleOutput` on any node uses it.
const OP_CONSOLE: u8 = 3;
/// The most of a console log a peer sends (its tail).
pub const MAX_CONSOLE: u64 = 1 << 20;
/// A piece of a disk a resize or cold migration set aside on its source host
/// (`<uuid>_resize/<file>`): the 32 bytes after the op are the server's uuid (16 bytes), the
/// file's index in [`MIGRATION_FILES`] (1 byte), the offset (8 bytes, big-endian) and 7 zero
/// bytes. The answer carries at most [`DISK_PIECE`] bytes from the offset; fewer (or none)
/// means the end of the file. The target's compute agent pulls a disk with it piece by piece.
const OP_DISK: u8 = 4;
/// The node's `uptime(1)` line ([`uptime_line`]), which `os-hypervisors/{id}/uptime` on any
/// node answers for this one; the 32 bytes after the op are zero.
const OP_UPTIME: u8 = 5;
/// The longest uptime line either side accepts.
const MAX_UPTIME_LINE: u32 = 4096;
/// The most of a disk one [`OP_DISK`] answer carries.
pub const DISK_PIECE: usize = 4 << 20;
/// The files of an instance directory a migration moves, by index.
pub const MIGRATION_FILES: [&str; 2] = ["disk", "disk.config"];
/// The directory a resize sets the source's disks aside in (Nova's `<uuid>_resize`).
pub fn resize_dir(instances: &std::path::Path, id: &str) -> std::path::PathBuf {
    instances.join(format!("{id}_resize"))
}

const OK: u8 = 0;
const NOT_FOUND: u8 = 1;
const BAD_REQUEST: u8 = 2;
const INTERNAL: u8 = 3;

/// Why a chunk could not be fetched from or pushed to one peer. Each is a reason to try another.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("cannot reach node {node}")]
    Unreachable {
        node: String,
        #[source]
        source: ClusterError,
    },
    #[error("the connection to node {node} was lost")]
    ConnectionLost {
        node: String,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("the stream to node {node} failed: {reason}")]
    Stream { node: String, reason: String },
    #[error("node {node} took longer than {limit:?} for chunk {digest}")]
    Timeout {
        node: String,
        digest: Digest,
        limit: Duration,
    },
    #[error("node {node} does not hold chunk {digest}")]
    NotFound { node: String, digest: Digest },
    #[error("node {node} refused chunk {digest}: {message}")]
    Refused {
        node: String,
        digest: Digest,
        message: String,
    },
    #[error("node {node} sent {len} bytes for chunk {digest}, expected {expected}")]
    BadLength {
        node: String,
        digest: Digest,
        len: u64,
        expected: u64,
    },
}

impl TransferError {
    /// Whether the peer itself is gone (not just this request): callers stop asking it.
    pub fn peer_down(&self) -> bool {
        matches!(
            self,
            TransferError::Unreachable { .. } | TransferError::ConnectionLost { .. }
        )
    }
}

/// Serves GET and PUT on the data connections of other members.
#[derive(Debug)]
pub struct ChunkService {
    store: ChunkStore,
    /// Where the compute agent keeps instance directories (their `console.log`).
    instances: Arc<std::path::Path>,
}

impl ChunkService {
    pub fn new(store: ChunkStore, instances: &std::path::Path) -> Arc<ChunkService> {
        Arc::new(ChunkService {
            store,
            instances: instances.into(),
        })
    }
}

impl DataHandler for ChunkService {
    fn serve(&self, peer: String, conn: Connection) -> BoxFuture<'static, ()> {
        let store = self.store.clone();
        let instances = self.instances.clone();
        Box::pin(async move {
            let mut streams = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = conn.accept_bi() => match accepted {
                        Ok((send, recv)) => {
                            streams.spawn(serve_stream(
                                store.clone(),
                                instances.clone(),
                                peer.clone(),
                                send,
                                recv,
                            ));
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "data connection closed");
                            return;
                        }
                    },
                    Some(_) = streams.join_next(), if !streams.is_empty() => {}
                }
            }
        })
    }
}

fn refuse(send: &mut SendStream, recv: &mut RecvStream) {
    let _ = send.reset(BAD_REQUEST_CODE);
    let _ = recv.stop(BAD_REQUEST_CODE);
}

async fn answer(send: &mut SendStream, status: u8, message: &str) {
    let mut head = Vec::with_capacity(5 + message.len());
    head.push(status);
    head.extend_from_slice(&(message.len() as u32).to_be_bytes());
    head.extend_from_slice(message.as_bytes());
    let _ = tokio::time::timeout(HEADER_TIMEOUT, send.write_all(&head)).await;
    let _ = send.finish();
}

/// Answers `OK` with `payload`, which has `limit` to cross.
async fn answer_ok(send: &mut SendStream, payload: &[u8], limit: Duration) {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(OK);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    let _ = tokio::time::timeout(limit, send.write_all(&out)).await;
    let _ = send.finish();
}

async fn serve_stream(
    store: ChunkStore,
    instances: Arc<std::path::Path>,
    peer: String,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let mut head = [0u8; 33];
    match tokio::time::timeout(HEADER_TIMEOUT, recv.read_exact(&mut head)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "chunk request cut short");
            refuse(&mut send, &mut recv);
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "chunk request header too slow");
            refuse(&mut send, &mut recv);
            return;
        }
    }
    let mut d = [0u8; 32];
    d.copy_from_slice(&head[1..]);
    let d = Digest(d);
    match head[0] {
        OP_GET => serve_get(&store, &peer, d, &mut send).await,
        OP_PUT => serve_put(&store, &peer, d, &mut send, &mut recv).await,
        OP_CONSOLE => {
            let mut uuid = [0u8; 16];
            uuid.copy_from_slice(&head[1..17]);
            let id = uuid::Uuid::from_bytes(uuid).to_string();
            match read_console(&instances, &id).await {
                Ok(Some(bytes)) => answer_ok(&mut send, &bytes, CHUNK_TIMEOUT).await,
                Ok(None) => answer(&mut send, NOT_FOUND, "no console log on this node").await,
                Err(e) => {
                    tracing::warn!(%peer, server = %id, error = %e, "cannot read a console log");
                    answer(&mut send, INTERNAL, "cannot read the console log").await
                }
            }
        }
        OP_DISK => {
            let mut uuid = [0u8; 16];
            uuid.copy_from_slice(&head[1..17]);
            let id = uuid::Uuid::from_bytes(uuid).to_string();
            let Some(file) = MIGRATION_FILES.get(usize::from(head[17])) else {
                return refuse(&mut send, &mut recv);
            };
            let offset = u64::from_be_bytes(head[18..26].try_into().expect("8 bytes"));
            let path = resize_dir(&instances, &id).join(file);
            match read_piece(&path, offset).await {
                Ok(Some(bytes)) => answer_ok(&mut send, &bytes, CHUNK_TIMEOUT).await,
                Ok(None) => answer(&mut send, NOT_FOUND, "no such migration disk here").await,
                Err(e) => {
                    tracing::warn!(%peer, server = %id, error = %e, "cannot read a migration disk");
                    answer(&mut send, INTERNAL, "cannot read the disk").await
                }
            }
        }
        OP_UPTIME => match tokio::task::spawn_blocking(uptime_line).await {
            Ok(Ok(line)) => answer_ok(&mut send, line.as_bytes(), HEADER_TIMEOUT).await,
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "cannot read this host's uptime");
                answer(&mut send, INTERNAL, "cannot read the uptime").await
            }
            Err(_) => answer(&mut send, INTERNAL, "cannot read the uptime").await,
        },
        op => {
            tracing::warn!(%peer, op, "unknown chunk request");
            refuse(&mut send, &mut recv);
        }
    }
}

async fn serve_get(store: &ChunkStore, peer: &str, d: Digest, send: &mut SendStream) {
    let path = store.path(&d);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return answer(send, NOT_FOUND, "chunk not held here").await;
        }
        Err(e) => {
            tracing::warn!(%peer, chunk = %d, error = %e, "cannot open chunk");
            return answer(send, INTERNAL, "cannot open the chunk").await;
        }
    };
    let len = match file.metadata().await {
        Ok(m) if m.len() <= MAX_CHUNK as u64 => m.len(),
        _ => return answer(send, INTERNAL, "cannot size the chunk").await,
    };
    let sent = async {
        let mut head = [0u8; 5];
        head[0] = OK;
        head[1..].copy_from_slice(&(len as u32).to_be_bytes());
        send.write_all(&head).await.map_err(|e| e.to_string())?;
        let mut left = len as usize;
        while left > 0 {
            let mut piece = BytesMut::zeroed(left.min(SEND_PIECE));
            file.read_exact(&mut piece)
                .await
                .map_err(|e| e.to_string())?;
            left -= piece.len();
            send.write_chunk(piece.freeze())
                .await
                .map_err(|e| e.to_string())?;
        }
        send.finish().map_err(|e| e.to_string())
    };
    match tokio::time::timeout(CHUNK_TIMEOUT, sent).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, chunk = %d, error = %e, "chunk send failed"),
        Err(_) => {
            tracing::warn!(%peer, chunk = %d, "chunk send too slow");
            let _ = send.reset(BAD_REQUEST_CODE);
        }
    }
}

async fn serve_put(
    store: &ChunkStore,
    peer: &str,
    d: Digest,
    send: &mut SendStream,
    recv: &mut RecvStream,
) {
    let mut len = [0u8; 4];
    if tokio::time::timeout(HEADER_TIMEOUT, recv.read_exact(&mut len))
        .await
        .map_or(true, |r| r.is_err())
    {
        return refuse(send, recv);
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_CHUNK {
        tracing::warn!(%peer, len, "refusing an oversized chunk");
        return refuse(send, recv);
    }
    let mut data = BytesMut::zeroed(len);
    match tokio::time::timeout(CHUNK_TIMEOUT, recv.read_exact(&mut data)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(%peer, chunk = %d, error = %e, "chunk push cut short");
            return refuse(send, recv);
        }
        Err(_) => {
            tracing::warn!(%peer, chunk = %d, "chunk push too slow");
            return refuse(send, recv);
        }
    }
    match store.put(d, data.freeze()).await {
        Ok(()) => answer(send, OK, "").await,
        Err(e @ ChunkError::Mismatch { .. }) => {
            tracing::warn!(%peer, error = %e, "refusing a pushed chunk");
            answer(send, BAD_REQUEST, &e.to_string()).await
        }
        Err(e) => {
            tracing::warn!(%peer, chunk = %d, error = %e, "cannot store a pushed chunk");
            answer(send, INTERNAL, "cannot store the chunk").await
        }
    }
}

fn stream_err(node: &str, reason: impl std::fmt::Display) -> TransferError {
    TransferError::Stream {
        node: node.to_owned(),
        reason: reason.to_string(),
    }
}

/// Turns a stream failure into "the connection is gone" when it is, so callers stop asking
/// this peer.
fn lost(node: &str, conn: &Connection, reason: impl std::fmt::Display) -> TransferError {
    match conn.close_reason() {
        Some(source) => TransferError::ConnectionLost {
            node: node.to_owned(),
            source,
        },
        None => stream_err(node, reason),
    }
}

/// The last [`MAX_CONSOLE`] bytes of server `id`'s console log under `instances`, or `None`
/// if this node has none.
pub async fn read_console(
    instances: &std::path::Path,
    id: &str,
) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncSeekExt;
    let path = instances.join(id).join("console.log");
    let mut f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata().await?.len();
    f.seek(std::io::SeekFrom::Start(len.saturating_sub(MAX_CONSOLE)))
        .await?;
    let mut out = Vec::with_capacity(len.min(MAX_CONSOLE) as usize);
    f.take(MAX_CONSOLE).read_to_end(&mut out).await?;
    Ok(Some(out))
}

/// At most [`DISK_PIECE`] bytes of `path` from `offset`, or `None` when there is no such file.
async fn read_piece(path: &std::path::Path, offset: u64) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncSeekExt;
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    f.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut out = Vec::with_capacity(DISK_PIECE);
    f.take(DISK_PIECE as u64).read_to_end(&mut out).await?;
    Ok(Some(out))
}

/// Copies file `index` of [`MIGRATION_FILES`] that a migration of `server_id` set aside on
/// `node` into `out`, piece by piece. `Ok(false)`: `node` has no such file.
pub async fn pull_migration_file(
    cluster: &Cluster,
    node: &str,
    server_id: &uuid::Uuid,
    index: u8,
    out: &std::path::Path,
) -> Result<bool, TransferError> {
    use tokio::io::AsyncWriteExt;
    let none = Digest([0u8; 32]);
    let io = |e: std::io::Error| stream_err(node, format!("writing {}: {e}", out.display()));
    let mut file: Option<tokio::fs::File> = None;
    let mut offset = 0u64;
    loop {
        let mut req = [0u8; 33];
        req[0] = OP_DISK;
        req[1..17].copy_from_slice(server_id.as_bytes());
        req[17] = index;
        req[18..26].copy_from_slice(&offset.to_be_bytes());
        let piece = timed(node, none, async {
            let (conn, mut recv) = send_request(cluster, node, &req, None).await?;
            let len = read_status(node, none, &conn, &mut recv).await?;
            if len as usize > DISK_PIECE {
                return Err(TransferError::BadLength {
                    node: node.to_owned(),
                    digest: none,
                    len: len.into(),
                    expected: DISK_PIECE as u64,
                });
            }
            Answer {
                node: node.to_owned(),
                conn,
                recv,
                len,
            }
            .body()
            .await
        })
        .await;
        let piece = match piece {
            Ok(p) => p,
            Err(TransferError::NotFound { .. }) if offset == 0 => return Ok(false),
            Err(e) => return Err(e),
        };
        let f = match &mut file {
            Some(f) => f,
            None => file.insert(tokio::fs::File::create(out).await.map_err(io)?),
        };
        f.write_all(&piece).await.map_err(io)?;
        offset += piece.len() as u64;
        if piece.len() < DISK_PIECE {
            f.sync_all().await.map_err(io)?;
            return Ok(true);
        }
    }
}

/// The tail of server `server_id`'s console log from `node`, where it runs.
pub async fn console_log(
    cluster: &Cluster,
    node: &str,
    server_id: &uuid::Uuid,
) -> Result<Bytes, TransferError> {
    let none = Digest([0u8; 32]);
    let mut req = [0u8; 33];
    req[0] = OP_CONSOLE;
    req[1..17].copy_from_slice(server_id.as_bytes());
    timed(node, none, async {
        let (conn, mut recv) = send_request(cluster, node, &req, None).await?;
        let len = read_status(node, none, &conn, &mut recv).await?;
        if u64::from(len) > MAX_CONSOLE {
            return Err(TransferError::BadLength {
                node: node.to_owned(),
                digest: none,
                len: len.into(),
                expected: MAX_CONSOLE,
            });
        }
        Answer {
            node: node.to_owned(),
            conn,
            recv,
            len,
        }
        .body()
        .await
    })
    .await
}

/// Node `node`'s `uptime(1)` line, asked over the data transport; given up on after
/// [`ANSWER_TIMEOUT`] (a live member answers in milliseconds).
pub async fn uptime(cluster: &Cluster, node: &str) -> Result<String, TransferError> {
    let none = Digest([0u8; 32]);
    let mut req = [0u8; 33];
    req[0] = OP_UPTIME;
    let asked = async {
        let (conn, mut recv) = send_request(cluster, node, &req, None).await?;
        let len = read_status(node, none, &conn, &mut recv).await?;
        if len > MAX_UPTIME_LINE {
            return Err(TransferError::BadLength {
                node: node.to_owned(),
                digest: none,
                len: len.into(),
                expected: MAX_UPTIME_LINE.into(),
            });
        }
        let body = Answer {
            node: node.to_owned(),
            conn,
            recv,
            len,
        }
        .body()
        .await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(ANSWER_TIMEOUT, asked)
        .await
        .unwrap_or_else(|_| {
            Err(TransferError::Timeout {
                node: node.to_owned(),
                digest: none,
                limit: ANSWER_TIMEOUT,
            })
        })
}

/// This host's line as `uptime(1)` prints it, which is what Nova's libvirt driver answers for
/// `os-hypervisors/{id}/uptime` and what the `openstack` client parses:
/// `" 17:37:14 up 3 days,  2:33,  0 users,  load average: 0.33, 0.36, 0.34"` (the time of day
/// in UTC).
pub fn uptime_line() -> std::io::Result<String> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let up = std::fs::read_to_string("/proc/uptime")?;
    let secs = up
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .ok_or_else(|| bad("unreadable /proc/uptime"))? as u64;
    let load = std::fs::read_to_string("/proc/loadavg")?;
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    if load.len() != 3 {
        return Err(bad("unreadable /proc/loadavg"));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Ok(format_uptime(now, secs, logged_in_users(), &load))
}

fn format_uptime(now_unix: u64, up_secs: u64, users: usize, load: &[&str]) -> String {
    let t = now_unix % 86_400;
    let (days, h, m) = (
        up_secs / 86_400,
        up_secs % 86_400 / 3600,
        up_secs % 3600 / 60,
    );
    let up = match days {
        0 => format!("{h:2}:{m:02}"),
        1 => format!("1 day, {h:2}:{m:02}"),
        d => format!("{d} days, {h:2}:{m:02}"),
    };
    format!(
        " {:02}:{:02}:{:02} up {up},  {users} user{},  load average: {}",
        t / 3600,
        t % 3600 / 60,
        t % 60,
        if users == 1 { "" } else { "s" },
        load.join(", ")
    )
}

/// Login sessions as `uptime(1)` counts them: `USER_PROCESS` records in utmp (glibc's x86-64
/// layout, 384 bytes a record, the type first); none when there is no utmp.
fn logged_in_users() -> usize {
    const RECORD: usize = 384;
    const USER_PROCESS: i16 = 7;
    std::fs::read("/var/run/utmp")
        .map(|b| {
            b.chunks_exact(RECORD)
                .filter(|r| i16::from_ne_bytes([r[0], r[1]]) == USER_PROCESS)
                .count()
        })
        .unwrap_or(0)
}

async fn connect(cluster: &Cluster, node: &str) -> Result<Connection, TransferError> {
    cluster
        .data_connection(node)
        .await
        .map_err(|source| TransferError::Unreachable {
            node: node.to_owned(),
            source,
        })
}

/// Reads a response header and, for an error, its message.
async fn read_status(
    node: &str,
    d: Digest,
    conn: &Connection,
    recv: &mut RecvStream,
) -> Result<u32, TransferError> {
    let mut head = [0u8; 5];
    recv.read_exact(&mut head)
        .await
        .map_err(|e| lost(node, conn, e))?;
    let len = u32::from_be_bytes(head[1..].try_into().expect("4 bytes"));
    if head[0] == OK {
        return Ok(len);
    }
    let mut message = vec![0u8; (len as usize).min(4096)];
    let _ = recv.read_exact(&mut message).await;
    let message = String::from_utf8_lossy(&message).into_owned();
    Err(match head[0] {
        NOT_FOUND => TransferError::NotFound {
            node: node.to_owned(),
            digest: d,
        },
        _ => TransferError::Refused {
            node: node.to_owned(),
            digest: d,
            message,
        },
    })
}

/// Opens a request stream to `node` and sends `head` (and `body`, if any), then finishes our
/// side. Returns the connection and the stream to read the answer from.
async fn send_request(
    cluster: &Cluster,
    node: &str,
    head: &[u8],
    body: Option<Bytes>,
) -> Result<(Connection, RecvStream), TransferError> {
    let conn = connect(cluster, node).await?;
    let (mut send, recv) =
        conn.open_bi()
            .await
            .map_err(|source| TransferError::ConnectionLost {
                node: node.to_owned(),
                source,
            })?;
    send.write_all(head)
        .await
        .map_err(|e| lost(node, &conn, e))?;
    if let Some(body) = body {
        send.write_chunk(body)
            .await
            .map_err(|e| lost(node, &conn, e))?;
    }
    let _ = send.finish();
    Ok((conn, recv))
}

/// Runs one transfer of chunk `d` with `node` within [`CHUNK_TIMEOUT`].
pub async fn timed<T>(
    node: &str,
    d: Digest,
    transfer: impl std::future::Future<Output = Result<T, TransferError>>,
) -> Result<T, TransferError> {
    tokio::time::timeout(CHUNK_TIMEOUT, transfer)
        .await
        .unwrap_or_else(|_| {
            Err(TransferError::Timeout {
                node: node.to_owned(),
                digest: d,
                limit: CHUNK_TIMEOUT,
            })
        })
}

/// The bytes node `node` holds as chunk `d`: exactly `expected_len` bytes if given, at most
/// [`MAX_CHUNK`] otherwise. **Not hashed**: the caller checks them against `d` (the streamer does
/// so as it writes them).
pub async fn fetch(
    cluster: &Cluster,
    node: &str,
    d: Digest,
    expected_len: Option<u64>,
) -> Result<Bytes, TransferError> {
    timed(node, d, async {
        request(cluster, node, d, expected_len).await?.body().await
    })
    .await
}

/// A GET that its holder has started answering: the chunk's length is known and its bytes
/// follow on the stream.
#[derive(Debug)]
pub struct Answer {
    node: String,
    conn: Connection,
    recv: RecvStream,
    len: u32,
}

/// Asks node `node` for chunk `d` and waits (at most [`ANSWER_TIMEOUT`] after the request is
/// sent) until it starts answering. Not limited by [`CHUNK_TIMEOUT`]: wrap it with the body.
pub async fn request(
    cluster: &Cluster,
    node: &str,
    d: Digest,
    expected_len: Option<u64>,
) -> Result<Answer, TransferError> {
    let mut req = [0u8; 33];
    req[0] = OP_GET;
    req[1..].copy_from_slice(&d.0);
    let (conn, mut recv) = send_request(cluster, node, &req, None).await?;
    let len =
        match tokio::time::timeout(ANSWER_TIMEOUT, read_status(node, d, &conn, &mut recv)).await {
            Ok(status) => status?,
            Err(_) => {
                // Drop the cached connection: the next request reconnects, and fails fast if
                // the peer is gone.
                conn.close(NO_ANSWER_CODE, b"no answer");
                return Err(TransferError::Timeout {
                    node: node.to_owned(),
                    digest: d,
                    limit: ANSWER_TIMEOUT,
                });
            }
        };
    let expected = expected_len.unwrap_or(u64::from(len).min(MAX_CHUNK as u64));
    if u64::from(len) != expected {
        let _ = recv.stop(BAD_REQUEST_CODE);
        return Err(TransferError::BadLength {
            node: node.to_owned(),
            digest: d,
            len: len.into(),
            expected,
        });
    }
    Ok(Answer {
        node: node.to_owned(),
        conn,
        recv,
        len,
    })
}

impl Answer {
    /// The node answering.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Reads the chunk's bytes.
    pub async fn body(mut self) -> Result<Bytes, TransferError> {
        let mut data = BytesMut::zeroed(self.len as usize);
        self.recv
            .read_exact(&mut data)
            .await
            .map_err(|e| lost(&self.node, &self.conn, e))?;
        Ok(data.freeze())
    }
}

/// Pushes chunk `d` to node `node`; returns once that node has it durably.
pub async fn push(
    cluster: &Cluster,
    node: &str,
    d: Digest,
    data: Bytes,
) -> Result<(), TransferError> {
    timed(node, d, async {
        let mut head = [0u8; 37];
        head[0] = OP_PUT;
        head[1..33].copy_from_slice(&d.0);
        head[33..].copy_from_slice(&(data.len() as u32).to_be_bytes());
        let (conn, mut recv) = send_request(cluster, node, &head, Some(data)).await?;
        read_status(node, d, &conn, &mut recv).await.map(drop)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uptime_line_reads_as_uptime_1_prints_it() {
        let load = ["0.33", "0.36", "0.34"];
        // 17:37:14 UTC, up 2 h 33 min: the form the `openstack` client's parser expects
        // (`<time> up <uptime>, <n> users, load average: <l1>, <l5>, <l15>`).
        let line = format_uptime(1_796_578_634, 2 * 3600 + 33 * 60, 0, &load);
        assert_eq!(
            line,
            " 17:37:14 up  2:33,  0 users,  load average: 0.33, 0.36, 0.34"
        );
        let line = format_uptime(0, 3 * 86_400 + 3600 + 5 * 60, 1, &load);
        assert_eq!(
            line,
            " 00:00:00 up 3 days,  1:05,  1 user,  load average: 0.33, 0.36, 0.34"
        );
        assert!(format_uptime(0, 86_400, 2, &load).contains(" up 1 day,  0:00,  2 users,"));
    }

    #[test]
    fn this_hosts_uptime_line_is_complete() {
        let line = uptime_line().expect("/proc is readable");
        assert!(line.contains(" up "), "{line}");
        assert!(line.contains("load average: "), "{line}");
        assert!(line.matches(", ").count() >= 3, "{line}");
    }
}
