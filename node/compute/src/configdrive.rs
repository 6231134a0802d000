//! The config drive: an ISO 9660 image labelled `config-2` with the metadata documents
//! (`metadata::config_drive_files`), attached to the guest as a CD-ROM, as Nova's
//! `ConfigDriveBuilder` makes it with `genisoimage` (Rock Ridge and Joliet names, so the
//! lower-case, dotted file names survive). cloud-init finds it by its label and reads
//! `openstack/latest/meta_data.json`, `user_data` and `network_data.json` without a network.
//!
//! Blocking: the caller runs [`build`] off the async runtime.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The file name in the instance directory (Nova's `disk.config`).
pub const FILE: &str = "disk.config";
/// The volume label cloud-init looks for.
pub const LABEL: &str = "config-2";

#[derive(Debug, thiserror::Error)]
pub enum ConfigDriveError {
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("file name {0:?} is not a relative path below the drive's root")]
    BadName(String),
    #[error("`genisoimage` could not be run (install genisoimage)")]
    ToolMissing(#[source] std::io::Error),
    #[error("`genisoimage` failed: {0}")]
    ToolFailed(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigDriveError + '_ {
    move |source| ConfigDriveError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes the ISO image of `files` (path below the root → bytes) to `out`. The files are
/// staged in a directory next to `out`, which is removed afterwards; `out` appears only
/// complete (written under a temporary name, then renamed).
pub fn build(out: &Path, files: &[(String, Vec<u8>)]) -> Result<(), ConfigDriveError> {
    let parent = out.parent().unwrap_or(Path::new("."));
    let stage = parent.join(format!(".{FILE}.stage"));
    let tmp = parent.join(format!(".{FILE}.tmp"));
    let _ = std::fs::remove_dir_all(&stage);
    let result = (|| {
        for (name, bytes) in files {
            let rel = Path::new(name);
            if name.is_empty()
                || rel.is_absolute()
                || rel
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(ConfigDriveError::BadName(name.clone()));
            }
            let path = stage.join(rel);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
            }
            std::fs::write(&path, bytes).map_err(io(&path))?;
        }
        // Nova's arguments (nova/virt/configdrive.py, `_make_iso9660`).
        let output = Command::new("genisoimage")
            .arg("-o")
            .arg(&tmp)
            .args([
                "-ldots",
                "-allow-lowercase",
                "-allow-multidot",
                "-l",
                "-publisher",
                concat!("OpenStack Compute (Shoal ", env!("CARGO_PKG_VERSION"), ")"),
                "-quiet",
                "-J",
                "-r",
                "-V",
                LABEL,
            ])
            .arg(&stage)
            .output()
            .map_err(ConfigDriveError::ToolMissing)?;
        if !output.status.success() {
            return Err(ConfigDriveError::ToolFailed(
                String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            ));
        }
        std::fs::rename(&tmp, out).map_err(io(out))
    })();
    let _ = std::fs::remove_dir_all(&stage);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("-version").output().is_ok()
    }

    #[test]
    fn the_drive_holds_the_files_under_its_label() {
        if !have("genisoimage") || !have("isoinfo") {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "genisoimage is needed (node/scripts/install-deps.sh)"
            );
            eprintln!("skipping: genisoimage is missing");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(FILE);
        let files = vec![
            (
                "openstack/latest/meta_data.json".to_owned(),
                br#"{"uuid": "u-1"}"#.to_vec(),
            ),
            (
                "openstack/latest/user_data".to_owned(),
                b"#!/bin/sh\n".to_vec(),
            ),
        ];
        build(&out, &files).unwrap();
        let pvd = Command::new("isoinfo")
            .arg("-d")
            .arg("-i")
            .arg(&out)
            .output()
            .unwrap();
        let pvd = String::from_utf8_lossy(&pvd.stdout);
        assert!(pvd.contains("Volume id: config-2"), "{pvd}");
        assert!(pvd.contains("Rock Ridge"), "{pvd}");
        let cat = Command::new("isoinfo")
            .args(["-R", "-x", "/openstack/latest/meta_data.json", "-i"])
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(cat.stdout, br#"{"uuid": "u-1"}"#);
        // Nothing staged is left next to it.
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
        // A name that climbs out of the drive is refused.
        let bad = vec![("../x".to_owned(), Vec::new())];
        assert!(matches!(
            build(&tmp.path().join("other"), &bad),
            Err(ConfigDriveError::BadName(_))
        ));
    }
}
