//! The state machine and log store beyond openraft's suite: transaction semantics, idempotent
//! apply, watch streams, snapshots, corruption and restart.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use futures::StreamExt;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::vote::RaftLeaderId;
use openraft::{RaftLogReader, RaftSnapshotBuilder};
use proptest::prelude::*;
use shoal_consensus::raft_types::{Entry, EntryPayload, LeaderId, LogId, TypeConfig, Vote};
use shoal_consensus::store::{self, LogStore, StateMachineStore, StoreOptions, WatchError};
use shoal_types::{Command, EventKind, Expect, Row, Txn, TxnResponse, WatchEvent};

fn log_id(index: u64) -> LogId {
    LogId::new(LeaderId::new(1, 1), index)
}

fn txn_entry(index: u64, txn: Txn) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::Txn(txn)),
    }
}

fn open(dir: &std::path::Path) -> (LogStore, StateMachineStore) {
    store::open(dir, StoreOptions::default()).unwrap()
}

async fn apply1(sm: &mut StateMachineStore, index: u64, txn: Txn) -> TxnResponse {
    sm.apply_entries(vec![txn_entry(index, txn)])
        .await
        .unwrap()
        .remove(0)
}

async fn all_rows(sm: &StateMachineStore, table: &str) -> Vec<(String, Row)> {
    sm.reader().list(table, "", usize::MAX).await.unwrap()
}

/// A transaction whose precondition fails changes no row, yet the entry counts as applied.
#[tokio::test]
async fn failed_precondition_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path());
    let r = apply1(&mut sm, 1, Txn::new().put("t", "a", "1")).await;
    assert!(r.succeeded);
    let before = all_rows(&sm, "t").await;

    let r = apply1(
        &mut sm,
        2,
        Txn::new()
            .when("t", "a", Expect::Present)
            .when("t", "b", Expect::Present)
            .put("t", "a", "2")
            .put("t", "c", "3"),
    )
    .await;
    assert_eq!(
        r,
        TxnResponse {
            succeeded: false,
            revision: 2,
            failed_precondition: Some(1)
        }
    );
    assert_eq!(all_rows(&sm, "t").await, before);
    assert_eq!(sm.reader().revision(), 2);
    assert_eq!(sm.reader().applied_log_id(), Some(log_id(2)));
}

/// Revision preconditions compare with `mod_revision`; rows carry create revision and version.
#[tokio::test]
async fn revision_precondition_and_row_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path());
    let reader = sm.reader();
    apply1(&mut sm, 1, Txn::new().put("t", "k", "a")).await;
    apply1(&mut sm, 2, Txn::new().put("t", "other", "x")).await;
    apply1(&mut sm, 3, Txn::new().put("t", "k", "b")).await;
    let row = reader.get("t", "k").await.unwrap().unwrap();
    assert_eq!(
        row,
        Row {
            value: b"b".to_vec(),
            create_revision: 1,
            mod_revision: 3,
            version: 2
        }
    );
    // A stale revision fails; the current one succeeds.
    let stale = apply1(
        &mut sm,
        4,
        Txn::new()
            .when("t", "k", Expect::Revision(1))
            .put("t", "k", "c"),
    )
    .await;
    assert!(!stale.succeeded);
    let fresh = apply1(
        &mut sm,
        5,
        Txn::new()
            .when("t", "k", Expect::Revision(3))
            .put("t", "k", "c"),
    )
    .await;
    assert!(fresh.succeeded);
    assert_eq!(reader.get("t", "k").await.unwrap().unwrap().mod_revision, 5);
    // Delete then create resets create_revision and version.
    apply1(
        &mut sm,
        6,
        Txn::new().when("t", "k", Expect::Present).delete("t", "k"),
    )
    .await;
    assert_eq!(reader.get("t", "k").await.unwrap(), None);
    apply1(
        &mut sm,
        7,
        Txn::new().when("t", "k", Expect::Absent).put("t", "k", "d"),
    )
    .await;
    let row = reader.get("t", "k").await.unwrap().unwrap();
    assert_eq!(
        (row.create_revision, row.mod_revision, row.version),
        (7, 7, 1)
    );
}

/// Two nodes claiming the same resource at the same revision: only the first to commit wins,
/// even inside one apply batch.
#[tokio::test]
async fn conflicting_claims_only_first_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path());
    apply1(&mut sm, 1, Txn::new().put("hosts", "h1", "free")).await;
    let claim = |who: &str| {
        Txn::new().when("hosts", "h1", Expect::Revision(1)).put(
            "hosts",
            "h1",
            format!("claimed by {who}"),
        )
    };
    let rs = sm
        .apply_entries(vec![txn_entry(2, claim("a")), txn_entry(3, claim("b"))])
        .await
        .unwrap();
    assert!(rs[0].succeeded);
    assert!(!rs[1].succeeded);
    assert_eq!(rs[1].failed_precondition, Some(0));
    let row = sm.reader().get("hosts", "h1").await.unwrap().unwrap();
    assert_eq!(row.value, b"claimed by a");
}

/// Bounded adds to one host from claims proposed without knowing of each other, applied in
/// one batch: every claim that fits commits, in log order, and the one that would pass the
/// bound fails as a whole (its instance row is not written either) and says which op failed.
#[tokio::test]
async fn bounded_adds_commit_until_the_bound_then_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path());
    apply1(&mut sm, 1, Txn::new().put("hosts", "h1", r#"{"used":0}"#)).await;
    let claim = |id: &str| {
        Txn::new()
            .when("instances", id, Expect::Absent)
            .put("instances", id, "h1")
            .add(
                "hosts",
                "h1",
                vec![shoal_types::AddField {
                    name: "used".into(),
                    delta: 2,
                    max: Some(5),
                }],
            )
    };
    let rs = sm
        .apply_entries(vec![
            txn_entry(2, claim("a")),
            txn_entry(3, claim("b")),
            txn_entry(4, claim("c")),
        ])
        .await
        .unwrap();
    assert!(rs[0].succeeded && rs[1].succeeded, "{rs:?}");
    assert!(!rs[2].succeeded);
    // One precondition, then the put (op 0) and the add (op 1): index 1 + 1.
    assert_eq!(rs[2].failed_precondition, Some(2));
    let reader = sm.reader();
    let row = reader.get("hosts", "h1").await.unwrap().unwrap();
    assert_eq!(row.value, br#"{"used":4}"#);
    assert_eq!(row.mod_revision, 3);
    assert_eq!(reader.get("instances", "c").await.unwrap(), None);
    // Giving back is unbounded and commits whatever the row holds.
    let release = Txn::new().delete("instances", "a").add(
        "hosts",
        "h1",
        vec![shoal_types::AddField {
            name: "used".into(),
            delta: -2,
            max: None,
        }],
    );
    assert!(apply1(&mut sm, 5, release).await.succeeded);
    assert!(apply1(&mut sm, 6, claim("c")).await.succeeded);
    let row = reader.get("hosts", "h1").await.unwrap().unwrap();
    assert_eq!(row.value, br#"{"used":4}"#);
}

/// list returns rows of one table with the prefix, in key order, up to the limit.
#[tokio::test]
async fn list_is_a_prefix_scan_within_one_table() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path());
    apply1(
        &mut sm,
        1,
        Txn::new()
            .put("a", "x/1", "1")
            .put("a", "x/2", "2")
            .put("a", "y/1", "3")
            .put("ab", "x/3", "4"),
    )
    .await;
    let r = sm.reader();
    let keys = |v: Vec<(String, Row)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(keys(r.list("a", "x/", 10).await.unwrap()), ["x/1", "x/2"]);
    assert_eq!(keys(r.list("a", "", 2).await.unwrap()), ["x/1", "x/2"]);
    assert_eq!(
        keys(r.list("a", "", 10).await.unwrap()),
        ["x/1", "x/2", "y/1"]
    );
    let (rev, _) = r.list_with_revision("ab", "", 10).await.unwrap();
    assert_eq!(rev, 1);
}

fn arb_txn() -> impl Strategy<Value = Txn> {
    let key = prop_oneof![Just("a"), Just("b"), Just("c")];
    let expect = prop_oneof![
        Just(Expect::Absent),
        Just(Expect::Present),
        (0u64..8).prop_map(Expect::Revision)
    ];
    let pre = (key.clone(), expect);
    let op = (key, any::<bool>(), any::<u8>());
    (
        proptest::collection::vec(pre, 0..2),
        proptest::collection::vec(op, 1..3),
    )
        .prop_map(|(pres, ops)| {
            let mut t = Txn::new();
            for (k, e) in pres {
                t = t.when("t", k, e);
            }
            for (k, put, v) in ops {
                t = if put {
                    t.put("t", k, vec![v])
                } else {
                    t.delete("t", k)
                };
            }
            t
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Applying entries again (a crash between apply and its acknowledgement) changes neither
    /// the rows, the history nor the revision.
    #[test]
    fn applying_twice_changes_nothing(txns in proptest::collection::vec(arb_txn(), 1..12), replay_from in 0usize..12) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (_log, mut sm) = open(dir.path());
            let entries: Vec<Entry> = txns.iter().enumerate().map(|(i, t)| txn_entry(i as u64 + 1, t.clone())).collect();
            let first = sm.apply_entries(entries.clone()).await.unwrap();
            let rows = all_rows(&sm, "t").await;
            let history = collect_until(&sm, 1, None).await;
            let replay_from = replay_from.min(entries.len() - 1);
            let again = sm.apply_entries(entries[replay_from..].to_vec()).await.unwrap();
            prop_assert_eq!(all_rows(&sm, "t").await, rows);
            prop_assert_eq!(collect_until(&sm, 1, None).await, history);
            prop_assert_eq!(sm.reader().revision(), entries.len() as u64);
            // Replayed answers are reconstructed from history; a txn with ops that succeeded
            // is reported as succeeded.
            for (a, b) in first[replay_from..].iter().zip(&again) {
                prop_assert_eq!(a.revision, b.revision);
            }
            Ok(())
        })?;
    }
}

/// Reads the watch stream from `from` until the replica's current revision has been passed
/// (or `n` events were seen).
async fn collect_until(sm: &StateMachineStore, from: u64, n: Option<usize>) -> Vec<WatchEvent> {
    let r = sm.reader();
    let mut w = r.watch("t", "", from).await.unwrap();
    let mut out = Vec::new();
    loop {
        if n.is_some_and(|n| out.len() >= n) {
            return out;
        }
        match tokio::time::timeout(Duration::from_millis(200), w.next()).await {
            Ok(Some(ev)) => out.push(ev.unwrap()),
            Ok(None) => panic!("watch ended"),
            Err(_) if n.is_none() => return out,
            Err(_) => panic!("watch stalled after {} events", out.len()),
        }
    }
}

fn put_entry(index: u64, key: &str) -> Entry {
    txn_entry(index, Txn::new().put("t", key, index.to_string()))
}

/// A watch started while entries are being applied sees every event from its start revision
/// exactly once and in order: history replay and live events meet without gap or duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replay_then_live_has_no_gap_or_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path());
    for i in 1..=40 {
        sm.apply_entries(vec![put_entry(i, &format!("k{}", i % 7))])
            .await
            .unwrap();
    }
    let reader = sm.reader();
    let writer = tokio::spawn(async move {
        for i in 41..=120 {
            sm.apply_entries(vec![put_entry(i, &format!("k{}", i % 7))])
                .await
                .unwrap();
        }
        sm
    });
    // Start the watch while the writer runs, so the seam falls somewhere in the middle.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut w = reader.watch("t", "", 10).await.unwrap();
    let mut revs = Vec::new();
    while revs.len() < 111 {
        let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("watch stalled")
            .unwrap()
            .unwrap();
        revs.push(ev.revision);
    }
    assert_eq!(revs, (10..=120).collect::<Vec<_>>());
    let _sm = writer.await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), w.next())
            .await
            .is_err(),
        "no event after the last one"
    );
}

/// A watcher slower than the live channel falls back to history and still misses nothing;
/// the key prefix filter applies to both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watcher_rereads_history() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        watch_channel_capacity: 2,
        ..StoreOptions::default()
    };
    let (_log, mut sm) = store::open(dir.path(), opts).unwrap();
    let reader = sm.reader();
    let mut w = reader.watch("t", "even", 1).await.unwrap();
    for i in 1..=300u64 {
        let key = if i % 2 == 0 { "even" } else { "odd" };
        sm.apply_entries(vec![put_entry(i, &format!("{key}{i}"))])
            .await
            .unwrap();
    }
    let mut revs = Vec::new();
    while revs.len() < 150 {
        let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("watch stalled")
            .unwrap()
            .unwrap();
        assert!(ev.key.starts_with("even"));
        revs.push(ev.revision);
    }
    assert_eq!(revs, (1..=150).map(|i| i * 2).collect::<Vec<_>>());
}

/// The progress mark: a watch of a quiet table still moves its mark with every applied entry,
/// and once the mark reads R, draining the stream yields every matching event up to R (the
/// mark is raised only after the events are in the stream), also for a watcher that lags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_progress_mark_covers_every_event_up_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        watch_channel_capacity: 2,
        ..StoreOptions::default()
    };
    let (_log, mut sm) = store::open(dir.path(), opts).unwrap();
    let reader = sm.reader();
    apply1(&mut sm, 1, Txn::new().put("t", "even0", "x")).await;
    let mut w = reader.watch("t", "even", 2).await.unwrap();
    assert_eq!(
        w.progress().get(),
        1,
        "a watch from 2 starts complete through 1"
    );
    let mut quiet = reader.watch("other", "", 2).await.unwrap();
    let mut quiet_mark = quiet.progress();
    let mut mark = w.progress();
    let (mut seen, mut expected) = (Vec::new(), Vec::new());
    let mut index = 1;
    for i in 0..300u64 {
        index += 1;
        if i % 50 == 49 {
            // A failed transaction makes no event, yet the mark passes it.
            let failing = Txn::new()
                .when("t", "nothing", Expect::Present)
                .put("t", "even-no", "v");
            assert!(!apply1(&mut sm, index, failing).await.succeeded);
        } else {
            let key = if i % 2 == 0 { "even" } else { "odd" };
            apply1(
                &mut sm,
                index,
                Txn::new().put("t", &format!("{key}{i}"), "v"),
            )
            .await;
            if i % 2 == 0 {
                expected.push(index);
            }
        }
        // Read the mark, then drain: everything up to the mark must be there.
        let at = mark.get();
        while let Some(ev) = w.try_next() {
            seen.push(ev.unwrap().revision);
        }
        let due = expected.iter().filter(|r| **r <= at).count();
        assert_eq!(seen[..due.min(seen.len())], expected[..due], "mark {at}");
        assert!(seen.len() >= due, "mark {at}: drained {seen:?}");
    }
    let end = tokio::time::timeout(Duration::from_secs(10), mark.wait_for(index)).await;
    assert!(end.unwrap(), "the mark reaches the last index");
    while let Some(ev) = w.try_next() {
        seen.push(ev.unwrap().revision);
    }
    assert_eq!(seen, expected);
    let end = tokio::time::timeout(Duration::from_secs(10), quiet_mark.wait_for(index)).await;
    assert!(
        end.unwrap(),
        "a quiet table's mark follows the applied index"
    );
    assert!(quiet.try_next().is_none(), "no event of the quiet table");
    // A watch that only replays history (nothing is applied after it starts) reaches the
    // applied index too, once the replay is in the stream.
    let mut late = reader.watch("t", "even", 2).await.unwrap();
    let mut late_mark = late.progress();
    let end = tokio::time::timeout(Duration::from_secs(10), late_mark.wait_for(index)).await;
    assert!(
        end.unwrap(),
        "a replay-only watch reaches the applied index"
    );
    let mut replayed = Vec::new();
    while let Some(ev) = late.try_next() {
        replayed.push(ev.unwrap().revision);
    }
    assert_eq!(replayed, expected);
}

/// Events carry the row after the change, and deletes are reported.
#[tokio::test]
async fn watch_events_carry_rows_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path());
    apply1(&mut sm, 1, Txn::new().put("t", "k", "v")).await;
    apply1(&mut sm, 2, Txn::new().delete("t", "k").delete("t", "never")).await;
    let evs = collect_until(&sm, 0, Some(2)).await;
    assert!(matches!(&evs[0].kind, EventKind::Put(r) if r.value == b"v" && r.mod_revision == 1));
    assert_eq!(evs[1].kind, EventKind::Delete);
    assert_eq!(evs[1].revision, 2);
}

/// A watch from before the retained history is refused with the oldest revision kept, so the
/// client re-lists; from that revision on it works.
#[tokio::test]
async fn watch_before_retained_history_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        history_retention: 10,
        ..StoreOptions::default()
    };
    let (_log, mut sm) = store::open(dir.path(), opts).unwrap();
    for i in 1..=30 {
        sm.apply_entries(vec![put_entry(i, "k")]).await.unwrap();
    }
    let r = sm.reader();
    match r.watch("t", "", 5).await {
        Err(WatchError::Compacted { oldest }) => assert_eq!(oldest, 21),
        other => panic!("expected Compacted, got {other:?}"),
    }
    let evs = collect_until(&sm, 21, None).await;
    assert_eq!(
        evs.iter().map(|e| e.revision).collect::<Vec<_>>(),
        (21..=30).collect::<Vec<_>>()
    );
}

async fn fill(sm: &mut StateMachineStore, n: u64) {
    let entries = (1..=n)
        .map(|i| {
            let t = Txn::new()
                .put("t", &format!("k{i:05}"), vec![i as u8; 10])
                .put("u", &format!("x{}", i % 3), "y");
            txn_entry(i, t)
        })
        .collect();
    sm.apply_entries(entries).await.unwrap();
}

/// A snapshot built on one store and installed on a fresh one yields identical rows, applied
/// log id and revision; watches on the new store start after the snapshot.
#[tokio::test]
async fn snapshot_build_then_install_yields_identical_rows() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (_la, mut a) = open(a_dir.path());
    let (_lb, mut b) = open(b_dir.path());
    fill(&mut a, 2500).await;
    let snap = a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(2500)));
    assert!(a.reader().snapshot_file_size().unwrap() > 2500 * 10);

    b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    for t in ["t", "u"] {
        assert_eq!(all_rows(&a, t).await, all_rows(&b, t).await);
    }
    assert_eq!(all_rows(&b, "t").await.len(), 2500);
    assert_eq!(b.applied_state().await.unwrap().0, Some(log_id(2500)));
    assert_eq!(b.reader().revision(), 2500);
    assert!(matches!(
        b.reader().watch("t", "", 100).await,
        Err(WatchError::Compacted { oldest: 2501 })
    ));
    let cur = b.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(cur.meta, snap.meta);
    // Only one snapshot file is kept.
    assert_eq!(
        std::fs::read_dir(b_dir.path().join("snapshots"))
            .unwrap()
            .count(),
        1
    );
}

/// A snapshot file with one altered byte is refused and the store's state is untouched.
#[tokio::test]
async fn corrupted_snapshot_is_refused_and_state_untouched() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (_la, mut a) = open(a_dir.path());
    let (_lb, mut b) = open(b_dir.path());
    fill(&mut a, 50).await;
    apply1(&mut b, 1, Txn::new().put("t", "mine", "keep")).await;
    let mut snap = a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let mut bytes = Vec::new();
    snap.snapshot.read_to_end(&mut bytes).unwrap();
    for pos in [bytes.len() / 2, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[pos] ^= 1;
        let mut f = b.reader().incoming_snapshot_file().unwrap();
        f.write_all(&bad).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let err = b.install_snapshot(&snap.meta, f).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    }
    // Truncated.
    let mut f = b.reader().incoming_snapshot_file().unwrap();
    f.write_all(&bytes[..bytes.len() - 10]).unwrap();
    assert!(b.install_snapshot(&snap.meta, f).await.is_err());

    let rows = all_rows(&b, "t").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "mine");
    assert_eq!(b.reader().revision(), 1);
    assert!(b.get_current_snapshot().await.unwrap().is_none());
}

async fn append(log: &mut LogStore, entries: Vec<Entry>) {
    let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
}

fn blank(index: u64) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Blank,
    }
}

/// A stored entry whose bytes fail validation is reported as an InvalidData error, not a panic.
#[tokio::test]
async fn corrupted_stored_entry_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open(dir.path());
    append(&mut log, (1..=5).map(blank).collect()).await;
    log.corrupt_entry_for_test(3, b"\x01\x02garbage").unwrap();
    let err = log.try_get_log_entries(1..=5).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("log entry 3"), "{err}");
    // Entries before it still read.
    assert_eq!(log.try_get_log_entries(1..3).await.unwrap().len(), 2);
    // An entry that decodes but sits at the wrong index is also refused.
    let mut other = log.clone();
    let wrong = shoal_types::codec::encode(&shoal_consensus::wire::WEntry::from(&blank(9)));
    other.corrupt_entry_for_test(4, &wrong).unwrap();
    assert!(other.try_get_log_entries(4..5).await.is_err());
}

/// After the store is dropped and reopened, vote, log, purge point, rows and applied state
/// are as they were.
#[tokio::test]
async fn reopen_keeps_vote_log_and_rows() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, mut sm) = open(dir.path());
        log.save_vote(&Vote::new_committed(3, 2)).await.unwrap();
        append(&mut log, (1..=10).map(blank).collect()).await;
        log.purge(log_id(2)).await.unwrap();
        apply1(&mut sm, 1, Txn::new().put("t", "k", "v")).await;
    }
    // RocksDB releases its lock when the last handle is dropped; blocking tasks may hold one a
    // moment longer.
    let (mut log, mut sm) = loop {
        match store::open(dir.path(), StoreOptions::default()) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(Vote::new_committed(3, 2))
    );
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(log_id(2)));
    assert_eq!(st.last_log_id, Some(log_id(10)));
    assert_eq!(log.try_get_log_entries(0..100).await.unwrap().len(), 8);
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1)));
    assert_eq!(sm.reader().revision(), 1);
    assert_eq!(
        sm.reader().get("t", "k").await.unwrap().unwrap().value,
        b"v"
    );
}

async fn reopen(dir: &std::path::Path) -> (LogStore, StateMachineStore) {
    loop {
        match store::open(dir, StoreOptions::default()) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A crash in the middle of a snapshot install (marker written, rows half replaced) is
/// finished at the next open: the rows are exactly the snapshot's.
#[tokio::test]
async fn interrupted_snapshot_install_is_finished_at_open() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (_la, mut a) = open(a_dir.path());
    fill(&mut a, 40).await;
    let want = all_rows(&a, "t").await;
    let snap = a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    {
        let (_lb, mut b) = open(b_dir.path());
        b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
        b.reader().simulate_interrupted_install_for_test().unwrap();
        assert_ne!(all_rows(&b, "t").await, want);
    }
    let (_lb, mut b) = reopen(b_dir.path()).await;
    assert_eq!(all_rows(&b, "t").await, want);
    assert_eq!(b.applied_state().await.unwrap().0, Some(log_id(40)));
    assert_eq!(b.reader().revision(), 40);
}

/// A watcher following live events when a snapshot replaces the state is told its history is
/// gone (Compacted), rather than silently skipping what the snapshot covered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_watcher_is_told_when_a_snapshot_is_installed() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let (_la, mut a) = open(a_dir.path());
    let (_lb, mut b) = open(b_dir.path());
    fill(&mut a, 30).await;
    apply1(&mut b, 1, Txn::new().put("t", "old", "x")).await;
    let mut w = b.reader().watch("t", "", 0).await.unwrap();
    assert_eq!(w.next().await.unwrap().unwrap().key, "old");
    let snap = a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("watcher not told")
        .unwrap();
    assert!(
        matches!(next, Err(WatchError::Compacted { oldest: 31 })),
        "{next:?}"
    );
}
