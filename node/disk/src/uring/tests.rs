//! The writer against the file it produces: every test compares the bytes on disk and the
//! returned digest with an independent `sha2` computation over the source bytes.

use std::pin::Pin;
use std::task::{Context, Poll};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::io::ReadBuf;

use super::*;

/// A writer, or `None` when this host has no io_uring (then the test says so and passes, except
/// under CI=true where that is a failure).
fn writer(path: &Path, total: u64, opts: &WriterOptions, fault: Fault) -> Option<UringWriter> {
    match UringWriter::spawn(path, total, opts, fault) {
        Ok(w) => Some(w),
        Err(UringError::Unsupported(e)) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "io_uring is unavailable under CI=true: {e}"
            );
            eprintln!("skipping: io_uring is unavailable here: {e}");
            None
        }
        Err(e) => panic!("writer setup failed: {e}"),
    }
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

fn opts(chunk_size: usize) -> WriterOptions {
    WriterOptions {
        chunk_size,
        slots: 4,
        direct: true,
        ..WriterOptions::default()
    }
}

/// Writes `src` in chunks of `chunk` bytes, in the given order of chunk indices, all at once.
async fn write_chunks(w: &UringWriter, src: &[u8], chunk: usize, order: &[usize]) {
    let mut tasks = tokio::task::JoinSet::new();
    for &i in order {
        let w = w.clone();
        let start = i * chunk;
        let bytes = src[start..(start + chunk).min(src.len())].to_vec();
        tasks.spawn(async move { w.write_chunk(start as u64, bytes).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
}

async fn round_trip(len: usize, chunk: usize, shuffle: bool, direct: bool, fault: Fault) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let src = data(len, len as u64 ^ chunk as u64);
    let o = WriterOptions {
        direct,
        ..opts(chunk)
    };
    let Some(w) = writer(&path, len as u64, &o, fault) else {
        return;
    };
    let mut order: Vec<usize> = (0..len.div_ceil(chunk)).collect();
    if shuffle {
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    }
    write_chunks(&w, &src, chunk, &order).await;
    let digest = w.finish().await.unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk.len(), len, "file length");
    assert!(
        on_disk == src,
        "file bytes differ (len {len}, chunk {chunk}, shuffle {shuffle})"
    );
    let independent: [u8; 32] = sha2::Sha256::digest(&src).into();
    assert_eq!(digest.0, independent);
}

/// Byte-exact files and digests at the alignment edges, in order.
#[tokio::test]
async fn edge_sizes_are_byte_exact() {
    let chunk = 64 << 10;
    for len in [
        0,
        1,
        4095,
        4096,
        4097,
        chunk - 1,
        chunk,
        chunk + 1,
        3 * chunk + 4097,
    ] {
        round_trip(len, chunk, false, true, Fault::default()).await;
    }
}

/// Chunks written out of order and concurrently still make the exact file, and the digest
/// comes from the chunks as they went by: reading the file back is forbidden here.
#[tokio::test]
async fn chunks_out_of_order() {
    let no_read_back = Fault {
        no_read_back: true,
        ..Fault::default()
    };
    round_trip(9 * (64 << 10) + 123, 64 << 10, true, true, no_read_back).await;
}

/// With a window too small for the chunks that arrive early, the digest is still exact: what
/// the window could not keep is read back, between the chunks it did keep.
#[tokio::test]
async fn chunks_beyond_the_hash_window_are_read_back() {
    let chunk = 64 << 10;
    let len = 9 * chunk + 123;
    for window in [0, chunk, 3 * chunk] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let src = data(len, window as u64);
        let o = WriterOptions {
            hash_window: window,
            ..opts(chunk)
        };
        let Some(w) = writer(&path, len as u64, &o, Fault::default()) else {
            return;
        };
        // Last to first, one at a time: every chunk but the last written arrives early.
        for i in (0..len.div_ceil(chunk)).rev() {
            let start = i * chunk;
            let bytes = src[start..(start + chunk).min(len)].to_vec();
            w.write_chunk(start as u64, bytes).await.unwrap();
        }
        let digest = w.finish().await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), src);
        assert_eq!(digest.0, <[u8; 32]>::from(sha2::Sha256::digest(&src)));
    }
}

/// Chunk sizes that are not page multiples: every chunk has a buffered head and tail around an
/// O_DIRECT middle.
#[tokio::test]
async fn unaligned_chunks() {
    round_trip(20 * 5000 + 17, 5000, true, true, Fault::default()).await;
    round_trip(7 * 12289, 12289, false, true, Fault::default()).await;
}

/// Without O_DIRECT everything goes through the buffered descriptor.
#[tokio::test]
async fn buffered_only() {
    round_trip(5 * 8192 + 1, 8192, true, false, Fault::default()).await;
}

/// Short writes are resubmitted until the chunk is complete, including remainders that start
/// at unaligned offsets of a direct segment.
#[tokio::test]
async fn short_writes_are_resubmitted() {
    for cap in [1000, 4096, 4096 + 512] {
        let fault = Fault {
            short_write: Some(cap),
            ..Fault::default()
        };
        round_trip(3 * (32 << 10) + 777, 32 << 10, true, true, fault).await;
    }
}

/// When O_DIRECT writes fail with EINVAL, the writer falls back to buffered writes for them and
/// for everything after, and the file is still exact.
#[tokio::test]
async fn direct_einval_falls_back_to_buffered() {
    let fault = Fault {
        direct_einval: true,
        ..Fault::default()
    };
    round_trip(6 * 8192 + 5, 8192, true, true, fault).await;
}

/// A reader that returns at most a few bytes per read, to prove chunks are filled across short
/// reads and the last chunk ends at EOF.
struct Dribble {
    data: Vec<u8>,
    at: usize,
    rng: rand::rngs::StdRng,
}

impl AsyncRead for Dribble {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let step = self.rng.random_range(1..=7usize);
        let n = step.min(self.data.len() - self.at).min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn reader_with_short_reads_and_eof() {
    for len in [0usize, 1, 4097, 3 * 8192, 3 * 8192 + 5] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let src = data(len, 99);
        let Some(w) = writer(&path, len as u64, &opts(8192), Fault::default()) else {
            return;
        };
        let reader = Dribble {
            data: src.clone(),
            at: 0,
            rng: rand::rngs::StdRng::seed_from_u64(1),
        };
        assert_eq!(w.write_from(reader).await.unwrap(), len as u64);
        let digest = w.finish().await.unwrap();
        assert!(std::fs::read(&path).unwrap() == src);
        assert_eq!(digest, Digest(sha2::Sha256::digest(&src).into()));
    }
}

/// A chunk whose hash does not match is refused before anything is written, and the file is then
/// incomplete.
#[tokio::test]
async fn checksum_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let Some(w) = writer(&path, 8192, &opts(4096), Fault::default()) else {
        return;
    };
    let good = data(4096, 1);
    w.write_chunk_verified(0, good.clone(), Digest::of(&good))
        .await
        .unwrap();
    let bad = data(4096, 2);
    let e = w
        .write_chunk_verified(4096, bad, Digest::of(&good))
        .await
        .unwrap_err();
    assert!(
        matches!(e, UringError::ChecksumMismatch { offset: 4096, .. }),
        "{e}"
    );
    assert_eq!(&std::fs::read(&path).unwrap()[4096..], &[0u8; 4096][..]);
    let e = w.finish().await.unwrap_err();
    assert!(
        matches!(
            e,
            UringError::Incomplete {
                first_missing: 4096
            }
        ),
        "{e}"
    );
}

/// Overlapping, out-of-range and oversized chunks are refused; a missing middle is reported.
#[tokio::test]
async fn bad_chunks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let Some(w) = writer(&path, 10_000, &opts(4096), Fault::default()) else {
        return;
    };
    w.write_chunk(0, vec![1u8; 4096]).await.unwrap();
    let e = w.write_chunk(4000, vec![1u8; 10]).await.unwrap_err();
    assert!(matches!(e, UringError::Overlap { offset: 4000 }), "{e}");
    let e = w.write_chunk(9999, vec![1u8; 2]).await.unwrap_err();
    assert!(matches!(e, UringError::OutOfRange { .. }), "{e}");
    let e = w.write_chunk(0, vec![1u8; 4097]).await.unwrap_err();
    assert!(matches!(e, UringError::TooLarge { .. }), "{e}");
    w.write_chunk(8192, vec![1u8; 10_000 - 8192]).await.unwrap();
    let e = w.finish().await.unwrap_err();
    assert!(
        matches!(
            e,
            UringError::Incomplete {
                first_missing: 4096
            }
        ),
        "{e}"
    );
}

#[test]
fn plan_splits_head_pages_and_tail() {
    let p = |o, l| plan(o, l, true).collect::<Vec<_>>();
    assert_eq!(p(0, 4096), [(0, 4096, Fd::Direct)]);
    assert_eq!(p(0, 4097), [(0, 4096, Fd::Direct), (4096, 1, Fd::Buffered)]);
    assert_eq!(p(1, 4095), [(1, 4095, Fd::Buffered)]);
    assert_eq!(
        p(100, 10_000),
        [
            (100, 3996, Fd::Buffered),
            (4096, 4096, Fd::Direct),
            (8192, 1908, Fd::Buffered)
        ]
    );
    assert_eq!(
        plan(0, 8192, false).collect::<Vec<_>>(),
        [(0, 8192, Fd::Buffered)]
    );
}

/// Where the file system takes O_DIRECT, the writer uses it (otherwise the other tests would
/// only prove the buffered path).
#[tokio::test]
async fn direct_is_used_when_the_file_system_allows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let Some(w) = writer(&path, 4096, &opts(4096), Fault::default()) else {
        return;
    };
    let probe = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path);
    assert_eq!(w.is_direct(), probe.is_ok());
    eprintln!(
        "direct: {}, registered buffers: {}",
        w.is_direct(),
        w.is_registered()
    );
    w.write_chunk(0, vec![7u8; 4096]).await.unwrap();
    w.finish().await.unwrap();
}

#[test]
fn missing_io_uring_is_its_own_error() {
    for errno in [libc::EPERM, libc::ENOSYS, libc::EACCES] {
        let e = setup_error(io::Error::from_raw_os_error(errno));
        assert!(matches!(e, UringError::Unsupported(_)), "{errno}: {e}");
    }
    for errno in [libc::EINVAL, libc::ENOMEM, libc::EMFILE] {
        let e = setup_error(io::Error::from_raw_os_error(errno));
        assert!(matches!(e, UringError::Setup(_)), "{errno}: {e}");
    }
}

/// Invalid options are refused before any ring or file exists.
#[test]
fn options_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    for o in [
        WriterOptions {
            slots: 0,
            ..opts(4096)
        },
        WriterOptions {
            chunk_size: 0,
            ..opts(4096)
        },
        WriterOptions {
            chunk_size: (1 << 30) + 1,
            ..opts(4096)
        },
    ] {
        let e = UringWriter::create(&path, 1, &o).unwrap_err();
        assert!(matches!(e, UringError::Options(_)), "{e}");
    }
    assert!(!path.exists());
}
