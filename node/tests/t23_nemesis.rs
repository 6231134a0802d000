//! Five `shoal` processes under a nemesis while clients read and write through every node: the
//! recorded history is linearizable per key, no acknowledged write is lost, every node ends with
//! the same rows, and no valid token is ever refused.
//!
//! The nemesis injects one fault at a time, heals it, and waits until every node serves a
//! linearizable read again before the next: `kill -9` and restart of the leader and of a random
//! node, SIGSTOP/SIGCONT of a random node, and (root, `nft`) partitions of the leader and of a
//! minority of two, made of nftables rules that drop the UDP (QUIC) packets between the groups'
//! peer ports in a table this test owns and always removes. Signing keys rotate every 10 s
//! meanwhile, and clients use both a token taken before the faults and fresh ones.
//!
//! `SHOAL_NEMESIS_SECS` (default 60) sets how long the faults run; `SHOAL_NEMESIS_SEED` replays
//! one run's choices. `shoal-loadtest faults` runs the same nemesis for longer and measures
//! availability.

mod common;
#[path = "common/linearizable.rs"]
mod linearizable;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::nft::Firewall;
use common::{wait_until, Cluster};
use linearizable::{Kind, Op, Outcome};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const NODES: usize = 5;
const KEYS: usize = 5;
const CLIENTS: usize = 6;
/// Longer than the node's own 10 s bound on a write or read barrier, so that a node's answer
/// (503 or 504) is normally seen rather than our timeout.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(12);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillLeader,
    KillRandom,
    Pause,
    PartitionLeader,
    PartitionMinority,
}

/// Sets the flag when dropped, so clients stop even if the nemesis panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What the nodes' clients share: the API bases and a clock.
struct Bench {
    bases: Vec<String>,
    start: Instant,
    password: String,
}

impl Bench {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn token(&self, http: &reqwest::blocking::Client, node: usize) -> Option<String> {
        let body = serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": "admin", "domain": {"name": "Default"}, "password": self.password}}},
            "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}}}});
        let resp = http
            .post(format!("{}/identity/v3/auth/tokens", self.bases[node]))
            .json(&body)
            .send()
            .ok()?;
        if resp.status().as_u16() != 201 {
            return None;
        }
        Some(
            resp.headers()
                .get("x-subject-token")?
                .to_str()
                .ok()?
                .to_owned(),
        )
    }
}

/// A refusal of a token that was valid: the node, the status and the body.
#[derive(Debug)]
#[allow(dead_code)] // Read through `Debug`, in the failure message.
struct Refusal {
    node: usize,
    fresh: bool,
    at: f64,
    body: String,
}

/// What a client saw, besides the history.
#[derive(Default)]
struct Seen {
    refusals: Vec<Refusal>,
    /// Count of each answer: `200`, `503`, `timeout`, ...
    answers: BTreeMap<String, u64>,
}

fn key(k: usize) -> String {
    format!("nemesis/k{k}")
}

/// One write through `node`; returns its outcome and the label of the answer.
fn put(
    http: &reqwest::blocking::Client,
    base: &str,
    token: &str,
    key: &str,
    value: &str,
) -> (Outcome, String, Option<String>) {
    let resp = http
        .put(format!("{base}/shoal/v1/kv/{key}"))
        .header("X-Auth-Token", token)
        .body(value.to_owned())
        .send();
    let resp = match resp {
        // Refused before the request was sent: it never reached the node.
        Err(e) if e.is_connect() => return (Outcome::Fail, "connect".into(), None),
        // Sent, then the connection broke or the time ran out: it may have been applied.
        Err(e) if e.is_timeout() => return (Outcome::Unknown, "timeout".into(), None),
        Err(_) => return (Outcome::Unknown, "io".into(), None),
        Ok(r) => r,
    };
    let status = resp.status().as_u16();
    let body = resp.text();
    let outcome = match (status, &body) {
        (200, Ok(_)) => Outcome::Ok,
        // The body was lost on the way: the write may have been applied.
        (200, Err(_)) => Outcome::Unknown,
        // docs/consensus.md: a 503 (`Unavailable`) is answered only when no copy of the write
        // can be in a log; 4xx are refusals before anything was proposed.
        (400..=499 | 503, _) => Outcome::Fail,
        // 504 is "commit status unknown"; a 500 says nothing either way.
        _ => Outcome::Unknown,
    };
    (outcome, status.to_string(), body.ok())
}

/// One linearizable read through `node`: `Some(value or absent)` if it answered.
fn get(
    http: &reqwest::blocking::Client,
    base: &str,
    token: &str,
    key: &str,
) -> (Option<Option<String>>, String, Option<String>) {
    let resp = http
        .get(format!("{base}/shoal/v1/kv/{key}?consistency=linearizable"))
        .header("X-Auth-Token", token)
        .send();
    let resp = match resp {
        Err(e) if e.is_connect() => return (None, "connect".into(), None),
        Err(e) if e.is_timeout() => return (None, "timeout".into(), None),
        Err(_) => return (None, "io".into(), None),
        Ok(r) => r,
    };
    let status = resp.status().as_u16();
    let Ok(body) = resp.text() else {
        return (None, "io".into(), None);
    };
    match status {
        200 => (Some(Some(body)), "200".into(), None),
        404 => (Some(None), "404".into(), None),
        s => (None, s.to_string(), Some(body)),
    }
}

fn client_http() -> reqwest::blocking::Client {
    common::install_crypto();
    reqwest::blocking::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// A client: random reads and writes of random keys through random nodes until `stop`,
/// alternating between the token it was given before the faults and the freshest one it could
/// get (re-issued through a random node every few seconds).
fn client_loop(
    id: usize,
    bench: &Bench,
    first_token: String,
    seed: u64,
    stop: &AtomicBool,
    history: &Mutex<Vec<Op>>,
    seen: &Mutex<Seen>,
) {
    let http = client_http();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fresh = first_token.clone();
    let mut fresh_at = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if fresh_at.elapsed() > Duration::from_secs(3) {
            if let Some(t) = bench.token(&http, rng.random_range(0..NODES)) {
                fresh = t;
            }
            fresh_at = Instant::now();
        }
        seq += 1;
        let use_fresh = seq.is_multiple_of(2);
        let token = if use_fresh { &fresh } else { &first_token };
        let node = rng.random_range(0..NODES);
        let k = key(rng.random_range(0..KEYS));
        let base = &bench.bases[node];
        let invoke = bench.now();
        let (kind, outcome, answer, body) = if rng.random_bool(0.5) {
            let value = format!("c{id}-{seq}");
            let (outcome, answer, body) = put(&http, base, token, &k, &value);
            (Kind::Write(value), outcome, answer, body)
        } else {
            let (read, answer, body) = get(&http, base, token, &k);
            match read {
                Some(v) => (Kind::Read(v), Outcome::Ok, answer, body),
                None => (Kind::Read(None), Outcome::Unknown, answer, body),
            }
        };
        let complete = bench.now();
        {
            let mut s = seen.lock().unwrap();
            *s.answers.entry(answer.clone()).or_default() += 1;
            if answer == "401" {
                s.refusals.push(Refusal {
                    node,
                    fresh: use_fresh,
                    at: invoke as f64 / 1e9,
                    body: body.unwrap_or_default(),
                });
            }
        }
        history.lock().unwrap().push(Op {
            client: id,
            key: k,
            kind,
            invoke,
            complete,
            outcome,
            node,
        });
        if outcome != Outcome::Ok {
            // A refused connection fails in microseconds: do not spin on a dead node.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits until every node answers a linearizable read; returns how long that took.
fn wait_serving(bench: &Bench, http: &reqwest::blocking::Client, token: &str, what: &str) -> f64 {
    let started = Instant::now();
    for (i, base) in bench.bases.iter().enumerate() {
        wait_until(
            &format!("node{} to serve a linearizable read after {what}", i + 1),
            Duration::from_secs(60),
            || get(http, base, token, "nemesis/probe").0,
        );
    }
    started.elapsed().as_secs_f64()
}

/// The `nemesis/` rows as node `i` has them: (key, value, mod_revision).
fn rows(
    http: &reqwest::blocking::Client,
    base: &str,
    token: &str,
) -> Option<Vec<(String, String, u64)>> {
    let resp = http
        .get(format!(
            "{base}/shoal/v1/kv?prefix=nemesis/&consistency=linearizable"
        ))
        .header("X-Auth-Token", token)
        .send()
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let v: Value = resp.json().ok()?;
    Some(
        v["items"]
            .as_array()?
            .iter()
            .map(|r| {
                (
                    r["key"].as_str().unwrap().to_owned(),
                    r["value"].as_str().unwrap().to_owned(),
                    r["mod_revision"].as_u64().unwrap(),
                )
            })
            .collect(),
    )
}

/// Waits until the status through node 1 lists all five nodes as healthy voters (or leader).
fn wait_five_voters(c: &mut Cluster) {
    wait_until("five healthy voters", Duration::from_secs(90), || {
        let s = c.status(0)?;
        let members = s["members"].as_array()?;
        let ok = members.len() == NODES
            && s["leader"].is_string()
            && members
                .iter()
                .all(|m| m["healthy"] == true && (m["role"] == "leader" || m["role"] == "voter"));
        ok.then_some(())
    });
}

#[test]
fn history_under_faults_is_linearizable_and_nothing_is_lost() {
    let secs: u64 = std::env::var("SHOAL_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("SHOAL_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("nemesis: {secs} s of faults, seed {seed} (SHOAL_NEMESIS_SEED replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let firewall = Firewall::new("t23");

    let mut c = Cluster::init(&[
        "--voters",
        "5",
        "--key-rotation-secs",
        "10",
        "--token-ttl-secs",
        "600",
    ]);
    for _ in 1..NODES {
        c.join_new();
    }
    wait_five_voters(&mut c);
    let ports: Vec<u16> = c.nodes.iter().map(|n| n.listen.port()).collect();
    let bench = Bench {
        bases: c.nodes.iter().map(|n| n.base()).collect(),
        start: Instant::now(),
        password: c.password.clone(),
    };
    let http = client_http();
    // Tokens from before the faults, one through each node.
    let tokens: Vec<String> = (0..NODES).map(|i| c.token(i)).collect();
    wait_serving(&bench, &http, &tokens[0], "start");

    let mut kinds = vec![Fault::KillLeader, Fault::KillRandom, Fault::Pause];
    if firewall.is_some() {
        kinds.extend([Fault::PartitionLeader, Fault::PartitionMinority]);
    }
    let history = Mutex::new(Vec::new());
    let seen = Mutex::new(Seen::default());
    let stop = AtomicBool::new(false);
    let mut faults: Vec<(f64, String, f64)> = Vec::new();

    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for id in 0..CLIENTS {
            let (bench, history, seen, stop) = (&bench, &history, &seen, &stop);
            let token = tokens[id % NODES].clone();
            let client_seed = seed.wrapping_add(id as u64 + 1);
            s.spawn(move || client_loop(id, bench, token, client_seed, stop, history, seen));
        }
        let end = Instant::now() + Duration::from_secs(secs);
        let mut round: Vec<Fault> = Vec::new();
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(rng.random_range(1000..2500)));
            // Every kind once per round, in a random order, so a short run sees them all.
            if round.is_empty() {
                round = kinds.clone();
                round.shuffle(&mut rng);
            }
            let fault = round.pop().unwrap();
            let hold = Duration::from_millis(rng.random_range(2000..4500));
            let at = bench.now() as f64 / 1e9;
            let leader = c.leader_index();
            let label = match fault {
                Fault::KillLeader | Fault::KillRandom => {
                    let victim = if fault == Fault::KillLeader {
                        leader
                    } else {
                        rng.random_range(0..NODES)
                    };
                    c.nodes[victim].kill9();
                    std::thread::sleep(hold);
                    c.restart(victim);
                    format!("{fault:?} node{}", victim + 1)
                }
                Fault::Pause => {
                    let victim = rng.random_range(0..NODES);
                    let pid = c.nodes[victim].child.as_ref().unwrap().id() as libc::pid_t;
                    // SAFETY: kill(2) takes plain integers; the pid is our own child.
                    unsafe { libc::kill(pid, libc::SIGSTOP) };
                    std::thread::sleep(hold);
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGCONT) };
                    format!("Pause node{}", victim + 1)
                }
                Fault::PartitionLeader | Fault::PartitionMinority => {
                    let fw = firewall.as_ref().unwrap();
                    let mut order: Vec<usize> = (0..NODES).collect();
                    order.shuffle(&mut rng);
                    let cut: Vec<usize> = if fault == Fault::PartitionLeader {
                        vec![leader]
                    } else {
                        order[..2].to_vec()
                    };
                    let (a, b): (Vec<u16>, Vec<u16>) = (
                        cut.iter().map(|&i| ports[i]).collect(),
                        (0..NODES)
                            .filter(|i| !cut.contains(i))
                            .map(|i| ports[i])
                            .collect(),
                    );
                    fw.partition(&a, &b);
                    std::thread::sleep(hold);
                    fw.heal();
                    let names: Vec<String> = cut.iter().map(|i| format!("node{}", i + 1)).collect();
                    format!("{fault:?} {}", names.join("+"))
                }
            };
            let recovered = wait_serving(&bench, &http, &tokens[0], &label);
            eprintln!(
                "nemesis: {at:7.2} s {label} (leader was node{}), held {:.1} s, all nodes serve \
                 {recovered:.2} s after healing",
                leader + 1,
                hold.as_secs_f64()
            );
            faults.push((at, label, recovered));
        }
    });

    // Every node must end with the same rows: wait until each node's linearizable list of the
    // table agrees (a write whose client gave up may still commit for a few seconds).
    let token = &tokens[0];
    let agreed = wait_until(
        "every node to list the same rows",
        Duration::from_secs(30),
        || {
            let lists: Vec<_> = bench
                .bases
                .iter()
                .map(|b| rows(&http, b, token))
                .collect::<Option<Vec<_>>>()?;
            lists
                .iter()
                .all(|l| *l == lists[0])
                .then(|| lists[0].clone())
        },
    );

    // The voter set is what it was: no fault made the cluster give up a voter for good.
    wait_five_voters(&mut c);

    // Final reads through every node go into the history: a lost write shows up as a read that
    // no order explains.
    let mut history = history.into_inner().unwrap();
    let mut finals: BTreeMap<String, Option<String>> = BTreeMap::new();
    for k in 0..KEYS {
        for (i, base) in bench.bases.iter().enumerate() {
            let invoke = bench.now();
            let (read, answer, body) = get(&http, base, token, &key(k));
            let v = read.unwrap_or_else(|| {
                panic!(
                    "final read of {} through node{} failed: {answer} {body:?}",
                    key(k),
                    i + 1
                )
            });
            history.push(Op {
                client: 1000 + i,
                key: key(k),
                kind: Kind::Read(v.clone()),
                invoke,
                complete: bench.now(),
                outcome: Outcome::Ok,
                node: i,
            });
            if let Some(prev) = finals.insert(key(k), v.clone()) {
                assert_eq!(prev, v, "nodes disagree on {} at the end", key(k));
            }
        }
    }
    for (k, v, _) in &agreed {
        assert_eq!(finals[k].as_ref(), Some(v), "{k}: list and read disagree");
    }

    let seen = seen.into_inner().unwrap();
    let count = |o: Outcome| history.iter().filter(|op| op.outcome == o).count();
    eprintln!(
        "nemesis: {} operations ({} ok, {} failed, {} unknown), {} faults; answers {:?}",
        history.len(),
        count(Outcome::Ok),
        count(Outcome::Fail),
        count(Outcome::Unknown),
        faults.len(),
        seen.answers
    );

    // No acknowledged write lost, said plainly (the checker below proves it too): each key ends
    // with a value some write that did not fail wrote, and no write acknowledged to a client
    // began after that write ended.
    for (k, v) in &finals {
        let writes: Vec<&Op> = history
            .iter()
            .filter(|o| &o.key == k && matches!(o.kind, Kind::Write(_)))
            .collect();
        let acked = writes.iter().filter(|o| o.outcome == Outcome::Ok);
        match v {
            None => assert!(
                acked.clone().next().is_none(),
                "{k} is absent at the end although writes to it were acknowledged"
            ),
            Some(v) => {
                let w = writes
                    .iter()
                    .find(|o| o.kind == Kind::Write(v.clone()))
                    .unwrap_or_else(|| panic!("{k} ends with {v:?}, which nobody wrote"));
                assert_ne!(
                    w.outcome,
                    Outcome::Fail,
                    "{k} ends with a write that was refused: {w}"
                );
                let ended = if w.outcome == Outcome::Ok {
                    w.complete
                } else {
                    u64::MAX
                };
                if let Some(later) = acked.clone().find(|o| o.invoke > ended) {
                    panic!("{k} ends with {v:?}, but a later acknowledged write was lost: {later}");
                }
            }
        }
    }

    assert!(
        seen.refusals.is_empty(),
        "valid tokens were refused: {:#?}",
        seen.refusals
    );

    let started = Instant::now();
    let violations = linearizable::check(&history);
    eprintln!(
        "nemesis: checked {} keys in {:.2} s",
        KEYS,
        started.elapsed().as_secs_f64()
    );
    if !violations.is_empty() {
        for v in &violations {
            eprintln!("{v}");
        }
        for (at, label, _) in &faults {
            eprintln!("fault at {at:.2} s: {label}");
        }
        panic!("{} keys are not linearizable", violations.len());
    }
    assert!(
        faults.len() >= kinds.len(),
        "only {} faults in {secs} s; every kind must run at least once",
        faults.len()
    );
}
