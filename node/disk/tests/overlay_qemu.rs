//! Our overlays judged by qemu: `qemu-img check` finds nothing, `qemu-img info --backing-chain`
//! shows the chain, reads fall through to the base and writes land in the overlay.

mod common;

use std::path::Path;

use common::*;
use shoal_disk::qcow2::{
    create_overlay, inspect_with, BackingFormat, InspectPolicy, OverlayError, OverlaySpec,
};

const MIB: u64 = 1 << 20;

fn chain(path: &Path) -> Vec<serde_json::Value> {
    let out = ok(
        "qemu-img",
        &[
            "info",
            "--backing-chain",
            "--output=json",
            path.to_str().unwrap(),
        ],
    );
    serde_json::from_str(&out).unwrap()
}

/// Everything an overlay over `base` must satisfy; `base` holds 0x5a in its first MiB and 0xc3
/// at [8 MiB, 9 MiB), zero elsewhere.
fn check_overlay(base: &Path, fmt: BackingFormat, base_size: u64, size: u64) {
    let dir = base.parent().unwrap();
    let out = dir.join(format!("overlay-{size}.qcow2"));
    let info = create_overlay(&out, &OverlaySpec::new(base, fmt, size)).unwrap();
    assert_eq!(info.backing_size, base_size);
    qemu_img_check(&out);

    let chain = chain(&out);
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(chain[0]["format"], "qcow2");
    assert_eq!(chain[0]["virtual-size"], size);
    assert_eq!(chain[0]["backing-filename"], base.to_str().unwrap());
    assert_eq!(chain[0]["full-backing-filename"], base.to_str().unwrap());
    assert_eq!(chain[0]["backing-filename-format"], fmt.as_str());
    assert_eq!(chain[0]["format-specific"]["data"]["compat"], "1.1");
    assert_eq!(chain[1]["filename"], base.to_str().unwrap());
    assert_eq!(chain[1]["format"], fmt.as_str());
    assert_eq!(chain[1]["virtual-size"], base_size);

    // Reads fall through to the base; past the base's end they read zero.
    qemu_io_expect(&out, "qcow2", 0x5a, 0, MIB);
    qemu_io_expect(&out, "qcow2", 0xc3, 8 * MIB, MIB);
    qemu_io_expect(&out, "qcow2", 0, 2 * MIB, MIB);
    if size > base_size {
        // Just past the base's end, and the last bytes of the disk.
        let n = (size - base_size).min(MIB);
        qemu_io_expect(&out, "qcow2", 0, base_size, n);
        qemu_io_expect(&out, "qcow2", 0, size - n, n);
    }

    // A write lands in the overlay and leaves the base alone.
    let before = sha(base);
    qemu_io_write(&out, "qcow2", 0xa5, 4096, 128 * 1024);
    assert_eq!(sha(base), before, "the base changed");
    qemu_io_expect(&out, "qcow2", 0xa5, 4096, 128 * 1024);
    qemu_io_expect(&out, "qcow2", 0x5a, 0, 4096);
    qemu_io_expect(
        &out,
        "qcow2",
        0x5a,
        4096 + 128 * 1024,
        MIB - 4096 - 128 * 1024,
    );
    qemu_io_expect(base, fmt.as_str(), 0x5a, 0, MIB);
    qemu_img_check(&out);

    // Our own refcount walk agrees with qemu's after qemu allocated clusters.
    let ours = inspect_with(&out, &InspectPolicy::overlay()).unwrap();
    assert_eq!(ours.virtual_size, size);
    assert_eq!(ours.backing_file.as_deref(), base.to_str());
    assert!(ours.verified_clusters > info.file_size / info.cluster_size);
}

/// Overlays over a raw base whose bytes were written directly, equal in size and larger.
#[test]
fn overlay_over_raw_base() {
    if !qemu_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mut bytes = vec![0u8; 64 * MIB as usize];
    bytes[..MIB as usize].fill(0x5a);
    bytes[8 * MIB as usize..9 * MIB as usize].fill(0xc3);
    std::fs::write(&base, &bytes).unwrap();
    check_overlay(&base, BackingFormat::Raw, 64 * MIB, 64 * MIB);
    check_overlay(&base, BackingFormat::Raw, 64 * MIB, 10 << 30);
    check_overlay(&base, BackingFormat::Raw, 64 * MIB, (64 << 20) + 512);
}

/// Overlays over a qcow2 base made by `qemu-img create` and filled by `qemu-io`.
#[test]
fn overlay_over_qcow2_base() {
    if !qemu_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let b = base.to_str().unwrap();
    ok("qemu-img", &["create", "-q", "-f", "qcow2", b, "64M"]);
    qemu_io_write(&base, "qcow2", 0x5a, 0, MIB);
    qemu_io_write(&base, "qcow2", 0xc3, 8 * MIB, MIB);
    check_overlay(&base, BackingFormat::Qcow2, 64 * MIB, 64 * MIB);
    check_overlay(&base, BackingFormat::Qcow2, 64 * MIB, 1 << 40);

    let small = dir.path().join("small.qcow2");
    let e = create_overlay(
        &small,
        &OverlaySpec::new(&base, BackingFormat::Qcow2, 32 * MIB),
    )
    .unwrap_err();
    assert!(matches!(e, OverlayError::SmallerThanBacking { .. }), "{e}");
}

/// A chain of our own overlays (overlay on overlay) is still a valid chain for qemu.
#[test]
fn overlay_on_overlay() {
    if !qemu_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x5au8; MIB as usize]).unwrap();
    let mid = dir.path().join("mid.qcow2");
    create_overlay(&mid, &OverlaySpec::new(&base, BackingFormat::Raw, 4 * MIB)).unwrap();
    qemu_io_write(&mid, "qcow2", 0x77, 2 * MIB, 4096);
    let top = dir.path().join("top.qcow2");
    create_overlay(&top, &OverlaySpec::new(&mid, BackingFormat::Qcow2, 8 * MIB)).unwrap();
    qemu_img_check(&top);
    assert_eq!(chain(&top).len(), 3);
    qemu_io_expect(&top, "qcow2", 0x5a, 0, MIB);
    qemu_io_expect(&top, "qcow2", 0x77, 2 * MIB, 4096);
    qemu_io_expect(&top, "qcow2", 0, 4 * MIB, 4 * MIB);
}

/// Overlays of many sizes and cluster sizes pass `qemu-img check` and report the right size.
#[test]
fn random_sizes_pass_qemu_img_check() {
    if !qemu_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![1u8; 4096]).unwrap();
    let sizes = [
        4096u64,
        512 * 1000 + 512,
        1 << 29,
        (1 << 29) + 512,
        3 << 40,
        64 << 40,
    ];
    for (i, &size) in sizes.iter().enumerate() {
        for bits in [12, 16, 21] {
            let out = dir.path().join(format!("o-{i}-{bits}.qcow2"));
            let mut spec = OverlaySpec::new(&base, BackingFormat::Raw, size);
            spec.cluster_bits = bits;
            match create_overlay(&out, &spec) {
                Ok(_) => {}
                // 4 KiB clusters cannot map 64 TiB in one refcount block of metadata.
                Err(OverlayError::ClusterBits(12) | OverlayError::Size(_)) if bits == 12 => {
                    continue
                }
                Err(e) => panic!("{size} {bits}: {e}"),
            }
            qemu_img_check(&out);
            assert_eq!(chain(&out)[0]["virtual-size"], size);
            assert_eq!(chain(&out)[0]["cluster-size"], 1u64 << bits);
        }
    }
}
