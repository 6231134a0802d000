//! Chunk garbage collection: a chunk this node stores that no image manifest refers to, and that
//! nobody stored for a grace period, is dropped, so deleting an image frees its space.
//!
//! The manifests are read after a read barrier (a lagging replica must not miss a new image), a
//! manifest that does not parse stops the pass, and this node's `chunk_holders` row is deleted
//! through Raft **before** the file, so no reader is ever sent to a chunk that is gone. The grace
//! period covers uploads in progress, whose chunks a manifest refers to only once the upload
//! commits; storing a chunk again (a new upload of the same bytes) restarts its grace period.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use shoal_consensus::cluster::ClusterError;
use shoal_disk::uring::Digest;
use shoal_types::Txn;

use super::chunks::ChunkError;
use super::manifest::{self, BadManifest};
use super::ImageStore;

/// How often a node looks for unreferenced chunks.
pub const EVERY: Duration = Duration::from_secs(600);
/// How long an unreferenced chunk is kept after it was last stored.
pub const GRACE: Duration = Duration::from_secs(6 * 3600);
/// Holder rows deleted per Raft transaction.
const BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error("manifest of image {image} is unreadable; not collecting")]
    Manifest {
        image: String,
        #[source]
        source: BadManifest,
    },
    #[error("the collection task stopped")]
    Task,
}

fn stored_before(store: &ImageStore, d: &Digest, cutoff: SystemTime) -> bool {
    std::fs::metadata(store.chunks.path(d))
        .and_then(|m| m.modified())
        .is_ok_and(|t| t < cutoff)
}

/// One pass: returns the chunks removed from this node.
pub async fn collect(store: &ImageStore, grace: Duration) -> Result<Vec<Digest>, GcError> {
    let chunks = store.chunks.clone();
    let local = tokio::task::spawn_blocking(move || chunks.list())
        .await
        .map_err(|_| GcError::Task)??;
    if local.is_empty() {
        return Ok(Vec::new());
    }
    store.cluster.read_barrier().await?;
    let mut referenced = HashSet::new();
    for (image, digests) in manifest::all_digests(&store.cluster).await? {
        let digests = digests.map_err(|source| GcError::Manifest { image, source })?;
        referenced.extend(digests);
    }
    let cutoff = SystemTime::now() - grace;
    let victims: Vec<Digest> = local
        .into_iter()
        .filter(|d| !referenced.contains(d) && stored_before(store, d, cutoff))
        .collect();
    let me = store.node_name().to_owned();
    let mut removed = Vec::new();
    for batch in victims.chunks(BATCH) {
        let txn = batch.iter().fold(Txn::new(), |t, d| {
            t.delete(manifest::HOLDERS, &manifest::holder_key(d, &me))
        });
        store.cluster.write(txn).await?;
        for d in batch {
            // Stored again since the list was taken: keep it (its holder row was written again
            // by whoever stored it, if it belongs to an image).
            if !stored_before(store, d, cutoff) {
                continue;
            }
            store.chunks.remove(d)?;
            removed.push(*d);
        }
    }
    if !removed.is_empty() {
        tracing::info!(chunks = removed.len(), "removed unreferenced chunks");
    }
    Ok(removed)
}
