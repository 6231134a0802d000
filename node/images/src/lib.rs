//! The image service (see `docs/images.md`): image records and the rules about them, and image
//! bytes across the cluster.
//!
//! Owns the `images` and `image_members` tables (records in [`record`], who may change them in
//! [`policy`]), the `image_manifests` and `chunk_holders` tables, this node's chunk store and
//! base-image cache, and its `[images]` settings ([`ImagesSection`]). Must never depend on the
//! HTTP layer or on another service crate: the compute agent reaches base images through the
//! `ImageSource` the binary builds over [`ImageStore`].
//!
//! - [`chunks`]: this node's content-addressed chunk store.
//! - [`manifest`]: the Raft rows saying how an image is chunked and which node holds which
//!   chunk.
//! - [`upload`]: cutting an incoming image into chunks and hashing it.
//! - [`replicate`]: pushing each chunk to its replicas while the upload goes on.
//! - [`peer`]: the chunk protocol between members on `shoal-data/1` connections.
//! - [`pull`]: the streamer, which assembles a verified image in the base-image cache.
//! - [`cache`]: the base-image cache, its leases and its eviction policy.
//! - [`gc`]: removing chunks no image refers to any more.
//! - [`rereplicate`]: copying chunks again when a holder is lost.
//!
//! [`ImageStore`] is what the Image API and the compute side use: it knows this node's
//! directories and the `[images]` settings.

pub mod cache;
pub mod chunks;
pub mod gc;
pub mod manifest;
pub mod peer;
pub mod policy;
pub mod pull;
pub mod record;
pub mod replicate;
pub mod rereplicate;
mod settings;
pub mod upload;

pub use settings::ImagesSection;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use shoal_consensus::cluster::Cluster;
use shoal_disk::uring::Digest;
use tokio::sync::watch;

use cache::{Cache, CacheLease};
use chunks::{ChunkError, ChunkStore};
use pull::PullStatus;
use replicate::Replicator;
use upload::{UploadError, Uploader};

/// An error and its sources, as one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// How often the cache is checked against its budget.
const CACHE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// This node's image storage.
#[derive(Debug, Clone)]
pub struct ImageStore {
    pub cluster: Cluster,
    pub chunks: ChunkStore,
    pub settings: ImagesSection,
    dir: PathBuf,
    cache: Cache,
    /// Pulls running on this node, by image id; a second pull of the same image joins the first.
    pulls: Arc<Mutex<HashMap<String, watch::Receiver<PullStatus>>>>,
}

impl ImageStore {
    /// Opens the store under `<data-dir>/images`: `chunks/`, `staging/` (uploads in progress,
    /// cleared at start) and `cache/` (whole base images, named by image id), and starts serving
    /// this node's chunks to the other members.
    pub fn open(
        cluster: Cluster,
        data_dir: &Path,
        settings: ImagesSection,
        instances: &Path,
    ) -> std::io::Result<ImageStore> {
        let dir = data_dir.join("images");
        let chunks = ChunkStore::open(&dir.join("chunks"))?;
        let staging = dir.join("staging");
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir_all(&staging)?;
        let cache = Cache::new(dir.join("cache"));
        std::fs::create_dir_all(cache.dir())?;
        cache.clear_parts()?;
        cluster.serve_data(peer::ChunkService::new(chunks.clone(), instances));
        Ok(ImageStore {
            cluster,
            chunks,
            settings,
            dir,
            cache,
            pulls: Arc::default(),
        })
    }

    /// This node's name, as chunk holder rows record it.
    pub fn node_name(&self) -> &str {
        &self.cluster.node().name
    }

    /// Starts taking in the bytes of image `image_id`; its chunks are pushed to
    /// `replication - 1` other nodes as they are sealed.
    pub async fn uploader(&self, image_id: &str) -> Result<Uploader, UploadError> {
        let replicator = Replicator::start(
            self.cluster.clone(),
            self.chunks.clone(),
            image_id,
            self.settings.replication,
        )
        .await
        .map_err(UploadError::Cluster)?;
        let uploader = Uploader::new(
            self.chunks.clone(),
            self.node_name().to_owned(),
            self.settings.chunk_bytes as usize,
            self.settings.max_image_bytes,
            self.dir
                .join("staging")
                .join(format!("{image_id}.{:016x}", rand::random::<u64>())),
        )
        .await?;
        Ok(uploader.with_replicator(replicator))
    }

    /// The bytes of chunk `d`, checked against its hash: this node's copy if it has a sound
    /// one, else from the nodes that hold it, one after the other until one sends the right bytes.
    pub async fn read_chunk(&self, d: Digest) -> Result<Bytes, ChunkError> {
        match self.chunks.get(d).await {
            Ok(Some(data)) => return Ok(data),
            Ok(None) => {}
            Err(e @ ChunkError::Mismatch { .. }) => {
                tracing::error!(error = %e, "local chunk is damaged; reading it from a peer");
            }
            Err(e) => return Err(e),
        }
        let me = self.node_name();
        let holders = manifest::holders(&self.cluster, &d)
            .await
            .map_err(|e| ChunkError::Cluster(e.to_string()))?;
        for node in holders.iter().filter(|n| *n != me) {
            let data = match peer::fetch(&self.cluster, node, d, None).await {
                Ok(data) => data,
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "chunk read failed; trying another holder");
                    continue;
                }
            };
            let actual = chunks::digest_of(data.clone()).await?;
            if actual == d {
                return Ok(data);
            }
            tracing::warn!(%node, chunk = %d, %actual, "holder sent a damaged chunk; trying another");
        }
        Err(ChunkError::Missing(d))
    }

    /// Keeps cached image `image_id` from eviction while the lease is held. The compute agent
    /// holds one per base image its instances use, for as long as their rows exist.
    pub fn lease(&self, image_id: &str) -> CacheLease {
        self.cache.lease(image_id)
    }

    /// Ages the base-image cache (see `Cache::age_unused`): images in `keep` stay and count as
    /// used now; others unused for `min_age` go. Returns the images removed.
    pub async fn age_unused(
        &self,
        keep: std::collections::BTreeSet<String>,
        min_age: std::time::Duration,
    ) -> std::io::Result<Vec<String>> {
        let (cache, pulling) = (self.cache.clone(), self.pulling());
        tokio::task::spawn_blocking(move || {
            cache.age_unused(&keep, min_age, &pulling, std::time::SystemTime::now())
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Where the cached whole copy of `image_id` lives on this node (whether or not it exists).
    pub fn cache_path(&self, image_id: &str) -> PathBuf {
        self.cache.path(image_id)
    }

    /// Keeps the cache under its budget, collects unreferenced chunks and copies chunks whose
    /// holders were lost, until `shutdown`.
    pub async fn run_maintenance(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut cache_tick = tokio::time::interval(CACHE_EVERY);
        let mut gc_tick = tokio::time::interval(gc::EVERY);
        let grace = std::time::Duration::from_secs(self.settings.rereplicate_after_secs);
        let mut rerep = rereplicate::Rereplicator::new(grace);
        let mut rerep_tick = tokio::time::interval(rereplicate::every(grace));
        rerep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut removals = rereplicate::Removals::watch(&self.cluster).await;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = cache_tick.tick() => {
                    let (cache, pulling) = (self.cache.clone(), self.pulling());
                    let (budget, min_age) = (
                        self.settings.cache_bytes,
                        std::time::Duration::from_secs(self.settings.cache_min_age_secs),
                    );
                    let evicted = tokio::task::spawn_blocking(move || {
                        cache.evict(budget, min_age, &pulling)
                    })
                    .await;
                    if let Ok(Err(e)) = evicted {
                        tracing::warn!(error = %e, "cache eviction failed");
                    }
                }
                _ = gc_tick.tick() => {
                    if let Err(e) = gc::collect(&self, gc::GRACE).await {
                        tracing::warn!(error = %chain(&e), "chunk garbage collection failed");
                    }
                }
                _ = removals.next() => rerep_tick.reset_immediately(),
                _ = rerep_tick.tick() => {
                    // A pass can take a while (pushes); shutdown does not wait for it. A push
                    // cut short leaves at most an unrecorded copy, which is harmless.
                    let pass = tokio::select! {
                        _ = &mut shutdown => return,
                        pass = rerep.pass(&self) => pass,
                    };
                    match pass {
                        Ok(p) if p.more => {
                            rerep_tick.reset_after(std::time::Duration::from_secs(1));
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %chain(&e), "re-replication pass failed"),
                    }
                }
            }
        }
    }
}
