//! Placement through Raft claims: concurrent schedulers on every node never double-book.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_until, Cluster};
use serde_json::{json, Value};

const ZONE: &str = "t60";
const HOSTS: usize = 4;
/// Per host: 2048 MB at a RAM ratio of 1.0 holds exactly 8 instances of 256 MB; vCPUs and
/// disk allow more, so RAM is the binding resource and a full cluster holds 32.
const RAM_MB: u64 = 2048;
const FLAVOR_RAM: u64 = 256;
const CAPACITY: usize = HOSTS * (RAM_MB / FLAVOR_RAM) as usize;

fn request(
    http: &reqwest::blocking::Client,
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = http.request(method, url).header("x-auth-token", token);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn placement_body(n: usize) -> Value {
    json!({
        "flavor": {"vcpus": 1, "ram_mb": FLAVOR_RAM, "disk_gb": 1},
        "availability_zone": ZONE,
        "num_instances": n,
    })
}

/// Six clients, two per node of a real 3-node cluster, place 1-3 instances per request into 4
/// small synthetic hosts until the scheduler refuses with "no valid host". Afterwards, read
/// linearizably: no host is over its capacity × ratio, the hosts are exactly full, every
/// acknowledged placement is in `instances` on the host the client was told, nothing else is
/// there, and each host's used counters equal the sum of its instances.
#[test]
fn concurrent_placements_through_every_node_never_overcommit() {
    let c = Cluster::start(3, &[]);
    let token = c.token(0);
    let http = &c.http;

    // Bad registrations are refused with the field named.
    let (st, body) = request(
        http,
        reqwest::Method::PUT,
        &format!("{}/shoal/v1/hosts/bad", c.nodes[0].base()),
        &token,
        Some(&json!({"vcpus": 0, "ram_mb": 1, "disk_gb": 1})),
    );
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("vcpus"), "{body}");

    for h in 0..HOSTS {
        let (st, body) = request(
            http,
            reqwest::Method::PUT,
            &format!("{}/shoal/v1/hosts/t60-host{h}", c.nodes[h % 3].base()),
            &token,
            Some(&json!({
                "vcpus": 4, "ram_mb": RAM_MB, "disk_gb": 100, "availability_zone": ZONE,
                "allocation_ratios": {"cpu": 16.0, "ram": 1.0, "disk": 1.0},
            })),
        );
        assert_eq!(st, 200, "{body}");
    }

    // A request the scheduler refuses outright: a JSON query that does not parse.
    let (st, body) = request(
        http,
        reqwest::Method::POST,
        &format!("{}/shoal/v1/placements", c.nodes[1].base()),
        &token,
        Some(&json!({"flavor": {"vcpus": 1, "ram_mb": 1, "disk_gb": 0},
                     "scheduler_hints": {"query": "[\"=\", \"$bogus\""}})),
    );
    assert_eq!(st, 400, "{body}");

    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for client in 0..6 {
            let base = c.nodes[client % 3].base();
            let (token, acked, attempts) = (token.clone(), acked.clone(), attempts.clone());
            s.spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                let mut n = 0;
                loop {
                    n += 1;
                    let body = placement_body(1 + (client + n) % 3);
                    let (st, resp) = request(
                        &http,
                        reqwest::Method::POST,
                        &format!("{base}/shoal/v1/placements"),
                        &token,
                        Some(&body),
                    );
                    match st {
                        200 => {
                            attempts
                                .lock()
                                .unwrap()
                                .push(resp["attempts"].as_u64().unwrap());
                            for p in resp["placements"].as_array().unwrap() {
                                let id = p["instance_id"].as_str().unwrap().to_owned();
                                let host = p["host"].as_str().unwrap().to_owned();
                                assert!(acked.lock().unwrap().insert(id, host).is_none());
                            }
                        }
                        409 if resp.to_string().contains("no valid host") => {
                            // A multi-instance request may not fit where a single one does:
                            // stop only when a single instance is refused too.
                            if body["num_instances"] == 1 {
                                return;
                            }
                        }
                        // Lost the race ten times in a row: legal, try again.
                        409 if resp.to_string().contains("conflicted") => {}
                        _ => panic!("placement through {base}: {st} {resp}"),
                    }
                }
            });
        }
    });

    // The refusal carries Nova's per-filter counts.
    let (st, body) = request(
        http,
        reqwest::Method::POST,
        &format!("{}/shoal/v1/placements", c.nodes[2].base()),
        &token,
        Some(&placement_body(1)),
    );
    assert_eq!(st, 409, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(
            "AvailabilityZoneFilter: (start: 7, end: 4), AggregateRamFilter: (start: 4, end: 0)"
        ),
        "{msg}"
    );

    let (st, hosts) = request(
        http,
        reqwest::Method::GET,
        &format!("{}/shoal/v1/hosts", c.nodes[1].base()),
        &token,
        None,
    );
    assert_eq!(st, 200, "{hosts}");
    let (st, instances) = request(
        http,
        reqwest::Method::GET,
        &format!("{}/shoal/v1/instances", c.nodes[2].base()),
        &token,
        None,
    );
    assert_eq!(st, 200, "{instances}");
    let instances = instances["instances"].as_object().unwrap();
    let acked = acked.lock().unwrap();

    assert_eq!(acked.len(), CAPACITY, "the hosts should be exactly full");
    assert_eq!(instances.len(), acked.len(), "{instances:?}");
    for (id, host) in acked.iter() {
        assert_eq!(instances[id]["host"], host.as_str(), "instance {id}");
    }

    let mut checked = 0;
    for h in hosts["hosts"].as_array().unwrap() {
        if h["availability_zone"] != ZONE {
            // The nodes' own hosts registered themselves and got nothing.
            assert_eq!(h["vcpus_used"], 0, "{h}");
            continue;
        }
        checked += 1;
        let name = h["name"].as_str().unwrap();
        let mine: Vec<&Value> = instances.values().filter(|i| i["host"] == name).collect();
        let sum = |f: &str| mine.iter().map(|i| i[f].as_u64().unwrap()).sum::<u64>();
        assert_eq!(h["vcpus_used"].as_u64().unwrap(), sum("vcpus"), "{h}");
        assert_eq!(h["ram_mb_used"].as_u64().unwrap(), sum("ram_mb"), "{h}");
        assert_eq!(h["disk_mb_used"].as_u64().unwrap(), sum("disk_mb"), "{h}");
        assert_eq!(h["instances"].as_array().unwrap().len(), mine.len(), "{h}");
        assert!(h["ram_mb_used"].as_u64().unwrap() <= RAM_MB, "{h}");
        assert!(h["vcpus_used"].as_u64().unwrap() <= 4 * 16, "{h}");
        assert!(h["disk_mb_used"].as_u64().unwrap() <= 100 * 1024, "{h}");
    }
    assert_eq!(checked, HOSTS);

    // Registering a host again changes its totals and keeps its usage and instances.
    let before = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "t60-host0")
        .unwrap()
        .clone();
    let (st, after) = request(
        http,
        reqwest::Method::PUT,
        &format!("{}/shoal/v1/hosts/t60-host0", c.nodes[2].base()),
        &token,
        Some(&json!({"vcpus": 8, "ram_mb": 2 * RAM_MB, "disk_gb": 100, "availability_zone": ZONE})),
    );
    assert_eq!(st, 200, "{after}");
    let after = &after["host"];
    assert_eq!(after["ram_mb_total"], 2 * RAM_MB);
    for f in [
        "vcpus_used",
        "ram_mb_used",
        "disk_mb_used",
        "instances",
        "allocation_ratios",
    ] {
        assert_eq!(after[f], before[f], "{f}");
    }
    assert!(after["generation"].as_u64() > before["generation"].as_u64());

    // Every node registered itself as a host with the capacity it detected.
    let names = wait_until("the nodes' own hosts", Duration::from_secs(30), || {
        let (_, hosts) = request(
            http,
            reqwest::Method::GET,
            &format!("{}/shoal/v1/hosts", c.nodes[0].base()),
            &token,
            None,
        );
        let names: Vec<String> = hosts["hosts"]
            .as_array()?
            .iter()
            .filter(|h| h["availability_zone"] == "nova" && h["vcpus_total"].as_u64() >= Some(1))
            .map(|h| h["name"].as_str().unwrap().to_owned())
            .collect();
        (names.len() == 3).then_some(names)
    });
    assert_eq!(names, vec!["node1", "node2", "node3"]);
    let attempts = attempts.lock().unwrap();
    eprintln!(
        "{} requests acknowledged, {} retries",
        attempts.len(),
        attempts.iter().map(|a| a - 1).sum::<u64>()
    );
}
