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
