//! The snapshot file format.
//!
//! ```text
//! magic    8 bytes  "SHOALSN1"
//! frame    u32 little-endian length, then that many bytes of rkyv: SnapshotHeader
//! frame *  one per row batch (header.batches of them): rkyv RowBatch
//! sha256   32 bytes over everything before it
//! EOF
//! ```
//!
//! A reader checks every frame with bytecheck, the counts in the header, the checksum and that
//! nothing follows it, so a truncated, padded or altered file is refused.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};
use shoal_types::codec::{decode, encode};
use shoal_types::Row;

use super::StoreError;
use crate::wire::WSnapshotMeta;

const MAGIC: &[u8; 8] = b"SHOALSN1";
/// A frame larger than this is refused before anything is allocated for it.
const MAX_FRAME: u32 = 64 << 20;
/// Rows per batch frame when writing.
pub(crate) const ROWS_PER_BATCH: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct SnapshotHeader {
    pub meta: WSnapshotMeta,
    pub rows: u64,
    pub batches: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct SnapRow {
    pub table: String,
    pub key: String,
    pub row: Row,
}

#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub(crate) struct RowBatch {
    pub rows: Vec<SnapRow>,
}

/// Writes a snapshot file frame by frame, hashing as it goes.
pub(crate) struct SnapshotWriter {
    out: BufWriter<File>,
    hasher: Sha256,
}

impl SnapshotWriter {
    pub(crate) fn create(path: &Path, header: &SnapshotHeader) -> Result<Self, StoreError> {
        let file = File::create(path)?;
        let mut w = SnapshotWriter {
            out: BufWriter::new(file),
            hasher: Sha256::new(),
        };
        w.write_raw(MAGIC)?;
        w.write_frame(&encode(header))?;
        Ok(w)
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(bytes);
        self.out.write_all(bytes)?;
        Ok(())
    }

    fn write_frame(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or_else(|| {
                StoreError::BadSnapshot(format!("a {}-byte frame is too large", bytes.len()))
            })?;
        self.write_raw(&len.to_le_bytes())?;
        self.write_raw(bytes)
    }

    pub(crate) fn write_batch(&mut self, batch: &RowBatch) -> Result<(), StoreError> {
        self.write_frame(&encode(batch))
    }

    /// Writes the checksum and syncs the file to disk.
    pub(crate) fn finish(mut self) -> Result<(), StoreError> {
        let digest = self.hasher.finalize();
        self.out.write_all(&digest)?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    }
}

/// Hashes everything read through it and optionally copies it to a sink.
struct Tee<'a, R> {
    inner: R,
    hasher: Sha256,
    copy: Option<&'a mut dyn Write>,
}

impl<R: Read> Tee<'_, R> {
    fn read_exact_hashed(&mut self, buf: &mut [u8]) -> Result<(), StoreError> {
        self.inner.read_exact(buf).map_err(truncated)?;
        self.hasher.update(&*buf);
        if let Some(c) = self.copy.as_mut() {
            c.write_all(buf)?;
        }
        Ok(())
    }

    fn read_frame(&mut self) -> Result<Vec<u8>, StoreError> {
        let mut len = [0u8; 4];
        self.read_exact_hashed(&mut len)?;
        let len = u32::from_le_bytes(len);
        if len > MAX_FRAME {
            return Err(StoreError::BadSnapshot(format!(
                "a frame claims {len} bytes, more than the {MAX_FRAME}-byte limit"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        self.read_exact_hashed(&mut buf)?;
        Ok(buf)
    }
}

fn truncated(e: io::Error) -> StoreError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        StoreError::BadSnapshot("the file is truncated".into())
    } else {
        StoreError::Io(e)
    }
}

fn bad(what: &str) -> impl FnOnce(shoal_types::codec::DecodeError) -> StoreError + '_ {
    move |e| StoreError::BadSnapshot(format!("its {what} does not decode: {e}"))
}

/// Reads only the header (for `get_current_snapshot`). The file was verified when it was
/// written or installed.
pub(crate) fn read_header(file: &mut File) -> Result<SnapshotHeader, StoreError> {
    let mut tee = Tee {
        inner: BufReader::new(file),
        hasher: Sha256::new(),
        copy: None,
    };
    let mut magic = [0u8; 8];
    tee.read_exact_hashed(&mut magic)?;
    if &magic != MAGIC {
        return Err(StoreError::BadSnapshot(
            "it does not start with the snapshot magic".into(),
        ));
    }
    decode(&tee.read_frame()?).map_err(bad("header"))
}

/// Reads and verifies a whole snapshot, handing each row batch to `on_batch` and copying the
/// bytes to `copy` if given. Nothing is trusted until the checksum at the end matches, so a
/// caller that changes state in `on_batch` must only do so on a file already verified.
pub(crate) fn read_verified(
    src: impl Read,
    copy: Option<&mut dyn Write>,
    mut on_batch: impl FnMut(RowBatch) -> Result<(), StoreError>,
) -> Result<SnapshotHeader, StoreError> {
    let mut tee = Tee {
        inner: BufReader::new(src),
        hasher: Sha256::new(),
        copy,
    };
    let mut magic = [0u8; 8];
    tee.read_exact_hashed(&mut magic)?;
    if &magic != MAGIC {
        return Err(StoreError::BadSnapshot(
            "it does not start with the snapshot magic".into(),
        ));
    }
    let header: SnapshotHeader = decode(&tee.read_frame()?).map_err(bad("header"))?;
    let mut rows = 0u64;
    for _ in 0..header.batches {
        let batch: RowBatch = decode(&tee.read_frame()?).map_err(bad("row batch"))?;
        for r in &batch.rows {
            shoal_types::validate_table(&r.table)
                .and_then(|_| shoal_types::validate_key(&r.key))
                .map_err(|e| StoreError::BadSnapshot(format!("it holds an invalid row: {e}")))?;
        }
        rows += batch.rows.len() as u64;
        on_batch(batch)?;
    }
    if rows != header.rows {
        return Err(StoreError::BadSnapshot(format!(
            "its header counts {} rows but it holds {rows}",
            header.rows
        )));
    }
    let computed = tee.hasher.clone().finalize();
    let mut stored = [0u8; 32];
    tee.inner.read_exact(&mut stored).map_err(truncated)?;
    if let Some(c) = tee.copy.as_mut() {
        c.write_all(&stored)?;
    }
    if computed.as_slice() != stored {
        return Err(StoreError::BadSnapshot(
            "its checksum does not match".into(),
        ));
    }
    let mut extra = [0u8; 1];
    if tee.inner.read(&mut extra)? != 0 {
        return Err(StoreError::BadSnapshot("bytes follow its checksum".into()));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{WMembership, WStoredMembership};

    fn header(rows: u64, batches: u64) -> SnapshotHeader {
        SnapshotHeader {
            meta: WSnapshotMeta {
                last_log_id: None,
                last_membership: WStoredMembership {
                    log_id: None,
                    membership: WMembership {
                        configs: vec![],
                        nodes: vec![],
                    },
                },
            },
            rows,
            batches,
        }
    }

    fn write(path: &Path, n: u64) {
        let mut w = SnapshotWriter::create(path, &header(n, 1)).unwrap();
        w.write_batch(&RowBatch {
            rows: (0..n)
                .map(|i| SnapRow {
                    table: "t".into(),
                    key: format!("k{i}"),
                    row: Row {
                        value: vec![i as u8],
                        create_revision: i,
                        mod_revision: i,
                        version: 1,
                    },
                })
                .collect(),
        })
        .unwrap();
        w.finish().unwrap();
    }

    /// A written file reads back; every single flipped byte or truncation is refused.
    #[test]
    fn every_flip_and_cut_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        write(&path, 3);
        let bytes = std::fs::read(&path).unwrap();
        let mut n = 0;
        read_verified(&bytes[..], None, |b| {
            n += b.rows.len();
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 3);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(
                read_verified(&b[..], None, |_| Ok(())).is_err(),
                "flip at {i}"
            );
        }
        for cut in 0..bytes.len() {
            assert!(
                read_verified(&bytes[..cut], None, |_| Ok(())).is_err(),
                "cut at {cut}"
            );
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(read_verified(&padded[..], None, |_| Ok(())).is_err());
    }
}
