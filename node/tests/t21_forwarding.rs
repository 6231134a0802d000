//! Forwarded writes follow the leader: a write through a follower right after `kill -9` of the
//! leader is re-sent to the new leader as soon as one is elected, instead of waiting out a
//! timeout against the dead one, and it is applied exactly once.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;

/// One write's outcome: how long it took, and the revision it was acknowledged at.
struct Put {
    took: Duration,
    result: Result<u64, String>,
}

fn put(c: &Cluster, node: usize, token: &str, key: &str, value: &str) -> Put {
    let started = Instant::now();
    let result = c
        .http
        .put(format!("{}/shoal/v1/kv/{key}", c.nodes[node].base()))
        .header("X-Auth-Token", token)
        .body(value.to_owned())
        .send()
        .map_err(|e| e.to_string())
        .and_then(|resp| {
            let status = resp.status();
            let text = resp.text().unwrap_or_default();
            if !status.is_success() {
                return Err(format!("{status}: {text}"));
            }
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            v["revision"].as_u64().ok_or_else(|| text.clone())
        });
    Put {
        took: started.elapsed(),
        result,
    }
}

/// The row's (value, mod revision, version), read linearizably.
fn row(c: &Cluster, node: usize, token: &str, key: &str) -> (String, u64, u64) {
    let resp = c
        .http
        .get(format!(
            "{}/shoal/v1/kv/{key}?consistency=linearizable",
            c.nodes[node].base()
        ))
        .header("X-Auth-Token", token)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{key} is missing");
    let header = |name: &str| -> u64 { resp.headers()[name].to_str().unwrap().parse().unwrap() };
    let (revision, version) = (header("X-Shoal-Revision"), header("X-Shoal-Version"));
    (resp.text().unwrap(), revision, version)
}

/// Writes sent through both followers the moment the leader is killed all succeed well under
/// the old 10 s forwarding timeout, and each is applied exactly once: its row is at version 1
/// and at the revision its acknowledgement named (a forward re-sent to the new leader after
/// its first copy committed would have made version 2 or moved the revision).
#[test]
fn writes_through_followers_follow_a_killed_leader_and_apply_once() {
    let mut c = Cluster::start(3, &[]);
    let old = c.leader_index();
    let followers: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let tokens: Vec<String> = (0..3).map(|i| c.token(i)).collect();
    // Warm each follower's connection to the leader, as a busy cluster's would be.
    for &f in &followers {
        put(&c, f, &tokens[f], &format!("warm-{f}"), "x")
            .result
            .unwrap();
    }

    c.nodes[old].kill9();
    let writes: Vec<(usize, String, Put)> = std::thread::scope(|s| {
        let handles: Vec<_> = followers
            .iter()
            .flat_map(|&f| (0..3).map(move |n| (f, format!("after-{f}-{n}"))))
            .map(|(f, key)| {
                let (c, token) = (&c, &tokens[f]);
                s.spawn(move || {
                    let p = put(c, f, token, &key, &key);
                    (f, key, p)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (f, key, p) in &writes {
        let revision = match &p.result {
            Ok(r) => *r,
            Err(e) => {
                c.dump_logs();
                panic!(
                    "write {key} through node {f} failed after {:?}: {e}",
                    p.took
                );
            }
        };
        assert!(
            p.took < Duration::from_secs(5),
            "write {key} through node {f} took {:?}",
            p.took
        );
        let (value, mod_revision, version) = row(&c, *f, &tokens[*f], key);
        assert_eq!(value, *key);
        assert_eq!(version, 1, "{key} was applied more than once");
        assert_eq!(
            mod_revision, revision,
            "{key} was applied again after its ack"
        );
    }
    let slowest = writes.iter().map(|(_, _, p)| p.took).max().unwrap();
    eprintln!("slowest write through a follower after the kill: {slowest:?}");

    c.restart(old);
    c.wait_healthy(3);
}

/// Sends a `kv` PUT with an `Idempotency-Key`; returns the status and the body.
fn put_keyed(
    c: &Cluster,
    node: usize,
    token: &str,
    key: &str,
    idem: &str,
    value: &str,
) -> (u16, String) {
    let resp = c
        .http
        .put(format!("{}/shoal/v1/kv/{key}", c.nodes[node].base()))
        .header("X-Auth-Token", token)
        .header("Idempotency-Key", idem)
        .body(value.to_owned())
        .send()
        .unwrap();
    (resp.status().as_u16(), resp.text().unwrap())
}

/// A client that sends a write again with the same `Idempotency-Key` (as it must when the first
/// answer was lost or said "commit status unknown") gets the first answer back, through any
/// node, and the write is not applied a second time: a later write by someone else survives
/// the repeat. A new key is a new write; a malformed key is a 400.
#[test]
fn a_write_repeated_with_its_idempotency_key_is_applied_once() {
    let c = Cluster::start(3, &[]);
    let tokens: Vec<String> = (0..3).map(|i| c.token(i)).collect();
    let revision = |body: &str| -> u64 {
        serde_json::from_str::<serde_json::Value>(body).unwrap()["revision"]
            .as_u64()
            .unwrap_or_else(|| panic!("no revision in {body}"))
    };

    let (status, first) = put_keyed(&c, 0, &tokens[0], "door", "req-1", "open");
    assert_eq!(status, 200, "{first}");
    let first = revision(&first);
    // Someone else changes the key after the first write committed.
    let later = put(&c, 1, &tokens[1], "door", "closed").result.unwrap();
    assert!(later > first);

    // The repeat, through another node (forwarded to the leader), answers the first revision
    // and leaves the later value alone.
    for node in [2, 0] {
        let (status, body) = put_keyed(&c, node, &tokens[node], "door", "req-1", "open");
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            revision(&body),
            first,
            "a repeat is answered with the first result"
        );
    }
    let (value, mod_revision, version) = row(&c, 2, &tokens[2], "door");
    assert_eq!(value, "closed", "the repeat must not be applied again");
    assert_eq!((mod_revision, version), (later, 2));

    // A new key is a new write.
    let (status, body) = put_keyed(&c, 1, &tokens[1], "door", "req-2", "open");
    assert_eq!(status, 200, "{body}");
    assert!(revision(&body) > later);
    assert_eq!(row(&c, 0, &tokens[0], "door").0, "open");

    // Bad keys are refused before anything is written.
    for bad in ["", "has space", &"k".repeat(65)] {
        let (status, body) = put_keyed(&c, 0, &tokens[0], "door", bad, "x");
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert!(body.contains("Idempotency-Key"), "{body}");
    }
    assert_eq!(row(&c, 0, &tokens[0], "door").0, "open");
}
