//! Out-of-range numbers, control characters and unknown ids get a 400 that names the field,
//! in the API's own error shape, and nothing is stored.

mod common;

use common::Cluster;
use serde_json::{json, Value};

fn send(c: &Cluster, token: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = c
        .http
        .request(m, format!("{}{path}", c.nodes[0].base()))
        .header("X-Auth-Token", token);
    if !body.is_null() {
        req = req.json(&body);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

/// The message of a Nova `badRequest` body.
fn nova_400(status: u16, body: &Value) -> String {
    assert_eq!(status, 400, "{body}");
    body["badRequest"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("not Nova's shape: {body}"))
        .to_owned()
}

#[test]
fn out_of_range_and_control_character_inputs_are_refused() {
    let c = Cluster::init(&[]);
    let t = c.token(0);
    let flavor = |over: Value| {
        let mut f = json!({"name": "f", "ram": 512, "vcpus": 1, "disk": 1});
        for (k, v) in over.as_object().unwrap() {
            f[k] = v.clone();
        }
        json!({ "flavor": f })
    };
    for (over, field) in [
        (json!({"ram": 1u64 << 63}), "ram"),
        (json!({"vcpus": 4294967295u64}), "vcpus"),
        (json!({"disk": u64::MAX}), "disk"),
        (json!({"swap": u64::MAX}), "swap"),
        (json!({"OS-FLV-EXT-DATA:ephemeral": u64::MAX}), "ephemeral"),
        (json!({"rxtx_factor": 1e308}), "rxtx_factor"),
        (json!({"name": "bad\u{0}name"}), "name"),
        (json!({"name": "new\nline"}), "name"),
    ] {
        let (s, b) = send(
            &c,
            &t,
            "POST",
            "/compute/v2.1/flavors",
            flavor(over.clone()),
        );
        let m = nova_400(s, &b);
        assert!(m.contains(field), "{over}: {m}");
    }
    let (s, b) = send(&c, &t, "GET", "/compute/v2.1/flavors/detail", Value::Null);
    assert_eq!(s, 200);
    assert!(
        !b.to_string().contains("\"name\":\"f\""),
        "a refused flavor was stored: {b}"
    );

    let (s, _) = send(
        &c,
        &t,
        "POST",
        "/compute/v2.1/flavors",
        flavor(json!({"id": "ok-1"})),
    );
    assert_eq!(s, 200);
    let (s, b) = send(
        &c,
        &t,
        "POST",
        "/compute/v2.1/flavors/ok-1/os-extra_specs",
        json!({"extra_specs": {"k": "v\u{1b}[2J"}}),
    );
    assert!(nova_400(s, &b).contains("control"));

    let (s, b) = send(
        &c,
        &t,
        "POST",
        "/compute/v2.1/os-aggregates",
        json!({"aggregate": {"name": "agg\u{7}"}}),
    );
    assert!(nova_400(s, &b).contains("aggregate name"));
    let (s, b) = send(
        &c,
        &t,
        "POST",
        "/compute/v2.1/os-aggregates",
        json!({"aggregate": {"name": "agg1"}}),
    );
    assert_eq!(s, 200, "{b}");
    let id = b["aggregate"]["id"].clone();
    let (s, b) = send(
        &c,
        &t,
        "POST",
        &format!("/compute/v2.1/os-aggregates/{id}/action"),
        json!({"set_metadata": {"metadata": {"k\u{0}": "v"}}}),
    );
    assert!(nova_400(s, &b).contains("metadata key"));
    let (s, b) = send(
        &c,
        &t,
        "POST",
        "/compute/v2.1/os-server-groups",
        json!({"server_group": {"name": "g\r\nX-Injected: 1", "policies": ["affinity"]}}),
    );
    assert!(nova_400(s, &b).contains("server group name"));

    // Quotas: bounded values, and ids that name no project are refused.
    let projects: Value = c
        .http
        .get(format!("{}/identity/v3/projects", c.nodes[0].base()))
        .header("X-Auth-Token", &t)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let admin_project = projects["projects"][0]["id"].as_str().unwrap().to_owned();
    let (s, b) = send(
        &c,
        &t,
        "PUT",
        &format!("/compute/v2.1/os-quota-sets/{admin_project}"),
        json!({"quota_set": {"cores": i64::MAX}}),
    );
    assert!(nova_400(s, &b).contains("2147483647"));
    for bad in ["not-a-uuid", "..%2F..%2Fetc%2Fpasswd", "a%0D%0Ab"] {
        for method in ["GET", "DELETE"] {
            let (s, b) = send(
                &c,
                &t,
                method,
                &format!("/compute/v2.1/os-quota-sets/{bad}"),
                Value::Null,
            );
            assert!(
                nova_400(s, &b).contains("not a valid project"),
                "{method} {bad}"
            );
        }
    }
    let (s, _) = send(
        &c,
        &t,
        "GET",
        &format!("/compute/v2.1/os-quota-sets/{admin_project}"),
        Value::Null,
    );
    assert_eq!(s, 200);

    // Images carry at most 128 additional properties, as Glance's default quota.
    let image = |n: usize| {
        let mut b = json!({"name": "props", "disk_format": "raw", "container_format": "bare"});
        for i in 0..n {
            b[format!("p{i}")] = json!("v");
        }
        b
    };
    let (s, b) = send(&c, &t, "POST", "/image/v2/images", image(129));
    assert_eq!(s, 413, "{b}");
    assert!(b["message"].as_str().unwrap().contains("128"), "{b}");
    let (s, b) = send(&c, &t, "POST", "/image/v2/images", image(128));
    assert_eq!(s, 201, "{b}");

    // Identity names: control characters are refused in Keystone's error shape.
    for (path, body) in [
        (
            "/identity/v3/projects",
            json!({"project": {"name": "p\u{0}x"}}),
        ),
        (
            "/identity/v3/users",
            json!({"user": {"name": "u\nx", "password": "pw-secret-1"}}),
        ),
    ] {
        let (s, b) = send(&c, &t, "POST", path, body);
        assert_eq!(s, 400, "{path}: {b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains("control"),
            "{b}"
        );
    }

    // Unknown paths and bodies that are not JSON answer in the API's shape too.
    let (s, b) = send(&c, &t, "GET", "/compute/v2.1/no-such-thing", Value::Null);
    assert_eq!(s, 404);
    assert!(b["itemNotFound"]["message"].is_string(), "{b}");
}
