//! The typed state layer: every table of the replicated keyspace that the node's services use,
//! its key format and its record type, and one way to read and change a row (`Table<T>`).
//!
//! Owns: table names (`tables`), row encoding (JSON), compare-and-set with a bounded retry,
//! the typed errors a read or a write can end in, and the records several services share
//! (`records`: a port, which the network service owns and the compute agent binds). The
//! services (`identity`, `images`, `compute`, `network`) go through it instead of writing their
//! own read/CAS/retry loops.
//!
//! Must never depend on a service crate, on the HTTP layer (axum) or on the node's config: it
//! sits directly on `shoal-consensus`, and under it an in-memory `MemStore` serves unit tests.

mod mem;
pub mod quota;
pub mod records;
mod store;
mod table;
pub mod tables;
pub mod time;
pub mod validate;

pub use mem::MemStore;
pub use shoal_types::{Expect, Row, Txn, TxnResponse};
pub use store::{State, Store};
pub use table::{retry, Listing, Table, Versioned, DEFAULT_ATTEMPTS};

/// What a read or a write of the state ended in, keeping which row it was about.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The stored bytes do not decode as the table's record type.
    #[error("row {key:?} of table {table} is corrupt: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    /// Every compare-and-set attempt lost to a concurrent writer.
    #[error("row {key:?} of table {table} kept changing over {attempts} attempts; retry")]
    Contended {
        table: &'static str,
        key: String,
        attempts: u32,
    },
    #[error("no row {key:?} in table {table}")]
    NotFound { table: &'static str, key: String },
    #[error("row {key:?} of table {table} already exists")]
    AlreadyExists { table: &'static str, key: String },
    /// No leader, peer unreachable, or this replica is stopping: the caller may retry later.
    #[error("the cluster is unavailable: {0}")]
    Unavailable(String),
    /// The write was sent and its fate is unknown (the leader was lost before it answered):
    /// it may or may not have been applied. Not retried blindly: read before retrying, or
    /// resend with the same request id.
    #[error("the write's outcome is unknown: {0}")]
    CommitUnknown(String),
    /// The transaction itself was refused before it was proposed (names, sizes).
    #[error("the write was refused: {0}")]
    Rejected(String),
}

impl StateError {
    /// Maps a consensus error met on `table`/`key` into the typed state error.
    pub fn from_cluster(
        table: &'static str,
        key: &str,
        e: shoal_consensus::cluster::ClusterError,
    ) -> Self {
        use shoal_consensus::cluster::ClusterError as C;
        match e {
            C::Corrupt(reason) => StateError::Corrupt {
                table,
                key: key.to_owned(),
                reason,
            },
            C::NotFound(_) => StateError::NotFound {
                table,
                key: key.to_owned(),
            },
            C::BadRequest(m) => StateError::Rejected(m),
            C::CommitUnknown(m) => StateError::CommitUnknown(m),
            other => StateError::Unavailable(other.to_string()),
        }
    }
}
