//! RocksDB storage for Raft: the log store and the state machine, in one database.
//!
//! One RocksDB instance per node holds five column families (see `docs/consensus.md`, section
//! "Storage"): `log` (entries keyed by big-endian index), `raft_meta` (vote, committed,
//! last purged), `rows` (the tables, keyed `table \0 key`), `history` (watch events keyed by
//! revision and sequence) and `sm_meta` (applied log id, membership, history floor, current
//! snapshot). Everything stored is rkyv-encoded through the wire mirrors and validated when
//! read back: a stored value that fails validation is corruption, reported as an error.
//!
//! Every RocksDB call runs on tokio's blocking pool, never on a runtime worker. Writes that
//! openraft relies on for safety (vote, append, truncate, purge, apply) are synced to the WAL
//! before they are acknowledged.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use shoal_types::codec::DecodeError;

mod log;
mod sm;
mod snapshot;
mod watch;

pub use log::LogStore;
pub use sm::{SnapshotBuilder, StateMachineStore, StateReader};
pub use watch::{WatchError, WatchProgress, WatchStream};

pub(crate) const CF_LOG: &str = "log";
pub(crate) const CF_RAFT_META: &str = "raft_meta";
pub(crate) const CF_ROWS: &str = "rows";
pub(crate) const CF_HISTORY: &str = "history";
pub(crate) const CF_SM_META: &str = "sm_meta";
const ALL_CFS: [&str; 5] = [CF_LOG, CF_RAFT_META, CF_ROWS, CF_HISTORY, CF_SM_META];

/// Tunables of the store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How many revisions of watch history are kept; older events are pruned as entries are
    /// applied and a watch that starts before them gets [`WatchError::Compacted`].
    pub history_retention: u64,
    /// Capacity, in apply batches, of the live watch channel. A watcher that falls further
    /// behind than this re-reads the history instead.
    pub watch_channel_capacity: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            history_retention: 100_000,
            watch_channel_capacity: 1024,
        }
    }
}

/// A storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB operation failed")]
    Rocks(#[from] rocksdb::Error),
    #[error("stored {what} is corrupt")]
    Corrupt {
        what: String,
        #[source]
        source: DecodeError,
    },
    #[error("stored {what} is invalid: {reason}")]
    Invalid { what: String, reason: String },
    #[error("file I/O failed")]
    Io(#[from] io::Error),
    #[error("snapshot is refused: {0}")]
    BadSnapshot(String),
    #[error("column family {0} is missing")]
    MissingColumnFamily(&'static str),
    #[error("a blocking storage task did not complete")]
    Join(#[from] tokio::task::JoinError),
}

impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> io::Error {
        let kind = match &e {
            StoreError::Corrupt { .. }
            | StoreError::Invalid { .. }
            | StoreError::BadSnapshot(_) => io::ErrorKind::InvalidData,
            StoreError::Io(io) => io.kind(),
            _ => io::ErrorKind::Other,
        };
        // Keep the whole chain in the message: openraft only prints the io::Error.
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        io::Error::new(kind, msg)
    }
}

/// The database shared by the log store and the state machine.
#[derive(Debug)]
pub(crate) struct Db {
    pub(crate) db: DB,
    pub(crate) dir: PathBuf,
}

impl Db {
    pub(crate) fn cf(&self, name: &'static str) -> &ColumnFamily {
        // Every column family is created at open; `open` checks they are all present.
        self.db
            .cf_handle(name)
            .expect("column families are checked at open")
    }

    pub(crate) fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    pub(crate) fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }
}

/// Opens (creating if needed) the store under `dir` and returns its two halves.
///
/// Blocking: call it from `spawn_blocking` or before the runtime serves traffic. It finishes a
/// snapshot install that a crash interrupted, so the state machine is consistent on return.
pub fn open(dir: &Path, opts: StoreOptions) -> Result<(LogStore, StateMachineStore), StoreError> {
    std::fs::create_dir_all(dir.join("snapshots"))?;
    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    let cfs = ALL_CFS
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
    let db = DB::open_cf_descriptors(&db_opts, dir.join("db"), cfs)?;
    for name in ALL_CFS {
        if db.cf_handle(name).is_none() {
            return Err(StoreError::MissingColumnFamily(name));
        }
    }
    let db = Arc::new(Db {
        db,
        dir: dir.to_path_buf(),
    });
    let log = LogStore::new(db.clone());
    let sm = StateMachineStore::open(db, opts)?;
    Ok((log, sm))
}

/// Runs blocking storage work off the async runtime.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await?
}

pub(crate) fn corrupt(what: impl Into<String>) -> impl FnOnce(DecodeError) -> StoreError {
    let what = what.into();
    move |source| StoreError::Corrupt { what, source }
}
