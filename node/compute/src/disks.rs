//! A flavor's ephemeral and swap disks, made as Nova's libvirt driver makes them with its
//! default `images_type` (qcow2): a formatted raw base of the size under
//! `<instances_path>/_base` (`ephemeral_<GB>_vfat`, `swap_<MB>`), shared by every server of that
//! size on the host, and per server a qcow2 overlay on it in the instance directory
//! (`disk.eph0`, `disk.swap`), written natively with `shoal-disk`. The guest therefore finds a
//! vfat file system labelled `ephemeral0` on vdb (Nova's default for an image without
//! `os_type`; cloud-init mounts it at /mnt) and a swap area after it.
//!
//! Blocking: the callers run these off the async runtime.

use std::path::{Path, PathBuf};
use std::process::Command;

use shoal_disk::qcow2::{create_overlay, BackingFormat, OverlaySpec};

/// The overlay file names in the instance directory, as Nova names them.
pub const EPHEMERAL_FILE: &str = "disk.eph0";
pub const SWAP_FILE: &str = "disk.swap";
/// The label of the ephemeral file system (Nova's `ephemeral0`, what cloud-init looks for).
pub const EPHEMERAL_LABEL: &str = "ephemeral0";
/// The directory of shared bases under the instances path (Nova's `_base`).
pub const BASE_DIR: &str = "_base";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{tool}` could not be run (install {package})")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{tool}` failed on {path}: {stderr}")]
    ToolFailed {
        tool: &'static str,
        path: PathBuf,
        stderr: String,
    },
    #[error("cannot write the overlay")]
    Overlay(#[from] shoal_disk::qcow2::OverlayError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Which kind of formatted base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    Ephemeral { gb: u64 },
    Swap { mb: u64 },
}

impl Base {
    fn file_name(self) -> String {
        match self {
            Base::Ephemeral { gb } => format!("ephemeral_{gb}_vfat"),
            Base::Swap { mb } => format!("swap_{mb}"),
        }
    }

    fn bytes(self) -> u64 {
        match self {
            Base::Ephemeral { gb } => gb << 30,
            Base::Swap { mb } => mb << 20,
        }
    }

    /// Formats the sparse file at `path` as Nova does (`mkfs -t vfat -n ephemeral0`,
    /// `mkswap`).
    fn format(self, path: &Path) -> Result<(), DiskError> {
        let (tool, package, mut cmd) = match self {
            Base::Ephemeral { .. } => {
                let mut c = Command::new("mkfs.vfat");
                c.args(["-n", EPHEMERAL_LABEL]);
                ("mkfs.vfat", "dosfstools", c)
            }
            Base::Swap { .. } => ("mkswap", "util-linux", Command::new("mkswap")),
        };
        let out = cmd
            .arg(path)
            .output()
            .map_err(|source| DiskError::ToolMissing {
                tool,
                package,
                source,
            })?;
        if !out.status.success() {
            return Err(DiskError::ToolFailed {
                tool,
                path: path.to_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }
}

/// The formatted base of `kind` under `instances_path/_base`, made if missing. Made under a
/// temporary name and linked into place, so that concurrent spawns of the same size never see
/// a half-formatted base; the link fails if another spawn got there first, so a base in use
/// is never replaced (file system ids differ between two formats), and the loser's copy goes.
fn ensure_base(instances_path: &Path, kind: Base) -> Result<PathBuf, DiskError> {
    let dir = instances_path.join(BASE_DIR);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let path = dir.join(kind.file_name());
    if path.exists() {
        return Ok(path);
    }
    let tmp = dir.join(format!(
        ".{}.{}.{}",
        kind.file_name(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let made = (|| {
        let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.set_len(kind.bytes()).map_err(io(&tmp))?;
        drop(f);
        kind.format(&tmp)?;
        match std::fs::hard_link(&tmp, &path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(io(&path)(e)),
            _ => Ok(()),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    made.map(|()| path)
}

/// The extra disks of a flavor, in the order Nova attaches them (vdb onwards): the ephemeral
/// disk, then swap. Each is created in `instance_dir` unless it is there already (a rebuild
/// keeps what the guest wrote). Returns their paths.
pub fn ensure_extra_disks(
    instances_path: &Path,
    instance_dir: &Path,
    ephemeral_gb: u64,
    swap_mb: u64,
) -> Result<Vec<PathBuf>, DiskError> {
    // A base and the overlay on it appear together for the aging pass.
    let _bases = BASE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut disks = Vec::new();
    for (kind, file) in [
        (Base::Ephemeral { gb: ephemeral_gb }, EPHEMERAL_FILE),
        (Base::Swap { mb: swap_mb }, SWAP_FILE),
    ] {
        if kind.bytes() == 0 {
            continue;
        }
        let overlay = instance_dir.join(file);
        if !overlay.exists() {
            let base = ensure_base(instances_path, kind)?;
            create_overlay(
                &overlay,
                &OverlaySpec::new(base, BackingFormat::Raw, kind.bytes()),
            )?;
        }
        disks.push(overlay);
    }
    Ok(disks)
}

/// Held while a base is ensured and an overlay made on it, and by the aging pass
/// (`crate::imagecache`) while it reads the overlays and removes bases: a base found unused is
/// never one an overlay being made is about to back onto.
pub(crate) static BASE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The names under `_base` of the bases a flavor's ephemeral and swap disks back onto.
pub fn base_names(ephemeral_gb: u64, swap_mb: u64) -> Vec<String> {
    [
        Base::Ephemeral { gb: ephemeral_gb },
        Base::Swap { mb: swap_mb },
    ]
    .into_iter()
    .filter(|k| k.bytes() > 0)
    .map(Base::file_name)
    .collect()
}

/// The guest's device names of a server's disks, as Nova's block device mapping shows them:
/// root `/dev/vda`, then the ephemeral disk, then swap.
pub fn device_names(ephemeral_gb: u64, swap_mb: u64) -> (Option<String>, Option<String>) {
    let mut next = b'b';
    let mut take = |present: bool| {
        present.then(|| {
            let d = format!("/dev/vd{}", next as char);
            next += 1;
            d
        })
    };
    let eph = take(ephemeral_gb > 0);
    let swap = take(swap_mb > 0);
    (eph, swap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_follow_novas_order() {
        assert_eq!(device_names(0, 0), (None, None));
        assert_eq!(device_names(1, 0), (Some("/dev/vdb".into()), None));
        assert_eq!(device_names(0, 512), (None, Some("/dev/vdb".into())));
        assert_eq!(
            device_names(1, 512),
            (Some("/dev/vdb".into()), Some("/dev/vdc".into()))
        );
    }

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("--help").output().is_ok()
    }

    #[test]
    fn disks_are_overlays_on_formatted_bases() {
        if !have("mkfs.vfat") || !have("mkswap") {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "mkfs.vfat and mkswap are needed (node/scripts/install-deps.sh)"
            );
            eprintln!("skipping: mkfs.vfat or mkswap is missing");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let inst = tmp.path().join("i1");
        std::fs::create_dir_all(&inst).unwrap();
        let disks = ensure_extra_disks(tmp.path(), &inst, 1, 64).unwrap();
        assert_eq!(disks, vec![inst.join("disk.eph0"), inst.join("disk.swap")]);
        let base = tmp.path().join("_base/ephemeral_1_vfat");
        assert_eq!(std::fs::metadata(&base).unwrap().len(), 1 << 30);
        let head = |path: &Path, n: usize| {
            use std::io::Read;
            let mut b = vec![0u8; n];
            std::fs::File::open(path)
                .unwrap()
                .read_exact(&mut b)
                .unwrap();
            b
        };
        let boot = head(&base, 512);
        // A FAT boot sector with its label.
        assert_eq!(&boot[510..512], &[0x55, 0xaa]);
        assert!(boot[..512].windows(10).any(|w| w == b"ephemeral0"));
        let swap = head(&tmp.path().join("_base/swap_64"), 4096);
        assert_eq!(&swap[4096 - 10..4096], b"SWAPSPACE2");
        // A second server of the same sizes reuses the bases; a rebuild keeps its files.
        let inst2 = tmp.path().join("i2");
        std::fs::create_dir_all(&inst2).unwrap();
        ensure_extra_disks(tmp.path(), &inst2, 1, 64).unwrap();
        let again = ensure_extra_disks(tmp.path(), &inst, 1, 64).unwrap();
        assert_eq!(again, disks);
        let names: Vec<_> = std::fs::read_dir(tmp.path().join("_base"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// Spawns of the same size at once share one base, and no temporary file is left.
    #[test]
    fn concurrent_spawns_share_one_base() {
        if !have("mkfs.vfat") || !have("mkswap") {
            eprintln!("skipping: mkfs.vfat or mkswap is missing");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let root = root.clone();
                std::thread::spawn(move || {
                    let inst = root.join(format!("i{i}"));
                    std::fs::create_dir_all(&inst).unwrap();
                    ensure_extra_disks(&root, &inst, 2, 32).unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().len(), 2);
        }
        let mut names: Vec<_> = std::fs::read_dir(root.join("_base"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ephemeral_2_vfat", "swap_32"]);
    }
}
