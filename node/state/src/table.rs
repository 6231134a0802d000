//! `Table<T>`: one replicated table whose rows are JSON-encoded `T`.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_types::{Expect, Row, Txn};

use crate::{StateError, Store};

/// How many compare-and-set rounds a write makes before it reports `Contended`.
pub const DEFAULT_ATTEMPTS: u32 = 5;

/// A decoded row and the revision a compare-and-set must name to replace it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    /// The row's `mod_revision`.
    pub revision: u64,
}

/// The rows under a prefix and the revision the listing reflects at least.
#[derive(Debug, Clone)]
pub struct Listing<T> {
    pub rows: Vec<(String, Versioned<T>)>,
    /// Resume a watch from `revision + 1` to see every change after this listing.
    pub revision: u64,
}

impl<T> Listing<T> {
    pub fn into_values(self) -> impl Iterator<Item = T> {
        self.rows.into_iter().map(|(_, v)| v.value)
    }
}

pub struct Table<T> {
    store: Arc<dyn Store>,
    name: &'static str,
    attempts: u32,
    _record: PhantomData<fn() -> T>,
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            name: self.name,
            attempts: self.attempts,
            _record: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Table<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("name", &self.name).finish()
    }
}

impl<T: Serialize + DeserializeOwned> Table<T> {
    pub fn new(store: Arc<dyn Store>, name: &'static str) -> Self {
        Self {
            store,
            name,
            attempts: DEFAULT_ATTEMPTS,
            _record: PhantomData,
        }
    }

    /// The same table with another bound on compare-and-set rounds.
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn encode(&self, value: &T) -> Vec<u8> {
        serde_json::to_vec(value).expect("records serialise: plain data, string keys")
    }

    pub fn decode(&self, key: &str, row: &Row) -> Result<Versioned<T>, StateError> {
        let value = serde_json::from_slice(&row.value).map_err(|e| StateError::Corrupt {
            table: self.name,
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Versioned {
            value,
            revision: row.mod_revision,
        })
    }

    fn err(
        &self,
        key: &str,
    ) -> impl FnOnce(shoal_consensus::cluster::ClusterError) -> StateError + '_ {
        let key = key.to_owned();
        move |e| StateError::from_cluster(self.name, &key, e)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Versioned<T>>, StateError> {
        match self
            .store
            .get(self.name, key)
            .await
            .map_err(self.err(key))?
        {
            None => Ok(None),
            Some(row) => self.decode(key, &row).map(Some),
        }
    }

    /// Like `get`, but a missing row is `NotFound`.
    pub async fn require(&self, key: &str) -> Result<Versioned<T>, StateError> {
        self.get(key).await?.ok_or_else(|| StateError::NotFound {
            table: self.name,
            key: key.to_owned(),
        })
    }

    /// Every row whose key starts with `prefix`, in key order. One corrupt row fails the list.
    pub async fn list(&self, prefix: &str) -> Result<Listing<T>, StateError> {
        let (rows, revision) = self
            .store
            .list(self.name, prefix, usize::MAX)
            .await
            .map_err(self.err(prefix))?;
        let rows = rows
            .into_iter()
            .map(|(k, row)| self.decode(&k, &row).map(|v| (k, v)))
            .collect::<Result<_, _>>()?;
        Ok(Listing { rows, revision })
    }

    /// Creates the row; `AlreadyExists` if it is there. Returns the new revision.
    pub async fn put_if_absent(&self, key: &str, value: &T) -> Result<u64, StateError> {
        let txn =
            Txn::new()
                .when(self.name, key, Expect::Absent)
                .put(self.name, key, self.encode(value));
        let resp = self.store.write(txn).await.map_err(self.err(key))?;
        if resp.succeeded {
            Ok(resp.revision)
        } else {
            Err(StateError::AlreadyExists {
                table: self.name,
                key: key.to_owned(),
            })
        }
    }

    /// Replaces the row if it is still at `revision`; `Ok(None)` if it moved.
    pub async fn put_at(
        &self,
        key: &str,
        value: &T,
        revision: u64,
    ) -> Result<Option<u64>, StateError> {
        let txn = Txn::new()
            .when(self.name, key, Expect::Revision(revision))
            .put(self.name, key, self.encode(value));
        let resp = self.store.write(txn).await.map_err(self.err(key))?;
        Ok(resp.succeeded.then_some(resp.revision))
    }

    /// Several [`Table::put_at`]s in one transaction: each row replaced if it is still at its
    /// revision. A row that moved is left out (its answer is `None`) and the rest are written
    /// again, so one stale row costs the others a round, never their write. Answers are in the
    /// order of `rows`. On an error, every row not yet written gets it as a `Err` message (the
    /// error applies to them all).
    pub async fn put_at_many(
        &self,
        rows: &[(String, Vec<u8>, u64)],
    ) -> Vec<Result<Option<u64>, StateError>> {
        let mut answers: Vec<Option<Result<Option<u64>, StateError>>> =
            rows.iter().map(|_| None).collect();
        let mut left: Vec<usize> = (0..rows.len()).collect();
        while !left.is_empty() {
            let mut txn = Txn::new();
            for &i in &left {
                let (key, value, revision) = &rows[i];
                txn = txn.when(self.name, key, Expect::Revision(*revision)).put(
                    self.name,
                    key,
                    value.clone(),
                );
            }
            match self.store.write(txn).await {
                Ok(resp) if resp.succeeded => {
                    for &i in &left {
                        answers[i] = Some(Ok(Some(resp.revision)));
                    }
                    left.clear();
                }
                Ok(resp) => match resp.failed_precondition.map(|p| p as usize) {
                    Some(p) if p < left.len() => {
                        answers[left.remove(p)] = Some(Ok(None));
                    }
                    _ => {
                        for &i in &left {
                            answers[i] = Some(Ok(None));
                        }
                        left.clear();
                    }
                },
                Err(e) => {
                    use shoal_consensus::cluster::ClusterError as C;
                    let again = || match &e {
                        C::CommitUnknown(m) => C::CommitUnknown(m.clone()),
                        C::BadRequest(m) => C::BadRequest(m.clone()),
                        other => C::Unavailable(other.to_string()),
                    };
                    for &i in &left {
                        answers[i] = Some(Err(StateError::from_cluster(
                            self.name,
                            &rows[i].0,
                            again(),
                        )));
                    }
                    left.clear();
                }
            }
        }
        answers
            .into_iter()
            .map(|a| a.expect("every row gets an answer"))
            .collect()
    }

    /// Writes the row whatever is there.
    pub async fn put(&self, key: &str, value: &T) -> Result<u64, StateError> {
        let txn = Txn::new().put(self.name, key, self.encode(value));
        Ok(self.store.write(txn).await.map_err(self.err(key))?.revision)
    }

    /// Reads the row, lets `change` edit it (or refuse with its own error), and writes it back
    /// if nobody changed it meanwhile, re-reading up to the table's attempt bound.
    pub async fn update<E>(
        &self,
        key: &str,
        mut change: impl FnMut(&mut T) -> Result<(), E>,
    ) -> Result<Versioned<T>, E>
    where
        E: From<StateError>,
    {
        for _ in 0..self.attempts {
            let mut current = self.require(key).await?;
            change(&mut current.value)?;
            if let Some(revision) = self.put_at(key, &current.value, current.revision).await? {
                return Ok(Versioned {
                    value: current.value,
                    revision,
                });
            }
        }
        Err(self.contended(key).into())
    }

    /// Like `update`, but a missing row starts as `new()` and is created (`Absent` precondition).
    pub async fn upsert<E>(
        &self,
        key: &str,
        new: impl Fn() -> T,
        mut change: impl FnMut(&mut T) -> Result<(), E>,
    ) -> Result<Versioned<T>, E>
    where
        E: From<StateError>,
    {
        for _ in 0..self.attempts {
            let (mut value, expect) = match self.get(key).await? {
                Some(v) => (v.value, Expect::Revision(v.revision)),
                None => (new(), Expect::Absent),
            };
            change(&mut value)?;
            let txn =
                Txn::new()
                    .when(self.name, key, expect)
                    .put(self.name, key, self.encode(&value));
            let resp = self.store.write(txn).await.map_err(self.err(key))?;
            if resp.succeeded {
                return Ok(Versioned {
                    value,
                    revision: resp.revision,
                });
            }
        }
        Err(self.contended(key).into())
    }

    fn contended(&self, key: &str) -> StateError {
        StateError::Contended {
            table: self.name,
            key: key.to_owned(),
            attempts: self.attempts,
        }
    }

    /// Deletes the row if it exists; returns whether it did.
    pub async fn delete(&self, key: &str) -> Result<bool, StateError> {
        let txn = Txn::new()
            .when(self.name, key, Expect::Present)
            .delete(self.name, key);
        Ok(self
            .store
            .write(txn)
            .await
            .map_err(self.err(key))?
            .succeeded)
    }

    /// Deletes the row if it is still at `revision`; `false` if it moved or went.
    pub async fn delete_at(&self, key: &str, revision: u64) -> Result<bool, StateError> {
        let txn = Txn::new()
            .when(self.name, key, Expect::Revision(revision))
            .delete(self.name, key);
        Ok(self
            .store
            .write(txn)
            .await
            .map_err(self.err(key))?
            .succeeded)
    }
}

/// The one compare-and-set loop: runs `round` until it returns `Some` (its write applied) or
/// `attempts` rounds lost to concurrent writers (`Contended` on `table`/`key`). For writes that
/// span several rows, where `Table::update` does not fit.
pub async fn retry<R, E, F, Fut>(
    table: &'static str,
    key: &str,
    attempts: u32,
    mut round: F,
) -> Result<R, E>
where
    E: From<StateError>,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<R>, E>>,
{
    for _ in 0..attempts.max(1) {
        if let Some(done) = round().await? {
            return Ok(done);
        }
    }
    Err(StateError::Contended {
        table,
        key: key.to_owned(),
        attempts: attempts.max(1),
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::State;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Rec {
        n: u32,
    }

    #[tokio::test]
    async fn put_if_absent_get_update_delete() {
        let state = State::in_memory();
        let t: Table<Rec> = state.table("recs");
        t.put_if_absent("a", &Rec { n: 1 }).await.unwrap();
        assert!(matches!(
            t.put_if_absent("a", &Rec { n: 2 }).await,
            Err(StateError::AlreadyExists { table: "recs", .. })
        ));
        let v = t
            .update::<StateError>("a", |r| {
                r.n += 10;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(v.value, Rec { n: 11 });
        assert_eq!(t.require("a").await.unwrap(), v);
        assert!(t.delete("a").await.unwrap());
        assert!(!t.delete("a").await.unwrap());
        assert!(matches!(
            t.update::<StateError>("a", |_| Ok(())).await,
            Err(StateError::NotFound { table: "recs", .. })
        ));
    }

    #[tokio::test]
    async fn upsert_creates_then_changes() {
        let state = State::in_memory();
        let t: Table<Rec> = state.table("recs");
        let bump = |r: &mut Rec| -> Result<(), StateError> {
            r.n += 1;
            Ok(())
        };
        assert_eq!(
            t.upsert("a", || Rec { n: 0 }, bump).await.unwrap().value.n,
            1
        );
        assert_eq!(
            t.upsert("a", || Rec { n: 0 }, bump).await.unwrap().value.n,
            2
        );
    }

    #[tokio::test]
    async fn list_by_prefix_reports_revision() {
        let state = State::in_memory();
        let t: Table<Rec> = state.table("recs");
        for (k, n) in [("x/1", 1), ("x/2", 2), ("y/1", 3)] {
            t.put(k, &Rec { n }).await.unwrap();
        }
        let l = t.list("x/").await.unwrap();
        assert_eq!(
            l.rows.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["x/1", "x/2"]
        );
        assert_eq!(l.revision, 3);
    }

    #[tokio::test]
    async fn corrupt_row_names_table_and_key() {
        let state = State::in_memory();
        state
            .write("recs", Txn::new().put("recs", "bad", b"not json".to_vec()))
            .await
            .unwrap();
        let t: Table<Rec> = state.table("recs");
        match t.get("bad").await {
            Err(StateError::Corrupt {
                table: "recs", key, ..
            }) => assert_eq!(key, "bad"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn update_gives_up_as_contended_when_every_round_loses() {
        let state = State::in_memory();
        let t: Table<Rec> = state.table("recs").with_attempts(3);
        t.put("a", &Rec { n: 0 }).await.unwrap();
        let rival = t.clone();
        let mut rounds = 0;
        let res = t
            .update::<StateError>("a", |r| {
                rounds += 1;
                r.n += 1;
                // A concurrent writer moves the row after every read.
                let rival = rival.clone();
                futures::executor::block_on(rival.put("a", &Rec { n: 100 })).unwrap();
                Ok(())
            })
            .await;
        assert!(
            matches!(res, Err(StateError::Contended { attempts: 3, .. })),
            "{res:?}"
        );
        assert_eq!(rounds, 3);
        assert_eq!(t.require("a").await.unwrap().value, Rec { n: 100 });
    }
}
