//! The formats qemu sees as raw bytes but Glance names by what they boot: kernels (`aki`),
//! ramdisks (`ari`) and CD images (`iso`). Each must carry its own signature.

use super::{le32, DiskFormat, Source};
use crate::qcow2::inspect::InspectError;

/// `HdrS`, the x86 Linux boot protocol's header signature, at 0x202 in every bzImage.
const BZIMAGE_MAGIC: (usize, &[u8]) = (0x202, b"HdrS");
/// arm64 `Image`: `ARM\x64` at 0x38 (Documentation/arch/arm64/booting.rst).
const ARM64_MAGIC: (usize, u32) = (0x38, 0x644d_5241);
/// riscv `Image`: `RSC\x05` at 0x38 (Documentation/arch/riscv/boot-image-header.rst).
const RISCV_MAGIC: (usize, u32) = (0x38, 0x0543_5352);

/// Checks that an `aki` image is a Linux kernel.
pub(super) fn check_kernel(src: &dyn Source) -> Result<(), InspectError> {
    let h = src.head(0x206)?;
    let at = |off: usize, magic: &[u8]| h.get(off..off + magic.len()) == Some(magic);
    let le_at = |(off, magic): (usize, u32)| h.len() >= off + 4 && le32(&h, off) == magic;
    if at(BZIMAGE_MAGIC.0, BZIMAGE_MAGIC.1) || le_at(ARM64_MAGIC) || le_at(RISCV_MAGIC) {
        Ok(())
    } else {
        Err(InspectError::MissingSignature {
            claimed: DiskFormat::Aki,
            expected: "a Linux kernel (an x86 bzImage with `HdrS` at byte 0x202, or an arm64 \
                       or riscv Image)",
        })
    }
}

/// The first bytes of the things an initramfs may be: compressed (gzip, xz, zstd, lz4,
/// bzip2, lzo) or a plain cpio archive (new ASCII, with CRC, or old ASCII).
const RAMDISK_MAGICS: [&[u8]; 11] = [
    b"\x1f\x8b",
    b"\xfd7zXZ\0",
    b"\x28\xb5\x2f\xfd",
    b"\x02\x21\x4c\x18",
    b"\x04\x22\x4d\x18",
    b"BZh",
    b"\x89LZO\0",
    b"070701",
    b"070702",
    b"070707",
    // lzma "alone" streams as the kernel's lzma decompressor reads them (lc=3, lp=0, pb=2).
    b"\x5d\0\0",
];

/// Checks that an `ari` image is a ramdisk (initramfs).
pub(super) fn check_ramdisk(src: &dyn Source) -> Result<(), InspectError> {
    let h = src.head(6)?;
    if RAMDISK_MAGICS.iter().any(|m| h.starts_with(m)) {
        Ok(())
    } else {
        Err(InspectError::MissingSignature {
            claimed: DiskFormat::Ari,
            expected: "a ramdisk (a gzip, xz, zstd, lz4, bzip2, lzo or lzma stream, or a cpio \
                       archive)",
        })
    }
}

/// Where the first volume descriptor's standard identifier sits: sector 16 of 2048 bytes,
/// after its one-byte type.
pub(super) const ISO_ID_AT: u64 = 0x8001;

/// Checks that an `iso` image is an ISO 9660 (or UDF bridge) file system.
pub(super) fn check_iso(src: &dyn Source) -> Result<(), InspectError> {
    let missing = InspectError::MissingSignature {
        claimed: DiskFormat::Iso,
        expected: "an ISO 9660 volume descriptor (`CD001` at byte 0x8001)",
    };
    if src.len() < ISO_ID_AT + 5 {
        return Err(missing);
    }
    let id = src.bytes(ISO_ID_AT, 5, DiskFormat::Iso, "volume descriptor")?;
    // UDF images open with an extended area (`BEA01`) where ISO 9660 puts `CD001`.
    if id == b"CD001" || id == b"BEA01" {
        Ok(())
    } else {
        Err(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::super::check;
    use super::*;

    fn with(len: usize, at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    }

    #[test]
    fn kernels_are_recognised_by_their_boot_headers() {
        let bz = with(8192, 0x202, b"HdrS");
        assert_eq!(check(&bz, DiskFormat::Aki).unwrap().0, 8192);
        let arm = with(4096, 0x38, b"ARMd");
        assert!(check(&arm, DiskFormat::Aki).is_ok());
        let riscv = with(4096, 0x38, b"RSC\x05");
        assert!(check(&riscv, DiskFormat::Aki).is_ok());
        for not in [vec![0u8; 8192], with(8192, 0x200, b"HdrS"), vec![0u8; 10]] {
            let e = check(&not, DiskFormat::Aki).unwrap_err();
            assert!(
                matches!(
                    e,
                    InspectError::MissingSignature {
                        claimed: DiskFormat::Aki,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("HdrS"), "{e}");
        }
        // A kernel is still raw: declared raw or ami, it is accepted as such.
        assert!(check(&bz, DiskFormat::Raw).is_ok());
    }

    #[test]
    fn ramdisks_are_recognised_by_compression_or_cpio_magic() {
        for m in RAMDISK_MAGICS {
            let r = with(1024, 0, m);
            assert_eq!(check(&r, DiskFormat::Ari).unwrap().0, 1024, "{m:?}");
        }
        let e = check(&with(1024, 0, b"ELF"), DiskFormat::Ari).unwrap_err();
        assert!(e.to_string().contains("ramdisk"), "{e}");
        assert!(check(&Vec::new(), DiskFormat::Ari).is_err());
    }

    #[test]
    fn iso_needs_cd001_at_0x8001() {
        let iso = with(0x9000, 0x8001, b"CD001");
        assert_eq!(check(&iso, DiskFormat::Iso).unwrap().0, 0x9000);
        let udf = with(0x9000, 0x8001, b"BEA01");
        assert!(check(&udf, DiskFormat::Iso).is_ok());
        for not in [
            with(0x9000, 0x8000, b"CD001"),
            vec![0u8; 0x8003],
            vec![0u8; 10],
        ] {
            let e = check(&not, DiskFormat::Iso).unwrap_err();
            assert!(e.to_string().contains("CD001"), "{e}");
        }
        // An ISO that starts like a vmdk is one to qemu: refused.
        let mut both = iso;
        both[..4].copy_from_slice(b"KDMV");
        let e = check(&both, DiskFormat::Iso).unwrap_err();
        assert!(
            matches!(
                e,
                InspectError::FormatMismatch {
                    detected: "vmdk",
                    ..
                }
            ),
            "{e}"
        );
    }
}
