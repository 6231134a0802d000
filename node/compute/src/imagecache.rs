//! Aging of the base files, as Nova's image cache manager: a periodic pass removes a base no
//! instance on this node uses once it has been unused for
//! `[compute] remove_unused_original_minimum_age_seconds` (Nova's default 86400).
//!
//! "In use" is derived, at every pass, from what survives a restart: the server rows placed on
//! this node (their image, kernel and ramdisk; their flavor's ephemeral and swap sizes) and the
//! backing file named in the header of every overlay under the instances path (so an instance
//! directory no row names still keeps its bases). A base in use has its mtime set to the pass's
//! time, as Nova's `_mark_in_use` does, so "unused for" is the time since the last pass that saw
//! it in use, and it survives restarts (it is on disk). This module handles the ephemeral and
//! swap bases under `<instances_path>/_base`; the base images in the image cache are aged by the
//! image service through [`crate::agent::ImageSource::age_unused`], under its lease lock.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::disks::BASE_DIR;

/// The overlay files the compute agent writes in an instance directory.
pub const OVERLAYS: [&str; 3] = ["disk", "disk.eph0", "disk.swap"];

/// The backing file a qcow2 image names in its header (relative names resolved against the
/// image's directory), or `None` for a file that is not qcow2 or has no backing file.
pub fn backing_file(path: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut f = std::fs::File::open(path)?;
    let mut header = [0u8; 20];
    if f.read_exact(&mut header).is_err() || header[..4] != *b"QFI\xfb" {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let size = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
    if offset == 0 || size == 0 || size > 4096 {
        return Ok(None);
    }
    let mut name = vec![0u8; size as usize];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset))?;
    f.read_exact(&mut name)?;
    let name = PathBuf::from(String::from_utf8_lossy(&name).into_owned());
    Ok(Some(match path.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name,
    }))
}

/// Every file an overlay under `instances_path/<instance>/` backs onto.
pub fn overlay_backings(instances_path: &Path) -> std::io::Result<BTreeSet<PathBuf>> {
    let mut out = BTreeSet::new();
    let dir = match std::fs::read_dir(instances_path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in dir {
        let entry = entry?;
        if entry.file_name() == BASE_DIR || !entry.file_type()?.is_dir() {
            continue;
        }
        for name in OVERLAYS {
            match backing_file(&entry.path().join(name)) {
                Ok(Some(b)) => {
                    out.insert(canonical(&b));
                }
                Ok(None) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
}

/// What one pass over a directory did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Aged {
    /// Bases in use, marked used now.
    pub in_use: Vec<PathBuf>,
    /// Bases unused for at least the minimum age, removed.
    pub removed: Vec<PathBuf>,
}

/// One pass over the base files directly in `dir` (names starting with `.` are files being
/// made, and skipped): a file in `in_use` (canonical paths) gets `now` as its mtime; any other
/// file whose mtime is at least `min_age` before `now` is removed.
pub fn age_dir(
    dir: &Path,
    in_use: &BTreeSet<PathBuf>,
    min_age: Duration,
    now: SystemTime,
) -> std::io::Result<Aged> {
    let mut aged = Aged::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(aged),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') || !entry.file_type()?.is_file() {
            continue;
        }
        let path = entry.path();
        if in_use.contains(&canonical(&path)) {
            std::fs::File::options()
                .write(true)
                .open(&path)?
                .set_modified(now)?;
            aged.in_use.push(path);
            continue;
        }
        let unused_for = now
            .duration_since(entry.metadata()?.modified()?)
            .unwrap_or_default();
        if unused_for >= min_age {
            tracing::info!(base = %path.display(), "removing a base file no instance has used for the minimum age");
            std::fs::remove_file(&path)?;
            aged.removed.push(path);
        }
    }
    Ok(aged)
}

/// The ephemeral and swap bases the flavors of these servers use, under `instances_path`.
pub fn extra_disk_bases<'a>(
    instances_path: &Path,
    flavors: impl Iterator<Item = (u64, u64)> + 'a,
) -> BTreeSet<PathBuf> {
    let dir = instances_path.join(BASE_DIR);
    let mut out = BTreeSet::new();
    for (ephemeral_gb, swap_mb) in flavors {
        for name in crate::disks::base_names(ephemeral_gb, swap_mb) {
            out.insert(canonical(&dir.join(name)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn qemu_img(args: &[&str]) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn set_mtime(p: &Path, t: SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    /// Real files and `qemu-img` overlays: the backing file is read from the overlay's header
    /// (absolute and relative names); a pass keeps and marks the bases in use (by the rows or
    /// by an overlay, also of an instance directory no row names), removes an unused base once
    /// it is old enough and not before, and skips files being made.
    #[test]
    fn unused_bases_go_after_the_minimum_age_and_backed_ones_never() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let base = root.join(BASE_DIR);
        std::fs::create_dir_all(&base).unwrap();
        for name in [
            "ephemeral_1_vfat",
            "swap_64",
            "swap_128",
            "ephemeral_2_vfat",
        ] {
            std::fs::write(base.join(name), vec![0u8; 4096]).unwrap();
        }
        std::fs::write(base.join(".swap_256.tmp"), b"x").unwrap();
        // An instance whose row is gone: its overlay still backs onto ephemeral_2_vfat.
        let orphan = root.join("orphan-uuid");
        std::fs::create_dir_all(&orphan).unwrap();
        let eph2 = base.join("ephemeral_2_vfat");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            eph2.to_str().unwrap(),
            orphan.join("disk.eph0").to_str().unwrap(),
        ]);
        // A relative backing name resolves against the overlay's directory.
        let inst = root.join("live-uuid");
        std::fs::create_dir_all(&inst).unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "../_base/swap_64",
            inst.join("disk.swap").to_str().unwrap(),
        ]);
        assert_eq!(
            canonical(&backing_file(&inst.join("disk.swap")).unwrap().unwrap()),
            canonical(&base.join("swap_64"))
        );
        assert_eq!(
            backing_file(&base.join("swap_64")).unwrap(),
            None,
            "raw: no backing"
        );
        let backed = overlay_backings(root).unwrap();
        assert_eq!(
            backed,
            BTreeSet::from([canonical(&eph2), canonical(&base.join("swap_64"))])
        );

        // The rows on this node use a flavor with 1 GB ephemeral and no swap.
        let mut in_use = extra_disk_bases(root, [(1, 0)].into_iter());
        in_use.extend(backed);
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        let long_ago = now - 2 * day;
        for name in [
            "ephemeral_1_vfat",
            "swap_64",
            "swap_128",
            "ephemeral_2_vfat",
        ] {
            set_mtime(&base.join(name), long_ago);
        }
        set_mtime(&base.join(".swap_256.tmp"), long_ago);
        // swap_128 was used until an hour ago: not old enough yet.
        set_mtime(&base.join("swap_128"), now - Duration::from_secs(3600));
        let aged = age_dir(&base, &in_use, day, now).unwrap();
        assert_eq!(aged.removed, Vec::<PathBuf>::new());
        assert_eq!(aged.in_use.len(), 3);
        // In use: marked now, so they count as used from this pass on.
        let mtime = |n: &str| std::fs::metadata(base.join(n)).unwrap().modified().unwrap();
        assert!(mtime("ephemeral_1_vfat") >= now - Duration::from_secs(1));

        // A day later nobody uses swap_128 still; the in-use ones stay.
        let later = now + day;
        let aged = age_dir(&base, &in_use, day, later).unwrap();
        assert_eq!(aged.removed, vec![base.join("swap_128")]);
        let mut left: Vec<_> = std::fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                ".swap_256.tmp",
                "ephemeral_1_vfat",
                "ephemeral_2_vfat",
                "swap_64"
            ]
        );
        // qemu-img still opens the overlays: their bases are there.
        qemu_img(&["check", "-q", orphan.join("disk.eph0").to_str().unwrap()]);
        qemu_img(&["info", inst.join("disk.swap").to_str().unwrap()]);

        // Once nothing uses them, a day after the last pass that saw them in use, they go.
        let aged = age_dir(&base, &BTreeSet::new(), day, later + day).unwrap();
        assert_eq!(aged.removed.len(), 3);
    }
}
