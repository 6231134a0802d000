//! openraft's storage conformance suite against the RocksDB store.

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;
use shoal_consensus::raft_types::TypeConfig;
use shoal_consensus::store::{self, LogStore, StateMachineStore, StoreOptions};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        // A fresh directory per sub-test; the guard keeps it alive until the sub-test ends.
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = store::open(dir.path(), StoreOptions::default()).expect("open store");
        Ok((dir, log, sm))
    }
}

/// The store satisfies every property openraft's suite checks: log state, vote, append,
/// truncate, purge, apply, membership, snapshot build and transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(Builder).await.unwrap();
}
