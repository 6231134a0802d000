//! Leader failure and recovery with real processes.

mod common;

use std::time::{Duration, Instant};

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

/// A leader asked to stop (SIGTERM) hands leadership to a caught-up voter before it exits. The
/// nodes run with a 3 s election timeout, so without the handover the survivors could not elect
/// anyone for at least 3 s; a write through a survivor acknowledged well under that shows the
/// handover worked. Every write acknowledged before the stop is still readable, and the stopped
/// node exits cleanly.
#[test]
fn a_leader_stopped_gracefully_hands_over_leadership() {
    let mut c = Cluster::start(3, &["--election-timeout-ms", "3000"]);
    for i in 0..20 {
        c.kv_put(i % 3, &format!("before/{i}"), &i.to_string())
            .unwrap();
    }
    let old = c.leader_index();
    let survivor = (0..3).find(|i| *i != old).unwrap();
    c.token(survivor);
    let pid = c.nodes[old].child.as_ref().unwrap().id();
    let stopped = Instant::now();
    // SAFETY: sends a signal to a child process this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let took = loop {
        if c.kv_put(survivor, "after", "x").is_ok() {
            break stopped.elapsed();
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "no write through a survivor within 30 s of stopping the leader"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("a write through a survivor was acknowledged {took:?} after SIGTERM of the leader");
    assert!(
        took < Duration::from_millis(1500),
        "the write took {took:?}: leadership was not handed over (an election needs at least 3 s)"
    );
    let status = wait_until(
        "the stopped leader to exit",
        Duration::from_secs(30),
        || c.nodes[old].child.as_mut().unwrap().try_wait().unwrap(),
    );
    assert!(status.success(), "the stopped leader exited with {status}");
    c.nodes[old].child = None;
    let new = c.leader_index();
    assert_ne!(new, old, "the stopped node cannot still lead");
    for i in 0..20 {
        assert_eq!(
            c.kv_get(survivor, &format!("before/{i}"), "linearizable")
                .unwrap()
                .as_deref(),
            Some(i.to_string().as_str()),
            "an acknowledged write was lost"
        );
    }
}
