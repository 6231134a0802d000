//! VHD (Virtual PC, qemu's `vpc`): a 512-byte footer at the end of every file, copied to the
//! start of dynamic and differencing disks. Differencing disks name their parent: refused.

use super::{be32, be64, DiskFormat, Source};
use crate::qcow2::inspect::InspectError;

pub(crate) const COOKIE: &[u8] = b"conectix";
const FOOTER_LEN: usize = 512;
const DYNAMIC_COOKIE: &[u8] = b"cxsparse";
const DYNAMIC_HEADER_LEN: usize = 1024;
const VERSION: u32 = 0x0001_0000;
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;
/// qemu's limit on the block allocation table (`VHD_MAX_SECTORS` / smallest block).
const MAX_BAT_ENTRIES: u32 = 1 << 24;

fn malformed(problem: impl Into<String>) -> InspectError {
    super::malformed(DiskFormat::Vhd, problem)
}

/// The footer's checksum: the one's complement of the sum of its bytes, checksum field zeroed.
pub(crate) fn checksum(footer: &[u8]) -> u32 {
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |s, (_, b)| s.wrapping_add(u32::from(*b)));
    !sum
}

/// Checks a vhd and returns its virtual size.
pub(super) fn check(src: &dyn Source) -> Result<u64, InspectError> {
    let len = src.len();
    let head = src.head(FOOTER_LEN)?;
    let at_start = head.starts_with(COOKIE);
    let footer = if at_start {
        src.bytes(0, FOOTER_LEN, DiskFormat::Vhd, "footer copy")?
    } else {
        let tail = len
            .checked_sub(FOOTER_LEN as u64)
            .map(|at| src.bytes(at, FOOTER_LEN, DiskFormat::Vhd, "footer"))
            .transpose()?;
        match tail {
            Some(t) if t.starts_with(COOKIE) => t,
            _ => {
                return Err(InspectError::MissingSignature {
                    claimed: DiskFormat::Vhd,
                    expected: "a VHD footer (`conectix` at the start or in the last 512 bytes)",
                })
            }
        }
    };
    if checksum(&footer) != be32(&footer, 64) {
        return Err(malformed("the footer checksum does not match its bytes"));
    }
    let version = be32(&footer, 12);
    if version != VERSION {
        return Err(malformed(format!(
            "file format version {version:#x} is not 1.0"
        )));
    }
    let current_size = be64(&footer, 48);
    match be32(&footer, 60) {
        TYPE_FIXED => {
            // The data comes first and is the disk; the footer alone follows it.
            if at_start || current_size.checked_add(FOOTER_LEN as u64) != Some(len) {
                return Err(malformed(format!(
                    "a fixed disk of {current_size} bytes is a {}-byte file, this one has {len}",
                    current_size.saturating_add(FOOTER_LEN as u64)
                )));
            }
        }
        TYPE_DYNAMIC => check_dynamic(src, &footer)?,
        TYPE_DIFFERENCING => {
            return Err(InspectError::ParentImage {
                format: DiskFormat::Vhd,
                detail: "disk type 4 names a parent disk".into(),
            })
        }
        other => {
            return Err(malformed(format!(
                "disk type {other} is not fixed (2), dynamic (3) or differencing (4)"
            )))
        }
    }
    Ok(current_size)
}

fn check_dynamic(src: &dyn Source, footer: &[u8]) -> Result<(), InspectError> {
    let data_offset = be64(footer, 16);
    let h = src.bytes(
        data_offset,
        DYNAMIC_HEADER_LEN,
        DiskFormat::Vhd,
        "dynamic disk header",
    )?;
    if !h.starts_with(DYNAMIC_COOKIE) {
        return Err(malformed(format!(
            "no dynamic disk header (`cxsparse`) at byte {data_offset}"
        )));
    }
    // A dynamic disk has no parent: the parent's id and its eight locators stay empty.
    let parent_named =
        h[40..56].iter().any(|b| *b != 0) || (0..8).any(|i| be32(&h, 576 + i * 24) != 0);
    if parent_named {
        return Err(InspectError::ParentImage {
            format: DiskFormat::Vhd,
            detail: "the dynamic disk header names a parent".into(),
        });
    }
    let table_offset = be64(&h, 16);
    let entries = be32(&h, 28);
    let block_size = be32(&h, 32);
    if !block_size.is_power_of_two() || block_size < 512 {
        return Err(malformed(format!(
            "block size {block_size} is not a power of two of at least 512"
        )));
    }
    if entries > MAX_BAT_ENTRIES {
        return Err(malformed(format!(
            "the block allocation table has {entries} entries, more than qemu allows"
        )));
    }
    let fits = table_offset
        .checked_add(u64::from(entries) * 4)
        .is_some_and(|end| end <= src.len());
    if !fits {
        return Err(malformed(format!(
            "the block allocation table at byte {table_offset} ({entries} entries) lies \
             outside the file"
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::check as check_as;
    use super::*;

    /// A footer of `disk_type` for a disk of `size` bytes, checksum set.
    pub(crate) fn footer(disk_type: u32, size: u64, data_offset: u64) -> Vec<u8> {
        let mut f = vec![0u8; FOOTER_LEN];
        f[..8].copy_from_slice(COOKIE);
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&VERSION.to_be_bytes());
        f[16..24].copy_from_slice(&data_offset.to_be_bytes());
        f[40..48].copy_from_slice(&size.to_be_bytes());
        f[48..56].copy_from_slice(&size.to_be_bytes());
        f[60..64].copy_from_slice(&disk_type.to_be_bytes());
        let c = checksum(&f);
        f[64..68].copy_from_slice(&c.to_be_bytes());
        f
    }

    fn fixed(size: u64) -> Vec<u8> {
        let mut b = vec![0u8; size as usize];
        b.extend(footer(TYPE_FIXED, size, u64::MAX));
        b
    }

    /// footer copy, dynamic header at 512, BAT at 1536, footer at the end.
    fn dynamic(size: u64, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let f = footer(TYPE_DYNAMIC, size, 512);
        let mut b = f.clone();
        let mut h = vec![0u8; DYNAMIC_HEADER_LEN];
        h[..8].copy_from_slice(DYNAMIC_COOKIE);
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&1536u64.to_be_bytes());
        let entries = size.div_ceil(2 << 20) as u32;
        h[28..32].copy_from_slice(&entries.to_be_bytes());
        h[32..36].copy_from_slice(&(2u32 << 20).to_be_bytes());
        edit(&mut h);
        b.extend(h);
        b.extend(vec![0xffu8; (entries as usize * 4).next_multiple_of(512)]);
        b.extend(f);
        b
    }

    #[test]
    fn fixed_and_dynamic_disks_are_accepted_with_their_size() {
        assert_eq!(check_as(&fixed(4096), DiskFormat::Vhd).unwrap().0, 4096);
        let d = dynamic(64 << 20, |_| {});
        assert_eq!(check_as(&d, DiskFormat::Vhd).unwrap().0, 64 << 20);
        // qemu probes a dynamic vhd as vpc: it is not raw.
        let e = check_as(&d, DiskFormat::Raw).unwrap_err();
        assert!(
            matches!(
                e,
                InspectError::FormatMismatch {
                    detected: "vpc",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn differencing_disks_and_parents_are_refused() {
        let mut diff = footer(TYPE_DIFFERENCING, 1 << 20, 512);
        diff.extend(vec![0u8; 2048]);
        let e = check_as(&diff, DiskFormat::Vhd).unwrap_err();
        assert!(matches!(e, InspectError::ParentImage { .. }), "{e}");
        assert!(e.to_string().contains("self-contained"), "{e}");
        // A "dynamic" disk whose header carries a parent locator is one too.
        let d = dynamic(8 << 20, |h| h[576..580].copy_from_slice(b"W2ku"));
        let e = check_as(&d, DiskFormat::Vhd).unwrap_err();
        assert!(matches!(e, InspectError::ParentImage { .. }), "{e}");
        let d = dynamic(8 << 20, |h| h[40] = 1);
        assert!(matches!(
            check_as(&d, DiskFormat::Vhd).unwrap_err(),
            InspectError::ParentImage { .. }
        ));
    }

    #[test]
    fn broken_footers_are_named() {
        let mut b = fixed(4096);
        let n = b.len();
        b[n - 1] ^= 1;
        let e = check_as(&b, DiskFormat::Vhd).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        // The footer says 8192 bytes of data but the file holds 4096.
        let mut short = vec![0u8; 4096];
        short.extend(footer(TYPE_FIXED, 8192, u64::MAX));
        let e = check_as(&short, DiskFormat::Vhd).unwrap_err();
        assert!(e.to_string().contains("fixed disk"), "{e}");
        let e = check_as(&vec![0u8; 4096], DiskFormat::Vhd).unwrap_err();
        assert!(e.to_string().contains("conectix"), "{e}");
        let d = dynamic(8 << 20, |h| h[..8].copy_from_slice(b"notspars"));
        let e = check_as(&d, DiskFormat::Vhd).unwrap_err();
        assert!(e.to_string().contains("cxsparse"), "{e}");
        let d = dynamic(8 << 20, |h| {
            h[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes())
        });
        let e = check_as(&d, DiskFormat::Vhd).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        let mut t = footer(7, 4096, u64::MAX);
        t.extend(vec![0u8; 512]);
        let e = check_as(&t, DiskFormat::Vhd).unwrap_err();
        assert!(e.to_string().contains("disk type 7"), "{e}");
    }
}
