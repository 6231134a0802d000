//! Keyed transactions (`Command::Keyed`): one request id is applied once within the window,
//! repeats get the first answer, and the record survives restart and snapshot install.

use std::time::Duration;

use openraft::storage::RaftStateMachine;
use openraft::vote::RaftLeaderId;
use openraft::RaftSnapshotBuilder;
use shoal_consensus::raft_types::{Entry, EntryPayload, LeaderId, LogId};
use shoal_consensus::store::{self, LogStore, StateMachineStore, StoreOptions};
use shoal_types::{Command, Expect, KeyedTxn, Txn, TxnResponse, REQUEST_WINDOW};

fn log_id(index: u64) -> LogId {
    LogId::new(LeaderId::new(1, 1), index)
}

fn keyed(index: u64, id: &str, txn: Txn) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::Keyed(Box::new(KeyedTxn {
            request_id: id.into(),
            txn,
        }))),
    }
}

fn blank(index: u64) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Blank,
    }
}

/// A put of `t/k`: each application bumps the row's version.
fn bump(value: &str) -> Txn {
    Txn::new().put("t", "k", value)
}

async fn open(dir: &std::path::Path) -> (LogStore, StateMachineStore) {
    // RocksDB releases its lock when the last handle is dropped; blocking tasks may hold one a
    // moment longer.
    loop {
        match store::open(dir, StoreOptions::default()) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn apply(sm: &mut StateMachineStore, entries: Vec<Entry>) -> Vec<TxnResponse> {
    sm.apply_entries(entries).await.unwrap()
}

async fn version(sm: &StateMachineStore) -> u64 {
    sm.reader().get("t", "k").await.unwrap().unwrap().version
}

/// A repeat of a request id, in the same batch or a later one, changes nothing and answers
/// with the first result (its revision, its precondition outcome).
#[tokio::test]
async fn repeat_is_applied_once_and_answered_with_the_first_result() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path()).await;
    let first = apply(
        &mut sm,
        vec![keyed(1, "req-1", bump("a")), keyed(2, "req-1", bump("b"))],
    )
    .await;
    assert!(first[0].succeeded);
    assert_eq!(first[1], first[0], "a repeat in the same batch");
    let later = apply(&mut sm, vec![keyed(3, "req-1", bump("c"))]).await;
    assert_eq!(later[0], first[0], "a repeat in a later batch");
    assert_eq!(version(&sm).await, 1);
    assert_eq!(
        sm.reader().get("t", "k").await.unwrap().unwrap().value,
        b"a"
    );

    // A failed precondition is an answer too: the repeat gets it even once it would hold.
    let guarded = Txn::new()
        .when("t", "g", Expect::Present)
        .put("t", "k", "g");
    let r = apply(&mut sm, vec![keyed(4, "req-2", guarded.clone())]).await;
    assert_eq!(r[0].failed_precondition, Some(0));
    apply(
        &mut sm,
        vec![Entry {
            log_id: log_id(5),
            payload: EntryPayload::Normal(Command::Txn(Txn::new().put("t", "g", "x"))),
        }],
    )
    .await;
    let again = apply(&mut sm, vec![keyed(6, "req-2", guarded)]).await;
    assert_eq!(again[0], r[0]);
    assert_eq!(version(&sm).await, 1);
    // Another id is another request.
    let other = apply(&mut sm, vec![keyed(7, "req-3", bump("d"))]).await;
    assert!(other[0].succeeded);
    assert_eq!(version(&sm).await, 2);
}

/// The record is state like any row: a restarted store and a store built from a snapshot
/// both still recognise the id.
#[tokio::test]
async fn request_ids_survive_restart_and_snapshot() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let first = {
        let (_log, mut a) = open(a_dir.path()).await;
        apply(&mut a, vec![keyed(1, "req-1", bump("a"))]).await[0].clone()
    };
    let (_log, mut a) = open(a_dir.path()).await;
    assert_eq!(
        apply(&mut a, vec![keyed(2, "req-1", bump("b"))]).await[0],
        first
    );
    assert_eq!(version(&a).await, 1);

    let snap = a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let (_lb, mut b) = open(b_dir.path()).await;
    b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(
        apply(&mut b, vec![keyed(3, "req-1", bump("c"))]).await[0],
        first
    );
    assert_eq!(version(&b).await, 1);
}

/// Past the window an id is forgotten: a repeat is applied again, and the old records are
/// pruned. Whether a record counts depends on its age only, so batch boundaries (which differ
/// between replicas) cannot change an answer.
#[tokio::test]
async fn ids_expire_after_the_window_whatever_the_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path()).await;
    apply(&mut sm, vec![keyed(1, "old", bump("a"))]).await;
    // The id applied at revision 1 counts up to revision WINDOW. Jump the applied index there
    // with one blank entry.
    let last_in = REQUEST_WINDOW;
    apply(&mut sm, vec![blank(last_in - 1)]).await;
    let still = apply(&mut sm, vec![keyed(last_in, "old", bump("b"))]).await;
    assert_eq!(still[0].revision, 1, "still inside the window");
    assert_eq!(version(&sm).await, 1);
    let after = apply(&mut sm, vec![keyed(last_in + 1, "old", bump("c"))]).await;
    assert!(after[0].succeeded);
    assert_eq!(
        after[0].revision,
        last_in + 1,
        "outside the window: applied again"
    );
    assert_eq!(version(&sm).await, 2);
    // The first record's index entry is gone; the id's new record stays.
    let index = sm
        .reader()
        .list("_requests_by_revision", "", usize::MAX)
        .await
        .unwrap();
    let keys: Vec<&str> = index.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, vec![format!("{:020}/old", last_in + 1).as_str()]);
    let rec = sm.reader().get("_requests", "old").await.unwrap().unwrap();
    assert_eq!(rec.mod_revision, last_in + 1);
}

/// Expired ids are removed a bounded number per batch, each batch going on where the last
/// stopped, and a restarted store still removes the rest.
#[tokio::test]
async fn expired_ids_are_pruned_in_steps_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ids = 2500u64;
    let index_len = |sm: &StateMachineStore| {
        let r = sm.reader();
        async move {
            r.list("_requests_by_revision", "", usize::MAX)
                .await
                .unwrap()
                .len()
        }
    };
    {
        let (_log, mut sm) = open(dir.path()).await;
        let entries = (1..=ids)
            .map(|i| keyed(i, &format!("req-{i}"), bump("a")))
            .collect();
        apply(&mut sm, entries).await;
        assert_eq!(index_len(&sm).await, ids as usize);
        // Every id is now past the window; one batch removes at most 1024 of them.
        apply(&mut sm, vec![blank(REQUEST_WINDOW + ids)]).await;
        assert_eq!(index_len(&sm).await, (ids - 1024) as usize);
        assert!(sm
            .reader()
            .get("_requests", "req-1")
            .await
            .unwrap()
            .is_none());
        assert!(sm
            .reader()
            .get("_requests", "req-1025")
            .await
            .unwrap()
            .is_some());
    }
    let (_log, mut sm) = open(dir.path()).await;
    apply(&mut sm, vec![blank(REQUEST_WINDOW + ids + 1)]).await;
    assert_eq!(index_len(&sm).await, (ids - 2048) as usize);
    apply(&mut sm, vec![blank(REQUEST_WINDOW + ids + 2)]).await;
    assert_eq!(index_len(&sm).await, 0);
    assert!(sm
        .reader()
        .get("_requests", &format!("req-{ids}"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(version(&sm).await, ids);
}

/// Transactions cannot touch the store's own tables.
#[tokio::test]
async fn user_transactions_cannot_write_request_records() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path()).await;
    apply(&mut sm, vec![keyed(1, "req-1", bump("a"))]).await;
    let forged = Entry {
        log_id: log_id(2),
        payload: EntryPayload::Normal(Command::Txn(Txn::new().delete("_requests", "req-1"))),
    };
    let r = apply(&mut sm, vec![forged]).await;
    assert!(!r[0].succeeded);
    assert!(sm
        .reader()
        .get("_requests", "req-1")
        .await
        .unwrap()
        .is_some());
}
