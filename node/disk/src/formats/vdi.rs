//! VDI (VirtualBox): a 512-byte header. qemu opens dynamic and fixed images; undo and
//! differencing images, and any image linked to a parent, are refused.

use super::{le32, le64, DiskFormat, Source};
use crate::qcow2::inspect::InspectError;

pub(crate) const SIGNATURE: u32 = 0xbeda_107f;
pub(crate) const SIGNATURE_AT: usize = 0x40;
const HEADER_LEN: usize = 0x200;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_FIXED: u32 = 2;
const TYPE_UNDO: u32 = 3;
const TYPE_DIFF: u32 = 4;
/// qemu's limit on the block map (`VDI_BLOCKS_IN_IMAGE_MAX`).
const MAX_BLOCKS: u32 = 0x3fff_ffff;

fn malformed(problem: impl Into<String>) -> InspectError {
    super::malformed(DiskFormat::Vdi, problem)
}

/// Checks a vdi and returns its virtual size.
pub(super) fn check(src: &dyn Source) -> Result<u64, InspectError> {
    let h = src.bytes(0, HEADER_LEN, DiskFormat::Vdi, "header")?;
    let version = le32(&h, 0x44);
    if version >> 16 != 1 {
        return Err(malformed(format!("version {version:#x} is not 1.x")));
    }
    match le32(&h, 0x4c) {
        TYPE_DYNAMIC | TYPE_FIXED => {}
        t @ (TYPE_UNDO | TYPE_DIFF) => {
            return Err(InspectError::ParentImage {
                format: DiskFormat::Vdi,
                detail: format!("image type {t} is an undo or differencing image"),
            })
        }
        t => {
            return Err(malformed(format!(
                "image type {t} is not dynamic (1) or fixed (2)"
            )))
        }
    }
    // uuid_link and uuid_parent: a stand-alone image links to nothing.
    if h[0x1a8..0x1c8].iter().any(|b| *b != 0) {
        return Err(InspectError::ParentImage {
            format: DiskFormat::Vdi,
            detail: "the header links to a parent image".into(),
        });
    }
    let sector_size = le32(&h, 0x168);
    if sector_size != 512 {
        return Err(malformed(format!("sector size {sector_size} is not 512")));
    }
    let (bmap_at, blocks) = (le32(&h, 0x154), le32(&h, 0x180));
    if blocks > MAX_BLOCKS {
        return Err(malformed(format!(
            "{blocks} blocks is more than qemu allows"
        )));
    }
    if u64::from(bmap_at) + u64::from(blocks) * 4 > src.len() {
        return Err(malformed(format!(
            "the block map at byte {bmap_at} ({blocks} blocks) lies outside the file"
        )));
    }
    Ok(le64(&h, 0x170))
}

#[cfg(test)]
mod tests {
    use super::super::check as check_as;
    use super::*;

    fn image(kind: u32, size: u64) -> Vec<u8> {
        let mut b = vec![0u8; 0x400];
        b[..0x28].copy_from_slice(b"<<< Oracle VM VirtualBox Disk Image >>>\n");
        b[0x40..0x44].copy_from_slice(&SIGNATURE.to_le_bytes());
        b[0x44..0x48].copy_from_slice(&0x0001_0001u32.to_le_bytes());
        b[0x48..0x4c].copy_from_slice(&0x190u32.to_le_bytes());
        b[0x4c..0x50].copy_from_slice(&kind.to_le_bytes());
        b[0x154..0x158].copy_from_slice(&0x200u32.to_le_bytes());
        b[0x158..0x15c].copy_from_slice(&0x400u32.to_le_bytes());
        b[0x168..0x16c].copy_from_slice(&512u32.to_le_bytes());
        b[0x170..0x178].copy_from_slice(&size.to_le_bytes());
        b[0x178..0x17c].copy_from_slice(&(1u32 << 20).to_le_bytes());
        let blocks = size.div_ceil(1 << 20) as u32;
        b[0x180..0x184].copy_from_slice(&blocks.to_le_bytes());
        b[0x188] = 7;
        b.resize(0x200 + (blocks as usize * 4).max(0x200), 0xff);
        b
    }

    #[test]
    fn dynamic_and_fixed_images_give_their_size() {
        assert_eq!(
            check_as(&image(1, 64 << 20), DiskFormat::Vdi).unwrap().0,
            64 << 20
        );
        assert!(check_as(&image(2, 8 << 20), DiskFormat::Vdi).is_ok());
        let e = check_as(&image(1, 1 << 20), DiskFormat::Raw).unwrap_err();
        assert!(
            matches!(
                e,
                InspectError::FormatMismatch {
                    detected: "vdi",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn differencing_undo_and_linked_images_are_refused() {
        for t in [TYPE_UNDO, TYPE_DIFF] {
            let e = check_as(&image(t, 1 << 20), DiskFormat::Vdi).unwrap_err();
            assert!(matches!(e, InspectError::ParentImage { .. }), "{e}");
        }
        let mut linked = image(1, 1 << 20);
        linked[0x1a8] = 1;
        let e = check_as(&linked, DiskFormat::Vdi).unwrap_err();
        assert!(e.to_string().contains("parent"), "{e}");
    }

    #[test]
    fn broken_headers_are_named() {
        let mut b = image(1, 1 << 20);
        b[0x46] = 2;
        assert!(check_as(&b, DiskFormat::Vdi)
            .unwrap_err()
            .to_string()
            .contains("version"));
        let mut b = image(1, 1 << 20);
        b[0x180..0x184].copy_from_slice(&0x1000_0000u32.to_le_bytes());
        assert!(check_as(&b, DiskFormat::Vdi)
            .unwrap_err()
            .to_string()
            .contains("outside"));
        let b = image(9, 1 << 20);
        assert!(check_as(&b, DiskFormat::Vdi)
            .unwrap_err()
            .to_string()
            .contains("type 9"));
        let e = check_as(&image(1, 1 << 20)[..0x100].to_vec(), DiskFormat::Vdi).unwrap_err();
        assert!(matches!(e, InspectError::Truncated { .. }), "{e}");
    }
}
