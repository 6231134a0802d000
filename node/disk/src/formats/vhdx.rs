//! VHDX: a file type identifier, two headers, a region table at 192 KiB naming the block
//! allocation table and the metadata region, whose items give the virtual size and say whether
//! the disk has a parent (a differencing disk: refused).

use super::{le16, le32, le64, DiskFormat, Source};
use crate::qcow2::inspect::InspectError;

pub(crate) const FILE_SIGNATURE: &[u8] = b"vhdxfile";
const REGION_TABLE_AT: u64 = 192 << 10;
const REGION_TABLE_LEN: usize = 64 << 10;
const MAX_ENTRIES: u32 = 2047;
const METADATA_TABLE_LEN: usize = 64 << 10;

/// GUIDs as they lie on disk (the first three fields little-endian).
const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

pub(crate) const BAT_REGION: [u8; 16] = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
pub(crate) const METADATA_REGION: [u8; 16] = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
pub(crate) const FILE_PARAMETERS: [u8; 16] = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
pub(crate) const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
pub(crate) const PARENT_LOCATOR: [u8; 16] = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
const HAS_PARENT: u32 = 1 << 1;

fn malformed(problem: impl Into<String>) -> InspectError {
    super::malformed(DiskFormat::Vhdx, problem)
}

/// Checks a vhdx and returns its virtual size.
pub(super) fn check(src: &dyn Source) -> Result<u64, InspectError> {
    let rt = src.bytes(
        REGION_TABLE_AT,
        REGION_TABLE_LEN,
        DiskFormat::Vhdx,
        "region table",
    )?;
    if &rt[..4] != b"regi" {
        return Err(malformed("no region table (`regi`) at 192 KiB"));
    }
    let count = le32(&rt, 8);
    if count > MAX_ENTRIES {
        return Err(malformed(format!("the region table has {count} entries")));
    }
    let mut metadata = None;
    for i in 0..count as usize {
        let e = &rt[16 + i * 32..16 + (i + 1) * 32];
        let (offset, length, required) = (le64(e, 16), le32(e, 24), le32(e, 28) & 1 != 0);
        if e[..16] == METADATA_REGION {
            metadata = Some((offset, length));
        } else if e[..16] != BAT_REGION && required {
            // qemu refuses regions it does not know that the file says it needs.
            return Err(malformed(
                "the region table names an unknown required region",
            ));
        }
    }
    let (md_offset, md_len) = metadata.ok_or_else(|| malformed("no metadata region"))?;
    if (md_len as usize) < METADATA_TABLE_LEN {
        return Err(malformed(format!(
            "the metadata region is {md_len} bytes, less than its 64 KiB table"
        )));
    }
    let md = src.bytes(
        md_offset,
        METADATA_TABLE_LEN,
        DiskFormat::Vhdx,
        "metadata table",
    )?;
    if &md[..8] != b"metadata" {
        return Err(malformed(format!(
            "no metadata table (`metadata`) at byte {md_offset}"
        )));
    }
    let entries = u32::from(le16(&md, 10));
    if entries > MAX_ENTRIES {
        return Err(malformed(format!(
            "the metadata table has {entries} entries"
        )));
    }
    let mut size = None;
    let mut flags = None;
    for i in 0..entries as usize {
        let e = &md[32 + i * 32..32 + (i + 1) * 32];
        let (item_offset, item_len) = (le32(e, 16), le32(e, 20));
        let item = |want: usize, what| {
            if (item_len as usize) < want || item_offset < METADATA_TABLE_LEN as u32 {
                return Err(malformed(format!("the {what} item is misplaced")));
            }
            src.bytes(
                md_offset + u64::from(item_offset),
                want,
                DiskFormat::Vhdx,
                what,
            )
        };
        if e[..16] == PARENT_LOCATOR {
            return Err(InspectError::ParentImage {
                format: DiskFormat::Vhdx,
                detail: "its metadata holds a parent locator".into(),
            });
        } else if e[..16] == VIRTUAL_DISK_SIZE {
            size = Some(le64(&item(8, "virtual disk size")?, 0));
        } else if e[..16] == FILE_PARAMETERS {
            flags = Some(le32(&item(8, "file parameters")?, 4));
        }
    }
    let flags = flags.ok_or_else(|| malformed("no file parameters item"))?;
    if flags & HAS_PARENT != 0 {
        return Err(InspectError::ParentImage {
            format: DiskFormat::Vhdx,
            detail: "its file parameters say it has a parent".into(),
        });
    }
    size.ok_or_else(|| malformed("no virtual disk size item"))
}

#[cfg(test)]
mod tests {
    use super::super::check as check_as;
    use super::*;

    /// A minimal vhdx: identifier, region table with BAT and metadata, metadata at 1 MiB.
    fn image(size: u64, flags: u32, extra: Option<[u8; 16]>) -> Vec<u8> {
        let md_at = 1usize << 20;
        let mut b = vec![0u8; md_at + (1 << 20)];
        b[..8].copy_from_slice(FILE_SIGNATURE);
        let rt = REGION_TABLE_AT as usize;
        b[rt..rt + 4].copy_from_slice(b"regi");
        b[rt + 8..rt + 12].copy_from_slice(&2u32.to_le_bytes());
        let mut region = |i: usize, id: [u8; 16], off: u64, len: u32| {
            let e = rt + 16 + i * 32;
            b[e..e + 16].copy_from_slice(&id);
            b[e + 16..e + 24].copy_from_slice(&off.to_le_bytes());
            b[e + 24..e + 28].copy_from_slice(&len.to_le_bytes());
            b[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes());
        };
        region(0, BAT_REGION, 3 << 20, 1 << 20);
        region(1, METADATA_REGION, md_at as u64, 1 << 20);
        b[md_at..md_at + 8].copy_from_slice(b"metadata");
        let n = if extra.is_some() { 3u16 } else { 2 };
        b[md_at + 10..md_at + 12].copy_from_slice(&n.to_le_bytes());
        let mut item = |i: usize, id: [u8; 16], data: &[u8]| {
            let e = md_at + 32 + i * 32;
            let off = 65536 + i * 64;
            b[e..e + 16].copy_from_slice(&id);
            b[e + 16..e + 20].copy_from_slice(&(off as u32).to_le_bytes());
            b[e + 20..e + 24].copy_from_slice(&(data.len() as u32).to_le_bytes());
            b[md_at + off..md_at + off + data.len()].copy_from_slice(data);
        };
        let mut fp = (32u32 << 20).to_le_bytes().to_vec();
        fp.extend(flags.to_le_bytes());
        item(0, FILE_PARAMETERS, &fp);
        item(1, VIRTUAL_DISK_SIZE, &size.to_le_bytes());
        if let Some(id) = extra {
            item(2, id, &[0u8; 24]);
        }
        b
    }

    #[test]
    fn a_plain_vhdx_gives_its_virtual_size() {
        let b = image(10 << 30, 0, None);
        assert_eq!(check_as(&b, DiskFormat::Vhdx).unwrap().0, 10 << 30);
        let e = check_as(&b, DiskFormat::Raw).unwrap_err();
        assert!(
            matches!(
                e,
                InspectError::FormatMismatch {
                    detected: "vhdx",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn differencing_vhdx_is_refused() {
        let e = check_as(&image(1 << 30, HAS_PARENT, None), DiskFormat::Vhdx).unwrap_err();
        assert!(matches!(e, InspectError::ParentImage { .. }), "{e}");
        let e = check_as(&image(1 << 30, 0, Some(PARENT_LOCATOR)), DiskFormat::Vhdx).unwrap_err();
        assert!(e.to_string().contains("parent locator"), "{e}");
    }

    #[test]
    fn broken_tables_are_named() {
        let mut b = image(1 << 30, 0, None);
        b[REGION_TABLE_AT as usize] = b'x';
        let e = check_as(&b, DiskFormat::Vhdx).unwrap_err();
        assert!(e.to_string().contains("regi"), "{e}");
        let mut b = image(1 << 30, 0, None);
        b[1 << 20] = b'x';
        let e = check_as(&b, DiskFormat::Vhdx).unwrap_err();
        assert!(e.to_string().contains("metadata table"), "{e}");
        let b = image(1 << 30, 0, None);
        let e = check_as(&b[..300_000].to_vec(), DiskFormat::Vhdx).unwrap_err();
        assert!(matches!(e, InspectError::Truncated { .. }), "{e}");
        let e = check_as(&image(1 << 50, 0, None), DiskFormat::Vhdx).unwrap_err();
        assert!(matches!(e, InspectError::VirtualSizeTooLarge { .. }), "{e}");
        let mut unknown = image(1 << 30, 0, None);
        let e = REGION_TABLE_AT as usize + 16;
        unknown[e] ^= 0xff;
        let err = check_as(&unknown, DiskFormat::Vhdx).unwrap_err();
        assert!(err.to_string().contains("unknown required region"), "{err}");
    }
}
