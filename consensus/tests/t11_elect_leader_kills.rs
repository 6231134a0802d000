//! Liveness across repeated leader crashes.

use std::time::Duration;

use shoal_consensus::testing::TestCluster;
use shoal_types::Txn;

/// Killing the leader (shutdown) and restarting it from the same directory, five times in a
/// row, yields a new leader among the survivors every time (no livelock), and the cluster keeps
/// committing writes; the restarted node recovers its state from disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_leader_kills_converge_to_new_leader() {
    let mut c = TestCluster::new_initialized(3).await.unwrap();
    let ids = c.ids().to_vec();
    let mut last_index = 0;
    for round in 0..5 {
        let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
        let term_before = c.metrics(leader).unwrap().current_term;
        c.kill(leader).await.unwrap();
        let others: Vec<u64> = ids.iter().copied().filter(|i| *i != leader).collect();
        let new = c
            .wait_for_leader_among(Some(&others), Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_ne!(new, leader);
        assert!(c.metrics(new).unwrap().current_term > term_before);
        let r = c
            .write(
                Txn::new().put("t", &format!("round{round}"), "x"),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        last_index = r.log_id.index;
        c.start(leader).await.unwrap();
    }
    c.wait_applied(None, last_index, Duration::from_secs(10))
        .await
        .unwrap();
    for (_, n) in c.running() {
        assert_eq!(n.reader.list("t", "round", 100).await.unwrap().len(), 5);
    }
    c.shutdown().await;
}

/// A leader whose outgoing messages are all lost (it still hears everyone) is replaced: the
/// others elect a new leader and commit writes without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_isolated_leader_is_replaced() {
    let c = TestCluster::new_initialized(3).await.unwrap();
    let ids = c.ids().to_vec();
    let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    c.router.isolate_outgoing(leader, &ids);
    let others: Vec<u64> = ids.iter().copied().filter(|i| *i != leader).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let new = loop {
        let l = c
            .wait_for_leader_among(Some(&others), Duration::from_secs(10))
            .await
            .unwrap();
        if l != leader {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let r = c
        .write_via(new, Txn::new().put("t", "k", "v"), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(r.data.succeeded);
    c.router.heal();
    c.wait_applied(None, r.log_id.index, Duration::from_secs(10))
        .await
        .unwrap();
    c.shutdown().await;
}
