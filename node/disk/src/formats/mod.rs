//! The disk formats the Image API accepts (Glance's defaults) and the check every upload goes
//! through: the content must be what `disk_format` says, and must not reach outside itself.
//!
//! qemu follows files named inside an image (a qcow2 backing file or external data file, a
//! vmdk extent, the parent of a vhd, vhdx or vdi differencing disk), so an image that names
//! one is a way to read a host file into a guest: all of those are refused. A format whose
//! content another format's signature contradicts is refused too, since whatever opens it
//! later may probe it as the other one.

mod boot;
mod ploop;
pub(crate) mod source;
mod vdi;
mod vhd;
mod vhdx;
mod vmdk;

use std::fs::File;
use std::path::Path;
use std::str::FromStr;

use source::FileSource;
pub(crate) use source::Source;

use crate::qcow2::header::MAGIC as QCOW2_MAGIC;
use crate::qcow2::inspect::{
    inspect_source, InspectError, InspectPolicy, Qcow2Info, MAX_VIRTUAL_SIZE,
};

/// What an image claims to be (`disk_format` in the Image API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskFormat {
    /// Amazon machine image: a raw disk.
    Ami,
    /// Amazon ramdisk image: an initramfs (compressed or plain cpio).
    Ari,
    /// Amazon kernel image: a Linux kernel.
    Aki,
    Vhd,
    Vhdx,
    Vmdk,
    Raw,
    Qcow2,
    Vdi,
    Iso,
    Ploop,
}

impl DiskFormat {
    /// Every format, in Glance's order (`disk_formats` in glance-api.conf).
    pub const ALL: [DiskFormat; 11] = [
        DiskFormat::Ami,
        DiskFormat::Ari,
        DiskFormat::Aki,
        DiskFormat::Vhd,
        DiskFormat::Vhdx,
        DiskFormat::Vmdk,
        DiskFormat::Raw,
        DiskFormat::Qcow2,
        DiskFormat::Vdi,
        DiskFormat::Iso,
        DiskFormat::Ploop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Ami => "ami",
            DiskFormat::Ari => "ari",
            DiskFormat::Aki => "aki",
            DiskFormat::Vhd => "vhd",
            DiskFormat::Vhdx => "vhdx",
            DiskFormat::Vmdk => "vmdk",
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vdi => "vdi",
            DiskFormat::Iso => "iso",
            DiskFormat::Ploop => "ploop",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DiskFormat {
    type Err = InspectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DiskFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| InspectError::UnsupportedDiskFormat(s.to_owned()))
    }
}

/// What an upload turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: DiskFormat,
    /// The size of the disk a guest sees (the file size for raw, ami, aki, ari and iso).
    pub virtual_size: u64,
    pub file_size: u64,
    pub qcow2: Option<Qcow2Info>,
}

/// How many leading bytes [`detect_format`] looks at.
pub const PROBE_BYTES: usize = 512;

/// Names the format qemu would probe from a file's first bytes (up to [`PROBE_BYTES`]); `raw`
/// when no known signature matches. Kernels, ramdisks and ISO images are raw to qemu.
pub fn detect_format(first: &[u8]) -> &'static str {
    let at = |off: usize, magic: &[u8]| first.get(off..off + magic.len()) == Some(magic);
    if at(0, &QCOW2_MAGIC.to_be_bytes()) {
        "qcow2"
    } else if at(0, b"QED\0") {
        "qed"
    } else if at(0, vmdk::SPARSE_MAGIC) || at(0, vmdk::COWD_MAGIC) || at(0, vmdk::DESCRIPTOR) {
        "vmdk"
    } else if at(0, vhdx::FILE_SIGNATURE) {
        "vhdx"
    } else if at(0, vhd::COOKIE) {
        "vpc"
    } else if at(vdi::SIGNATURE_AT, &vdi::SIGNATURE.to_le_bytes()) {
        "vdi"
    } else if at(0, ploop::MAGIC_V1) || at(0, ploop::MAGIC_V2) {
        "parallels"
    } else if at(0, b"LUKS\xba\xbe") {
        "luks"
    } else if at(0, b"Bochs Virtual HD Image") {
        "bochs"
    } else if at(0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop\n") {
        "cloop"
    } else {
        "raw"
    }
}

/// Checks an upload against what it claims to be, reading only the headers. See the module
/// documentation for what is refused.
pub fn check_upload(path: &Path, claimed: DiskFormat) -> Result<ImageInfo, InspectError> {
    let io = |source| InspectError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let src = FileSource {
        file: &file,
        len,
        path,
    };
    let (virtual_size, qcow2) = check(&src, claimed)?;
    Ok(ImageInfo {
        format: claimed,
        virtual_size,
        file_size: len,
        qcow2,
    })
}

/// Checks `src` as `claimed` and returns the virtual size (and, for qcow2, what its header
/// says). Works on any [`Source`], so the unit and property tests run on byte buffers.
pub(crate) fn check(
    src: &dyn Source,
    claimed: DiskFormat,
) -> Result<(u64, Option<Qcow2Info>), InspectError> {
    let detected = detect_format(&src.head(PROBE_BYTES)?);
    let expect = |want: &'static str| {
        if detected == want {
            Ok(())
        } else {
            Err(InspectError::FormatMismatch { claimed, detected })
        }
    };
    let size = match claimed {
        DiskFormat::Raw | DiskFormat::Ami => {
            expect("raw")?;
            src.len()
        }
        DiskFormat::Aki => {
            expect("raw")?;
            boot::check_kernel(src)?;
            src.len()
        }
        DiskFormat::Ari => {
            expect("raw")?;
            boot::check_ramdisk(src)?;
            src.len()
        }
        DiskFormat::Iso => {
            expect("raw")?;
            boot::check_iso(src)?;
            src.len()
        }
        // A fixed vhd has its footer only at the end, so qemu probes it as raw.
        DiskFormat::Vhd if detected == "raw" || detected == "vpc" => vhd::check(src)?,
        DiskFormat::Vhd => return Err(InspectError::FormatMismatch { claimed, detected }),
        DiskFormat::Vhdx => {
            expect("vhdx")?;
            vhdx::check(src)?
        }
        DiskFormat::Vmdk => {
            expect("vmdk")?;
            vmdk::check(src)?
        }
        DiskFormat::Vdi => {
            expect("vdi")?;
            vdi::check(src)?
        }
        DiskFormat::Ploop => {
            expect("parallels")?;
            ploop::check(src)?
        }
        DiskFormat::Qcow2 => {
            expect("qcow2")?;
            let info = inspect_source(src, &InspectPolicy::upload())?;
            return Ok((info.virtual_size, Some(info)));
        }
    };
    if size > MAX_VIRTUAL_SIZE {
        return Err(InspectError::VirtualSizeTooLarge {
            size,
            max: MAX_VIRTUAL_SIZE,
        });
    }
    Ok((size, None))
}

/// A structure of `format` is not what the format says it must be.
pub(crate) fn malformed(format: DiskFormat, problem: impl Into<String>) -> InspectError {
    InspectError::Malformed {
        format,
        problem: problem.into(),
    }
}

/// Little- and big-endian readers over a header already read whole (the caller read enough).
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_accepted_ones() {
        for f in DiskFormat::ALL {
            assert_eq!(f.as_str().parse::<DiskFormat>().unwrap(), f);
        }
        let e = "vpc".parse::<DiskFormat>().unwrap_err();
        let msg = e.to_string();
        for f in DiskFormat::ALL {
            assert!(msg.contains(f.as_str()), "{msg}");
        }
    }

    #[test]
    fn raw_and_ami_accept_plain_data_and_refuse_probed_formats() {
        let plain = vec![0x5au8; 4096];
        for f in [DiskFormat::Raw, DiskFormat::Ami] {
            assert_eq!(check(&plain, f).unwrap().0, 4096);
        }
        let mut vmdk = plain.clone();
        vmdk[..4].copy_from_slice(b"KDMV");
        let e = check(&vmdk, DiskFormat::Ami).unwrap_err();
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
        let mut qcow2 = plain;
        qcow2[..4].copy_from_slice(b"QFI\xfb");
        let e = check(&qcow2, DiskFormat::Raw).unwrap_err();
        assert!(e.to_string().contains("qcow2"), "{e}");
    }

    #[test]
    fn qcow2_content_is_not_another_format() {
        let mut b = vec![0u8; 1024];
        b[..4].copy_from_slice(b"QFI\xfb");
        for f in [
            DiskFormat::Vhdx,
            DiskFormat::Iso,
            DiskFormat::Aki,
            DiskFormat::Vhd,
        ] {
            let e = check(&b, f).unwrap_err();
            assert!(
                matches!(
                    e,
                    InspectError::FormatMismatch {
                        detected: "qcow2",
                        ..
                    }
                ),
                "{f}: {e}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// No sequence of bytes makes the check panic, whatever format it is declared as.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            for f in DiskFormat::ALL {
                let _ = check(&bytes, f);
            }
        }

        /// Garbage behind each format's signature never panics either (it gets past the probe).
        #[test]
        fn garbage_behind_a_signature_never_panics(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..70_000),
            which in 0usize..8,
        ) {
            let sig: &[u8] = match which {
                0 => vhd::COOKIE,
                1 => vhdx::FILE_SIGNATURE,
                2 => vmdk::SPARSE_MAGIC,
                3 => vmdk::DESCRIPTOR,
                4 => ploop::MAGIC_V2,
                5 => b"\x1f\x8b",
                6 => b"070701",
                _ => b"",
            };
            if bytes.len() >= sig.len() {
                bytes[..sig.len()].copy_from_slice(sig);
            }
            if which == 7 && bytes.len() > 0x206 {
                bytes[0x202..0x206].copy_from_slice(b"HdrS");
            }
            for f in DiskFormat::ALL {
                let _ = check(&bytes, f);
            }
        }
    }
}
