//! Every disk format the Image API accepts, as qemu-img makes it, passes the upload check
//! declared as itself and is refused declared as anything else; qemu-img's own ways of making
//! an image reach other files (vmdk descriptors and extents, vmdk parents) are refused.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use shoal_disk::qcow2::{check_upload, DiskFormat, InspectError};

fn create(dir: &Path, name: &str, fmt: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p.to_str().unwrap(), size]);
    ok("qemu-img", &args);
    p
}

/// qemu-img's own virtual size for the image, which ours must equal.
fn qemu_virtual_size(p: &Path, fmt: &str) -> u64 {
    let out = ok(
        "qemu-img",
        &["info", "--output=json", "-f", fmt, p.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

#[test]
fn qemu_made_images_pass_as_their_format_only() {
    if !qemu_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("dyn.vhd", "vpc", "", DiskFormat::Vhd),
        (
            "fixed.vhd",
            "vpc",
            "subformat=fixed,force_size=on",
            DiskFormat::Vhd,
        ),
        ("disk.vhdx", "vhdx", "", DiskFormat::Vhdx),
        ("sparse.vmdk", "vmdk", "", DiskFormat::Vmdk),
        (
            "stream.vmdk",
            "vmdk",
            "subformat=streamOptimized",
            DiskFormat::Vmdk,
        ),
        ("disk.vdi", "vdi", "", DiskFormat::Vdi),
        ("fixed.vdi", "vdi", "static=on", DiskFormat::Vdi),
        ("disk.ploop", "parallels", "", DiskFormat::Ploop),
        ("disk.qcow2", "qcow2", "", DiskFormat::Qcow2),
    ];
    for (name, fmt, opts, declared) in cases {
        let p = create(dir.path(), name, fmt, opts, "64M");
        if fmt != "vmdk" || !opts.contains("stream") {
            qemu_io_write(&p, fmt, 0x33, 1 << 20, 65536);
        }
        let info = check_upload(&p, declared).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.format, declared);
        assert_eq!(
            info.virtual_size,
            qemu_virtual_size(&p, fmt),
            "{name}: virtual size"
        );
        for other in DiskFormat::ALL {
            // A fixed vhd is raw bytes and a footer: as raw (or ami) it is a raw disk.
            let raw_too = name == "fixed.vhd" && matches!(other, DiskFormat::Raw | DiskFormat::Ami);
            if other == declared || raw_too {
                continue;
            }
            assert!(check_upload(&p, other).is_err(), "{name} passed as {other}");
        }
    }
}

#[test]
fn qemu_made_vmdk_references_are_refused() {
    if !qemu_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Descriptor files whose data is in other files.
    for sub in [
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ] {
        let p = create(
            dir.path(),
            &format!("{sub}.vmdk"),
            "vmdk",
            &format!("subformat={sub}"),
            "8M",
        );
        let e = check_upload(&p, DiskFormat::Vmdk).unwrap_err();
        assert!(matches!(e, InspectError::ExternalExtent(_)), "{sub}: {e}");
        assert!(e.to_string().contains(&format!("{sub}-")), "{sub}: {e}");
    }
    // A sparse vmdk with a parent.
    let base = create(dir.path(), "base.vmdk", "vmdk", "", "8M");
    let child = dir.path().join("child.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "vmdk",
            child.to_str().unwrap(),
        ],
    );
    let e = check_upload(&child, DiskFormat::Vmdk).unwrap_err();
    assert!(matches!(e, InspectError::ParentImage { .. }), "{e}");
}

/// An ISO image made the way install media are: `CD001` at byte 0x8001, and accepted only as iso.
#[test]
fn iso_images_are_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("boot.iso");
    let mut b = vec![0u8; 0x10000];
    b[0x8000] = 1;
    b[0x8001..0x8006].copy_from_slice(b"CD001");
    std::fs::write(&p, &b).unwrap();
    assert_eq!(
        check_upload(&p, DiskFormat::Iso).unwrap().virtual_size,
        0x10000
    );
    let e = check_upload(&p, DiskFormat::Aki).unwrap_err();
    assert!(matches!(e, InspectError::MissingSignature { .. }), "{e}");
}
