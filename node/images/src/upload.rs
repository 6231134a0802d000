//! Taking an image's bytes in: cut into chunks as they stream in, hash them (per chunk and for
//! the whole image), store the chunks, push them to their replicas (see [`super::replicate`]),
//! and keep a staging copy of the whole file for the upload inspector and this node's base-image
//! cache. Memory use is bounded by the replication queue, whatever the image size.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use md5::Md5;
use sha2::{Digest as _, Sha256, Sha512};
use shoal_disk::uring::Digest;
use tokio::io::AsyncWriteExt;

use super::chunks::{ChunkError, ChunkStore};
use super::manifest::Manifest;
use super::replicate::Replicator;

/// Why an upload stopped.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the image is larger than the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error("cannot write the staging file {path}")]
    Staging {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the hashing task stopped")]
    Hasher,
    #[error("cannot choose the image's replicas")]
    Cluster(#[source] shoal_consensus::cluster::ClusterError),
}

#[derive(Clone)]
struct Hashers {
    md5: Md5,
    sha256: Sha256,
    sha512: Sha512,
}

impl std::fmt::Debug for Hashers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hashers { md5, sha256, sha512 }")
    }
}

/// The result of a complete upload.
#[derive(Debug)]
pub struct Uploaded {
    pub manifest: Manifest,
    /// Glance's `checksum`: MD5 of the image, hex.
    pub md5: String,
    /// Glance's `os_hash_value` (with `os_hash_algo` = sha512), hex.
    pub sha512: String,
    /// The whole image as one file, for the inspector and the local base-image cache. The
    /// caller moves or deletes it.
    pub staging: PathBuf,
    /// `(chunk, node)` copies made durable during the upload, this node's and the replicas',
    /// for the manifest transaction. A chunk with fewer than `replication` entries here has
    /// fewer copies (a small cluster, or replicas that failed); a warning was logged.
    pub copies: Vec<(Digest, String)>,
}

/// One upload in progress. Feed it with [`push`](Self::push), end with
/// [`finish`](Self::finish); dropping it abandons the upload (the staging file is removed;
/// stored chunks stay until garbage collection, as other images may share them).
#[derive(Debug)]
pub struct Uploader {
    store: ChunkStore,
    node: String,
    chunk_size: usize,
    limit: u64,
    buf: BytesMut,
    size: u64,
    hashers: Option<Hashers>,
    chunks: Vec<Digest>,
    staging_path: PathBuf,
    staging: Option<tokio::fs::File>,
    replicator: Option<Replicator>,
}

impl Drop for Uploader {
    fn drop(&mut self) {
        if self.staging.is_some() {
            let _ = std::fs::remove_file(&self.staging_path);
        }
    }
}

impl Uploader {
    /// Starts an upload that stores chunks of `chunk_size` bytes in `store` (on node `node`),
    /// refuses more than `limit` bytes and stages the whole file at `staging`.
    pub async fn new(
        store: ChunkStore,
        node: String,
        chunk_size: usize,
        limit: u64,
        staging: PathBuf,
    ) -> Result<Uploader, UploadError> {
        assert!(chunk_size > 0, "chunk size must be positive");
        let file =
            tokio::fs::File::create(&staging)
                .await
                .map_err(|source| UploadError::Staging {
                    path: staging.clone(),
                    source,
                })?;
        Ok(Uploader {
            store,
            node,
            chunk_size,
            limit,
            buf: BytesMut::with_capacity(chunk_size),
            size: 0,
            hashers: Some(Hashers {
                md5: Md5::new(),
                sha256: Sha256::new(),
                sha512: Sha512::new(),
            }),
            chunks: Vec::new(),
            staging_path: staging,
            staging: Some(file),
            replicator: None,
        })
    }

    /// Pushes every chunk to replicas as it is sealed; `finish` waits for them.
    pub fn with_replicator(mut self, replicator: Replicator) -> Uploader {
        self.replicator = Some(replicator);
        self
    }

    /// Takes the next piece of the image, of any length.
    pub async fn push(&mut self, mut data: Bytes) -> Result<(), UploadError> {
        self.size += data.len() as u64;
        if self.size > self.limit {
            return Err(UploadError::TooLarge { limit: self.limit });
        }
        while !data.is_empty() {
            let take = (self.chunk_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data.split_to(take));
            if self.buf.len() == self.chunk_size {
                let chunk = self.buf.split().freeze();
                self.seal(chunk).await?;
            }
        }
        Ok(())
    }

    async fn seal(&mut self, chunk: Bytes) -> Result<(), UploadError> {
        let mut hashers = self.hashers.take().ok_or(UploadError::Hasher)?;
        let hashed = chunk.clone();
        let (hashers, d) = tokio::task::spawn_blocking(move || {
            hashers.md5.update(&hashed);
            hashers.sha256.update(&hashed);
            hashers.sha512.update(&hashed);
            let d = Digest::of(&hashed);
            (hashers, d)
        })
        .await
        .map_err(|_| UploadError::Hasher)?;
        self.hashers = Some(hashers);
        let file = self.staging.as_mut().ok_or(UploadError::Hasher)?;
        let (stored, staged) = tokio::join!(
            self.store.put_verified(d, chunk.clone()),
            file.write_all(&chunk)
        );
        stored?;
        staged.map_err(|source| UploadError::Staging {
            path: self.staging_path.clone(),
            source,
        })?;
        if let Some(replicator) = &self.replicator {
            replicator.send(d, chunk).await;
        }
        self.chunks.push(d);
        Ok(())
    }

    /// Seals the last chunk, syncs the staging file and returns the manifest and hashes.
    pub async fn finish(mut self) -> Result<Uploaded, UploadError> {
        if !self.buf.is_empty() {
            let chunk = self.buf.split().freeze();
            self.seal(chunk).await?;
        }
        let file = self.staging.take().ok_or(UploadError::Hasher)?;
        let synced = async {
            let mut file = file;
            file.flush().await?;
            file.sync_all().await
        }
        .await;
        if let Err(source) = synced {
            let _ = std::fs::remove_file(&self.staging_path);
            return Err(UploadError::Staging {
                path: self.staging_path.clone(),
                source,
            });
        }
        let replicas = match self.replicator.take() {
            Some(r) => r.finish().await,
            None => Vec::new(),
        };
        let h = self.hashers.take().ok_or(UploadError::Hasher)?;
        let manifest = Manifest {
            size: self.size,
            chunk_size: self.chunk_size as u64,
            chunks: self.chunks.iter().map(Digest::to_string).collect(),
            sha256: hex::encode(h.sha256.finalize()),
        };
        Ok(Uploaded {
            manifest,
            md5: hex::encode(h.md5.finalize()),
            sha512: hex::encode(h.sha512.finalize()),
            staging: self.staging_path.clone(),
            copies: {
                let mut copies: Vec<(Digest, String)> = self
                    .chunks
                    .iter()
                    .map(|d| (*d, self.node.clone()))
                    .chain(replicas)
                    .collect();
                copies.sort();
                copies.dedup();
                copies
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn upload(pieces: &[&[u8]], chunk: usize, limit: u64) -> Result<Uploaded, UploadError> {
        let dir = tempfile::tempdir().unwrap().keep();
        let store = ChunkStore::open(&dir.join("chunks")).unwrap();
        let mut up = Uploader::new(store, "n1".into(), chunk, limit, dir.join("stage"))
            .await
            .unwrap();
        for p in pieces {
            up.push(Bytes::copy_from_slice(p)).await?;
        }
        up.finish().await
    }

    #[tokio::test]
    async fn chunks_and_hashes_do_not_depend_on_how_the_bytes_arrive() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let whole = upload(&[&data], 4096, u64::MAX).await.unwrap();
        let pieces: Vec<&[u8]> = data.chunks(333).collect();
        let split = upload(&pieces, 4096, u64::MAX).await.unwrap();
        assert_eq!(whole.manifest, split.manifest);
        assert_eq!(whole.manifest.size, 10_000);
        assert_eq!(whole.manifest.chunks.len(), 3);
        let digests = whole.manifest.digests().unwrap();
        assert_eq!(digests[2], Digest::of(&data[8192..]));
        assert_eq!(whole.manifest.sha256, Digest::of(&data).to_string());
        assert_eq!(whole.sha512, hex::encode(Sha512::digest(&data)));
        assert_eq!(whole.md5, hex::encode(Md5::digest(&data)));
        assert_eq!(std::fs::read(&whole.staging).unwrap(), data);
        // The pattern repeats every 256 bytes, so the first two chunks are the same bytes: one
        // copy of each distinct chunk.
        assert_eq!(digests[0], digests[1]);
        assert_eq!(whole.copies.len(), 2);
    }

    #[tokio::test]
    async fn empty_and_exact_multiple_sizes() {
        let empty = upload(&[], 4, u64::MAX).await.unwrap();
        assert_eq!(empty.manifest.chunks.len(), 0);
        assert_eq!(empty.manifest.sha256, Digest::of(b"").to_string());
        let exact = upload(&[b"abcdefgh"], 4, u64::MAX).await.unwrap();
        assert_eq!(exact.manifest.chunks.len(), 2);
        exact.manifest.digests().unwrap();
    }

    #[tokio::test]
    async fn refuses_more_than_the_limit() {
        let err = upload(&[b"0123", b"45"], 4, 5).await.unwrap_err();
        assert!(matches!(err, UploadError::TooLarge { limit: 5 }), "{err}");
    }
}
