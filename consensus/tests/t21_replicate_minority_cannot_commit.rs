//! A minority partition cannot commit.

use std::time::Duration;

use shoal_consensus::testing::TestCluster;
use shoal_types::Txn;

/// A leader cut off with a minority (2 of 5) cannot commit: a write through it times out and
/// is applied nowhere; the majority elects a leader and commits; after healing, every node
/// holds exactly what the majority committed and the minority's write is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_minority_cannot_commit() {
    let c = TestCluster::new_initialized(5).await.unwrap();
    let base = c
        .write(Txn::new().put("t", "before", "x"), Duration::from_secs(5))
        .await
        .unwrap()
        .log_id
        .index;
    c.wait_applied(None, base, Duration::from_secs(5))
        .await
        .unwrap();

    let old = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let ids = c.ids().to_vec();
    let buddy = *ids.iter().find(|i| **i != old).unwrap();
    let minority = [old, buddy];
    let majority: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|i| !minority.contains(i))
        .collect();
    c.router.partition(&[&minority, &majority]);

    let lost = c
        .write_via(
            old,
            Txn::new().put("t", "minority", "lost"),
            Duration::from_secs(1),
        )
        .await;
    assert!(lost.is_err(), "a minority leader committed: {lost:?}");
    for id in minority {
        let r = &c.node(id).unwrap().reader;
        assert_eq!(r.revision(), base, "node {id} applied something");
        assert!(r.get("t", "minority").await.unwrap().is_none());
    }

    let new = c
        .wait_for_leader_among(Some(&majority), Duration::from_secs(10))
        .await
        .unwrap();
    let committed = c
        .write_via(
            new,
            Txn::new().put("t", "majority", "kept"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(committed.data.succeeded);

    c.router.heal();
    c.wait_applied(None, committed.log_id.index, Duration::from_secs(10))
        .await
        .unwrap();
    let expect = c
        .node(new)
        .unwrap()
        .reader
        .list("t", "", 100)
        .await
        .unwrap();
    assert_eq!(
        expect.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["before", "majority"]
    );
    for (id, n) in c.running() {
        assert_eq!(
            n.reader.list("t", "", 100).await.unwrap(),
            expect,
            "node {id}"
        );
    }
    c.shutdown().await;
}
