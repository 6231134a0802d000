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
    /// Adds to numeric fields of a JSON object row, each bounded: the transaction fails (and
    /// nothing of it applies) if a field would pass its bound. Boxed so the archived `Op`
    /// keeps its size and entries written before this variant existed still decode.
    Add(Box<AddOp>),
}

impl Op {
    pub fn table(&self) -> &str {
        match self {
            Op::Put { table, .. } | Op::Delete { table, .. } => table,
            Op::Add(a) => &a.table,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
            Op::Add(a) => &a.key,
        }
    }
}

/// [`Op::Add`]: integer additions to top-level fields of a row holding a JSON object, checked
/// by the state machine when it applies the entry. This is how a claim on a shared counter (a
/// host's used vCPUs) commits without conditioning on the row's revision: concurrent claims
/// that all fit all commit, in log order, and the one that would overfill is refused.
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
pub struct AddOp {
    pub table: String,
    pub key: String,
    pub fields: Vec<AddField>,
}

/// One field of an [`AddOp`]: `field += delta`; with `max`, the result must be at most `max`.
/// A missing field counts as 0, and a result below 0 is stored as 0.
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
pub struct AddField {
    pub name: String,
    pub delta: i64,
    pub max: Option<i64>,
}

/// Why an [`AddOp`] cannot apply to a row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    #[error("the row does not exist")]
    Absent,
    #[error("the row is not a JSON object")]
    NotAnObject,
    #[error("field {0:?} is not an integer")]
    NotAnInteger(String),
    #[error("field {field:?} would be {value}, over its bound {max}")]
    OverBound { field: String, value: i64, max: i64 },
}

impl AddOp {
    /// The row's new value: `value` (a JSON object) with the additions made, or why not. Pure
    /// and deterministic, so every replica decides the same.
    pub fn apply(&self, value: Option<&[u8]>) -> Result<Vec<u8>, AddError> {
        let value = value.ok_or(AddError::Absent)?;
        let mut obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(value).map_err(|_| AddError::NotAnObject)?;
        for f in &self.fields {
            let cur = match obj.get(&f.name) {
                None | Some(serde_json::Value::Null) => 0,
                Some(v) => v
                    .as_i64()
                    .or_else(|| v.as_u64().map(|u| i64::try_from(u).unwrap_or(i64::MAX)))
                    .ok_or_else(|| AddError::NotAnInteger(f.name.clone()))?,
            };
            let new = cur.saturating_add(f.delta).max(0);
            if let Some(max) = f.max {
                if f.delta > 0 && new > max {
                    return Err(AddError::OverBound {
                        field: f.name.clone(),
                        value: new,
                        max,
                    });
                }
            }
            obj.insert(f.name.clone(), serde_json::Value::from(new));
        }
        Ok(serde_json::to_vec(&obj).expect("a JSON map serialises"))
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

    /// Adds an [`Op::Add`]. If it cannot apply, the transaction fails with
    /// `failed_precondition` = `preconditions.len()` + the op's index.
    pub fn add(mut self, table: &str, key: &str, fields: Vec<AddField>) -> Self {
        self.ops.push(Op::Add(Box::new(AddOp {
            table: table.to_owned(),
            key: key.to_owned(),
            fields,
        })));
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
            validate_user_table(&p.table)?;
            validate_key(&p.key)?;
        }
        for op in &self.ops {
            validate_user_table(op.table())?;
            validate_key(op.key())?;
            match op {
                Op::Put { value, .. } if value.len() > MAX_VALUE_BYTES => {
                    return Err(TxnError::ValueTooLarge {
                        len: value.len(),
                        max: MAX_VALUE_BYTES,
                    });
                }
                Op::Add(a)
                    if a.fields.is_empty()
                        || a.fields.len() > MAX_ADD_FIELDS
                        || a.fields
                            .iter()
                            .any(|f| f.name.is_empty() || f.name.len() > MAX_TABLE_LEN) =>
                {
                    return Err(TxnError::BadAdd);
                }
                _ => {}
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
    /// A transaction with a client request id: the state machine applies it once per id
    /// within [`REQUEST_WINDOW`] revisions and answers a repeat with the first result. Boxed so
    /// the archived enum keeps the size it had with `Txn` alone, and entries written before
    /// this variant existed still decode.
    Keyed(Box<KeyedTxn>),
}

impl Command {
    /// The transaction, keyed or not.
    pub fn txn(&self) -> &Txn {
        match self {
            Command::Txn(t) => t,
            Command::Keyed(k) => &k.txn,
        }
    }

    /// The client request id, if the command carries one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Command::Txn(_) => None,
            Command::Keyed(k) => Some(&k.request_id),
        }
    }
}

/// A transaction that may be proposed more than once (a client's retry, a forward re-sent to a
/// new leader) and must be applied at most once.
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
pub struct KeyedTxn {
    /// Chosen by the client, unique per logical request (a UUID, or `agent/host/seq`).
    pub request_id: String,
    pub txn: Txn,
}

impl KeyedTxn {
    pub fn validate(&self) -> Result<(), TxnError> {
        validate_request_id(&self.request_id)?;
        self.txn.validate()
    }
}

/// How many revisions (log entries of the whole cluster) a request id is remembered for after
/// the write it keyed was applied. A repeat that commits later than this is applied again. It
/// is part of the replicated state machine's rules, so every node must use the same value.
pub const REQUEST_WINDOW: u64 = 100_000;
/// Longest client request id.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Request ids are 1-128 bytes of printable ASCII.
pub fn validate_request_id(id: &str) -> Result<(), TxnError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(TxnError::BadRequestId)
    }
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
            Command::Keyed(k) => write!(
                f,
                "txn({} preconditions, {} ops, request {})",
                k.txn.preconditions.len(),
                k.txn.ops.len(),
                k.request_id
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
    #[error("table name {0:?} is reserved: names starting with '_' belong to the store")]
    ReservedTable(String),
    #[error("request id is invalid: it must be 1-{MAX_REQUEST_ID_LEN} printable ASCII characters")]
    BadRequestId,
    #[error("an add op needs 1-{MAX_ADD_FIELDS} fields named by 1-{MAX_TABLE_LEN} bytes")]
    BadAdd,
}

/// Most fields one [`Op::Add`] may change.
pub const MAX_ADD_FIELDS: usize = 16;

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

/// A table a transaction may name: tables whose name starts with `_` are the store's own
/// (the request ids of [`KeyedTxn`]) and are written only by the state machine.
pub fn validate_user_table(table: &str) -> Result<(), TxnError> {
    validate_table(table)?;
    if table.starts_with('_') {
        return Err(TxnError::ReservedTable(table.to_owned()));
    }
    Ok(())
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

    #[test]
    fn reserved_tables_and_bad_request_ids_are_refused() {
        assert_eq!(
            Txn::new().put("_requests", "k", "v").validate(),
            Err(TxnError::ReservedTable("_requests".into()))
        );
        let keyed = |id: &str| KeyedTxn {
            request_id: id.into(),
            txn: Txn::new().put("kv", "k", "v"),
        };
        assert!(keyed("agent-1/42").validate().is_ok());
        assert_eq!(keyed("").validate(), Err(TxnError::BadRequestId));
        assert_eq!(keyed("a b").validate(), Err(TxnError::BadRequestId));
        assert_eq!(
            keyed(&"x".repeat(MAX_REQUEST_ID_LEN + 1)).validate(),
            Err(TxnError::BadRequestId)
        );
    }

    /// Adding `Command::Keyed` must not move the archived layout of `Command::Txn`: log
    /// entries and snapshots written before it existed must still decode.
    #[test]
    fn keyed_variant_keeps_the_archived_command_size() {
        assert_eq!(
            std::mem::size_of::<rkyv::Archived<Command>>(),
            4 + std::mem::size_of::<rkyv::Archived<Txn>>()
        );
    }

    fn arb_txn() -> impl Strategy<Value = Txn> {
        let name = "[a-z][a-z_]{0,7}";
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
            (
                name,
                ".{1,16}",
                ".{1,8}",
                any::<i64>(),
                any::<Option<i64>>()
            )
                .prop_map(|(table, key, name, delta, max)| Op::Add(Box::new(AddOp {
                    table,
                    key,
                    fields: vec![AddField { name, delta, max }],
                }))),
        ];
        (
            proptest::collection::vec(pre, 0..4),
            proptest::collection::vec(op, 0..4),
        )
            .prop_map(|(preconditions, ops)| Txn { preconditions, ops })
    }

    fn add(fields: &[(&str, i64, Option<i64>)]) -> AddOp {
        AddOp {
            table: "hosts".into(),
            key: "h".into(),
            fields: fields
                .iter()
                .map(|(name, delta, max)| AddField {
                    name: (*name).to_owned(),
                    delta: *delta,
                    max: *max,
                })
                .collect(),
        }
    }

    /// An add within its bounds changes only the named fields; one past a bound, a missing
    /// row or a field that is not an integer refuses the whole op; a release saturates at 0.
    #[test]
    fn bounded_adds_apply_or_refuse_whole() {
        let row = br#"{"used":3,"ram":100,"name":"h"}"#;
        let v: serde_json::Value = serde_json::from_slice(
            &add(&[("used", 2, Some(5)), ("ram", 50, None)])
                .apply(Some(row))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(v, serde_json::json!({"used": 5, "ram": 150, "name": "h"}));
        assert_eq!(
            add(&[("ram", 1, None), ("used", 3, Some(5))]).apply(Some(row)),
            Err(AddError::OverBound {
                field: "used".into(),
                value: 6,
                max: 5
            })
        );
        assert_eq!(add(&[("used", 1, None)]).apply(None), Err(AddError::Absent));
        assert_eq!(
            add(&[("name", 1, None)]).apply(Some(row)),
            Err(AddError::NotAnInteger("name".into()))
        );
        let v: serde_json::Value = serde_json::from_slice(
            &add(&[("used", -9, Some(0)), ("new", 4, None)])
                .apply(Some(row))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(v["used"], 0);
        assert_eq!(v["new"], 4);
        let empty = Txn::new().add("hosts", "h", Vec::new());
        assert_eq!(empty.validate(), Err(TxnError::BadAdd));
    }

    proptest! {
        /// Every command survives encode then validated decode unchanged.
        #[test]
        fn command_codec_round_trips(txn in arb_txn(), id in "[!-~]{1,32}", keyed: bool) {
            let cmd = if keyed {
                Command::Keyed(Box::new(KeyedTxn { request_id: id, txn }))
            } else {
                Command::Txn(txn)
            };
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
