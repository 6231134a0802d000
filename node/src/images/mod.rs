//! Image bytes across the cluster (see `docs/images.md`).
//!
//! - [`chunks`]: this node's content-addressed chunk store.
//! - [`manifest`]: the Raft rows saying how an image is chunked and which node holds which
//!   chunk.
//! - [`upload`]: cutting an incoming image into chunks and hashing it.
//!
//! [`ImageStore`] is what the Image API and the compute side use: it knows this node's
//! directories and the `[images]` settings.

pub mod chunks;
pub mod manifest;
pub mod upload;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use shoal_consensus::cluster::Cluster;
use shoal_disk::uring::Digest;

use crate::config::ImagesSection;
use chunks::{ChunkError, ChunkStore};
use upload::{UploadError, Uploader};

/// This node's image storage.
#[derive(Debug, Clone)]
pub struct ImageStore {
    pub cluster: Cluster,
    pub chunks: ChunkStore,
    pub settings: ImagesSection,
    dir: PathBuf,
}

impl ImageStore {
    /// Opens the store under `<data-dir>/images`: `chunks/`, `staging/` (uploads in progress,
    /// cleared at start) and `cache/` (whole base images, named by image id).
    pub fn open(
        cluster: Cluster,
        data_dir: &Path,
        settings: ImagesSection,
    ) -> std::io::Result<ImageStore> {
        let dir = data_dir.join("images");
        let chunks = ChunkStore::open(&dir.join("chunks"))?;
        let staging = dir.join("staging");
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir_all(&staging)?;
        std::fs::create_dir_all(dir.join("cache"))?;
        Ok(ImageStore {
            cluster,
            chunks,
            settings,
            dir,
        })
    }

    /// This node's name, as chunk holder rows record it.
    pub fn node_name(&self) -> &str {
        &self.cluster.node().name
    }

    /// Starts taking in the bytes of image `image_id`.
    pub async fn uploader(&self, image_id: &str) -> Result<Uploader, UploadError> {
        Uploader::new(
            self.chunks.clone(),
            self.node_name().to_owned(),
            self.settings.chunk_bytes as usize,
            self.settings.max_image_bytes,
            self.dir
                .join("staging")
                .join(format!("{image_id}.{:016x}", rand::random::<u64>())),
        )
        .await
    }

    /// The bytes of chunk `d`, checked against its hash. For now only chunks this node holds;
    /// the streamer extends this to pull from the peers that hold it.
    pub async fn read_chunk(&self, d: Digest) -> Result<Bytes, ChunkError> {
        self.chunks.get(d).await?.ok_or(ChunkError::Missing(d))
    }

    /// Where the cached whole copy of `image_id` lives on this node (whether or not it exists).
    pub fn cache_path(&self, image_id: &str) -> PathBuf {
        self.dir.join("cache").join(image_id)
    }
}
