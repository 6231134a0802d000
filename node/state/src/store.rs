//! The backend behind every table: the Raft cluster in a node, `MemStore` in unit tests.

use std::sync::Arc;

use futures::future::BoxFuture;
use shoal_consensus::cluster::{Cluster, ClusterError};
use shoal_types::{Row, Txn, TxnResponse};

use crate::{StateError, Table};

/// Rows of a listing with their keys, and the revision the listing reflects at least.
pub type Rows = (Vec<(String, Row)>, u64);

/// Raw access to the replicated keyspace. Errors are the consensus layer's; `Table` types them.
pub trait Store: Send + Sync + 'static {
    fn get<'a>(
        &'a self,
        table: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Row>, ClusterError>>;
    /// Rows under `prefix`, and a revision no later than the one the rows reflect (a watch
    /// resumed from it replays nothing it should not and misses nothing).
    fn list<'a>(
        &'a self,
        table: &'a str,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Rows, ClusterError>>;
    fn write(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResponse, ClusterError>>;
    /// Waits until this replica has applied every write the cluster had committed when the
    /// call began, so the reads that follow are linearizable; returns that revision.
    fn read_barrier(&self) -> BoxFuture<'_, Result<u64, ClusterError>>;
}

impl Store for Cluster {
    fn get<'a>(
        &'a self,
        table: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Row>, ClusterError>> {
        Box::pin(Cluster::get(self, table, key))
    }

    fn list<'a>(
        &'a self,
        table: &'a str,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Rows, ClusterError>> {
        Box::pin(async move {
            // Read before listing: the listing reflects at least this revision.
            let revision = self.revision();
            let rows = Cluster::list(self, table, prefix, limit).await?;
            Ok((rows, revision))
        })
    }

    fn write(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResponse, ClusterError>> {
        Box::pin(Cluster::write(self, txn))
    }

    fn read_barrier(&self) -> BoxFuture<'_, Result<u64, ClusterError>> {
        Box::pin(Cluster::read_barrier(self))
    }
}

/// A handle on the whole keyspace: hands out typed tables and runs multi-table transactions.
#[derive(Clone)]
pub struct State {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

impl State {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// A state over a fresh in-memory store, for unit tests of services.
    pub fn in_memory() -> Self {
        Self::new(Arc::new(crate::MemStore::default()))
    }

    pub fn table<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        name: &'static str,
    ) -> Table<T> {
        Table::new(self.store.clone(), name)
    }

    /// Proposes a transaction spanning several tables; `what` names it in errors.
    pub async fn write(&self, what: &'static str, txn: Txn) -> Result<TxnResponse, StateError> {
        self.store
            .write(txn)
            .await
            .map_err(|e| StateError::from_cluster(what, "", e))
    }

    /// Makes the reads that follow linearizable (see [`Store::read_barrier`]).
    pub async fn read_barrier(&self) -> Result<u64, StateError> {
        self.store
            .read_barrier()
            .await
            .map_err(|e| StateError::from_cluster("read_barrier", "", e))
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}
