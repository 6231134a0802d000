//! What an admin sets through the Compute API decides placement: a disabled compute service
//! gets no instances, and a flavor whose extra specs name aggregate metadata lands only on
//! that aggregate's hosts, in the zone the aggregate gives them.

mod common;

use std::time::Duration;

use common::osc::{openstack_bin, Osc};
use common::{wait_until, Cluster};
use serde_json::{json, Value};

/// Places `n` instances of `flavor` through node `node`; returns the hosts used, or the error.
fn place(
    c: &Cluster,
    token: &str,
    flavor: Value,
    az: Option<&str>,
    n: usize,
) -> Result<Vec<String>, Value> {
    let mut body = json!({"flavor": flavor, "num_instances": n});
    if let Some(z) = az {
        body["availability_zone"] = json!(z);
    }
    let resp = c
        .http
        .post(format!("{}/shoal/v1/placements", c.nodes[0].base()))
        .header("X-Auth-Token", token)
        .json(&body)
        .send()
        .unwrap();
    let ok = resp.status().is_success();
    let v: Value = resp.json().unwrap();
    if !ok {
        return Err(v);
    }
    Ok(v["placements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["host"].as_str().unwrap().to_owned())
        .collect())
}

#[test]
fn disabled_services_and_aggregate_metadata_reach_the_scheduler() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    let token = c.token(0);
    let small = json!({"vcpus": 1, "ram_mb": 64, "disk_gb": 0});
    // Room for every instance below whatever the machine's cores: a new host starts at Nova's
    // initial CPU ratio of 4.0, so a 2-core node holds 8 vCPUs. Each node registered itself at
    // start (the row exists), so nothing overwrites these totals.
    for name in ["node1", "node2", "node3"] {
        let path = format!("/shoal/v1/hosts/{name}");
        let host = wait_until("the node's registration", Duration::from_secs(30), || {
            let (st, v) = c.api(0, "GET", &path, &token, None);
            (st == 200).then(|| v["host"].clone())
        });
        let spec = json!({"vcpus": 64, "ram_mb": host["ram_mb_total"],
                          "disk_gb": host["disk_gb_total"],
                          "availability_zone": host["availability_zone"]});
        let (st, v) = c.api(0, "PUT", &path, &token, Some(spec));
        assert!(st == 200 || st == 201, "{st} {v}");
    }

    // node2's service disabled with the real client: 12 instances avoid it.
    let out = osc.run(
        1,
        &[
            "compute",
            "service",
            "set",
            "--disable",
            "node2",
            "nova-compute",
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    let hosts = place(&c, &token, small.clone(), None, 12).unwrap();
    assert!(
        !hosts.iter().any(|h| h == "node2"),
        "placed on a disabled host: {hosts:?}"
    );
    let out = osc.run(
        2,
        &[
            "compute",
            "service",
            "set",
            "--enable",
            "node2",
            "nova-compute",
        ],
    );
    assert!(out.ok, "{}", out.stderr);

    // An aggregate of node3 with ssd=true and zone fast, made with the real client.
    let agg = osc.json(
        0,
        &[
            "aggregate",
            "create",
            "--zone",
            "fast",
            "-f",
            "json",
            "ssd-hosts",
        ],
    );
    let id = agg["id"].to_string();
    for args in [
        vec!["aggregate", "add", "host", id.as_str(), "node3"],
        vec!["aggregate", "set", "--property", "ssd=true", id.as_str()],
    ] {
        let out = osc.run(1, &args);
        assert!(out.ok, "{args:?}: {}", out.stderr);
    }
    let ssd = json!({"vcpus": 1, "ram_mb": 64, "disk_gb": 0,
                     "extra_specs": {"aggregate_instance_extra_specs:ssd": "true"}});
    let hosts = place(&c, &token, ssd.clone(), None, 6).unwrap();
    assert!(hosts.iter().all(|h| h == "node3"), "{hosts:?}");
    let hosts = place(&c, &token, small.clone(), Some("fast"), 4).unwrap();
    assert!(hosts.iter().all(|h| h == "node3"), "zone fast: {hosts:?}");

    // With node3 disabled too, the ssd flavor has nowhere to go.
    let out = osc.run(
        0,
        &[
            "compute",
            "service",
            "set",
            "--disable",
            "node3",
            "nova-compute",
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    let err = place(&c, &token, ssd, None, 1).unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("no valid host"),
        "{err}"
    );
}
