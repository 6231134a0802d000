//! The disk work of a resize or cold migration on its target host: the root overlay pulled
//! from the source names the source's copy of its base image, so it is put on this host's copy
//! (an unsafe rebase: only the header changes, the base bytes are the same image), and grown to
//! the new flavor's root disk. Both through `qemu-img`, off the hot path (a resize is rare).

use std::path::{Path, PathBuf};

/// The backing file the overlay at `disk` names, if any.
pub fn backing_file(disk: &Path) -> Result<Option<PathBuf>, String> {
    crate::imagecache::backing_file(disk).map_err(|e| format!("reading {}: {e}", disk.display()))
}

/// Points the overlay at `disk` to `base` (of format `fmt`, `raw` or `qcow2`) without touching
/// its data (`qemu-img rebase -u`). Blocking.
pub fn rebase(disk: &Path, base: &Path, fmt: &str) -> Result<(), String> {
    run(std::process::Command::new("qemu-img")
        .args(["rebase", "-u", "-f", "qcow2", "-F", fmt, "-b"])
        .arg(base)
        .arg(disk))
}

/// Grows the qcow2 at `disk` to `size` bytes when it is smaller (`qemu-img resize`); a disk
/// already that large is left as it is. Blocking.
pub fn grow(disk: &Path, size: u64) -> Result<(), String> {
    let current = virtual_size(disk)?;
    if size <= current {
        return Ok(());
    }
    run(std::process::Command::new("qemu-img")
        .args(["resize", "-q", "-f", "qcow2"])
        .arg(disk)
        .arg(size.to_string()))
}

/// The virtual size in the qcow2 header of `disk`.
pub fn virtual_size(disk: &Path) -> Result<u64, String> {
    use std::io::Read;
    let mut header = [0u8; 32];
    std::fs::File::open(disk)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|e| format!("reading {}: {e}", disk.display()))?;
    if &header[..4] != b"QFI\xfb" {
        return Err(format!("{} is not a qcow2 image", disk.display()));
    }
    Ok(u64::from_be_bytes(
        header[24..32].try_into().expect("8 bytes"),
    ))
}

fn run(cmd: &mut std::process::Command) -> Result<(), String> {
    match cmd.output() {
        Err(e) => Err(format!("cannot run qemu-img: {e}")),
        Ok(o) if !o.status.success() => Err(format!(
            "qemu-img failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use shoal_disk::qcow2::{create_overlay, BackingFormat, OverlaySpec};

    use super::*;

    /// A pulled overlay is put on another copy of its base and grown; `qemu-img check` passes
    /// and the new base is what it names.
    #[test]
    fn rebase_and_grow_an_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
        std::fs::write(&a, vec![7u8; 1 << 20]).unwrap();
        std::fs::copy(&a, &b).unwrap();
        let disk = dir.path().join("disk");
        create_overlay(&disk, &OverlaySpec::new(&a, BackingFormat::Raw, 1 << 30)).unwrap();
        rebase(&disk, &b, "raw").unwrap();
        assert_eq!(backing_file(&disk).unwrap(), Some(b.clone()));
        grow(&disk, 2 << 30).unwrap();
        assert_eq!(virtual_size(&disk).unwrap(), 2 << 30);
        // Never shrunk.
        grow(&disk, 1 << 30).unwrap();
        assert_eq!(virtual_size(&disk).unwrap(), 2 << 30);
        let check = std::process::Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(&disk)
            .status()
            .unwrap();
        assert!(check.success());
    }
}
