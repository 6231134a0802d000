//! Log compaction and snapshot transfer.

use std::time::Duration;

use openraft::SnapshotPolicy;
use shoal_consensus::store::StoreOptions;
use shoal_consensus::testing::{test_config, TestCluster};
use shoal_types::Txn;

/// A follower that was down while the leader snapshotted and purged its log catches up through
/// a snapshot (its own log could not be extended from the purged one) and ends with the same
/// rows; the leader keeps a single snapshot file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_via_snapshot() {
    let config = openraft::Config {
        snapshot_policy: SnapshotPolicy::LogsSinceLast(20),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..test_config()
    };
    let mut c = TestCluster::with_config(3, config, StoreOptions::default())
        .await
        .unwrap();
    c.initialize().await.unwrap();
    let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let lagger = *c.ids().iter().find(|i| **i != leader).unwrap();
    c.kill(lagger).await.unwrap();

    let mut last = 0;
    for i in 0..60 {
        let r = c
            .write(
                Txn::new().put("t", &format!("k{i:03}"), vec![i as u8; 32]),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        last = r.log_id.index;
    }
    // Wait until the leader has purged past what the lagger holds.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
        let m = c.metrics(leader).unwrap();
        if m.purged.is_some_and(|p| p.index >= 20) {
            assert!(c.node(leader).unwrap().reader.snapshot_file_size().unwrap() > 60 * 32);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leader never purged: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    c.start(lagger).await.unwrap();
    c.wait_applied(Some(&[lagger]), last, Duration::from_secs(15))
        .await
        .unwrap();
    let m = c.metrics(lagger).unwrap();
    assert!(
        m.snapshot.is_some_and(|s| s.index >= 20),
        "no snapshot installed: {m:?}"
    );
    let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let want = c
        .node(leader)
        .unwrap()
        .reader
        .list("t", "", usize::MAX)
        .await
        .unwrap();
    assert_eq!(want.len(), 60);
    assert_eq!(
        c.node(lagger)
            .unwrap()
            .reader
            .list("t", "", usize::MAX)
            .await
            .unwrap(),
        want
    );
    c.shutdown().await;
}
