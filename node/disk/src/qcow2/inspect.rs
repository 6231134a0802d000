//! Reading and judging qcow2 headers. The image service runs [`check_upload`] on every upload
//! before anything else opens the file: qemu follows a backing file or an external data file
//! named inside an image, so an image that names one is a way to read a host file into a guest.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::formats::source::FileSource;
use crate::formats::{DiskFormat, Source};

use super::header::{
    Header, HeaderError, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_EXTERNAL_DATA_FILE,
    EXT_FULL_DISK_ENCRYPTION, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTERNAL_DATA_FILE,
    INCOMPAT_KNOWN, MAGIC,
};

/// The largest virtual disk we accept or create: 64 TiB. Anything larger is a mistake or an
/// attack on whoever sizes buffers from the header.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// qemu's limit on the L1 table, 32 MiB (`QCOW_MAX_L1_SIZE`), in entries.
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// qemu's limit on the refcount table, 8 MiB (`QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// qemu's limit on internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Refcount verification keeps a counter per cluster; beyond this many clusters it refuses.
pub const MAX_VERIFY_CLUSTERS: u64 = 1 << 24;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;

/// What the inspector tolerates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectPolicy {
    /// Accept an image that names a backing file (our own overlays do; uploads must not).
    pub allow_backing_file: bool,
    /// Walk the refcount and L1/L2 tables and check every cluster's refcount, as
    /// `qemu-img check` does (snapshots, bitmaps and compressed clusters are then refused).
    pub verify_refcounts: bool,
    /// Largest virtual size accepted.
    pub max_virtual_size: u64,
}

impl InspectPolicy {
    /// For uploaded images: no backing file, header checks only.
    pub fn upload() -> Self {
        InspectPolicy {
            allow_backing_file: false,
            verify_refcounts: false,
            max_virtual_size: MAX_VIRTUAL_SIZE,
        }
    }

    /// For a base image an overlay is written on: as uploads, but a chain is tolerated.
    pub fn base() -> Self {
        InspectPolicy {
            allow_backing_file: true,
            ..Self::upload()
        }
    }

    /// For our own overlays: backing file expected, refcounts verified.
    pub fn overlay() -> Self {
        InspectPolicy {
            allow_backing_file: true,
            verify_refcounts: true,
            ..Self::upload()
        }
    }
}

/// What the inspector found in a qcow2 image it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    pub version: u32,
    pub virtual_size: u64,
    pub cluster_size: u64,
    pub file_size: u64,
    pub l1_size: u32,
    pub refcount_bits: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub nb_snapshots: u32,
    /// Clusters whose refcount was verified (0 if the policy did not ask).
    pub verified_clusters: u64,
}

/// Why an image was refused.
#[derive(Debug, Error)]
pub enum InspectError {
    #[error("image {path:?} cannot be read")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error(
        "disk_format {0:?} is not supported: use one of ami, ari, aki, vhd, vhdx, vmdk, raw, \
         qcow2, vdi, iso, ploop"
    )]
    UnsupportedDiskFormat(String),
    #[error("the image was declared {claimed} but it does not hold {expected}")]
    MissingSignature {
        claimed: DiskFormat,
        expected: &'static str,
    },
    #[error("the {format} image is too short to hold its {what}")]
    Truncated {
        format: DiskFormat,
        what: &'static str,
    },
    #[error("the {format} image is malformed: {problem}")]
    Malformed { format: DiskFormat, problem: String },
    #[error(
        "the {format} image is a differencing image ({detail}); uploaded images must be \
         self-contained"
    )]
    ParentImage { format: DiskFormat, detail: String },
    #[error("the vmdk names another file ({0}); images must hold their own data")]
    ExternalExtent(String),
    #[error("the image was declared {claimed} but its content is {detected}")]
    FormatMismatch {
        claimed: DiskFormat,
        detected: &'static str,
    },
    #[error("the image names an external data file; images must hold their own data")]
    ExternalDataFile,
    #[error("the image names a backing file ({0:?}); uploaded images must be self-contained")]
    BackingFile(String),
    #[error("the backing file name is not UTF-8")]
    BackingFileNotUtf8,
    #[error("the image is encrypted; encrypted images are not supported")]
    Encrypted,
    #[error("the image uses unknown incompatible features {0:#x}; only bits 0-4 are defined")]
    UnknownIncompatibleFeatures(u64),
    #[error("the image is marked dirty; repair it with `qemu-img check -r all` before uploading")]
    Dirty,
    #[error("the image is marked corrupt")]
    Corrupt,
    #[error("virtual size {size} is larger than the {max} bytes allowed")]
    VirtualSizeTooLarge { size: u64, max: u64 },
    #[error("the L1 table has {l1_size} entries: {problem}")]
    L1Size { l1_size: u32, problem: &'static str },
    #[error("refcount_order {0} is invalid (0 to 6)")]
    RefcountOrder(u32),
    #[error("the {table} at byte {offset} ({len} bytes) is misaligned or outside the {file_size}-byte file")]
    TableOutOfBounds {
        table: &'static str,
        offset: u64,
        len: u64,
        file_size: u64,
    },
    #[error("the refcount table has {0} clusters, more than qemu allows")]
    RefcountTableTooLarge(u32),
    #[error("the image has {0} internal snapshots, more than qemu allows")]
    TooManySnapshots(u32),
    #[error("refcount verification does not support {0}")]
    VerifyUnsupported(&'static str),
    #[error("{what} at byte {offset} points outside the file")]
    ReferenceOutOfBounds { what: &'static str, offset: u64 },
    #[error("cluster at byte {offset} has refcount {recorded} but {expected} references")]
    RefcountMismatch {
        offset: u64,
        expected: u64,
        recorded: u64,
    },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> InspectError + '_ {
    move |source| InspectError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Inspects a qcow2 image under the upload policy: see [`InspectPolicy::upload`].
pub fn inspect(path: &Path) -> Result<Qcow2Info, InspectError> {
    inspect_with(path, &InspectPolicy::upload())
}

/// Reads the header of the image at `path` and applies `policy`.
pub fn inspect_with(path: &Path, policy: &InspectPolicy) -> Result<Qcow2Info, InspectError> {
    let f = File::open(path).map_err(io_err(path))?;
    let file_size = f.metadata().map_err(io_err(path))?.len();
    let src = FileSource {
        file: &f,
        len: file_size,
        path,
    };
    let (h, info) = read_and_judge(&src, policy)?;
    let verified_clusters = if policy.verify_refcounts {
        verify_refcounts(&f, &h, file_size, path)?
    } else {
        0
    };
    Ok(Qcow2Info {
        verified_clusters,
        ..info
    })
}

/// Reads a qcow2 header from `src` and applies `policy`, without the refcount walk.
pub(crate) fn inspect_source(
    src: &dyn Source,
    policy: &InspectPolicy,
) -> Result<Qcow2Info, InspectError> {
    read_and_judge(src, policy).map(|(_, info)| info)
}

fn read_and_judge(
    src: &dyn Source,
    policy: &InspectPolicy,
) -> Result<(Header, Qcow2Info), InspectError> {
    // The header and its extensions fill at most the first cluster (2 MiB at most): read
    // what the header says, no more.
    let mut first = src.head(104)?;
    if first.len() >= 24 && u32::from_be_bytes(first[0..4].try_into().expect("4")) == MAGIC {
        let cluster_bits = u32::from_be_bytes(first[20..24].try_into().expect("4"));
        if (9..=21).contains(&cluster_bits) {
            first = src.head(1usize << cluster_bits)?;
        }
    }
    let h = Header::decode(&first)?;
    let info = judge(&h, src.len(), policy)?;
    Ok((h, info))
}

fn judge(h: &Header, file_size: u64, policy: &InspectPolicy) -> Result<Qcow2Info, InspectError> {
    let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(InspectError::UnknownIncompatibleFeatures(unknown));
    }
    if h.incompatible_features & INCOMPAT_EXTERNAL_DATA_FILE != 0
        || h.extension(EXT_EXTERNAL_DATA_FILE).is_some()
    {
        return Err(InspectError::ExternalDataFile);
    }
    if h.crypt_method != 0 || h.extension(EXT_FULL_DISK_ENCRYPTION).is_some() {
        return Err(InspectError::Encrypted);
    }
    if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
        return Err(InspectError::Corrupt);
    }
    if h.incompatible_features & INCOMPAT_DIRTY != 0 {
        return Err(InspectError::Dirty);
    }
    let backing_file = match &h.backing_file {
        Some(name) => {
            let name =
                String::from_utf8(name.clone()).map_err(|_| InspectError::BackingFileNotUtf8)?;
            if !policy.allow_backing_file {
                return Err(InspectError::BackingFile(name));
            }
            Some(name)
        }
        None => None,
    };
    if h.size > policy.max_virtual_size {
        return Err(InspectError::VirtualSizeTooLarge {
            size: h.size,
            max: policy.max_virtual_size,
        });
    }
    if h.refcount_order > 6 {
        return Err(InspectError::RefcountOrder(h.refcount_order));
    }
    let cs = h.cluster_size();
    let l1 = u64::from(h.l1_size);
    if l1 > MAX_L1_ENTRIES {
        return Err(InspectError::L1Size {
            l1_size: h.l1_size,
            problem: "more than qemu's 32 MiB limit",
        });
    }
    if l1 < h.l1_entries_for(h.size) {
        return Err(InspectError::L1Size {
            l1_size: h.l1_size,
            problem: "too few to map the virtual size",
        });
    }
    let in_file = |table: &'static str, offset: u64, len: u64| {
        let ok = offset.is_multiple_of(cs)
            && offset.checked_add(len).is_some_and(|end| end <= file_size)
            && (len == 0 || offset != 0);
        if ok {
            Ok(())
        } else {
            Err(InspectError::TableOutOfBounds {
                table,
                offset,
                len,
                file_size,
            })
        }
    };
    if l1 > 0 {
        in_file("L1 table", h.l1_table_offset, l1 * 8)?;
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    if h.refcount_table_clusters == 0 || rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
        return Err(InspectError::RefcountTableTooLarge(
            h.refcount_table_clusters,
        ));
    }
    in_file("refcount table", h.refcount_table_offset, rt_bytes)?;
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(InspectError::TooManySnapshots(h.nb_snapshots));
    }
    if h.nb_snapshots > 0 {
        in_file("snapshot table", h.snapshots_offset, 1)?;
    }
    Ok(Qcow2Info {
        version: h.version,
        virtual_size: h.size,
        cluster_size: cs,
        file_size,
        l1_size: h.l1_size,
        refcount_bits: h.refcount_bits(),
        backing_file,
        backing_format: h
            .extension(EXT_BACKING_FORMAT)
            .map(|d| String::from_utf8_lossy(d).into_owned()),
        incompatible_features: h.incompatible_features,
        compatible_features: h.compatible_features,
        nb_snapshots: h.nb_snapshots,
        verified_clusters: 0,
    })
}

fn read_table(f: &File, path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, InspectError> {
    let mut b = vec![0u8; len as usize];
    f.read_exact_at(&mut b, offset).map_err(io_err(path))?;
    Ok(b)
}

fn be64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().expect("8"))
}

/// Counts the references to every cluster (header, refcount table and blocks, L1, L2 and data
/// clusters) and compares them with the recorded refcounts, as `qemu-img check` does. Returns
/// the number of clusters checked.
fn verify_refcounts(
    f: &File,
    h: &Header,
    file_size: u64,
    path: &Path,
) -> Result<u64, InspectError> {
    if h.nb_snapshots > 0 {
        return Err(InspectError::VerifyUnsupported("internal snapshots"));
    }
    if h.extension(EXT_BITMAPS).is_some() {
        return Err(InspectError::VerifyUnsupported("persistent bitmaps"));
    }
    if h.refcount_order < 3 {
        return Err(InspectError::VerifyUnsupported(
            "refcounts narrower than 8 bits",
        ));
    }
    let cs = h.cluster_size();
    let n = file_size.div_ceil(cs);
    if n > MAX_VERIFY_CLUSTERS {
        return Err(InspectError::VerifyUnsupported(
            "images of more than 2^24 clusters",
        ));
    }
    let mut expected = vec![0u64; n as usize];
    let mut mark = |what: &'static str, offset: u64, clusters: u64| {
        let first = offset / cs;
        if !offset.is_multiple_of(cs) || first + clusters > n {
            return Err(InspectError::ReferenceOutOfBounds { what, offset });
        }
        for c in first..first + clusters {
            expected[c as usize] += 1;
        }
        Ok(())
    };
    mark("header", 0, 1)?;
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    mark(
        "refcount table",
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters),
    )?;
    let rt = read_table(f, path, h.refcount_table_offset, rt_len)?;
    let mut blocks = Vec::new();
    for i in 0..(rt_len / 8) as usize {
        let off = be64_at(&rt, i) & !0x1ff;
        if off != 0 {
            mark("refcount block", off, 1)?;
            blocks.push((i as u64, off));
        }
    }
    let l1_len = u64::from(h.l1_size) * 8;
    if h.l1_size > 0 {
        mark("L1 table", h.l1_table_offset, l1_len.div_ceil(cs))?;
    }
    let l1 = read_table(f, path, h.l1_table_offset, l1_len)?;
    let l2_entry = h.l2_entry_size();
    for i in 0..h.l1_size as usize {
        let l2_off = be64_at(&l1, i) & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        mark("L2 table", l2_off, 1)?;
        let l2 = read_table(f, path, l2_off, cs)?;
        for j in 0..(cs / l2_entry) as usize {
            let e = be64_at(&l2, j * (l2_entry as usize / 8));
            if e & L2_COMPRESSED != 0 {
                return Err(InspectError::VerifyUnsupported("compressed clusters"));
            }
            let data = e & OFFSET_MASK;
            if data != 0 {
                mark("data cluster", data, 1)?;
            }
        }
    }
    // Recorded refcounts.
    let bits = h.refcount_bits() as u64;
    let per_block = cs * 8 / bits;
    let mut recorded = vec![0u64; n as usize];
    for (index, off) in blocks {
        let block = read_table(f, path, off, cs)?;
        let bytes = (bits / 8) as usize;
        for k in 0..per_block {
            let c = index * per_block + k;
            if c >= n {
                break;
            }
            let at = k as usize * bytes;
            let mut v = 0u64;
            for b in &block[at..at + bytes] {
                v = (v << 8) | u64::from(*b);
            }
            recorded[c as usize] = v;
        }
    }
    for c in 0..n as usize {
        if expected[c] != recorded[c] {
            return Err(InspectError::RefcountMismatch {
                offset: c as u64 * cs,
                expected: expected[c],
                recorded: recorded[c],
            });
        }
    }
    Ok(n)
}
