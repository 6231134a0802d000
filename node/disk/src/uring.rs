//! The io_uring chunk writer: lays the chunks of an image into a file at their offsets, in any
//! order, and returns the SHA-256 of the whole file once it is complete and durable.
//!
//! The ring lives on its own thread (as Firecracker's `io_uring` module): async callers send
//! commands over a channel and wait on a oneshot for the completion. A semaphore with one permit
//! per registered buffer bounds the chunks in flight, so the ring thread always has a buffer for
//! the command it receives and never blocks on the caller.
//!
//! Each chunk is copied into a 4096-aligned registered buffer at the same alignment as its file
//! offset (`offset % 4096`), so the whole pages inside a chunk are written through an `O_DIRECT`
//! descriptor straight from that buffer, and the unaligned head and tail bytes through a second,
//! buffered descriptor of the same file. No byte is written through both, and a page written with
//! `O_DIRECT` lies inside one chunk, so page cache and direct writes never race on a page. The
//! file is sized with `ftruncate` up front, so the last, short page needs no padding. A short
//! write is resubmitted for the rest (re-split, as its offset may no longer be aligned); `finish`
//! submits an fsync, which covers both descriptors (they share the inode).

use std::alloc::{self, Layout};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{mpsc, Arc};

use bytes::Bytes;
use io_uring::{opcode, types, IoUring};
use sha2::{Digest as _, Sha256};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// Alignment for `O_DIRECT`: offsets, lengths and buffer addresses. 4096 also satisfies
/// 512-byte logical blocks.
pub const ALIGN: u64 = 4096;

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// How the writer is set up.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// The largest chunk accepted, in bytes (at most 1 GiB).
    pub chunk_size: usize,
    /// Registered buffers, hence chunks in flight.
    pub slots: usize,
    /// Use `O_DIRECT` for aligned pages when the file system allows it.
    pub direct: bool,
    /// Bytes of chunks that arrived ahead of the in-order prefix that the writer keeps (by
    /// reference: the caller's `Bytes`) to hash once the prefix reaches them. Chunks past this
    /// budget are read back from the file at `finish` instead.
    pub hash_window: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_size: 4 << 20,
            slots: 8,
            direct: true,
            hash_window: 256 << 20,
        }
    }
}

/// Why writing failed.
#[derive(Debug, Error)]
pub enum UringError {
    /// The kernel refuses io_uring (EPERM under seccomp or `io_uring_disabled`, ENOSYS on old
    /// kernels): the caller may fall back to ordinary writes.
    #[error("io_uring is not available on this host")]
    Unsupported(#[source] io::Error),
    #[error("io_uring setup failed")]
    Setup(#[source] io::Error),
    #[error("invalid writer options: {0}")]
    Options(&'static str),
    #[error("{path:?} cannot be opened for writing")]
    Open { path: PathBuf, source: io::Error },
    #[error("chunk at offset {offset} of {len} bytes does not fit in the {total}-byte file")]
    OutOfRange { offset: u64, len: u64, total: u64 },
    #[error("chunk of {len} bytes is larger than the {max}-byte chunk size")]
    TooLarge { len: usize, max: usize },
    #[error("chunk at offset {offset} overlaps bytes already written")]
    Overlap { offset: u64 },
    #[error("chunk at offset {offset} has SHA-256 {actual}, expected {expected}")]
    ChecksumMismatch {
        offset: u64,
        expected: Digest,
        actual: Digest,
    },
    #[error("writing {len} bytes at offset {offset} failed")]
    Write {
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("fsync failed")]
    Fsync(#[source] io::Error),
    #[error("reading back the file for its digest failed")]
    ReadBack(#[source] io::Error),
    #[error("reading the source failed")]
    Read(#[source] io::Error),
    #[error("an earlier chunk failed to write, so the file is not complete")]
    ChunkFailed,
    #[error("the file is incomplete: the first missing byte is at offset {first_missing}")]
    Incomplete { first_missing: u64 },
    #[error("the writer thread is gone")]
    Gone,
}

/// A 4096-aligned heap buffer, registered with the ring.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len, ALIGN as usize).expect("valid layout");
        // SAFETY: `layout` has a non-zero size (the chunk size plus one page).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes owned by this buffer.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: the buffer is plain owned memory; it moves to the ring thread with its owner.
unsafe impl Send for AlignedBuf {}

enum Command {
    Write {
        offset: u64,
        data: Bytes,
        reply: oneshot::Sender<Result<(), UringError>>,
        permit: OwnedSemaphorePermit,
    },
    Finish {
        reply: oneshot::Sender<Result<Digest, UringError>>,
    },
}

/// Test hooks, applied to completions after the kernel really wrote the bytes, so rewriting them
/// is idempotent: `short_write` pretends at most that many bytes were written per submission;
/// `direct_einval` pretends every O_DIRECT write failed with EINVAL.
#[derive(Debug, Clone, Copy, Default)]
struct Fault {
    short_write: Option<u32>,
    direct_einval: bool,
    /// Make any read-back at `finish` fail, to prove a digest came from the bytes as they went by.
    no_read_back: bool,
}

/// The async handle. Cheap to clone; chunks may be written from many tasks at once.
#[derive(Debug, Clone)]
pub struct UringWriter {
    tx: mpsc::Sender<Command>,
    permits: Arc<Semaphore>,
    total_len: u64,
    chunk_size: usize,
    slots: usize,
    direct: bool,
    registered: bool,
}

/// Identifies the file a segment goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fd {
    Buffered = 0,
    Direct = 1,
}

/// Splits `[offset, offset + len)` into a buffered head, a direct middle of whole pages and a
/// buffered tail. Without `O_DIRECT` it is one buffered segment.
fn plan(offset: u64, len: u64, direct: bool) -> impl Iterator<Item = (u64, u64, Fd)> {
    let end = offset + len;
    let a = offset.next_multiple_of(ALIGN);
    let b = end / ALIGN * ALIGN;
    let segs = if !direct || a >= b {
        [
            (offset, len, Fd::Buffered),
            (0, 0, Fd::Buffered),
            (0, 0, Fd::Buffered),
        ]
    } else {
        [
            (offset, a - offset, Fd::Buffered),
            (a, b - a, Fd::Direct),
            (b, end - b, Fd::Buffered),
        ]
    };
    segs.into_iter().filter(|s| s.1 > 0)
}

/// EPERM (seccomp, `kernel.io_uring_disabled`), EACCES and ENOSYS mean "no io_uring here";
/// anything else is a real setup failure.
fn setup_error(e: io::Error) -> UringError {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::ENOSYS | libc::EACCES) => UringError::Unsupported(e),
        _ => UringError::Setup(e),
    }
}

impl UringWriter {
    /// Creates (or truncates) `path`, sizes it to `total_len` and starts the ring thread.
    pub fn create(
        path: &Path,
        total_len: u64,
        opts: &WriterOptions,
    ) -> Result<UringWriter, UringError> {
        Self::spawn(path, total_len, opts, Fault::default())
    }

    fn spawn(
        path: &Path,
        total_len: u64,
        opts: &WriterOptions,
        fault: Fault,
    ) -> Result<UringWriter, UringError> {
        if opts.slots == 0 || opts.slots > 1024 {
            return Err(UringError::Options("slots must be between 1 and 1024"));
        }
        if opts.chunk_size == 0 || opts.chunk_size > 1 << 30 {
            return Err(UringError::Options(
                "chunk_size must be between 1 byte and 1 GiB",
            ));
        }
        // Three segments per chunk at most, plus the fsync.
        let entries = (3 * opts.slots as u32 + 1).next_power_of_two();
        let ring = IoUring::new(entries).map_err(setup_error)?;
        let open_err = |source| UringError::Open {
            path: path.to_owned(),
            source,
        };
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(open_err)?;
        buffered.set_len(total_len).map_err(open_err)?;
        let direct = if opts.direct {
            // tmpfs and some others refuse O_DIRECT with EINVAL: then everything is buffered.
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .ok()
        } else {
            None
        };
        let direct_fd = direct.as_ref().unwrap_or(&buffered).as_raw_fd();
        ring.submitter()
            .register_files(&[buffered.as_raw_fd(), direct_fd])
            .map_err(UringError::Setup)?;

        let bufs: Vec<AlignedBuf> = (0..opts.slots)
            .map(|_| AlignedBuf::new(opts.chunk_size + ALIGN as usize))
            .collect();
        let iovecs: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.ptr.as_ptr().cast(),
                iov_len: b.layout.size(),
            })
            .collect();
        // SAFETY: each iovec describes a live allocation owned by `bufs`, which moves into the ring
        // thread together with the ring and outlives it there (it is dropped after the ring).
        // Registration can fail on RLIMIT_MEMLOCK; plain writes from the same buffers work then.
        let registered = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();

        let (tx, rx) = mpsc::channel();
        let ring_thread = RingThread {
            ring,
            bufs,
            registered,
            direct: direct.is_some(),
            total_len,
            free: (0..opts.slots).rev().collect(),
            jobs: (0..opts.slots).map(|_| None).collect(),
            segs: Vec::new(),
            free_segs: Vec::new(),
            inflight: 0,
            covered: BTreeMap::new(),
            hasher: Sha256::new(),
            hashed_to: 0,
            ahead: BTreeMap::new(),
            ahead_bytes: 0,
            hash_window: opts.hash_window,
            fault,
            buffered,
            _direct: direct,
        };
        let has_direct = ring_thread.direct;
        std::thread::Builder::new()
            .name("shoal-uring".into())
            .spawn(move || ring_thread.run(rx))
            .map_err(UringError::Setup)?;
        Ok(UringWriter {
            tx,
            permits: Arc::new(Semaphore::new(opts.slots)),
            total_len,
            chunk_size: opts.chunk_size,
            slots: opts.slots,
            direct: has_direct,
            registered,
        })
    }

    /// Whether whole pages go through `O_DIRECT` (false on file systems without it). The ring
    /// thread may still fall back to buffered writes if a direct write fails with EINVAL.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether the buffers are registered with the ring (false when RLIMIT_MEMLOCK forbids).
    pub fn is_registered(&self) -> bool {
        self.registered
    }

    /// The largest chunk accepted.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Writes `data` at `offset`. Returns once the kernel has written it (not yet durable:
    /// [`finish`](Self::finish) is). Each byte of the file must be written exactly once.
    pub async fn write_chunk(&self, offset: u64, data: impl Into<Bytes>) -> Result<(), UringError> {
        let data = data.into();
        let len = data.len() as u64;
        if data.len() > self.chunk_size {
            return Err(UringError::TooLarge {
                len: data.len(),
                max: self.chunk_size,
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.total_len)
        {
            return Err(UringError::OutOfRange {
                offset,
                len,
                total: self.total_len,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| UringError::Gone)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Write {
                offset,
                data,
                reply,
                permit,
            })
            .map_err(|_| UringError::Gone)?;
        rx.await.map_err(|_| UringError::Gone)?
    }

    /// Checks `data` against `expected` (hashed off the async threads), then writes it.
    pub async fn write_chunk_verified(
        &self,
        offset: u64,
        data: impl Into<Bytes>,
        expected: Digest,
    ) -> Result<(), UringError> {
        let data = data.into();
        let hashed = data.clone();
        let actual = tokio::task::spawn_blocking(move || Digest::of(&hashed))
            .await
            .map_err(|_| UringError::Gone)?;
        if actual != expected {
            return Err(UringError::ChecksumMismatch {
                offset,
                expected,
                actual,
            });
        }
        self.write_chunk(offset, data).await
    }

    /// Waits for every write, checks that every byte was written, fsyncs and returns the SHA-256
    /// of the whole file.
    pub async fn finish(self) -> Result<Digest, UringError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Finish { reply })
            .map_err(|_| UringError::Gone)?;
        rx.await.map_err(|_| UringError::Gone)?
    }

    /// Reads `reader` to its end in chunks of the writer's chunk size (a chunk is filled across
    /// short reads) and writes them at consecutive offsets, several in flight. Returns the bytes
    /// read.
    pub async fn write_from<R: AsyncRead + Unpin>(&self, mut reader: R) -> Result<u64, UringError> {
        let mut tasks = tokio::task::JoinSet::new();
        let mut offset = 0u64;
        loop {
            let mut chunk = vec![0u8; self.chunk_size];
            let mut filled = 0;
            while filled < chunk.len() {
                let n = reader
                    .read(&mut chunk[filled..])
                    .await
                    .map_err(UringError::Read)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            chunk.truncate(filled);
            let this = self.clone();
            let at = offset;
            tasks.spawn(async move { this.write_chunk(at, chunk).await });
            offset += filled as u64;
            while tasks.len() >= self.slots {
                tasks
                    .join_next()
                    .await
                    .expect("non-empty")
                    .map_err(|_| UringError::Gone)??;
            }
            if filled < self.chunk_size {
                break;
            }
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|_| UringError::Gone)??;
        }
        Ok(offset)
    }
}

struct Job {
    offset: u64,
    pad: usize,
    outstanding: usize,
    error: Option<UringError>,
    reply: oneshot::Sender<Result<(), UringError>>,
    _permit: OwnedSemaphorePermit,
}

#[derive(Clone, Copy)]
struct Seg {
    slot: usize,
    offset: u64,
    len: u64,
    fd: Fd,
}

const FSYNC: u64 = u64::MAX;

struct RingThread {
    ring: IoUring,
    bufs: Vec<AlignedBuf>,
    registered: bool,
    direct: bool,
    total_len: u64,
    free: Vec<usize>,
    jobs: Vec<Option<Job>>,
    segs: Vec<Option<Seg>>,
    free_segs: Vec<usize>,
    inflight: usize,
    /// Written ranges, start -> end, disjoint and merged.
    covered: BTreeMap<u64, u64>,
    /// The whole-file hash, fed in file order: a chunk at `hashed_to` is hashed as it arrives,
    /// with the chunks kept in `ahead` that it makes contiguous. What the window could not keep is
    /// read back at the end.
    hasher: Sha256,
    hashed_to: u64,
    ahead: BTreeMap<u64, Bytes>,
    ahead_bytes: usize,
    hash_window: usize,
    fault: Fault,
    // The files stay open as long as the ring that refers to them by registered index.
    buffered: File,
    _direct: Option<File>,
}

impl RingThread {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut finish: Option<oneshot::Sender<Result<Digest, UringError>>> = None;
        let mut failed: Option<UringError> = None;
        loop {
            if self.inflight == 0 {
                if let Some(reply) = finish.take() {
                    let result = match failed.take() {
                        Some(e) => Err(e),
                        None => self.complete(),
                    };
                    let _ = reply.send(result);
                    return;
                }
                match rx.recv() {
                    Ok(cmd) => self.command(cmd, &mut finish),
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.command(cmd, &mut finish);
            }
            if self.inflight > 0 {
                if let Err(e) = self.ring.submit_and_wait(1) {
                    if e.raw_os_error() != Some(libc::EINTR) {
                        // The ring is unusable: fail everything in flight and stop. Writes may
                        // still be in flight in the kernel, so their buffers are leaked.
                        self.fail_all(&e);
                        std::mem::forget(std::mem::take(&mut self.bufs));
                        if let Some(reply) = finish.take() {
                            let _ = reply.send(Err(UringError::Setup(e)));
                        }
                        return;
                    }
                }
                self.reap(&mut failed);
            }
        }
    }

    fn command(
        &mut self,
        cmd: Command,
        finish: &mut Option<oneshot::Sender<Result<Digest, UringError>>>,
    ) {
        match cmd {
            Command::Finish { reply } => *finish = Some(reply),
            Command::Write {
                offset,
                data,
                reply,
                permit,
            } => {
                if let Err(e) = self.cover(offset, data.len() as u64) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let slot = self.free.pop().expect("a permit guarantees a free slot");
                let pad = (offset % ALIGN) as usize;
                self.bufs[slot].as_mut_slice()[pad..pad + data.len()].copy_from_slice(&data);
                let len = data.len() as u64;
                self.hash_in_order(offset, data);
                self.jobs[slot] = Some(Job {
                    offset,
                    pad,
                    outstanding: 0,
                    error: None,
                    reply,
                    _permit: permit,
                });
                self.submit_range(slot, offset, len, self.direct);
            }
        }
    }

    /// Feeds the whole-file hash with `data` (at `offset`) if it continues the hashed prefix,
    /// then with the kept chunks that follow; otherwise keeps it if the window has room.
    fn hash_in_order(&mut self, offset: u64, data: Bytes) {
        if offset != self.hashed_to {
            if self.ahead_bytes + data.len() <= self.hash_window {
                self.ahead_bytes += data.len();
                self.ahead.insert(offset, data);
            }
            return;
        }
        self.hasher.update(&data);
        self.hashed_to += data.len() as u64;
        while let Some(next) = self.ahead.remove(&self.hashed_to) {
            self.ahead_bytes -= next.len();
            self.hasher.update(&next);
            self.hashed_to += next.len() as u64;
        }
    }

    /// Records `[offset, offset + len)` as written, refusing overlaps.
    fn cover(&mut self, offset: u64, len: u64) -> Result<(), UringError> {
        let end = offset + len;
        let mut start = offset;
        let mut stop = end;
        if let Some((&s, &e)) = self.covered.range(..=offset).next_back() {
            if e > offset {
                return Err(UringError::Overlap { offset });
            }
            if e == offset {
                start = s;
            }
        }
        if let Some((&s, &e)) = self.covered.range(offset..).next() {
            if s < end {
                return Err(UringError::Overlap { offset });
            }
            if s == end {
                stop = e;
                self.covered.remove(&s);
            }
        }
        self.covered.insert(start, stop);
        Ok(())
    }

    fn submit_range(&mut self, slot: usize, offset: u64, len: u64, direct: bool) {
        for (off, len, fd) in plan(offset, len, direct) {
            let seg = Seg {
                slot,
                offset: off,
                len,
                fd,
            };
            let id = match self.free_segs.pop() {
                Some(id) => {
                    self.segs[id] = Some(seg);
                    id
                }
                None => {
                    self.segs.push(Some(seg));
                    self.segs.len() - 1
                }
            };
            self.push_seg(id);
            self.jobs[slot]
                .as_mut()
                .expect("job of a live slot")
                .outstanding += 1;
            self.inflight += 1;
        }
    }

    fn push_seg(&mut self, id: usize) {
        let seg = self.segs[id].expect("live segment");
        let job = self.jobs[seg.slot].as_ref().expect("job of a live slot");
        let at = job.pad + (seg.offset - job.offset) as usize;
        let buf = &self.bufs[seg.slot];
        // SAFETY: `at + seg.len` is within the slot: the chunk was copied to `[pad, pad + len)`
        // and segments only cover it.
        let ptr = unsafe { buf.ptr.as_ptr().add(at) };
        let fd = types::Fixed(seg.fd as u32);
        let sqe = if self.registered {
            opcode::WriteFixed::new(fd, ptr, seg.len as u32, seg.slot as u16)
                .offset(seg.offset)
                .build()
        } else {
            opcode::Write::new(fd, ptr, seg.len as u32)
                .offset(seg.offset)
                .build()
        };
        let sqe = sqe.user_data(id as u64);
        for _ in 0..2 {
            // SAFETY: the buffer stays alive and untouched until this entry completes: the slot is
            // only reused once all its segments have completed, and on a fatal ring error the
            // buffers are leaked rather than freed (see `run`).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            // Full (short-write resubmissions can exceed three per slot): hand the queue to the
            // kernel and retry.
            if let Err(e) = self.ring.submit() {
                panic!("io_uring submit failed with a full queue: {e}");
            }
        }
        unreachable!("an empty submission queue has room");
    }

    fn reap(&mut self, failed: &mut Option<UringError>) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (id, mut res) in done {
            self.inflight -= 1;
            let id = id as usize;
            let seg = self.segs[id].take().expect("completion of a live segment");
            self.free_segs.push(id);
            if self.fault.direct_einval && seg.fd == Fd::Direct {
                res = -libc::EINVAL;
            }
            let job = self.jobs[seg.slot].as_mut().expect("job of a live slot");
            job.outstanding -= 1;
            if res == -libc::EINVAL && seg.fd == Fd::Direct {
                // The file system took O_DIRECT at open but not this write (a logical block
                // larger than 4096, or a stacked file system): write it buffered, and everything
                // after it.
                self.direct = false;
                self.submit_range(seg.slot, seg.offset, seg.len, false);
            } else if res < 0 {
                job.error.get_or_insert(UringError::Write {
                    offset: seg.offset,
                    len: seg.len,
                    source: io::Error::from_raw_os_error(-res),
                });
            } else if res == 0 {
                job.error.get_or_insert(UringError::Write {
                    offset: seg.offset,
                    len: seg.len,
                    source: io::ErrorKind::WriteZero.into(),
                });
            } else {
                let mut n = res as u64;
                if let Some(cap) = self.fault.short_write {
                    n = n.min(u64::from(cap));
                }
                if n < seg.len {
                    // Short write: resubmit the rest, re-split for alignment.
                    self.submit_range(seg.slot, seg.offset + n, seg.len - n, seg.fd == Fd::Direct);
                }
            }
            let job = self.jobs[seg.slot].as_mut().expect("job of a live slot");
            if job.outstanding == 0 {
                let job = self.jobs[seg.slot].take().expect("job");
                self.free.push(seg.slot);
                let result = match job.error {
                    Some(e) => {
                        failed.get_or_insert(UringError::ChunkFailed);
                        Err(e)
                    }
                    None => Ok(()),
                };
                let _ = job.reply.send(result);
            }
        }
    }

    fn fail_all(&mut self, e: &io::Error) {
        for job in self.jobs.iter_mut().filter_map(Option::take) {
            let _ = job.reply.send(Err(UringError::Write {
                offset: job.offset,
                len: 0,
                source: io::Error::new(e.kind(), e.to_string()),
            }));
        }
    }

    /// Checks coverage, fsyncs through the ring and finishes the digest.
    fn complete(&mut self) -> Result<Digest, UringError> {
        let first_missing = match self.covered.iter().next() {
            _ if self.total_len == 0 => None,
            Some((&0, &end)) if end == self.total_len => None,
            Some((&0, &end)) => Some(end),
            _ => Some(0),
        };
        if let Some(first_missing) = first_missing {
            return Err(UringError::Incomplete { first_missing });
        }
        let fsync = opcode::Fsync::new(types::Fixed(Fd::Buffered as u32))
            .build()
            .user_data(FSYNC);
        // SAFETY: fsync takes no buffer; nothing else is in flight, so the ring has room.
        unsafe { self.ring.submission().push(&fsync) }.expect("submission queue has room");
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(UringError::Fsync(e)),
            }
        }
        let res = self
            .ring
            .completion()
            .next()
            .map(|c| c.result())
            .unwrap_or(-libc::EIO);
        if res < 0 {
            return Err(UringError::Fsync(io::Error::from_raw_os_error(-res)));
        }
        // Bytes the window could not keep were not hashed on the way: read them back, up to the
        // next kept chunk.
        let mut buf = vec![0u8; 1 << 20];
        while self.hashed_to < self.total_len {
            if let Some(next) = self.ahead.remove(&self.hashed_to) {
                self.hasher.update(&next);
                self.hashed_to += next.len() as u64;
                continue;
            }
            let until = self
                .ahead
                .range(self.hashed_to..)
                .next()
                .map_or(self.total_len, |(&at, _)| at);
            let n = (until - self.hashed_to).min(buf.len() as u64) as usize;
            if self.fault.no_read_back {
                return Err(UringError::ReadBack(io::Error::other(
                    "read-back forbidden",
                )));
            }
            self.buffered
                .read_exact_at(&mut buf[..n], self.hashed_to)
                .map_err(UringError::ReadBack)?;
            self.hasher.update(&buf[..n]);
            self.hashed_to += n as u64;
        }
        Ok(Digest(std::mem::take(&mut self.hasher).finalize().into()))
    }
}

impl Drop for RingThread {
    fn drop(&mut self) {
        // Unregister before the buffers are freed. Field order would drop `ring` first anyway;
        // this makes the ordering explicit. Errors do not matter: the ring is going away.
        let _ = self.ring.submitter().unregister_buffers();
    }
}

#[cfg(test)]
mod tests;
