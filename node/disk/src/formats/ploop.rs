//! ploop (Virtuozzo; qemu's `parallels`): a 64-byte header and a block allocation table. A
//! ploop delta's parent is named only in `DiskDescriptor.xml`, never inside the image, so
//! an uploaded image is one self-contained delta.

use super::{le32, le64, DiskFormat, Source};
use crate::qcow2::inspect::InspectError;

pub(crate) const MAGIC_V1: &[u8] = b"WithoutFreeSpace";
pub(crate) const MAGIC_V2: &[u8] = b"WithouFreSpacExt";
const HEADER_LEN: usize = 64;
const VERSION: u32 = 2;
/// qemu's limit on the block allocation table.
const MAX_BAT: u32 = (i32::MAX / 4) as u32;

fn malformed(problem: impl Into<String>) -> InspectError {
    super::malformed(DiskFormat::Ploop, problem)
}

/// Checks a ploop image and returns its virtual size.
pub(super) fn check(src: &dyn Source) -> Result<u64, InspectError> {
    let h = src.bytes(0, HEADER_LEN, DiskFormat::Ploop, "header")?;
    let version = le32(&h, 16);
    if version != VERSION {
        return Err(malformed(format!("version {version} is not 2")));
    }
    let cluster_sectors = le32(&h, 28);
    if cluster_sectors == 0 {
        return Err(malformed("the cluster size is 0"));
    }
    let bat = le32(&h, 32);
    if bat > MAX_BAT || HEADER_LEN as u64 + u64::from(bat) * 4 > src.len() {
        return Err(malformed(format!(
            "the block allocation table ({bat} entries) lies outside the file"
        )));
    }
    let sectors = le64(&h, 36);
    sectors
        .checked_mul(512)
        .ok_or_else(|| malformed(format!("{sectors} sectors overflow")))
}

#[cfg(test)]
mod tests {
    use super::super::check as check_as;
    use super::*;

    fn image(magic: &[u8], sectors: u64, bat: u32) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[..16].copy_from_slice(magic);
        b[16..20].copy_from_slice(&VERSION.to_le_bytes());
        b[28..32].copy_from_slice(&2048u32.to_le_bytes());
        b[32..36].copy_from_slice(&bat.to_le_bytes());
        b[36..44].copy_from_slice(&sectors.to_le_bytes());
        b
    }

    #[test]
    fn ploop_images_give_their_size() {
        assert_eq!(
            check_as(&image(MAGIC_V2, 2048 * 8, 8), DiskFormat::Ploop)
                .unwrap()
                .0,
            8 << 20
        );
        assert!(check_as(&image(MAGIC_V1, 2048, 1), DiskFormat::Ploop).is_ok());
        let e = check_as(&image(MAGIC_V2, 2048, 1), DiskFormat::Raw).unwrap_err();
        assert!(
            matches!(
                e,
                InspectError::FormatMismatch {
                    detected: "parallels",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn broken_headers_are_named() {
        let e = check_as(&image(MAGIC_V2, 2048, 100_000), DiskFormat::Ploop).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        let mut b = image(MAGIC_V2, 2048, 1);
        b[16] = 3;
        assert!(check_as(&b, DiskFormat::Ploop)
            .unwrap_err()
            .to_string()
            .contains("version 3"));
        let e = check_as(&image(MAGIC_V2, u64::MAX, 1), DiskFormat::Ploop).unwrap_err();
        assert!(e.to_string().contains("overflow"), "{e}");
        let e = check_as(&MAGIC_V2.to_vec(), DiskFormat::Ploop).unwrap_err();
        assert!(matches!(e, InspectError::Truncated { .. }), "{e}");
    }
}
