//! Watch streams as the message bus: what every node sees.

use std::time::Duration;

use futures::StreamExt;
use shoal_consensus::store::WatchStream;
use shoal_consensus::testing::TestCluster;
use shoal_types::{Expect, WatchEvent};

async fn take(w: &mut WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .unwrap_or_else(|_| panic!("watch stalled after {} events", out.len()))
            .expect("watch ended")
            .expect("watch failed");
        out.push(ev);
    }
    out
}

/// A follower's watch delivers every committed change exactly once, in revision order, across
/// a leader kill; a node restarted from disk replays the identical sequence from its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_watch_sees_every_commit_once_across_leader_kill() {
    let mut c = TestCluster::new_initialized(3).await.unwrap();
    let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let follower = *c.ids().iter().find(|i| **i != leader).unwrap();
    let mut w = c
        .node(follower)
        .unwrap()
        .reader
        .watch("t", "", 0)
        .await
        .unwrap();

    let put = |i: u32| {
        // Absent: a retried write that had in fact committed fails instead of writing twice.
        shoal_types::Txn::new()
            .when("t", &format!("k{i:02}"), Expect::Absent)
            .put("t", &format!("k{i:02}"), "v")
    };
    for i in 0..10 {
        c.write(put(i), Duration::from_secs(5)).await.unwrap();
    }
    c.kill(leader).await.unwrap();
    for i in 10..20 {
        c.write(put(i), Duration::from_secs(10)).await.unwrap();
    }
    c.start(leader).await.unwrap();

    let seen = take(&mut w, 20).await;
    let keys: Vec<String> = seen.iter().map(|e| e.key.clone()).collect();
    assert_eq!(
        keys,
        (0..20).map(|i| format!("k{i:02}")).collect::<Vec<_>>()
    );
    assert!(seen.windows(2).all(|p| p[0].revision < p[1].revision));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), w.next())
            .await
            .is_err(),
        "an event was delivered twice"
    );

    let last = seen.last().unwrap().revision;
    c.wait_applied(Some(&[leader]), last, Duration::from_secs(10))
        .await
        .unwrap();
    let mut w2 = c
        .node(leader)
        .unwrap()
        .reader
        .watch("t", "", 0)
        .await
        .unwrap();
    assert_eq!(take(&mut w2, 20).await, seen);
    drop((w, w2));
    c.shutdown().await;
}
