//! `shoal kv watch`: the replacement for a message broker, seen from the CLI.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Cluster, SHOAL};
use serde_json::Value;

/// A watch on one node sees, in revision order, the writes made through another node under its
/// prefix and nothing else; a watch started later from an old revision replays them.
#[test]
fn watch_follows_writes_made_elsewhere_and_replays_from_a_revision() {
    let c = Cluster::start(2, &[]);
    let mut child = Command::new(SHOAL)
        .args(["kv", "watch", "jobs/"])
        .envs(c.openrc_env(1))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Give the watch time to subscribe before writing.
    std::thread::sleep(Duration::from_secs(1));
    let first = c.kv_put(0, "jobs/a", "one").unwrap();
    c.kv_put(0, "other/x", "ignored").unwrap();
    c.kv_put(0, "jobs/b", "two").unwrap();

    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut events: Vec<Value> = Vec::new();
    while events.len() < 2 {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("watch events");
        events.push(serde_json::from_str(&line).unwrap());
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(events[0]["key"], "jobs/a");
    assert_eq!(events[0]["value"], "one");
    assert_eq!(events[0]["type"], "put");
    assert_eq!(events[1]["key"], "jobs/b");
    assert!(events[0]["revision"].as_u64() < events[1]["revision"].as_u64());

    // Replay from the first write's revision, through the other node.
    let mut child = Command::new(SHOAL)
        .args([
            "kv",
            "watch",
            "jobs/",
            "--from-revision",
            &first.to_string(),
        ])
        .envs(c.openrc_env(0))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let a: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let b: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        (a["key"].as_str(), b["key"].as_str()),
        (Some("jobs/a"), Some("jobs/b"))
    );
}
