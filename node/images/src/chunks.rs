//! The local chunk store: content-addressed files under `<data-dir>/images/chunks`, named by
//! the SHA-256 of their bytes (`ab/abcdef…`). A chunk is written to a temporary file, synced and
//! renamed into place, so a name either holds the complete bytes or does not exist. Reads check
//! the hash again: a chunk damaged on this disk is reported, never served.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use shoal_disk::uring::Digest;

/// Why a chunk could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk bytes have SHA-256 {actual}, expected {expected}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("chunk store I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the hashing task stopped")]
    Hasher,
    #[error("no reachable node holds chunk {0}")]
    Missing(Digest),
    #[error("cannot read the chunk holders: {0}")]
    Cluster(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ChunkError + '_ {
    move |source| ChunkError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Parses a lowercase or uppercase 64-digit hex SHA-256.
pub fn parse_digest(s: &str) -> Option<Digest> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(Digest(out))
}

/// SHA-256 of `data` on the blocking pool (hashing 4 MiB takes milliseconds).
pub async fn digest_of(data: Bytes) -> Result<Digest, ChunkError> {
    tokio::task::spawn_blocking(move || Digest::of(&data))
        .await
        .map_err(|_| ChunkError::Hasher)
}

/// The chunks this node holds.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    dir: PathBuf,
}

impl ChunkStore {
    /// Opens (creating if needed) the store in `dir` and clears temporary files an interrupted
    /// write left behind.
    pub fn open(dir: &Path) -> io::Result<ChunkStore> {
        let tmp = dir.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        Ok(ChunkStore {
            dir: dir.to_owned(),
        })
    }

    /// Where the chunk `d` lives (whether or not it exists).
    pub fn path(&self, d: &Digest) -> PathBuf {
        let name = d.to_string();
        self.dir.join(&name[..2]).join(name)
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.path(d).exists()
    }

    /// Stores `data` as chunk `d` after checking its hash. Storing a chunk that exists is a
    /// no-op. Returns once the chunk is durable.
    pub async fn put(&self, d: Digest, data: Bytes) -> Result<(), ChunkError> {
        let actual = digest_of(data.clone()).await?;
        if actual != d {
            return Err(ChunkError::Mismatch {
                expected: d,
                actual,
            });
        }
        self.put_verified(d, data).await
    }

    /// [`put`](Self::put) for bytes whose hash the caller has just computed.
    pub async fn put_verified(&self, d: Digest, data: Bytes) -> Result<(), ChunkError> {
        let dest = self.path(&d);
        if dest.exists() {
            // Stored again: it is fresh for garbage collection's grace period.
            if let Ok(f) = std::fs::File::options().write(true).open(&dest) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
            return Ok(());
        }
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{d}.{:016x}", rand::random::<u64>()));
        tokio::task::spawn_blocking(move || write_atomically(&tmp, &dest, &data))
            .await
            .map_err(|_| ChunkError::Hasher)?
    }

    /// The bytes of chunk `d`, checked against their name; `None` if this node lacks it.
    pub async fn get(&self, d: Digest) -> Result<Option<Bytes>, ChunkError> {
        let path = self.path(&d);
        let data = match tokio::fs::read(&path).await {
            Ok(data) => Bytes::from(data),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let actual = digest_of(data.clone()).await?;
        if actual != d {
            return Err(ChunkError::Mismatch {
                expected: d,
                actual,
            });
        }
        Ok(Some(data))
    }

    /// Deletes chunk `d` if present.
    pub fn remove(&self, d: &Digest) -> Result<(), ChunkError> {
        let path = self.path(d);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Every chunk held, in no particular order.
    pub fn list(&self) -> Result<Vec<Digest>, ChunkError> {
        let mut out = Vec::new();
        for shard in std::fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let shard = shard.map_err(io_err(&self.dir))?.path();
            if !shard.is_dir() || shard.file_name().is_some_and(|n| n == "tmp") {
                continue;
            }
            for entry in std::fs::read_dir(&shard).map_err(io_err(&shard))? {
                let entry = entry.map_err(io_err(&shard))?;
                if let Some(d) = entry.file_name().to_str().and_then(parse_digest) {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }
}

fn write_atomically(tmp: &Path, dest: &Path, data: &[u8]) -> Result<(), ChunkError> {
    use std::io::Write;
    let parent = dest.parent().expect("chunk paths have a shard directory");
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let mut f = std::fs::File::create(tmp).map_err(io_err(tmp))?;
    f.write_all(data)
        .and_then(|_| f.sync_data())
        .map_err(io_err(tmp))?;
    std::fs::rename(tmp, dest).map_err(io_err(dest))?;
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_err(parent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let data = Bytes::from_static(b"hello chunk");
        let d = Digest::of(&data);
        assert!(!store.contains(&d));
        assert!(store.get(d).await.unwrap().is_none());
        store.put(d, data.clone()).await.unwrap();
        store.put(d, data.clone()).await.unwrap();
        assert_eq!(store.get(d).await.unwrap().unwrap(), data);
        assert_eq!(store.list().unwrap(), vec![d]);
        store.remove(&d).unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[tokio::test]
    async fn refuses_bytes_that_do_not_match_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let d = Digest::of(b"right");
        let err = store
            .put(d, Bytes::from_static(b"wrong"))
            .await
            .unwrap_err();
        assert!(matches!(err, ChunkError::Mismatch { .. }), "{err}");
        assert!(!store.contains(&d));
    }

    #[tokio::test]
    async fn a_chunk_damaged_on_disk_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let data = Bytes::from_static(b"precious bytes");
        let d = Digest::of(&data);
        store.put(d, data).await.unwrap();
        std::fs::write(store.path(&d), b"precious bytez").unwrap();
        assert!(matches!(
            store.get(d).await.unwrap_err(),
            ChunkError::Mismatch { .. }
        ));
    }

    #[test]
    fn digests_round_trip_through_hex() {
        let d = Digest::of(b"x");
        assert_eq!(parse_digest(&d.to_string()), Some(d));
        assert_eq!(parse_digest("zz"), None);
        assert_eq!(parse_digest(&"a".repeat(63)), None);
    }
}
