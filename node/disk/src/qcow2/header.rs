//! The qcow2 header: the fixed fields, the header extensions and the backing file name, all in
//! the first cluster (qemu `docs/interop/qcow2.txt`). Big-endian on disk.

use thiserror::Error;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// End of the header extension area.
pub const EXT_END: u32 = 0;
/// Backing file format name (`raw`, `qcow2`).
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Feature name table: names for the feature bits, for humans.
pub const EXT_FEATURE_NAME_TABLE: u32 = 0x6803_f857;
/// Persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption (LUKS) header pointer.
pub const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
/// External data file name: guest data lives in another file, named by the image.
pub const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bit 0: refcounts may be inconsistent (lazy refcounts, not closed).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: qemu found corruption and marked the image.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data is in an external data file.
pub const INCOMPAT_EXTERNAL_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Every incompatible feature bit defined by the qcow2 specification.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA_FILE
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2;

/// Length of the version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header without the compression type field.
pub const V3_HEADER_LEN: u32 = 104;
/// Length of the version 3 header with the compression type byte and its padding (what qemu 5.1+
/// writes, and what we write).
pub const V3_HEADER_LEN_WITH_COMPRESSION: u32 = 112;

/// qemu accepts cluster sizes from 512 bytes to 2 MiB.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu refuses backing file names longer than this.
pub const MAX_BACKING_FILE_NAME: usize = 1023;

/// A header decoding failure: the first cluster is not a well-formed qcow2 header.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer bytes than the header needs.
    #[error("the image is truncated: the qcow2 header needs {needed} bytes, the file has {len}")]
    Truncated { needed: usize, len: usize },
    /// Not `QFI\xfb`.
    #[error("not a qcow2 image: the magic is {found:#010x}, qcow2 starts with 0x514649fb")]
    BadMagic { found: u32 },
    /// Only versions 2 and 3 exist.
    #[error("qcow2 version {0} is not supported (2 and 3 are)")]
    UnsupportedVersion(u32),
    /// Cluster bits out of qemu's range.
    #[error("cluster_bits {0} is out of range (qcow2 allows 9 to 21)")]
    ClusterBits(u32),
    /// The header length field is inconsistent with the version or the cluster.
    #[error("header_length {0} is invalid (version 3 needs at least 104, a multiple of 8, inside the first cluster)")]
    HeaderLength(u32),
    /// An extension runs past the first cluster or the area is not terminated.
    #[error("the header extension at byte {offset} runs past the first cluster")]
    Extension { offset: usize },
    /// The backing file name is outside the first cluster or too long.
    #[error("the backing file name ({size} bytes at byte {offset}) is outside the first cluster or longer than 1023 bytes")]
    BackingFileName { offset: u64, size: u32 },
    /// Encoding: the backing file name would overlap the header extensions.
    #[error("the backing file name at byte {offset} overlaps the header extensions, which end at byte {ext_end}")]
    Layout { offset: u64, ext_end: usize },
}

/// One header extension, other than the end marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The decoded first cluster of a qcow2 image. Fields are named as in the specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// Extensions in file order, without the end marker.
    pub extensions: Vec<Extension>,
    /// The backing file name, as stored (not NUL-terminated).
    pub backing_file: Option<Vec<u8>>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

impl Header {
    /// Bytes in one cluster.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Bits per refcount entry.
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order
    }

    /// Bytes per L2 entry (16 with extended L2 entries).
    pub fn l2_entry_size(&self) -> u64 {
        if self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 {
            16
        } else {
            8
        }
    }

    /// The L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let l2_entries = self.cluster_size() / self.l2_entry_size();
        size.div_ceil(self.cluster_size() * l2_entries)
    }

    /// The payload of an extension, first of its kind.
    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// Where the extension area (including the end marker) ends.
    pub fn extensions_end(&self) -> usize {
        let mut at = self.header_length as usize;
        for e in &self.extensions {
            at += 8 + pad8(e.data.len());
        }
        at + 8
    }

    /// Sets `backing_file_offset` and `backing_file_size` so the name follows the extensions.
    pub fn place_backing_file(&mut self) {
        match &self.backing_file {
            Some(name) => {
                self.backing_file_offset = self.extensions_end() as u64;
                self.backing_file_size = name.len() as u32;
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
    }

    /// Encodes a version 3 header, its extensions and its backing file name, as they sit at the
    /// start of the first cluster. The backing file name goes at `backing_file_offset`.
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        if self.version != 3 {
            return Err(HeaderError::UnsupportedVersion(self.version));
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(HeaderError::ClusterBits(self.cluster_bits));
        }
        let hl = self.header_length;
        if hl < V3_HEADER_LEN || !hl.is_multiple_of(8) || u64::from(hl) > self.cluster_size() {
            return Err(HeaderError::HeaderLength(hl));
        }
        let ext_end = self.extensions_end();
        let mut b = Vec::with_capacity(ext_end + self.backing_file_size as usize);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        b.extend_from_slice(&self.backing_file_size.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        b.extend_from_slice(&self.incompatible_features.to_be_bytes());
        b.extend_from_slice(&self.compatible_features.to_be_bytes());
        b.extend_from_slice(&self.autoclear_features.to_be_bytes());
        b.extend_from_slice(&self.refcount_order.to_be_bytes());
        b.extend_from_slice(&hl.to_be_bytes());
        if hl >= V3_HEADER_LEN_WITH_COMPRESSION {
            b.push(self.compression_type);
        }
        b.resize(hl as usize, 0);
        for e in &self.extensions {
            b.extend_from_slice(&e.kind.to_be_bytes());
            b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            b.extend_from_slice(&e.data);
            b.resize(pad8(b.len()), 0);
        }
        b.extend_from_slice(&EXT_END.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        debug_assert_eq!(b.len(), ext_end);
        if let Some(name) = &self.backing_file {
            let off = self.backing_file_offset;
            if off < ext_end as u64 {
                return Err(HeaderError::Layout {
                    offset: off,
                    ext_end,
                });
            }
            let end = off + name.len() as u64;
            if name.len() > MAX_BACKING_FILE_NAME
                || name.len() as u64 != u64::from(self.backing_file_size)
                || end > self.cluster_size()
            {
                return Err(HeaderError::BackingFileName {
                    offset: off,
                    size: self.backing_file_size,
                });
            }
            b.resize(off as usize, 0);
            b.extend_from_slice(name);
        }
        Ok(b)
    }

    /// Decodes the header from the first bytes of an image: at least the first cluster, or the
    /// whole file if it is shorter. Checks the layout only; policy is the inspector's business.
    pub fn decode(b: &[u8]) -> Result<Header, HeaderError> {
        let need = |n: usize| {
            if b.len() < n {
                Err(HeaderError::Truncated {
                    needed: n,
                    len: b.len(),
                })
            } else {
                Ok(())
            }
        };
        need(8)?;
        let magic = be32(b, 0);
        if magic != MAGIC {
            return Err(HeaderError::BadMagic { found: magic });
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        need(V2_HEADER_LEN as usize)?;
        let cluster_bits = be32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::ClusterBits(cluster_bits));
        }
        let cluster_size = 1usize << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits,
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            need(V3_HEADER_LEN as usize)?;
            h.incompatible_features = be64(b, 72);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            let hl = h.header_length;
            if hl < V3_HEADER_LEN || !hl.is_multiple_of(8) || hl as usize > cluster_size {
                return Err(HeaderError::HeaderLength(hl));
            }
            need(hl as usize)?;
            if hl >= V3_HEADER_LEN_WITH_COMPRESSION {
                h.compression_type = b[104];
            }
        }
        // Extensions: within the first cluster, terminated by an end marker.
        let limit = cluster_size.min(b.len());
        let mut at = h.header_length as usize;
        loop {
            if at + 8 > limit {
                if b.len() < cluster_size && at + 8 > b.len() {
                    return Err(HeaderError::Truncated {
                        needed: at + 8,
                        len: b.len(),
                    });
                }
                return Err(HeaderError::Extension { offset: at });
            }
            let kind = be32(b, at);
            let len = be32(b, at + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let end = (at + 8)
                .checked_add(len)
                .ok_or(HeaderError::Extension { offset: at })?;
            if end > limit {
                return Err(HeaderError::Extension { offset: at });
            }
            h.extensions.push(Extension {
                kind,
                data: b[at + 8..end].to_vec(),
            });
            at += 8 + pad8(len);
        }
        if h.backing_file_offset != 0 {
            let off = h.backing_file_offset;
            let size = h.backing_file_size;
            let end = off.checked_add(u64::from(size));
            match end {
                Some(end)
                    if size as usize <= MAX_BACKING_FILE_NAME && end <= cluster_size as u64 =>
                {
                    if end as usize > b.len() {
                        return Err(HeaderError::Truncated {
                            needed: end as usize,
                            len: b.len(),
                        });
                    }
                    h.backing_file = Some(b[off as usize..end as usize].to_vec());
                }
                _ => return Err(HeaderError::BackingFileName { offset: off, size }),
            }
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn arb_header() -> impl Strategy<Value = Header> {
        (
            (
                12u32..=21,
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
            ),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                0u32..=6,
                any::<bool>(),
                any::<u8>(),
            ),
            proptest::collection::vec(
                (
                    1u32..=u32::MAX,
                    proptest::collection::vec(any::<u8>(), 0..40),
                ),
                0..4,
            ),
            proptest::option::of(proptest::collection::vec(1u8..=255, 1..200)),
        )
            .prop_map(|(a, b, exts, backing)| {
                let (cb, size, crypt, l1, l1o, rto, rtc, nbs, so) = a;
                let (inc, comp, auto, ro, with_ct, ct) = b;
                let mut h = Header {
                    version: 3,
                    backing_file_offset: 0,
                    backing_file_size: 0,
                    cluster_bits: cb,
                    size,
                    crypt_method: crypt,
                    l1_size: l1,
                    l1_table_offset: l1o,
                    refcount_table_offset: rto,
                    refcount_table_clusters: rtc,
                    nb_snapshots: nbs,
                    snapshots_offset: so,
                    incompatible_features: inc,
                    compatible_features: comp,
                    autoclear_features: auto,
                    refcount_order: ro,
                    header_length: if with_ct {
                        V3_HEADER_LEN_WITH_COMPRESSION
                    } else {
                        V3_HEADER_LEN
                    },
                    compression_type: if with_ct { ct } else { 0 },
                    extensions: exts
                        .into_iter()
                        .map(|(kind, data)| Extension { kind, data })
                        .collect(),
                    backing_file: backing,
                };
                h.place_backing_file();
                h
            })
    }

    proptest! {
        /// Every well-laid-out version 3 header survives encode then decode unchanged.
        #[test]
        fn encode_decode_round_trip(h in arb_header()) {
            let mut bytes = h.encode().unwrap();
            // Decoding reads the first cluster; pad as a file would be.
            bytes.resize(h.cluster_size() as usize, 0);
            prop_assert_eq!(Header::decode(&bytes).unwrap(), h);
        }

        /// Decoding arbitrary bytes never panics.
        #[test]
        fn decode_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..512), v3 in any::<bool>()) {
            if bytes.len() >= 8 && v3 {
                bytes[..4].copy_from_slice(&MAGIC.to_be_bytes());
                bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
            }
            let _ = Header::decode(&bytes);
        }
    }

    #[test]
    fn bad_magic_and_truncation_are_named() {
        assert_eq!(
            Header::decode(b"QFI\0\0\0\0\x03"),
            Err(HeaderError::BadMagic { found: 0x5146_4900 })
        );
        let mut b = MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&3u32.to_be_bytes());
        b.resize(80, 0);
        b[23] = 16;
        assert_eq!(
            Header::decode(&b),
            Err(HeaderError::Truncated {
                needed: 104,
                len: 80
            })
        );
    }
}
