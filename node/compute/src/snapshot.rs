//! Server snapshots (`createImage`, and the image `shelve` saves): what the new image says
//! about itself, and how the root disk becomes a standalone image.
//!
//! As Nova's compute API builds a snapshot's image (`_create_image` and
//! `_initialize_instance_snapshot_metadata`): the source image's properties as the server was
//! built with them, minus those Nova never inherits, then `instance_uuid`, `user_id`,
//! `image_type` = `snapshot`, `base_image_ref` and the caller's metadata on top; `min_ram` from
//! the source image and `min_disk` the larger of the source image's and the flavor's root disk
//! (Nova's `get_system_metadata_from_image`). The disk and container formats are left for the
//! upload, which sets what the driver wrote (qcow2, bare).
//!
//! The disk: the instance's qcow2 overlay is flattened onto its base with `qemu-img convert`
//! (what Nova's libvirt driver runs for a snapshot), into a qcow2 with no backing file.

use std::collections::BTreeMap;
use std::path::Path;

use crate::server::ServerRecord;

/// The format the agent writes snapshots in (Nova's `snapshot_image_format` for a qcow2
/// instance disk).
pub const DISK_FORMAT: &str = "qcow2";

/// The source image as far as a snapshot inherits from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceImage {
    pub min_ram: u64,
    pub min_disk: u64,
    pub disk_format: Option<String>,
    pub properties: BTreeMap<String, String>,
}

/// What a snapshot's image is created with: Glance's `min_ram`, `min_disk` and its additional
/// properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub min_ram: u64,
    pub min_disk: u64,
    pub properties: BTreeMap<String, String>,
}

/// Whether a source image's property stays off its snapshots: Nova's
/// `non_inheritable_image_properties` (`cache_in_nova`, `bittorrent`) and its signature
/// properties, Glance's own `os_glance_*` ones, and the hashes openstacksdk declares for the
/// bytes it uploaded (`owner_specified.openstack.*`), which the snapshot's bytes do not have.
fn inherited(key: &str) -> bool {
    !(matches!(
        key,
        "cache_in_nova"
            | "bittorrent"
            | "img_signature"
            | "img_signature_hash_method"
            | "img_signature_key_type"
            | "img_signature_certificate_uuid"
            | "instance_uuid"
            | "image_type"
            | "base_image_ref"
            | "user_id"
            | "image_location"
            | "image_state"
    ) || key.starts_with("os_glance")
        || key.starts_with("owner_specified.openstack."))
}

/// The new image's fields for a snapshot of `server` by `user_id`, with the caller's
/// `metadata`. `source` is the image the server was built from, `None` when it is gone: then
/// what the server row kept of it (kernel, ramdisk, command line) is inherited.
pub fn snapshot_meta(
    server: &ServerRecord,
    user_id: &str,
    source: Option<&SourceImage>,
    metadata: &BTreeMap<String, String>,
) -> SnapshotMeta {
    let mut properties: BTreeMap<String, String> = match source {
        Some(src) => src
            .properties
            .iter()
            .filter(|(k, _)| inherited(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        None => {
            let img = &server.image;
            [
                ("kernel_id", img.kernel_id.clone()),
                ("ramdisk_id", img.ramdisk_id.clone()),
                ("os_command_line", img.kernel_cmdline.clone()),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_owned(), v?)))
            .collect()
        }
    };
    properties.insert("base_image_ref".into(), server.image.id.clone());
    properties.insert("instance_uuid".into(), server.id.clone());
    properties.insert("user_id".into(), user_id.to_owned());
    properties.insert("image_type".into(), "snapshot".into());
    for (k, v) in metadata {
        properties.insert(k.clone(), v.clone());
    }
    let (min_ram, src_disk, vhd) = match source {
        Some(s) => (
            s.min_ram,
            s.min_disk,
            s.disk_format.as_deref() == Some("vhd"),
        ),
        None => (0, 0, false),
    };
    let root_gb = server.flavor.disk_gb;
    SnapshotMeta {
        min_ram,
        min_disk: if vhd { root_gb } else { src_disk.max(root_gb) },
        properties,
    }
}

/// The image `shelve` saves the server's disk to: `<name>-shelved`, as Nova names it.
pub fn shelved_name(server: &ServerRecord) -> String {
    format!("{}-shelved", server.name)
}

/// Flattens the qcow2 overlay `disk` (and the chain under it) into a standalone qcow2 at `out`
/// with `qemu-img convert`: written to a temporary name beside `out`, then renamed, so `out`
/// is never a partial image. Blocking.
pub fn flatten(disk: &Path, out: &Path) -> Result<(), String> {
    let part = out.with_extension("part");
    let result = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "qcow2"])
        .arg(disk)
        .arg(&part)
        .output();
    let fail = |why: String| {
        let _ = std::fs::remove_file(&part);
        Err(why)
    };
    match result {
        Err(e) => fail(format!("cannot run qemu-img: {e}")),
        Ok(o) if !o.status.success() => fail(format!(
            "qemu-img convert failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => match std::fs::rename(&part, out) {
            Ok(()) => Ok(()),
            Err(e) => fail(format!("cannot rename the snapshot: {e}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::tests::record;

    #[test]
    fn a_snapshot_inherits_as_nova_does() {
        let mut server = record();
        server.flavor.disk_gb = 5;
        let source = SourceImage {
            min_ram: 128,
            min_disk: 2,
            disk_format: Some("raw".into()),
            properties: [
                ("kernel_id", "k"),
                ("hw_disk_bus", "virtio"),
                ("cache_in_nova", "True"),
                ("owner_specified.openstack.md5", "abc"),
                ("img_signature", "sig"),
                ("instance_uuid", "someone-else"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        };
        let meta: BTreeMap<String, String> = [("kernel_id".to_owned(), "k2".to_owned())]
            .into_iter()
            .collect();
        let m = snapshot_meta(&server, "u1", Some(&source), &meta);
        assert_eq!((m.min_ram, m.min_disk), (128, 5));
        let p = &m.properties;
        assert_eq!(p["image_type"], "snapshot");
        assert_eq!(p["instance_uuid"], server.id);
        assert_eq!(p["base_image_ref"], "img");
        assert_eq!(p["user_id"], "u1");
        assert_eq!(p["hw_disk_bus"], "virtio");
        // The caller's metadata wins over what is inherited.
        assert_eq!(p["kernel_id"], "k2");
        for gone in [
            "cache_in_nova",
            "owner_specified.openstack.md5",
            "img_signature",
        ] {
            assert!(!p.contains_key(gone), "{gone} inherited");
        }
        // A larger source min_disk wins; a vhd source takes the flavor's.
        let mut big = source.clone();
        big.min_disk = 9;
        assert_eq!(snapshot_meta(&server, "u", Some(&big), &meta).min_disk, 9);
        big.disk_format = Some("vhd".into());
        assert_eq!(snapshot_meta(&server, "u", Some(&big), &meta).min_disk, 5);
    }

    #[test]
    fn without_its_source_image_a_snapshot_keeps_what_the_row_kept() {
        let mut server = record();
        server.image.kernel_id = Some("k".into());
        server.image.kernel_cmdline = Some("console=ttyS0".into());
        let m = snapshot_meta(&server, "u", None, &BTreeMap::new());
        assert_eq!(m.properties["kernel_id"], "k");
        assert_eq!(m.properties["os_command_line"], "console=ttyS0");
        assert!(!m.properties.contains_key("ramdisk_id"));
        assert_eq!((m.min_ram, m.min_disk), (0, 1));
        assert_eq!(shelved_name(&server), "vm-shelved");
    }

    #[test]
    fn flatten_writes_a_standalone_qcow2() {
        if std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: no qemu-img");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let mut data = vec![0u8; 1 << 20];
        data[..5].copy_from_slice(b"SHOAL");
        std::fs::write(&base, &data).unwrap();
        let disk = dir.path().join("disk");
        shoal_disk::qcow2::create_overlay(
            &disk,
            &shoal_disk::qcow2::OverlaySpec::new(
                &base,
                shoal_disk::qcow2::BackingFormat::Raw,
                2 << 20,
            ),
        )
        .unwrap();
        let out = dir.path().join("snap.qcow2");
        flatten(&disk, &out).unwrap();
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&out)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 2 << 20);
        assert!(info.get("backing-filename").is_none(), "{info}");
        // The base's bytes are in the snapshot itself.
        let raw = dir.path().join("back.raw");
        let ok = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&out)
            .arg(&raw)
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(&std::fs::read(&raw).unwrap()[..5], b"SHOAL");
        assert!(!out.with_extension("part").exists());
        // A disk that is not there: an error naming qemu-img, no partial file.
        let err = flatten(&dir.path().join("missing"), &dir.path().join("x.qcow2")).unwrap_err();
        assert!(err.contains("qemu-img"), "{err}");
        assert!(!dir.path().join("x.part").exists());
    }
}
