//! VMDK: a hosted sparse extent (`KDMV`) carrying its own descriptor is accepted when it is the
//! whole disk (`monolithicSparse` or `streamOptimized`, one extent, no parent). A descriptor
//! file names other files (its extents): refused, as is anything naming a parent.

use super::{le32, le64, DiskFormat, Source};
use crate::qcow2::inspect::InspectError;

pub(crate) const SPARSE_MAGIC: &[u8] = b"KDMV";
/// The ESX server sparse format (vmdk3), which qemu also opens.
pub(crate) const COWD_MAGIC: &[u8] = b"COWD";
pub(crate) const DESCRIPTOR: &[u8] = b"# Disk DescriptorFile";
/// Larger embedded descriptors are a mistake or an attack: qemu's own limit is 1 MiB.
const MAX_DESCRIPTOR: u64 = 1 << 20;
const SELF_CONTAINED: [&str; 2] = ["monolithicSparse", "streamOptimized"];

fn malformed(problem: impl Into<String>) -> InspectError {
    super::malformed(DiskFormat::Vmdk, problem)
}

/// Checks a vmdk and returns its virtual size.
pub(super) fn check(src: &dyn Source) -> Result<u64, InspectError> {
    let head = src.head(512)?;
    if head.starts_with(DESCRIPTOR) {
        // A descriptor holds no data: everything is in the extents it names.
        let text = String::from_utf8_lossy(&head);
        let named = extents(&text)
            .next()
            .map_or_else(|| "a descriptor file".to_owned(), |e| e.file.to_owned());
        return Err(InspectError::ExternalExtent(named));
    }
    if head.starts_with(COWD_MAGIC) {
        return Err(malformed(
            "the ESX server sparse format (COWD) is not supported; convert it to monolithicSparse",
        ));
    }
    let h = src.bytes(0, 79, DiskFormat::Vmdk, "sparse extent header")?;
    let version = le32(&h, 4);
    if !(1..=3).contains(&version) {
        return Err(malformed(format!(
            "sparse extent version {version} is not 1 to 3"
        )));
    }
    let capacity = le64(&h, 12);
    let size = capacity
        .checked_mul(512)
        .ok_or_else(|| malformed(format!("capacity of {capacity} sectors overflows")))?;
    let (desc_sector, desc_sectors) = (le64(&h, 28), le64(&h, 36));
    if desc_sector != 0 && desc_sectors != 0 {
        let len = desc_sectors
            .checked_mul(512)
            .filter(|l| *l <= MAX_DESCRIPTOR)
            .ok_or_else(|| malformed(format!("the descriptor is {desc_sectors} sectors long")))?;
        let offset = desc_sector
            .checked_mul(512)
            .ok_or_else(|| malformed("the descriptor offset overflows"))?;
        let d = src.bytes(
            offset,
            len as usize,
            DiskFormat::Vmdk,
            "embedded descriptor",
        )?;
        let end = d.iter().position(|b| *b == 0).unwrap_or(d.len());
        check_embedded_descriptor(&String::from_utf8_lossy(&d[..end]))?;
    }
    Ok(size)
}

struct Extent<'a> {
    kind: &'a str,
    file: &'a str,
}

/// The extent lines of a descriptor: `RW 2097152 SPARSE "disk.vmdk"`.
fn extents(text: &str) -> impl Iterator<Item = Extent<'_>> {
    text.lines().filter_map(|line| {
        let mut words = line.split_whitespace();
        let access = words.next()?;
        if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
            return None;
        }
        let _sectors = words.next()?;
        let kind = words.next().unwrap_or("");
        let file = line
            .split_once('"')
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or("", |(name, _)| name);
        Some(Extent { kind, file })
    })
}

fn value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

fn check_embedded_descriptor(text: &str) -> Result<(), InspectError> {
    if let Some(parent) = value(text, "parentFileNameHint") {
        return Err(InspectError::ParentImage {
            format: DiskFormat::Vmdk,
            detail: format!("parentFileNameHint {parent:?}"),
        });
    }
    match value(text, "parentCID") {
        None => {}
        Some(cid) if cid.eq_ignore_ascii_case("ffffffff") => {}
        Some(cid) => {
            return Err(InspectError::ParentImage {
                format: DiskFormat::Vmdk,
                detail: format!("parentCID {cid}"),
            })
        }
    }
    let create_type = value(text, "createType").unwrap_or("");
    if !SELF_CONTAINED.contains(&create_type) {
        return Err(malformed(format!(
            "createType {create_type:?} is not monolithicSparse or streamOptimized"
        )));
    }
    let mut all = extents(text);
    match (all.next(), all.next()) {
        (Some(e), None) if e.kind == "SPARSE" => Ok(()),
        (Some(e), None) => Err(InspectError::ExternalExtent(format!(
            "a {} extent {:?}",
            e.kind, e.file
        ))),
        (Some(_), Some(e)) => Err(InspectError::ExternalExtent(format!("{:?}", e.file))),
        (None, _) => Err(malformed("the descriptor names no extent")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::check as check_as;
    use super::*;

    const GOOD: &str = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
                        createType=\"monolithicSparse\"\n\n# Extent description\n\
                        RW 2097152 SPARSE \"disk.vmdk\"\n\nddb.virtualHWVersion = \"4\"\n";

    /// A sparse extent of `capacity` sectors with `descriptor` embedded at sector 1.
    fn sparse(capacity: u64, descriptor: &str) -> Vec<u8> {
        let mut b = vec![0u8; 512 * 24];
        b[..4].copy_from_slice(SPARSE_MAGIC);
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        b[12..20].copy_from_slice(&capacity.to_le_bytes());
        b[20..28].copy_from_slice(&128u64.to_le_bytes());
        b[28..36].copy_from_slice(&1u64.to_le_bytes());
        b[36..44].copy_from_slice(&20u64.to_le_bytes());
        b[512..512 + descriptor.len()].copy_from_slice(descriptor.as_bytes());
        b
    }

    #[test]
    fn monolithic_sparse_and_stream_optimized_are_accepted() {
        assert_eq!(
            check_as(&sparse(2097152, GOOD), DiskFormat::Vmdk)
                .unwrap()
                .0,
            1 << 30
        );
        let stream = GOOD.replace("monolithicSparse", "streamOptimized");
        assert!(check_as(&sparse(8, &stream), DiskFormat::Vmdk).is_ok());
        // No embedded descriptor at all: qemu reads the extent alone.
        let mut bare = sparse(8, "");
        bare[28..44].fill(0);
        assert!(check_as(&bare, DiskFormat::Vmdk).is_ok());
    }

    #[test]
    fn descriptors_extents_and_parents_are_refused() {
        let desc = GOOD.replace("disk.vmdk", "/etc/shadow").into_bytes();
        let e = check_as(&desc, DiskFormat::Vmdk).unwrap_err();
        assert!(
            matches!(&e, InspectError::ExternalExtent(f) if f == "/etc/shadow"),
            "{e}"
        );
        let two = GOOD.replace(
            "RW 2097152 SPARSE \"disk.vmdk\"",
            "RW 8 SPARSE \"disk.vmdk\"\nRW 8 FLAT \"/dev/sda\" 0",
        );
        let e = check_as(&sparse(16, &two), DiskFormat::Vmdk).unwrap_err();
        assert!(e.to_string().contains("/dev/sda"), "{e}");
        let flat = GOOD.replace("SPARSE \"disk.vmdk\"", "FLAT \"/dev/sda\" 0");
        let e = check_as(&sparse(16, &flat), DiskFormat::Vmdk).unwrap_err();
        assert!(matches!(e, InspectError::ExternalExtent(_)), "{e}");
        let child = GOOD.replace("parentCID=ffffffff", "parentCID=1234abcd");
        let e = check_as(&sparse(16, &child), DiskFormat::Vmdk).unwrap_err();
        assert!(matches!(e, InspectError::ParentImage { .. }), "{e}");
        let hint = format!("{GOOD}parentFileNameHint=\"base.vmdk\"\n");
        let e = check_as(&sparse(16, &hint), DiskFormat::Vmdk).unwrap_err();
        assert!(e.to_string().contains("base.vmdk"), "{e}");
        let split = GOOD.replace("monolithicSparse", "twoGbMaxExtentSparse");
        let e = check_as(&sparse(16, &split), DiskFormat::Vmdk).unwrap_err();
        assert!(e.to_string().contains("twoGbMaxExtentSparse"), "{e}");
    }

    #[test]
    fn broken_headers_are_named() {
        let mut b = sparse(16, GOOD);
        b[4..8].copy_from_slice(&9u32.to_le_bytes());
        let e = check_as(&b, DiskFormat::Vmdk).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
        let mut b = sparse(16, GOOD);
        b[36..44].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(check_as(&b, DiskFormat::Vmdk).is_err());
        let mut b = sparse(16, GOOD);
        b[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(check_as(&b, DiskFormat::Vmdk).is_err());
        let e = check_as(&b"KDMV".to_vec(), DiskFormat::Vmdk).unwrap_err();
        assert!(matches!(e, InspectError::Truncated { .. }), "{e}");
        let e = check_as(&b"COWD\0\0\0\0".to_vec(), DiskFormat::Vmdk).unwrap_err();
        assert!(e.to_string().contains("COWD"), "{e}");
    }
}
