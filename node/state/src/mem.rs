//! An in-memory `Store` with the same transaction semantics as the state machine (all
//! preconditions checked, then every op applied at one new revision), for unit tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use shoal_consensus::cluster::ClusterError;
use shoal_types::{Expect, Op, Row, Txn, TxnResponse};

use crate::store::Rows;
use crate::Store;

#[derive(Debug, Default)]
pub struct MemStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    revision: u64,
    rows: BTreeMap<(String, String), Row>,
}

impl Inner {
    fn holds(&self, table: &str, key: &str, expect: &Expect) -> bool {
        let row = self.rows.get(&(table.to_owned(), key.to_owned()));
        match (expect, row) {
            (Expect::Absent, r) => r.is_none(),
            (Expect::Present, r) => r.is_some(),
            (Expect::Revision(rev), Some(r)) => r.mod_revision == *rev,
            (Expect::Revision(_), None) => false,
        }
    }
}

impl Store for MemStore {
    fn get<'a>(
        &'a self,
        table: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Row>, ClusterError>> {
        let row = self
            .lock()
            .rows
            .get(&(table.to_owned(), key.to_owned()))
            .cloned();
        Box::pin(async move { Ok(row) })
    }

    fn list<'a>(
        &'a self,
        table: &'a str,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Rows, ClusterError>> {
        let inner = self.lock();
        let rows = inner
            .rows
            .range((table.to_owned(), prefix.to_owned())..)
            .take_while(|((t, k), _)| t == table && k.starts_with(prefix))
            .take(limit)
            .map(|((_, k), r)| (k.clone(), r.clone()))
            .collect();
        let revision = inner.revision;
        Box::pin(async move { Ok((rows, revision)) })
    }

    fn write(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResponse, ClusterError>> {
        let result = txn
            .validate()
            .map_err(|e| ClusterError::BadRequest(e.to_string()))
            .map(|()| self.apply(txn));
        Box::pin(async move { result })
    }

    fn read_barrier(&self) -> BoxFuture<'_, Result<u64, ClusterError>> {
        // One copy, written under a lock: every read is already linearizable.
        let revision = self.lock().revision;
        Box::pin(async move { Ok(revision) })
    }
}

impl MemStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock left consistent rows: each write is
        // applied whole under the lock.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, txn: Txn) -> TxnResponse {
        let mut inner = self.lock();
        inner.revision += 1;
        let revision = inner.revision;
        if let Some(i) = txn
            .preconditions
            .iter()
            .position(|p| !inner.holds(&p.table, &p.key, &p.expect))
        {
            return TxnResponse {
                succeeded: false,
                revision,
                failed_precondition: Some(i as u32),
            };
        }
        // The adds are decided first: one that cannot apply fails the transaction.
        let mut added = Vec::with_capacity(txn.ops.len());
        let mut scratch: BTreeMap<(String, String), Option<Vec<u8>>> = BTreeMap::new();
        for (i, op) in txn.ops.iter().enumerate() {
            let k = (op.table().to_owned(), op.key().to_owned());
            let current = match scratch.get(&k) {
                Some(v) => v.clone(),
                None => inner.rows.get(&k).map(|r| r.value.clone()),
            };
            match op {
                Op::Put { value, .. } => {
                    scratch.insert(k, Some(value.clone()));
                    added.push(None);
                }
                Op::Delete { .. } => {
                    scratch.insert(k, None);
                    added.push(None);
                }
                Op::Add(a) => match a.apply(current.as_deref()) {
                    Ok(v) => {
                        scratch.insert(k, Some(v.clone()));
                        added.push(Some(v));
                    }
                    Err(_) => {
                        return TxnResponse {
                            succeeded: false,
                            revision,
                            failed_precondition: Some((txn.preconditions.len() + i) as u32),
                        }
                    }
                },
            }
        }
        for (op, added) in txn.ops.into_iter().zip(added) {
            let op = match (op, added) {
                (Op::Add(a), Some(value)) => Op::Put {
                    table: a.table,
                    key: a.key,
                    value,
                },
                (op, _) => op,
            };
            match op {
                Op::Put { table, key, value } => {
                    let slot = inner.rows.entry((table, key));
                    let row = slot.or_insert(Row {
                        value: Vec::new(),
                        create_revision: revision,
                        mod_revision: revision,
                        version: 0,
                    });
                    row.value = value;
                    row.mod_revision = revision;
                    row.version += 1;
                }
                Op::Delete { table, key } => {
                    inner.rows.remove(&(table, key));
                }
                Op::Add(_) => unreachable!("every add was decided above"),
            }
        }
        TxnResponse {
            succeeded: true,
            revision,
            failed_precondition: None,
        }
    }
}
