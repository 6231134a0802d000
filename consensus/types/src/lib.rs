//! `shoal-types`: the vocabulary of Shoal's replicated state.
//!
//! This crate owns the commands that go through the Raft log (transactions over named tables),
//! the rows the state machine stores, the events its watch streams deliver and the node
//! descriptor that Raft membership carries. The scheduler, the load-test tool and the node all
//! speak these types.
//!
//! It must stay small and dependency-light: no openraft, no RocksDB, no tokio, no I/O. Anything
//! that decodes bytes from a peer goes through [`codec::decode`], which validates the archive
//! before it is trusted.

use std::fmt;

use serde::{Deserialize, Serialize};

pub mod codec;

/// Raft node identifier. Assigned once when a node is added to the cluster and never reused.
pub type NodeId = u64;

/// A node as Raft membership knows it: where to reach it and where it lives.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct NodeInfo {
    /// Human name, unique in the cluster (`shoal status` and `shoal node remove` use it).
    pub name: String,
    /// QUIC peer address (`--listen`).
    pub raft_addr: String,
    /// HTTP API address (`--api`).
    pub api_addr: String,
    /// Availability zone, used to spread voters.
    pub zone: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.raft_addr)
    }
}

/// What a precondition expects of a row.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum Expect {
    /// The row does not exist.
    Absent,
    /// The row exists, at any revision.
    Present,
    /// The row exists and was last modified at exactly this revision.
    Revision(u64),
}

/// A condition on one row that must hold for a transaction to apply.
#[derive(
    Clone,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Precondition {
    pub table: String,
    pub key: String,
    pub expect: Expect,
}

/// A change to one row.
#[derive(
    Clone,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum Op {
    Put {
        table: String,
        key: String,
        value: Vec<u8>,
    },
    Delete {
        table: String,
        key: String,
    },
}

impl Op {
    pub fn table(&self) -> &str {
        match self {
            Op::Put { table, .. } | Op::Delete { table, .. } => table,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// A transaction: if every precondition holds, every op is applied, atomically, at one
/// revision; otherwise nothing changes. This is how two nodes are kept from claiming the same
/// thing: both may propose, only the first to commit finds its preconditions true.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Txn {
    pub preconditions: Vec<Precondition>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn when(mut self, table: &str, key: &str, expect: Expect) -> Self {
        self.preconditions.push(Precondition {
            table: table.to_owned(),
            key: key.to_owned(),
            expect,
        });
        self
    }

    pub fn put(mut self, table: &str, key: &str, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Put {
            table: table.to_owned(),
            key: key.to_owned(),
            value: value.into(),
        });
        self
    }

    pub fn delete(mut self, table: &str, key: &str) -> Self {
        self.ops.push(Op::Delete {
            table: table.to_owned(),
            key: key.to_owned(),
        });
        self
    }

    /// Checks names and sizes before the transaction is proposed, so that a bad request is
    /// refused at the edge rather than committed to the log.
    pub fn validate(&self) -> Result<(), TxnError> {
        if self.ops.is_empty() && self.preconditions.is_empty() {
            return Err(TxnError::Empty);
        }
        if self.ops.len() + self.preconditions.len() > MAX_TXN_ITEMS {
            return Err(TxnError::TooManyItems {
                count: self.ops.len() + self.preconditions.len(),
                max: MAX_TXN_ITEMS,
            });
        }
        for p in &self.preconditions {
            validate_table(&p.table)?;
            validate_key(&p.key)?;
        }
        for op in &self.ops {
            validate_table(op.table())?;
            validate_key(op.key())?;
            if let Op::Put { value, .. } = op {
                if value.len() > MAX_VALUE_BYTES {
                    return Err(TxnError::ValueTooLarge {
                        len: value.len(),
                        max: MAX_VALUE_BYTES,
                    });
                }
            }
        }
        Ok(())
    }
}

/// A command replicated through the Raft log.
#[derive(
    Clone,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum Command {
    Txn(Txn),
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Txn(t) => write!(
                f,
                "txn({} preconditions, {} ops)",
                t.preconditions.len(),
                t.ops.len()
            ),
        }
    }
}

/// The state machine's answer to a [`Command`].
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct TxnResponse {
    /// Whether every precondition held and the ops were applied.
    pub succeeded: bool,
    /// The revision (log index) at which the command was applied or evaluated.
    pub revision: u64,
    /// Index into `preconditions` of the first one that did not hold.
    pub failed_precondition: Option<u32>,
}

/// A row of a table, with the revisions etcd users know.
#[derive(
    Clone,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Row {
    pub value: Vec<u8>,
    /// Revision at which the row was created (reset when it is deleted and created again).
    pub create_revision: u64,
    /// Revision of the last change; a precondition compares against this.
    pub mod_revision: u64,
    /// Number of puts since creation, starting at 1.
    pub version: u64,
}

/// What happened to a row.
#[derive(
    Clone,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum EventKind {
    Put(Row),
    Delete,
}

/// One change delivered by a watch stream, in revision order.
#[derive(
    Clone,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct WatchEvent {
    pub revision: u64,
    pub table: String,
    pub key: String,
    pub kind: EventKind,
}

/// Largest value a single row may hold. Rows are metadata; bulk bytes (images) live elsewhere.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Largest number of preconditions plus ops in one transaction.
pub const MAX_TXN_ITEMS: usize = 1024;
/// Longest table name.
pub const MAX_TABLE_LEN: usize = 64;
/// Longest key.
pub const MAX_KEY_LEN: usize = 512;

/// Why a transaction was refused before it reached the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    #[error("a transaction needs at least one precondition or op")]
    Empty,
    #[error("a transaction holds {count} preconditions and ops; at most {max} are allowed")]
    TooManyItems { count: usize, max: usize },
    #[error("table name {0:?} is invalid: use 1-{MAX_TABLE_LEN} characters from a-z, 0-9 and '_'")]
    BadTable(String),
    #[error("key is invalid: it must be 1-{MAX_KEY_LEN} bytes with no NUL byte")]
    BadKey,
    #[error("value of {len} bytes is larger than the {max}-byte limit")]
    ValueTooLarge { len: usize, max: usize },
}

/// Table names are short lowercase identifiers, so they can be used in RocksDB keys with a
/// separator and in metrics labels.
pub fn validate_table(table: &str) -> Result<(), TxnError> {
    let ok = !table.is_empty()
        && table.len() <= MAX_TABLE_LEN
        && table
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(TxnError::BadTable(table.to_owned()))
    }
}

/// Keys are any UTF-8 without NUL (the table/key separator in storage).
pub fn validate_key(key: &str) -> Result<(), TxnError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.as_bytes().contains(&0) {
        Err(TxnError::BadKey)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn validate_refuses_bad_names_and_sizes() {
        assert_eq!(Txn::new().validate(), Err(TxnError::Empty));
        assert!(matches!(
            Txn::new().put("Bad-Table", "k", "v").validate(),
            Err(TxnError::BadTable(_))
        ));
        assert_eq!(
            Txn::new().put("kv", "a\0b", "v").validate(),
            Err(TxnError::BadKey)
        );
        assert!(matches!(
            Txn::new()
                .put("kv", "k", vec![0u8; MAX_VALUE_BYTES + 1])
                .validate(),
            Err(TxnError::ValueTooLarge { .. })
        ));
        assert!(Txn::new()
            .when("kv", "k", Expect::Absent)
            .put("kv", "k", "v")
            .validate()
            .is_ok());
    }

    fn arb_txn() -> impl Strategy<Value = Txn> {
        let name = "[a-z_]{1,8}";
        let expect = prop_oneof![
            Just(Expect::Absent),
            Just(Expect::Present),
            any::<u64>().prop_map(Expect::Revision)
        ];
        let pre = (name, ".{1,16}", expect).prop_map(|(table, key, expect)| Precondition {
            table,
            key,
            expect,
        });
        let op = prop_oneof![
            (
                name,
                ".{1,16}",
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(table, key, value)| Op::Put { table, key, value }),
            (name, ".{1,16}").prop_map(|(table, key)| Op::Delete { table, key }),
        ];
        (
            proptest::collection::vec(pre, 0..4),
            proptest::collection::vec(op, 0..4),
        )
            .prop_map(|(preconditions, ops)| Txn { preconditions, ops })
    }

    proptest! {
        /// Every command survives encode then validated decode unchanged.
        #[test]
        fn command_codec_round_trips(txn in arb_txn()) {
            let cmd = Command::Txn(txn);
            let bytes = codec::encode(&cmd);
            let back: Command = codec::decode(&bytes).unwrap();
            prop_assert_eq!(back, cmd);
        }

        /// Arbitrary bytes never panic the decoder; they decode or return an error.
        #[test]
        fn decoding_garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = codec::decode::<Command>(&bytes);
            let _ = codec::decode::<WatchEvent>(&bytes);
        }
    }
}
