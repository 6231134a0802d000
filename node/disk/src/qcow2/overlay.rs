//! Writing a qcow2 v3 overlay on a base image, with no qemu-img process.
//!
//! Layout (cluster size C, 64 KiB by default), the same as `qemu-img create -f qcow2 -b`:
//!
//! ```text
//! cluster 0      header (112 bytes), backing format extension, end marker, backing file name
//! cluster 1      refcount table: entry 0 = offset of cluster 2, the rest zero
//! cluster 2      refcount block: 16-bit refcount 1 for clusters 0 ..= 2 + L1 clusters
//! cluster 3..    L1 table, all zero (nothing allocated: every read falls through to the base)
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

use super::header::{
    Extension, Header, EXT_BACKING_FORMAT, MAX_BACKING_FILE_NAME, V3_HEADER_LEN_WITH_COMPRESSION,
};
use super::inspect::{inspect_with, InspectError, InspectPolicy, MAX_L1_ENTRIES, MAX_VIRTUAL_SIZE};
use crate::formats::detect_format;

/// The default cluster size, 64 KiB, as qemu's.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;

/// The format of the base image an overlay reads through to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    Raw,
    Qcow2,
}

impl BackingFormat {
    /// The name qemu records and understands.
    pub fn as_str(self) -> &'static str {
        match self {
            BackingFormat::Raw => "raw",
            BackingFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for BackingFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackingFormat {
    type Err = OverlayError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(BackingFormat::Raw),
            "qcow2" => Ok(BackingFormat::Qcow2),
            other => Err(OverlayError::BackingFormat(other.to_owned())),
        }
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct OverlaySpec {
    /// Absolute path of the base image; recorded as is in the overlay.
    pub backing: PathBuf,
    pub backing_format: BackingFormat,
    /// Virtual disk size in bytes (from the flavor); at least the base's size.
    pub virtual_size: u64,
    /// log2 of the cluster size; [`DEFAULT_CLUSTER_BITS`] unless there is a reason.
    pub cluster_bits: u32,
    /// What is synced before returning.
    pub sync: SyncMode,
}

/// How durable a new overlay is when [`create_overlay`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Nothing synced: for tests and scratch disks.
    None,
    /// `fdatasync` of the file, as `qemu-img create` does; the directory entry is left to the
    /// file system's next journal commit.
    Data,
    /// `fdatasync` of the file and `fsync` of its directory: the name survives a crash too.
    Full,
}

impl OverlaySpec {
    /// An overlay with the default cluster size, fully synced.
    pub fn new(
        backing: impl Into<PathBuf>,
        backing_format: BackingFormat,
        virtual_size: u64,
    ) -> Self {
        OverlaySpec {
            backing: backing.into(),
            backing_format,
            virtual_size,
            cluster_bits: DEFAULT_CLUSTER_BITS,
            sync: SyncMode::Full,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayInfo {
    pub virtual_size: u64,
    pub backing_size: u64,
    pub cluster_size: u64,
    pub l1_size: u32,
    /// Length of the overlay file.
    pub file_size: u64,
}

/// Why an overlay could not be created.
#[derive(Debug, Error)]
pub enum OverlayError {
    #[error("size {0:?} is not a size: give bytes or a number with K, M, G, T or P (powers of 1024), e.g. 10G")]
    SizeSyntax(String),
    #[error(
        "virtual size {0} is invalid: it must be a positive multiple of 512 bytes, at most 64 TiB"
    )]
    Size(u64),
    #[error("virtual size {size} is smaller than the backing image ({backing_size} bytes); an overlay may only be larger or equal")]
    SmallerThanBacking { size: u64, backing_size: u64 },
    #[error("backing format {0:?} is not supported: use raw or qcow2")]
    BackingFormat(String),
    #[error("backing file {0:?} must be an absolute path")]
    RelativeBacking(PathBuf),
    #[error(
        "backing file path {0:?} is not valid: it must be UTF-8, without NUL, at most 1023 bytes"
    )]
    BackingName(PathBuf),
    #[error("backing file {path:?} cannot be opened")]
    BackingOpen { path: PathBuf, source: io::Error },
    #[error("backing file {0:?} is not a regular file")]
    BackingNotFile(PathBuf),
    #[error("backing file {path:?} is {detected} but the backing format given is raw")]
    BackingNotRaw {
        path: PathBuf,
        detected: &'static str,
    },
    #[error("backing file {path:?} is not a usable qcow2 image")]
    BackingInspect { path: PathBuf, source: InspectError },
    #[error("cluster_bits {0} is not supported for overlays (12 to 21)")]
    ClusterBits(u32),
    #[error("overlay {path:?} cannot be created")]
    Create { path: PathBuf, source: io::Error },
    #[error("overlay {path:?} cannot be written")]
    Write { path: PathBuf, source: io::Error },
}

/// Parses a size as `qemu-img` does: plain bytes, or a number followed by K, M, G, T or P
/// (binary multiples), optionally followed by `B` or `iB`. `10G`, `512M`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, OverlayError> {
    let err = || OverlayError::SizeSyntax(s.to_owned());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return Err(err()),
            };
            (&t[..t.len() - 1], shift)
        }
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// The header, refcount table, refcount block and L1 table of an empty overlay: everything that
/// gets written, as a plan.
#[derive(Debug, Clone)]
pub struct OverlayLayout {
    pub header: Header,
    /// Bytes of cluster 0 (header, extensions, backing file name).
    pub header_bytes: Vec<u8>,
    /// Clusters in use: header, refcount table, refcount block, L1 table.
    pub metadata_clusters: u64,
}

impl OverlayLayout {
    /// Lays out an overlay of `virtual_size` bytes over `backing` (already validated).
    pub fn new(
        backing: &[u8],
        backing_format: BackingFormat,
        virtual_size: u64,
        cluster_bits: u32,
    ) -> Result<OverlayLayout, OverlayError> {
        if !(12..=21).contains(&cluster_bits) {
            return Err(OverlayError::ClusterBits(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut header = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size: virtual_size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 3 * cluster_size,
            refcount_table_offset: cluster_size,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN_WITH_COMPRESSION,
            compression_type: 0,
            extensions: vec![Extension {
                kind: EXT_BACKING_FORMAT,
                data: backing_format.as_str().as_bytes().to_vec(),
            }],
            backing_file: Some(backing.to_vec()),
        };
        let l1_entries = header.l1_entries_for(virtual_size);
        if l1_entries > MAX_L1_ENTRIES {
            return Err(OverlayError::Size(virtual_size));
        }
        header.l1_size = l1_entries as u32;
        header.place_backing_file();
        let l1_clusters = (l1_entries * 8).div_ceil(cluster_size).max(1);
        let metadata_clusters = 3 + l1_clusters;
        // One refcount block must cover all metadata (16-bit entries).
        if metadata_clusters > cluster_size / 2 {
            return Err(OverlayError::ClusterBits(cluster_bits));
        }
        let header_bytes = header.encode().map_err(|_| {
            OverlayError::BackingName(PathBuf::from(String::from_utf8_lossy(backing).into_owned()))
        })?;
        Ok(OverlayLayout {
            header,
            header_bytes,
            metadata_clusters,
        })
    }

    /// Length of the overlay file.
    pub fn file_size(&self) -> u64 {
        self.metadata_clusters * self.header.cluster_size()
    }

    /// The first bytes of the refcount table: one entry, pointing at the refcount block.
    pub fn refcount_table_bytes(&self) -> [u8; 8] {
        (2 * self.header.cluster_size()).to_be_bytes()
    }

    /// The used bytes of the refcount block: refcount 1 for each metadata cluster.
    pub fn refcount_block_bytes(&self) -> Vec<u8> {
        (0..self.metadata_clusters)
            .flat_map(|_| 1u16.to_be_bytes())
            .collect()
    }
}

fn backing_size(spec: &OverlaySpec) -> Result<u64, OverlayError> {
    let path = &spec.backing;
    let open_err = |source| OverlayError::BackingOpen {
        path: path.clone(),
        source,
    };
    let mut f = File::open(path).map_err(open_err)?;
    let meta = f.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(OverlayError::BackingNotFile(path.clone()));
    }
    let mut first = Vec::with_capacity(512);
    (&mut f)
        .take(512)
        .read_to_end(&mut first)
        .map_err(open_err)?;
    let detected = detect_format(&first);
    match spec.backing_format {
        // A "raw" base that qemu would probe as something else is a mistake at best.
        BackingFormat::Raw if detected != "raw" => Err(OverlayError::BackingNotRaw {
            path: path.clone(),
            detected,
        }),
        BackingFormat::Raw => Ok(meta.len()),
        BackingFormat::Qcow2 => inspect_with(path, &InspectPolicy::base())
            .map(|info| info.virtual_size)
            .map_err(|source| OverlayError::BackingInspect {
                path: path.clone(),
                source,
            }),
    }
}

/// Validates `spec` and writes the overlay at `out`, which must not exist. On failure nothing is
/// left behind.
pub fn create_overlay(out: &Path, spec: &OverlaySpec) -> Result<OverlayInfo, OverlayError> {
    let size = spec.virtual_size;
    if size == 0 || !size.is_multiple_of(512) || size > MAX_VIRTUAL_SIZE {
        return Err(OverlayError::Size(size));
    }
    if !spec.backing.is_absolute() {
        return Err(OverlayError::RelativeBacking(spec.backing.clone()));
    }
    let name = spec
        .backing
        .to_str()
        .filter(|s| !s.contains('\0') && s.len() <= MAX_BACKING_FILE_NAME)
        .ok_or_else(|| OverlayError::BackingName(spec.backing.clone()))?;
    let backing_size = backing_size(spec)?;
    if size < backing_size {
        return Err(OverlayError::SmallerThanBacking { size, backing_size });
    }
    let layout = OverlayLayout::new(
        name.as_bytes(),
        spec.backing_format,
        size,
        spec.cluster_bits,
    )?;

    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        // Guest data will live here: private to the node (libvirt chowns it for qemu).
        .mode(0o600)
        .open(out)
        .map_err(|source| OverlayError::Create {
            path: out.to_owned(),
            source,
        })?;
    let written = write_layout(&file, &layout, spec.sync).and_then(|()| {
        if spec.sync == SyncMode::Full {
            sync_parent(out)
        } else {
            Ok(())
        }
    });
    if let Err(source) = written {
        drop(file);
        let _ = std::fs::remove_file(out);
        return Err(OverlayError::Write {
            path: out.to_owned(),
            source,
        });
    }
    Ok(OverlayInfo {
        virtual_size: size,
        backing_size,
        cluster_size: layout.header.cluster_size(),
        l1_size: layout.header.l1_size,
        file_size: layout.file_size(),
    })
}

/// Three small writes and a truncate: the rest of every cluster is zero, and a sparse hole reads
/// as zero.
fn write_layout(file: &File, layout: &OverlayLayout, sync: SyncMode) -> io::Result<()> {
    let cs = layout.header.cluster_size();
    file.write_all_at(&layout.header_bytes, 0)?;
    file.write_all_at(&layout.refcount_table_bytes(), cs)?;
    file.write_all_at(&layout.refcount_block_bytes(), 2 * cs)?;
    file.set_len(layout.file_size())?;
    if sync != SyncMode::None {
        // fdatasync covers the new length (needed to read the data back); the directory is
        // synced separately for the name.
        file.sync_data()?;
    }
    Ok(())
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1TB").unwrap(), 1 << 40);
        for bad in [
            "",
            "G",
            "10X",
            "-1",
            "1.5G",
            "99999999999999999999",
            "20000000P",
            "1 G",
        ] {
            assert!(
                matches!(parse_size(bad), Err(OverlayError::SizeSyntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn backing_formats_are_raw_or_qcow2() {
        assert_eq!("raw".parse::<BackingFormat>().unwrap(), BackingFormat::Raw);
        assert_eq!(
            "qcow2".parse::<BackingFormat>().unwrap(),
            BackingFormat::Qcow2
        );
        let e = "vmdk".parse::<BackingFormat>().unwrap_err();
        assert!(e.to_string().contains("use raw or qcow2"), "{e}");
    }

    #[test]
    fn inputs_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let out = dir.path().join("o.qcow2");
        let spec = |size| OverlaySpec::new(&base, BackingFormat::Raw, size);

        assert!(matches!(
            create_overlay(&out, &spec(0)),
            Err(OverlayError::Size(0))
        ));
        assert!(matches!(
            create_overlay(&out, &spec(1000)),
            Err(OverlayError::Size(1000))
        ));
        assert!(matches!(
            create_overlay(&out, &spec(512 * 1024)),
            Err(OverlayError::SmallerThanBacking { .. })
        ));
        assert!(matches!(
            create_overlay(&out, &spec(1 << 60)),
            Err(OverlayError::Size(_))
        ));
        let rel = OverlaySpec::new("base.raw", BackingFormat::Raw, 1 << 30);
        assert!(matches!(
            create_overlay(&out, &rel),
            Err(OverlayError::RelativeBacking(_))
        ));
        let missing = OverlaySpec::new(dir.path().join("nope"), BackingFormat::Raw, 1 << 30);
        assert!(matches!(
            create_overlay(&out, &missing),
            Err(OverlayError::BackingOpen { .. })
        ));
        let dirbase = OverlaySpec::new(dir.path(), BackingFormat::Raw, 1 << 30);
        assert!(matches!(
            create_overlay(&out, &dirbase),
            Err(OverlayError::BackingNotFile(_))
        ));
        assert!(!out.exists(), "failed creations leave nothing behind");

        // A raw base that is really qcow2 is refused; so is a "qcow2" base that is not.
        let q = dir.path().join("q.qcow2");
        create_overlay(&q, &spec(1 << 30)).unwrap();
        let wrong = OverlaySpec::new(&q, BackingFormat::Raw, 1 << 30);
        assert!(matches!(
            create_overlay(&out, &wrong),
            Err(OverlayError::BackingNotRaw {
                detected: "qcow2",
                ..
            })
        ));
        let wrong = OverlaySpec::new(&base, BackingFormat::Qcow2, 1 << 30);
        assert!(matches!(
            create_overlay(&out, &wrong),
            Err(OverlayError::BackingInspect { .. })
        ));

        // The output must not exist already.
        create_overlay(&out, &spec(1 << 30)).unwrap();
        assert!(matches!(
            create_overlay(&out, &spec(1 << 30)),
            Err(OverlayError::Create { .. })
        ));
    }

    #[test]
    fn layout_matches_qemu_for_one_gib() {
        let l = OverlayLayout::new(b"/b.raw", BackingFormat::Raw, 1 << 30, 16).unwrap();
        assert_eq!(l.header.l1_size, 2);
        assert_eq!(l.header.l1_table_offset, 0x30000);
        assert_eq!(l.file_size(), 0x40000);
        assert_eq!(l.header.backing_file_offset, 112 + 8 + 8 + 8);
        assert_eq!(l.refcount_block_bytes(), [0, 1, 0, 1, 0, 1, 0, 1]);
    }
}
