//! Leader failure and recovery with real processes.

mod common;

use std::time::Duration;

use common::{wait_until, Cluster};

/// After kill -9 of the leader, a write through a survivor succeeds (a new leader is
/// elected), no acknowledged write is lost, and the killed node restarted with `shoal start`
/// catches up and serves the new write from its own replica.
#[test]
fn killed_leader_is_replaced_and_catches_up_after_restart() {
    let mut c = Cluster::start(3, &[]);
    c.kv_put(0, "before", "1").unwrap();
    let old = c.leader_index();
    c.nodes[old].kill9();
    let survivor = (0..3).find(|i| *i != old).unwrap();
    wait_until(
        "a write through a survivor",
        Duration::from_secs(30),
        || c.kv_put(survivor, "after", "2").ok(),
    );
    let new = c.leader_index();
    assert_ne!(new, old, "the killed node cannot still lead");
    assert_eq!(
        c.kv_get(survivor, "before", "linearizable")
            .unwrap()
            .as_deref(),
        Some("1"),
        "an acknowledged write was lost"
    );

    c.restart(old);
    wait_until(
        "the restarted node to catch up",
        Duration::from_secs(60),
        || (c.kv_get(old, "after", "local").ok()?.as_deref() == Some("2")).then_some(()),
    );
    assert_eq!(
        c.kv_get(old, "before", "local").unwrap().as_deref(),
        Some("1")
    );
    c.wait_healthy(3);
}
