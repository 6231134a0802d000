//! The upload inspector: images qemu-img makes are accepted, crafted hostile headers are refused
//! with the error that names the problem.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use proptest::prelude::*;
use shoal_disk::qcow2::header::{Extension, Header, EXT_EXTERNAL_DATA_FILE};
use shoal_disk::qcow2::{
    check_upload, create_overlay, inspect, inspect_with, BackingFormat, DiskFormat, HeaderError,
    InspectError, InspectPolicy, OverlaySpec, SyncMode,
};

fn qemu_img_create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p.to_str().unwrap(), size]);
    ok("qemu-img", &args);
    p
}

/// A clean qemu-made image to corrupt: 1 GiB, 64 KiB clusters, some data.
fn victim(dir: &Path) -> PathBuf {
    let p = qemu_img_create(dir, "victim.qcow2", "", "1G");
    qemu_io_write(&p, "qcow2", 0x42, 0, 1 << 20);
    p
}

fn patch(src: &Path, dst: &Path, at: u64, bytes: &[u8]) -> PathBuf {
    std::fs::copy(src, dst).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(dst).unwrap();
    f.write_all_at(bytes, at).unwrap();
    dst.to_owned()
}

/// Images made by qemu-img with many option sets pass the upload check, and our refcount walk
/// agrees with qemu-img check on them.
#[test]
fn qemu_made_images_are_accepted() {
    if !qemu_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("", "1G"),
        ("cluster_size=4096", "100M"),
        ("cluster_size=2M", "10G"),
        ("refcount_bits=64", "1G"),
        ("refcount_bits=8", "1G"),
        ("compat=0.10", "1G"),
        ("lazy_refcounts=on", "1G"),
        ("extended_l2=on", "1G"),
        ("compression_type=zstd", "1G"),
        ("", "0"),
    ];
    for (i, (opts, size)) in cases.iter().enumerate() {
        let p = qemu_img_create(dir.path(), &format!("ok{i}.qcow2"), opts, size);
        if *size != "0" {
            qemu_io_write(&p, "qcow2", 0x11, 65536 * 3 + 512, 300_000);
        }
        qemu_img_check(&p);
        let info = check_upload(&p, DiskFormat::Qcow2).unwrap_or_else(|e| panic!("{opts}: {e}"));
        assert_eq!(info.format, DiskFormat::Qcow2);
        let q = info.qcow2.unwrap();
        assert_eq!(q.backing_file, None);
        let strict = InspectPolicy {
            verify_refcounts: true,
            ..InspectPolicy::upload()
        };
        let verified = inspect_with(&p, &strict).unwrap_or_else(|e| panic!("{opts}: {e}"));
        assert!(verified.verified_clusters >= 3, "{opts} {size}");
        assert_eq!(inspect(&p).unwrap().virtual_size, q.virtual_size);
    }
    // A raw upload is raw.
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    assert_eq!(
        check_upload(&raw, DiskFormat::Raw).unwrap().virtual_size,
        1 << 20
    );
}

/// qemu-img's own external data file and backing file options are refused.
#[test]
fn qemu_made_hostile_images_are_refused() {
    if !qemu_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.raw");
    let p = qemu_img_create(
        dir.path(),
        "datafile.qcow2",
        &format!("data_file={}", data.display()),
        "1M",
    );
    let e = check_upload(&p, DiskFormat::Qcow2).unwrap_err();
    assert!(matches!(e, InspectError::ExternalDataFile), "{e}");

    let base = dir.path().join("base.raw");
    std::fs::write(&base, [0u8; 512]).unwrap();
    let p = dir.path().join("backed.qcow2");
    let (b, o) = (base.to_str().unwrap(), p.to_str().unwrap());
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", o, "1M"],
    );
    let e = check_upload(&p, DiskFormat::Qcow2).unwrap_err();
    assert!(matches!(&e, InspectError::BackingFile(n) if n == b), "{e}");
    assert!(e.to_string().contains("self-contained"), "{e}");
    // The same image is fine where a chain is expected.
    assert_eq!(
        inspect_with(&p, &InspectPolicy::overlay())
            .unwrap()
            .backing_file
            .as_deref(),
        Some(b)
    );
}

/// Crafted headers: each refused with the error that names it.
#[test]
fn crafted_headers_are_refused() {
    if !qemu_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let v = victim(dir.path());
    let d = dir.path();
    let refused = |name: &str, at: u64, bytes: &[u8]| {
        let p = patch(&v, &d.join(name), at, bytes);
        check_upload(&p, DiskFormat::Qcow2)
            .err()
            .or_else(|| inspect(&p).err())
            .unwrap_or_else(|| panic!("{name} was accepted"))
    };

    // Incompatible bit 2 (external data file) without the extension.
    let e = refused("incompat-data.qcow2", 72, &4u64.to_be_bytes());
    assert!(matches!(e, InspectError::ExternalDataFile), "{e}");
    // An unknown incompatible feature.
    let e = refused("incompat-unknown.qcow2", 72, &(1u64 << 40).to_be_bytes());
    assert!(
        matches!(e, InspectError::UnknownIncompatibleFeatures(b) if b == 1 << 40),
        "{e}"
    );
    // Dirty and corrupt bits.
    let e = refused("dirty.qcow2", 72, &1u64.to_be_bytes());
    assert!(matches!(e, InspectError::Dirty), "{e}");
    let e = refused("corrupt.qcow2", 72, &2u64.to_be_bytes());
    assert!(matches!(e, InspectError::Corrupt), "{e}");
    // Encrypted (old AES).
    let e = refused("aes.qcow2", 32, &1u32.to_be_bytes());
    assert!(matches!(e, InspectError::Encrypted), "{e}");
    // A huge L1 table.
    let e = refused("l1.qcow2", 36, &0x1000_0000u32.to_be_bytes());
    assert!(matches!(e, InspectError::L1Size { .. }), "{e}");
    // An absurd virtual size (with a matching L1 size it would still be too big).
    let e = refused("size.qcow2", 24, &(1u64 << 62).to_be_bytes());
    assert!(matches!(e, InspectError::VirtualSizeTooLarge { .. }), "{e}");
    // A virtual size the L1 table cannot map.
    let e = refused("l1small.qcow2", 24, &(1u64 << 40).to_be_bytes());
    assert!(matches!(e, InspectError::L1Size { .. }), "{e}");
    // L1 table outside the file, refcount table misaligned.
    let e = refused("l1off.qcow2", 40, &(1u64 << 40).to_be_bytes());
    assert!(
        matches!(
            e,
            InspectError::TableOutOfBounds {
                table: "L1 table",
                ..
            }
        ),
        "{e}"
    );
    let e = refused("rt.qcow2", 48, &0x10001u64.to_be_bytes());
    assert!(
        matches!(
            e,
            InspectError::TableOutOfBounds {
                table: "refcount table",
                ..
            }
        ),
        "{e}"
    );
    // Bad magic: qcow2 claimed, something else (QED's `QED\0`) found.
    let e = refused("magic.qcow2", 0, b"QED\0");
    assert!(
        matches!(
            e,
            InspectError::FormatMismatch {
                detected: "qed",
                ..
            }
        ),
        "{e}"
    );
    let p = patch(&v, &d.join("magic2.qcow2"), 0, b"XXXX");
    let e = inspect(&p).unwrap_err();
    assert!(
        matches!(e, InspectError::Header(HeaderError::BadMagic { .. })),
        "{e}"
    );
    // Version 4.
    let e = refused("v4.qcow2", 4, &4u32.to_be_bytes());
    assert!(
        matches!(e, InspectError::Header(HeaderError::UnsupportedVersion(4))),
        "{e}"
    );
    // A backing file name pointing outside the first cluster.
    let mut bf = 0x20000u64.to_be_bytes().to_vec();
    bf.extend_from_slice(&10u32.to_be_bytes());
    let e = refused("bfoff.qcow2", 8, &bf);
    assert!(
        matches!(e, InspectError::Header(HeaderError::BackingFileName { .. })),
        "{e}"
    );
    // Cluster bits 30.
    let e = refused("cb.qcow2", 20, &30u32.to_be_bytes());
    assert!(
        matches!(e, InspectError::Header(HeaderError::ClusterBits(30))),
        "{e}"
    );

    // Truncated header: the first 50 bytes of a good image.
    let t = d.join("trunc.qcow2");
    std::fs::write(&t, &std::fs::read(&v).unwrap()[..50]).unwrap();
    let e = inspect(&t).unwrap_err();
    assert!(
        matches!(e, InspectError::Header(HeaderError::Truncated { .. })),
        "{e}"
    );
    let empty = d.join("empty.qcow2");
    std::fs::write(&empty, b"").unwrap();
    let e = check_upload(&empty, DiskFormat::Qcow2).unwrap_err();
    assert!(
        matches!(
            e,
            InspectError::FormatMismatch {
                detected: "raw",
                ..
            }
        ),
        "{e}"
    );

    // A qcow2 image declared raw (qemu would probe it; the guest would see the host's choice).
    let e = check_upload(&v, DiskFormat::Raw).unwrap_err();
    assert!(matches!(
        e,
        InspectError::FormatMismatch {
            claimed: DiskFormat::Raw,
            detected: "qcow2"
        }
    ));
    assert!(
        e.to_string()
            .contains("declared raw but its content is qcow2"),
        "{e}"
    );
    let vmdk = d.join("x.raw");
    std::fs::write(&vmdk, b"KDMV\x01\0\0\0").unwrap();
    let e = check_upload(&vmdk, DiskFormat::Raw).unwrap_err();
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
    assert!(matches!(
        "vpc".parse::<DiskFormat>(),
        Err(InspectError::UnsupportedDiskFormat(_))
    ));
}

/// The external data file extension alone (no feature bit) is refused, built with our encoder.
#[test]
fn data_file_extension_alone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, [0u8; 512]).unwrap();
    let o = dir.path().join("o.qcow2");
    create_overlay(&o, &OverlaySpec::new(&base, BackingFormat::Raw, 1 << 30)).unwrap();
    let bytes = std::fs::read(&o).unwrap();
    let mut h = Header::decode(&bytes).unwrap();
    h.extensions.push(Extension {
        kind: EXT_EXTERNAL_DATA_FILE,
        data: b"/etc/shadow".to_vec(),
    });
    h.place_backing_file();
    let enc = h.encode().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&o).unwrap();
    f.write_all_at(&enc, 0).unwrap();
    let e = inspect_with(&o, &InspectPolicy::overlay()).unwrap_err();
    assert!(matches!(e, InspectError::ExternalDataFile), "{e}");
}

/// A leaked cluster (refcount without a reference) is found by our walk, as by qemu-img check.
#[test]
fn refcount_leak_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, [0u8; 512]).unwrap();
    let o = dir.path().join("o.qcow2");
    create_overlay(&o, &OverlaySpec::new(&base, BackingFormat::Raw, 1 << 30)).unwrap();
    inspect_with(&o, &InspectPolicy::overlay()).unwrap();
    // Cluster 3 is the L1 table (refcount 1); claim a fourth metadata cluster that is not there,
    // then grow the file so it exists.
    let f = std::fs::OpenOptions::new().write(true).open(&o).unwrap();
    f.write_all_at(&1u16.to_be_bytes(), 2 * 65536 + 4 * 2)
        .unwrap();
    f.set_len(5 * 65536).unwrap();
    let e = inspect_with(&o, &InspectPolicy::overlay()).unwrap_err();
    assert!(
        matches!(
            e,
            InspectError::RefcountMismatch {
                offset: 0x40000,
                expected: 0,
                recorded: 1
            }
        ),
        "{e}"
    );
    if qemu_tools() {
        let out = run("qemu-img", &["check", "--output=json", o.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["leaks"], 1, "qemu-img agrees: {v}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// For any virtual size and cluster size we create, the overlay passes our inspector with
    /// refcounts verified, and reports what was asked.
    #[test]
    fn overlays_pass_our_consistency_checks(
        sectors in 1u64..=(64u64 << 40) / 512,
        bits in 12u32..=21,
        qcow2_base in any::<bool>(),
    ) {
        let size = sectors * 512;
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let fmt = if qcow2_base {
            let b = dir.path().join("b0");
            std::fs::write(&b, [0u8; 512]).unwrap();
            create_overlay(&base, &OverlaySpec::new(&b, BackingFormat::Raw, 512)).unwrap();
            BackingFormat::Qcow2
        } else {
            std::fs::write(&base, [0u8; 512]).unwrap();
            BackingFormat::Raw
        };
        let o = dir.path().join("o.qcow2");
        let mut spec = OverlaySpec::new(&base, fmt, size);
        spec.cluster_bits = bits;
        spec.sync = SyncMode::None;
        match create_overlay(&o, &spec) {
            Ok(created) => {
                let info = inspect_with(&o, &InspectPolicy::overlay()).unwrap();
                prop_assert_eq!(info.virtual_size, size);
                prop_assert_eq!(info.cluster_size, 1u64 << bits);
                prop_assert_eq!(info.backing_file.as_deref(), base.to_str());
                prop_assert_eq!(info.backing_format.as_deref(), Some(fmt.as_str()));
                prop_assert_eq!(info.verified_clusters, created.file_size >> bits);
                prop_assert_eq!(info.file_size, created.file_size);
                prop_assert_eq!(info.version, 3);
            }
            // Small clusters cannot map the largest disks: refused, never written.
            Err(e) => {
                prop_assert!(bits < 16, "{} {}: {}", size, bits, e);
                prop_assert!(!o.exists());
            }
        }
    }
}
