//! Elections under random partitions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shoal_consensus::testing::TestCluster;

/// A three-node cluster elects a leader that every node acknowledges, and a write through it
/// is applied on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_and_replicate() {
    let c = TestCluster::new_initialized(3).await.unwrap();
    let r = c
        .write(
            shoal_types::Txn::new().put("t", "k", "v"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(r.data.succeeded);
    c.wait_applied(None, r.log_id.index, Duration::from_secs(5))
        .await
        .unwrap();
    for (_, n) in c.running() {
        assert_eq!(n.reader.get("t", "k").await.unwrap().unwrap().value, b"v");
    }
    c.shutdown().await;
}

/// Election safety: across many rounds of random partitions of five nodes, no term ever has
/// two different leaders (checked on every node's own metrics, sampled continuously).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_leaders_in_one_term() {
    let c = TestCluster::new_initialized(5).await.unwrap();
    let ids = c.ids().to_vec();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5_0a1);
    let mut leaders: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut terms_seen = BTreeSet::new();
    for _round in 0..12 {
        let mut shuffled = ids.clone();
        shuffled.shuffle(&mut rng);
        let cut = rng.random_range(1..ids.len());
        let (a, b) = shuffled.split_at(cut);
        c.router.partition(&[a, b]);
        for _ in 0..25 {
            for (id, n) in c.running() {
                let m = n.raft.metrics().borrow_watched().clone();
                terms_seen.insert(m.current_term);
                if m.state == ServerState::Leader {
                    leaders.entry(m.current_term).or_default().insert(id);
                }
            }
            tokio::time::sleep(Duration::from_millis(12)).await;
        }
        c.router.heal();
    }
    for (term, ls) in &leaders {
        assert_eq!(ls.len(), 1, "term {term} had leaders {ls:?}");
    }
    // The partitions did force elections, or the test proved nothing.
    assert!(
        leaders.len() >= 3,
        "only {} terms had a leader",
        leaders.len()
    );
    c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    c.shutdown().await;
}
