//! What the Raft state says about image bytes.
//!
//! - `image_manifests/<image id>`: the image's chunk list ([`Manifest`]), written in the same
//!   transaction that makes the image `active`.
//! - `chunk_holders/<sha256>/<node name>`: one row per copy of a chunk. A node adds its rows
//!   when it holds a chunk durably and deletes them before it drops the chunk. Listing the
//!   prefix `<sha256>/` gives the nodes to pull from.

use serde::{Deserialize, Serialize};
use shoal_consensus::cluster::{Cluster, ClusterError};
use shoal_disk::uring::Digest;
use shoal_types::Op;

use super::chunks::parse_digest;

pub const MANIFESTS: &str = "image_manifests";
pub const HOLDERS: &str = "chunk_holders";

/// How an image's bytes are cut into chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Image size in bytes.
    pub size: u64,
    /// Every chunk but the last is this long; the last holds the rest (1..=chunk_size bytes).
    pub chunk_size: u64,
    /// SHA-256 of each chunk, in order, as hex.
    pub chunks: Vec<String>,
    /// SHA-256 of the whole image, as hex: what a pulled copy is checked against.
    pub sha256: String,
}

/// A manifest that does not describe a consistent image.
#[derive(Debug, thiserror::Error)]
#[error("image manifest is inconsistent: {0}")]
pub struct BadManifest(pub String);

impl Manifest {
    /// Checks the chunk count against the size and parses every digest.
    pub fn digests(&self) -> Result<Vec<Digest>, BadManifest> {
        if self.chunk_size == 0 {
            return Err(BadManifest("chunk size is 0".into()));
        }
        let expected = self.size.div_ceil(self.chunk_size);
        if self.chunks.len() as u64 != expected {
            return Err(BadManifest(format!(
                "{} chunks for {} bytes in {}-byte chunks (expected {expected})",
                self.chunks.len(),
                self.size,
                self.chunk_size
            )));
        }
        self.chunks
            .iter()
            .map(|c| parse_digest(c).ok_or_else(|| BadManifest(format!("bad chunk digest {c:?}"))))
            .collect()
    }

    /// The whole-image SHA-256.
    pub fn image_digest(&self) -> Result<Digest, BadManifest> {
        parse_digest(&self.sha256)
            .ok_or_else(|| BadManifest(format!("bad image digest {:?}", self.sha256)))
    }

    /// Byte offset and length of chunk `i`.
    pub fn extent(&self, i: usize) -> (u64, u64) {
        let offset = i as u64 * self.chunk_size;
        (offset, self.chunk_size.min(self.size - offset))
    }
}

pub fn holder_key(d: &Digest, node: &str) -> String {
    format!("{d}/{node}")
}

/// The ops recording `manifest` for `image_id` and each `(chunk, node)` copy.
pub fn record_ops(image_id: &str, manifest: &Manifest, copies: &[(Digest, String)]) -> Vec<Op> {
    let mut ops = vec![Op::Put {
        table: MANIFESTS.into(),
        key: image_id.into(),
        value: serde_json::to_vec(manifest).expect("manifests serialise"),
    }];
    ops.extend(copies.iter().map(|(d, node)| Op::Put {
        table: HOLDERS.into(),
        key: holder_key(d, node),
        value: Vec::new(),
    }));
    ops
}

/// The manifest of `image_id` in this node's replica, if it has one.
pub async fn load(cluster: &Cluster, image_id: &str) -> Result<Option<Manifest>, ClusterError> {
    let Some(row) = cluster.get(MANIFESTS, image_id).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&row.value)
        .map(Some)
        .map_err(|e| ClusterError::Corrupt(format!("manifest of image {image_id}: {e}")))
}

/// Every manifest in this node's replica: the image id and its chunk digests, or why they
/// cannot be read (callers decide whether a bad manifest stops them).
pub async fn all_digests(
    cluster: &Cluster,
) -> Result<Vec<(String, Result<Vec<Digest>, BadManifest>)>, ClusterError> {
    Ok(cluster
        .list(MANIFESTS, "", usize::MAX)
        .await?
        .into_iter()
        .map(|(image, row)| {
            let digests = serde_json::from_slice::<Manifest>(&row.value)
                .map_err(|e| BadManifest(e.to_string()))
                .and_then(|m| m.digests());
            (image, digests)
        })
        .collect())
}

/// The nodes holding chunk `d`, by name.
pub async fn holders(cluster: &Cluster, d: &Digest) -> Result<Vec<String>, ClusterError> {
    let prefix = format!("{d}/");
    Ok(cluster
        .list(HOLDERS, &prefix, usize::MAX)
        .await?
        .into_iter()
        .filter_map(|(key, _)| key.strip_prefix(&prefix).map(str::to_owned))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(size: u64, chunk_size: u64, n: usize) -> Manifest {
        Manifest {
            size,
            chunk_size,
            chunks: (0..n).map(|i| Digest::of(&[i as u8]).to_string()).collect(),
            sha256: Digest::of(b"all").to_string(),
        }
    }

    #[test]
    fn extents_cover_the_image_with_a_short_last_chunk() {
        let m = manifest(10, 4, 3);
        assert_eq!(m.digests().unwrap().len(), 3);
        assert_eq!(
            (0..3).map(|i| m.extent(i)).collect::<Vec<_>>(),
            vec![(0, 4), (4, 4), (8, 2)]
        );
        assert_eq!(manifest(0, 4, 0).digests().unwrap().len(), 0);
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        assert!(manifest(10, 4, 2).digests().is_err());
        assert!(manifest(10, 0, 0).digests().is_err());
        let mut m = manifest(4, 4, 1);
        m.chunks[0] = "not hex".into();
        let err = m.digests().unwrap_err().to_string();
        assert!(err.contains("not hex"), "{err}");
    }
}
