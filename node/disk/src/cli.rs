//! The function behind `shoal disk overlay --backing BASE --backing-format raw|qcow2 --size SIZE
//! OUT`. The binary owns the clap definitions; this takes the flag values as strings.

use std::path::Path;

use crate::qcow2::{
    create_overlay, parse_size, BackingFormat, OverlayError, OverlayInfo, OverlaySpec,
};

/// Parses the flags and creates the overlay at `out`.
pub fn overlay_command(
    backing: &Path,
    backing_format: &str,
    size: &str,
    out: &Path,
) -> Result<OverlayInfo, OverlayError> {
    let backing_format: BackingFormat = backing_format.parse()?;
    let virtual_size = parse_size(size)?;
    create_overlay(
        out,
        &OverlaySpec::new(backing, backing_format, virtual_size),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::{inspect_with, InspectPolicy};

    #[test]
    fn flags_reach_the_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let out = dir.path().join("disk.qcow2");
        let info = overlay_command(&base, "raw", "10G", &out).unwrap();
        assert_eq!(info.virtual_size, 10 << 30);
        let seen = inspect_with(&out, &InspectPolicy::overlay()).unwrap();
        assert_eq!(seen.backing_file.as_deref(), base.to_str());
        assert_eq!(seen.backing_format.as_deref(), Some("raw"));

        let other = dir.path().join("other.qcow2");
        let e = overlay_command(&base, "vmdk", "10G", &other).unwrap_err();
        assert!(matches!(e, OverlayError::BackingFormat(_)), "{e}");
        let e = overlay_command(&base, "raw", "ten gigs", &other).unwrap_err();
        assert!(matches!(e, OverlayError::SizeSyntax(_)), "{e}");
        let e = overlay_command(Path::new("base.raw"), "raw", "10G", &other).unwrap_err();
        assert!(matches!(e, OverlayError::RelativeBacking(_)), "{e}");
        assert!(!other.exists());
    }
}
