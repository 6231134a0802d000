//! The path a base image takes on a node: its chunks arrive out of order and are written by the
//! io_uring writer with their checksums checked, the result is inspected as an upload, and an
//! instance overlay is created on it and read through by qemu.

mod common;

use common::*;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use shoal_disk::qcow2::{check_upload, create_overlay, BackingFormat, DiskFormat, OverlaySpec};
use shoal_disk::uring::{Digest, UringError, UringWriter, WriterOptions};

#[tokio::test]
async fn streamed_base_inspected_then_overlaid() {
    if !qemu_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The "upload": a qcow2 image with data, made by qemu.
    let src = dir.path().join("src.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "64M"],
    );
    qemu_io_write(&src, "qcow2", 0x5a, 0, 1 << 20);
    qemu_io_write(&src, "qcow2", 0xc3, 40 << 20, 3 << 20);
    let bytes = std::fs::read(&src).unwrap();

    // Chunks of 256 KiB + 3 bytes (unaligned on purpose), in random order, checksums checked.
    let chunk = (256 << 10) + 3;
    let base = dir.path().join("base.qcow2");
    let opts = WriterOptions {
        chunk_size: chunk,
        slots: 4,
        direct: true,
        ..WriterOptions::default()
    };
    let w = match UringWriter::create(&base, bytes.len() as u64, &opts) {
        Ok(w) => w,
        Err(UringError::Unsupported(e)) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "io_uring unavailable: {e}"
            );
            eprintln!("skipping: io_uring unavailable: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mut order: Vec<usize> = (0..bytes.len().div_ceil(chunk)).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
    let mut tasks = tokio::task::JoinSet::new();
    for i in order {
        let piece = bytes[i * chunk..((i + 1) * chunk).min(bytes.len())].to_vec();
        let sum = Digest::of(&piece);
        let w = w.clone();
        tasks.spawn(async move { w.write_chunk_verified((i * chunk) as u64, piece, sum).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    assert_eq!(w.finish().await.unwrap(), Digest::of(&bytes));
    assert_eq!(sha(&base), sha(&src));

    // Inspected as an upload, then used as a base.
    let info = check_upload(&base, DiskFormat::Qcow2).unwrap();
    assert_eq!(info.virtual_size, 64 << 20);
    qemu_img_check(&base);
    let disk = dir.path().join("disk.qcow2");
    create_overlay(
        &disk,
        &OverlaySpec::new(&base, BackingFormat::Qcow2, 1 << 30),
    )
    .unwrap();
    qemu_img_check(&disk);
    qemu_io_expect(&disk, "qcow2", 0x5a, 0, 1 << 20);
    qemu_io_expect(&disk, "qcow2", 0xc3, 40 << 20, 3 << 20);
    qemu_io_expect(&disk, "qcow2", 0, 64 << 20, 1 << 20);
}
