//! The streamer: makes a whole, verified copy of an image in this node's base-image cache.
//!
//! Chunks this node holds are read locally; the others are fetched from the nodes that hold
//! them (the `chunk_holders` rows), several peers at once and a few chunks in flight per peer,
//! the least busy holder first. Every chunk is checked against its SHA-256 as it is handed to the
//! io_uring writer, and the whole file against the image's SHA-256 at the end. A holder that
//! sends a damaged chunk, does not have it or stalls is not asked for that chunk again; one whose
//! connection is lost is not asked for anything again. The chunk goes to the next holder. The
//! pull fails only when a chunk has no holder left, and then no file appears in the cache.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_consensus::cluster::ClusterError;
use shoal_disk::uring::{Digest, UringError, UringWriter, WriterOptions};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::manifest::{self, BadManifest, Manifest};
use super::peer;
use super::ImageStore;

/// Chunks fetched at once from one peer.
const PER_PEER: usize = 4;
/// Chunks read at once from this node's own store.
const LOCAL: usize = 2;
/// How far past the first unfinished chunk the streamer may run ahead; bounds the chunks the
/// writer keeps for its in-order hash.
const WINDOW: usize = 32;
/// How long a holder has to start answering a GET before the chunk is asked of another holder as
/// well (the first answer is taken). A live holder answers in milliseconds; a dead one would
/// otherwise cost a connect or answer timeout of seconds.
const HEDGE_AFTER: Duration = Duration::from_millis(300);

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("image {0} has no stored bytes (no manifest)")]
    NotFound(String),
    #[error(transparent)]
    Manifest(#[from] BadManifest),
    #[error("cannot read the cluster state")]
    Cluster(#[from] ClusterError),
    #[error("no holder could supply chunk {index} ({digest}); tried: {tried}")]
    Unavailable {
        index: usize,
        digest: Digest,
        tried: String,
    },
    #[error("cannot write the cached image")]
    Write(#[from] UringError),
    #[error("the assembled image has SHA-256 {actual}, its manifest says {expected}")]
    ImageDigest { expected: String, actual: Digest },
    #[error("cannot move the pulled image into the cache")]
    Io(#[from] std::io::Error),
    #[error("the pull task stopped")]
    Aborted,
}

/// Where a pull stands. `result` is set once it is over.
#[derive(Debug, Clone, Default)]
pub struct PullStatus {
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes that came from other nodes (the rest were local or already cached).
    pub fetched_bytes: u64,
    /// Chunk transfers that failed and were asked of another holder.
    pub retried_chunks: u64,
    /// Chunks a second holder served because the first had not started answering in time.
    pub hedged_chunks: u64,
    pub result: Option<Result<PathBuf, Arc<PullError>>>,
}

/// Where a chunk comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Source {
    Local,
    Peer(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Local => f.write_str("this node"),
            Source::Peer(p) => f.write_str(p),
        }
    }
}

enum ChunkFailure {
    /// Try the chunk elsewhere; `down` means stop asking this source for anything.
    Source { error: String, down: bool },
    /// The local write failed: the pull cannot go on.
    Fatal(UringError),
}

impl ImageStore {
    /// Starts pulling `image_id` into the cache, or joins the pull of it already running on this
    /// node. The pull goes on if every receiver is dropped.
    pub fn start_pull(&self, image_id: &str) -> watch::Receiver<PullStatus> {
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = pulls.get(image_id) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(PullStatus::default());
        pulls.insert(image_id.to_owned(), rx.clone());
        let this = self.clone();
        let id = image_id.to_owned();
        tokio::spawn(async move {
            let result = this.pull_once(&id, &tx).await.map_err(Arc::new);
            if let Err(e) = &result {
                tracing::warn!(image = %id, error = %crate::chain(e.as_ref()), "pull failed");
            }
            this.pulls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            tx.send_modify(|s| s.result = Some(result));
        });
        rx
    }

    /// Pulls `image_id` into the cache (or finds it there) and returns the cached file's path.
    /// The compute agent's way to ensure a base image.
    pub async fn pull(&self, image_id: &str) -> Result<PathBuf, Arc<PullError>> {
        let mut rx = self.start_pull(image_id);
        let result = match rx.wait_for(|s| s.result.is_some()).await {
            Ok(s) => s.result.clone().expect("checked"),
            Err(_) => Err(Arc::new(PullError::Aborted)),
        };
        result
    }

    /// Images being pulled on this node now.
    pub fn pulling(&self) -> Vec<String> {
        self.pulls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    async fn manifest_of(&self, image_id: &str) -> Result<Manifest, PullError> {
        if let Some(m) = manifest::load(&self.cluster, image_id).await? {
            return Ok(m);
        }
        // This replica may lag behind the upload's commit.
        self.cluster.read_barrier().await?;
        manifest::load(&self.cluster, image_id)
            .await?
            .ok_or_else(|| PullError::NotFound(image_id.to_owned()))
    }

    async fn pull_once(
        &self,
        image_id: &str,
        progress: &watch::Sender<PullStatus>,
    ) -> Result<PathBuf, PullError> {
        let dest = self.cache.path(image_id);
        if let Ok(meta) = tokio::fs::metadata(&dest).await {
            self.cache.touch(image_id);
            progress.send_modify(|s| {
                s.total_bytes = meta.len();
                s.done_bytes = meta.len();
            });
            return Ok(dest);
        }
        let m = self.manifest_of(image_id).await?;
        let digests = m.digests()?;
        let expected = m.image_digest()?;
        progress.send_modify(|s| s.total_bytes = m.size);
        let part = self.cache.part_path(image_id);
        let result = self
            .assemble(&m, &digests, &part, progress)
            .await
            .and_then(|actual| {
                if actual == expected {
                    Ok(())
                } else {
                    Err(PullError::ImageDigest {
                        expected: m.sha256.clone(),
                        actual,
                    })
                }
            });
        let moved = match result {
            Ok(()) => {
                let (part, dest) = (part.clone(), dest.clone());
                tokio::task::spawn_blocking(move || {
                    std::fs::rename(&part, &dest)?;
                    std::fs::File::open(dest.parent().expect("cache dir"))?.sync_all()
                })
                .await
                .map_err(|_| PullError::Aborted)?
                .map_err(PullError::Io)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = moved {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
        self.cache.touch(image_id);
        Ok(dest)
    }

    /// Writes every chunk of `m` into `path`; returns the whole file's SHA-256.
    async fn assemble(
        &self,
        m: &Manifest,
        digests: &[Digest],
        path: &std::path::Path,
        progress: &watch::Sender<PullStatus>,
    ) -> Result<Digest, PullError> {
        let opts = WriterOptions {
            chunk_size: (m.chunk_size as usize).max(1),
            ..WriterOptions::default()
        };
        let writer = UringWriter::create(path, m.size, &opts)?;
        let me = self.node_name().to_owned();
        let mut sources: Vec<Vec<Source>> = Vec::with_capacity(digests.len());
        let mut holders_of: HashMap<Digest, Vec<Source>> = HashMap::new();
        for d in digests {
            if !holders_of.contains_key(d) {
                let mut list = Vec::new();
                if self.chunks.contains(d) {
                    list.push(Source::Local);
                }
                let mut peers = manifest::holders(&self.cluster, d).await?;
                peers.retain(|p| *p != me);
                // Spread the first choice over holders; the least-busy rule does the rest.
                peers.sort_by_key(|p| peer_rank(d, p));
                list.extend(peers.into_iter().map(Source::Peer));
                holders_of.insert(*d, list);
            }
            sources.push(holders_of[d].clone());
        }

        let mut pending: BTreeSet<usize> = (0..digests.len()).collect();
        let mut excluded: Vec<HashSet<Source>> = vec![HashSet::new(); digests.len()];
        let mut tried: Vec<Vec<String>> = vec![Vec::new(); digests.len()];
        let mut down: HashSet<Source> = HashSet::new();
        let mut busy: HashMap<Source, usize> = HashMap::new();
        // Holders that let a hedged request win: asked only while no other holder is usable,
        // until they deliver a chunk again.
        let mut silent: HashSet<Source> = HashSet::new();
        let mut unfinished: BTreeSet<usize> = pending.clone();
        let mut tasks: JoinSet<(usize, Source, Result<Fetched, ChunkFailure>)> = JoinSet::new();
        loop {
            // Hand out chunks, in order, within the window past the first unfinished one.
            let horizon = unfinished.first().map_or(usize::MAX, |f| f + WINDOW);
            let mut started = Vec::new();
            for &i in pending.iter().take_while(|&&i| i < horizon) {
                let mut usable: Vec<&Source> = sources[i]
                    .iter()
                    .filter(|s| !excluded[i].contains(*s) && !down.contains(*s))
                    .collect();
                if usable.is_empty() {
                    return Err(PullError::Unavailable {
                        index: i,
                        digest: digests[i],
                        tried: if tried[i].is_empty() {
                            "no reachable node holds it".into()
                        } else {
                            tried[i].join("; ")
                        },
                    });
                }
                if usable.iter().any(|s| !silent.contains(*s)) {
                    usable.retain(|s| !silent.contains(*s));
                }
                let load = |s: &Source| busy.get(s).copied().unwrap_or(0);
                let limit = |s: &Source| if *s == Source::Local { LOCAL } else { PER_PEER };
                let Some(src) = usable
                    .iter()
                    .filter(|s| load(s) < limit(s))
                    .min_by_key(|s| load(s))
                    .map(|s| (*s).clone())
                else {
                    continue;
                };
                // The holder asked as well if `src` is slow to answer.
                let hedge = usable
                    .iter()
                    .filter(|s| **s != &src)
                    .min_by_key(|s| load(s))
                    .and_then(|s| match s {
                        Source::Peer(p) => Some(p.clone()),
                        Source::Local => None,
                    });
                *busy.entry(src.clone()).or_default() += 1;
                let (offset, len) = m.extent(i);
                let (store, writer, d) = (self.clone(), writer.clone(), digests[i]);
                tasks.spawn(async move {
                    let r = store
                        .copy_chunk(&writer, &src, hedge.as_deref(), d, offset, len)
                        .await;
                    (i, src, r)
                });
                started.push(i);
            }
            for i in started {
                pending.remove(&i);
            }
            let Some(done) = tasks.join_next().await else {
                break;
            };
            let (i, src, result) = done.map_err(|_| PullError::Aborted)?;
            if let Some(n) = busy.get_mut(&src) {
                *n -= 1;
            }
            match result {
                Ok(Fetched {
                    bytes: fetched,
                    hedged,
                }) => {
                    if hedged {
                        tracing::info!(chunk = i, source = %src, "holder slow to answer; another holder served the chunk");
                        silent.insert(src);
                        progress.send_modify(|s| s.hedged_chunks += 1);
                    } else {
                        silent.remove(&src);
                    }
                    unfinished.remove(&i);
                    let len = m.extent(i).1;
                    progress.send_modify(|s| {
                        s.done_bytes += len;
                        s.fetched_bytes += fetched;
                    });
                }
                Err(ChunkFailure::Fatal(e)) => return Err(PullError::Write(e)),
                Err(ChunkFailure::Source { error, down: gone }) => {
                    tracing::warn!(chunk = i, source = %src, %error, "chunk failed; trying another holder");
                    tried[i].push(format!("{src}: {error}"));
                    progress.send_modify(|s| s.retried_chunks += 1);
                    excluded[i].insert(src.clone());
                    if gone {
                        down.insert(src);
                    }
                    pending.insert(i);
                }
            }
        }
        Ok(writer.finish().await?)
    }

    /// Reads chunk `d` from `from` and writes it at `offset`, checked against `d`. If `from` is a
    /// peer that has not started answering after [`HEDGE_AFTER`], the chunk is asked of `hedge`
    /// as well and the first answer is taken.
    async fn copy_chunk(
        &self,
        writer: &UringWriter,
        from: &Source,
        hedge: Option<&str>,
        d: Digest,
        offset: u64,
        len: u64,
    ) -> Result<Fetched, ChunkFailure> {
        let mut hedged = false;
        let (data, fetched): (Bytes, u64) = match from {
            Source::Local => match tokio::fs::read(self.chunks.path(&d)).await {
                Ok(v) => (v.into(), 0),
                Err(e) => {
                    return Err(ChunkFailure::Source {
                        error: e.to_string(),
                        down: false,
                    })
                }
            },
            Source::Peer(node) => match self.fetch_hedged(node, hedge, d, len).await {
                Ok((b, h)) => {
                    hedged = h;
                    (b, len)
                }
                Err(e) => {
                    return Err(ChunkFailure::Source {
                        down: e.peer_down(),
                        error: crate::chain(&e),
                    })
                }
            },
        };
        if data.len() as u64 != len {
            return Err(ChunkFailure::Source {
                error: format!("{} bytes, expected {len}", data.len()),
                down: false,
            });
        }
        match writer.write_chunk_verified(offset, data, d).await {
            Ok(()) => Ok(Fetched {
                bytes: fetched,
                hedged,
            }),
            Err(e @ UringError::ChecksumMismatch { .. }) => Err(ChunkFailure::Source {
                error: e.to_string(),
                down: false,
            }),
            Err(e) => Err(ChunkFailure::Fatal(e)),
        }
    }
}

impl ImageStore {
    /// Fetches chunk `d` from `node`, or from `hedge` if `node` has not started answering within
    /// [`HEDGE_AFTER`] and `hedge` answers first. Returns the bytes and whether `hedge` served
    /// them. If the first to answer fails, the other's answer is awaited; the error reported is
    /// `node`'s.
    async fn fetch_hedged(
        &self,
        node: &str,
        hedge: Option<&str>,
        d: Digest,
        len: u64,
    ) -> Result<(Bytes, bool), peer::TransferError> {
        let cluster = &self.cluster;
        peer::timed(node, d, async {
            let first = peer::request(cluster, node, d, Some(len));
            tokio::pin!(first);
            let answer = match hedge {
                None => first.await?,
                Some(other) => tokio::select! {
                    r = &mut first => r?,
                    () = tokio::time::sleep(HEDGE_AFTER) => {
                        let second = peer::request(cluster, other, d, Some(len));
                        tokio::pin!(second);
                        tokio::select! {
                            r = &mut first => match r {
                                Ok(a) => a,
                                Err(e) => second.await.map_err(|_| e)?,
                            },
                            r = &mut second => match r {
                                Ok(a) => a,
                                Err(_) => first.await?,
                            },
                        }
                    }
                },
            };
            let hedged = answer.node() != node;
            Ok((answer.body().await?, hedged))
        })
        .await
    }
}

/// A chunk in place: the bytes that crossed the network, and whether a hedged request to a
/// second holder served it.
struct Fetched {
    bytes: u64,
    hedged: bool,
}

fn peer_rank(d: &Digest, node: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::new()
        .chain_update(d.0)
        .chain_update(node.as_bytes())
        .finalize()
        .into()
}
