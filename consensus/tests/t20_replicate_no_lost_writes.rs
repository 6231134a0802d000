//! Durability of acknowledged writes under faults.

use std::collections::BTreeMap;
use std::time::Duration;

use shoal_consensus::testing::TestCluster;
use shoal_types::Txn;

/// Writes `count` new keys through whichever node leads, returning those acknowledged.
async fn write_some(c: &TestCluster, n: &mut u32, count: usize) -> Vec<(String, (u64, String))> {
    let mut out = Vec::new();
    for _ in 0..count {
        *n += 1;
        let (k, v) = (format!("k{n:04}"), format!("v{n}"));
        // A write that times out is not acknowledged and may or may not land.
        if let Ok(r) = c
            .write(Txn::new().put("t", &k, v.clone()), Duration::from_secs(3))
            .await
        {
            assert!(r.data.succeeded);
            out.push((k, (r.log_id.index, v)));
        }
    }
    out
}

/// No acknowledged write is lost: writes go on while the leader is isolated, the cluster
/// heals, and leaders are killed and restarted; at the end every node holds every write that
/// was acknowledged, with its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_isolation_heal_and_kills() {
    let mut c = TestCluster::new_initialized(3).await.unwrap();
    let mut acked: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut n = 0;
    acked.extend(write_some(&c, &mut n, 10).await);
    let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    c.router.isolate(leader);
    acked.extend(write_some(&c, &mut n, 10).await);
    c.router.heal();
    acked.extend(write_some(&c, &mut n, 5).await);
    for _ in 0..2 {
        let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
        c.kill(leader).await.unwrap();
        acked.extend(write_some(&c, &mut n, 5).await);
        c.start(leader).await.unwrap();
    }
    acked.extend(write_some(&c, &mut n, 5).await);
    assert!(
        acked.len() >= 30,
        "only {} writes were acknowledged",
        acked.len()
    );

    let last = acked.values().map(|(i, _)| *i).max().unwrap();
    c.wait_applied(None, last, Duration::from_secs(15))
        .await
        .unwrap();
    for (id, node) in c.running() {
        let rows: BTreeMap<String, Vec<u8>> = node
            .reader
            .list("t", "", usize::MAX)
            .await
            .unwrap()
            .into_iter()
            .map(|(k, r)| (k, r.value))
            .collect();
        for (k, (index, v)) in &acked {
            assert_eq!(
                rows.get(k),
                Some(&v.as_bytes().to_vec()),
                "node {id} lost {k} (index {index})"
            );
        }
    }
    c.shutdown().await;
}

/// With a fifth of all messages lost and added latency, writes still commit and every node
/// converges to the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_slow_network_still_commits_and_converges() {
    let c = TestCluster::new_initialized(3).await.unwrap();
    c.router.drop_rate(0.2);
    c.router.delay(2, Duration::from_millis(10));
    let mut last = 0;
    for i in 0..15 {
        let r = c
            .write(
                Txn::new().put("t", &format!("k{i}"), "v"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        last = r.log_id.index;
    }
    c.router.heal();
    c.wait_applied(None, last, Duration::from_secs(10))
        .await
        .unwrap();
    let mut listings = Vec::new();
    for (_, n) in c.running() {
        listings.push(n.reader.list("t", "", usize::MAX).await.unwrap());
    }
    assert_eq!(listings[0].len(), 15);
    assert!(listings.windows(2).all(|w| w[0] == w[1]));
    c.shutdown().await;
}
