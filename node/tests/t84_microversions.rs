//! Compute API microversions above 2.1, as a user of `openstack --os-compute-api-version 2.x`
//! and of raw HTTP sees them on a three-node cluster whose agents drive libvirt's test
//! hypervisor: the negotiation and version documents, then key pairs, servers, server groups
//! and compute services at several versions, with 2.1 (no header) unchanged.

mod common;

use std::time::Duration;

use common::osc::{openstack_bin, Osc};
use common::{wait_until, Cluster};
use serde_json::Value;

/// The highest version Shoal claims; the version document must say the same.
const MAX: &str = "2.36";

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f me@host";

/// `GET path` with `headers`; the status, the response headers and the JSON body.
fn get(
    c: &Cluster,
    token: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = c
        .http
        .get(format!("{}{path}", c.nodes[0].base()))
        .header("X-Auth-Token", token);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let body = serde_json::from_str(&resp.text().unwrap()).unwrap_or(Value::Null);
    (status, h, body)
}

/// `POST /os-keypairs` with `body` at version `v`.
fn post_keypair(c: &Cluster, token: &str, v: &str, body: &Value) -> reqwest::blocking::Response {
    c.http
        .post(format!("{}/compute/v2.1/os-keypairs", c.nodes[0].base()))
        .header("X-Auth-Token", token)
        .header("OpenStack-API-Version", format!("compute {v}"))
        .json(body)
        .send()
        .unwrap()
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Negotiation as Nova: the default is 2.1, `latest` is the maximum, both headers are read and
/// answered, a version outside the range is a 406 and a malformed one a 400.
#[test]
fn negotiation_follows_nova() {
    let c = Cluster::start(1, &[]);
    let token = c.token(0);

    let (s, h, doc) = get(&c, &token, "/compute/v2.1/", &[]);
    assert_eq!(s, 200);
    assert_eq!(doc["version"]["version"], MAX, "{doc}");
    assert_eq!(doc["version"]["min_version"], "2.1");
    assert_eq!(header(&h, "openstack-api-version"), Some("compute 2.1"));
    assert_eq!(header(&h, "x-openstack-nova-api-version"), Some("2.1"));
    let vary = header(&h, "vary").unwrap_or_default();
    assert!(
        vary.contains("OpenStack-API-Version") && vary.contains("X-OpenStack-Nova-API-Version")
    );
    let (_, _, all) = get(&c, &token, "/compute/", &[]);
    assert_eq!(all["versions"][1]["version"], MAX, "{all}");

    for (name, value, want) in [
        ("OpenStack-API-Version", "compute latest".to_owned(), MAX),
        ("X-OpenStack-Nova-API-Version", "latest".to_owned(), MAX),
        ("OpenStack-API-Version", "compute 2.9".to_owned(), "2.9"),
        ("X-OpenStack-Nova-API-Version", "2.3".to_owned(), "2.3"),
    ] {
        let (s, h, _) = get(&c, &token, "/compute/v2.1/flavors", &[(name, &value)]);
        assert_eq!(s, 200, "{value}");
        assert_eq!(
            header(&h, "x-openstack-nova-api-version"),
            Some(want),
            "{value}"
        );
        assert_eq!(
            header(&h, "openstack-api-version"),
            Some(format!("compute {want}").as_str())
        );
    }
    let (minor, _) = MAX.split_once('.').map(|(a, b)| (b, a)).unwrap();
    let above = format!("2.{}", minor.parse::<u32>().unwrap() + 1);
    for v in [above.as_str(), "2.0", "3.0"] {
        let (s, h, body) = get(
            &c,
            &token,
            "/compute/v2.1/flavors",
            &[("X-OpenStack-Nova-API-Version", v)],
        );
        assert_eq!(s, 406, "{v}: {body}");
        let msg = body["computeFault"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(&format!("maximum is {MAX}")), "{body}");
        assert_eq!(header(&h, "x-openstack-nova-api-version"), None);
    }
    for v in ["2.01", "2", "two"] {
        let (s, _, body) = get(
            &c,
            &token,
            "/compute/v2.1/flavors",
            &[("OpenStack-API-Version", &format!("compute {v}"))],
        );
        assert_eq!(s, 400, "{v}: {body}");
        assert!(body["badRequest"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid format"));
    }
}

/// Key pairs, servers, server groups and services at 2.1 and above, through the real client.
#[test]
fn versioned_views_through_the_openstack_client() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    let at = |v: &str| [("OS_COMPUTE_API_VERSION", v.to_owned())];
    let json_at = |v: &str, args: &[&str]| {
        let env = at(v);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        osc.json_as(0, &env, args)
    };
    let run_at = |v: &str, args: &[&str]| {
        let env = at(v);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        osc.run_as(0, &env, args)
    };

    // The client refuses a version above the server's maximum itself.
    let (minor, _) = MAX.split_once('.').map(|(a, b)| (b, a)).unwrap();
    let above = format!("2.{}", minor.parse::<u32>().unwrap() + 1);
    assert!(!run_at(&above, &["server", "list"]).ok);

    // 2.2: key pair types; 2.1 shows none.
    let dir = c.tmp.path();
    let ssh = dir.join("k.pub");
    std::fs::write(&ssh, ED25519).unwrap();
    let kp = json_at(
        "2.2",
        &[
            "keypair",
            "create",
            "--public-key",
            ssh.to_str().unwrap(),
            "--type",
            "ssh",
            "k1",
        ],
    )
    .json();
    assert_eq!(kp["type"], "ssh", "{kp}");
    let cert = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap();
    // The client drops `--type` (it names it `key_type`), so the certificate goes over HTTP.
    let token = c.token(0);
    let body = serde_json::json!({"keypair": {
        "name": "k2", "type": "x509", "public_key": cert.cert.pem()}});
    let post = |v: &str| post_keypair(&c, &token, v, &body);
    assert_eq!(post("2.1").status().as_u16(), 400);
    let created = post("2.2");
    assert_eq!(created.status().as_u16(), 201);
    let x: Value = created.json().unwrap();
    assert_eq!(x["keypair"]["type"], "x509", "{x}");
    assert_eq!(
        x["keypair"]["fingerprint"].as_str().unwrap().len(),
        59,
        "{x}"
    );
    let listed = json_at("2.2", &["keypair", "list"]).json();
    let types: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["Type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(types, ["ssh", "x509"], "{listed}");
    // At 2.1 (no header) the answer has no type. (The client fills in a default of its own, so
    // the bare answer is read over HTTP.)
    let (_, _, shown) = get(&c, &token, "/compute/v2.1/os-keypairs/k1", &[]);
    assert!(shown["keypair"].get("type").is_none(), "{shown}");
    assert_eq!(shown["keypair"]["name"], "k1", "{shown}");
    // 2.10: an admin manages another user's key pairs.
    osc.json(0, &["user", "create", "--password", "bob-pw-1", "bob"]);
    let bob = osc.json(0, &["user", "show", "bob"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let theirs = json_at(
        "2.10",
        &[
            "keypair",
            "create",
            "--public-key",
            ssh.to_str().unwrap(),
            "--user",
            "bob",
            "bk",
        ],
    )
    .json();
    assert_eq!(theirs["user_id"], bob, "{theirs}");
    let bobs = json_at("2.10", &["keypair", "list", "--user", "bob"]).json();
    assert_eq!(bobs.as_array().unwrap().len(), 1, "{bobs}");
    assert!(run_at("2.10", &["keypair", "delete", "--user", "bob", "bk"]).ok);

    // Servers: a flavor, an image and one server built at 2.1.
    osc.json(
        0,
        &[
            "flavor", "create", "--vcpus", "1", "--ram", "256", "--disk", "1", "m1.tiny",
        ],
    );
    let disk = dir.join("tiny.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    osc.json(
        0,
        &[
            "image",
            "create",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--file",
            disk.to_str().unwrap(),
            "tiny",
        ],
    );
    // (The client asks for the highest version both sides know unless told otherwise.)
    let vm = json_at(
        "2.1",
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "--wait", "Web_01",
        ],
    )
    .json();
    let id = vm["id"].as_str().unwrap().to_owned();
    let host = vm["OS-EXT-SRV-ATTR:host"].as_str().unwrap().to_owned();

    // 2.1: none of the later fields.
    let (_, _, v21) = get(&c, &token, &format!("/compute/v2.1/servers/{id}"), &[]);
    let v21 = &v21["server"];
    assert_eq!(v21["id"], id.as_str(), "{v21}");
    for later in [
        "locked",
        "host_status",
        "description",
        "OS-EXT-SRV-ATTR:hostname",
        "OS-EXT-SRV-ATTR:reservation_id",
    ] {
        assert!(v21.get(later).is_none(), "{later} at 2.1: {v21}");
    }
    // 2.3: the extended attributes, for an admin.
    let v23 = json_at("2.3", &["server", "show", &id]).json();
    assert_eq!(v23["OS-EXT-SRV-ATTR:hostname"], "web-01", "{v23}");
    assert_eq!(v23["OS-EXT-SRV-ATTR:launch_index"], 0);
    assert_eq!(v23["OS-EXT-SRV-ATTR:root_device_name"], "/dev/vda");
    assert!(v23["OS-EXT-SRV-ATTR:reservation_id"]
        .as_str()
        .unwrap()
        .starts_with("r-"));
    assert!(v23["locked"].is_null(), "{v23}");
    // 2.9: locked.
    assert!(run_at("2.9", &["server", "lock", &id]).ok);
    let v29 = json_at("2.9", &["server", "show", &id]).json();
    assert_eq!(v29["locked"], true, "{v29}");
    assert!(run_at("2.9", &["server", "unlock", &id]).ok);
    // 2.16: host_status, UP while the host's service is up and enabled.
    let v216 = json_at("2.16", &["server", "show", &id]).json();
    assert_eq!(v216["host_status"], "UP", "{v216}");
    assert_eq!(v216["locked"], false);

    // 2.19: a server created below 2.19 has its name as description; one created at 2.19 has
    // the one it was given, which update and rebuild change.
    let v219 = json_at("2.19", &["server", "show", &id]).json();
    assert_eq!(v219["description"], "Web_01", "{v219}");
    let described = json_at(
        "2.19",
        &[
            "server",
            "create",
            "--flavor",
            "m1.tiny",
            "--image",
            "tiny",
            "--description",
            "the db",
            "--wait",
            "db",
        ],
    )
    .json();
    let db = described["id"].as_str().unwrap().to_owned();
    assert_eq!(described["description"], "the db", "{described}");
    assert!(
        run_at(
            "2.19",
            &["server", "set", "--description", "still the db", &db]
        )
        .ok
    );
    let shown = json_at("2.19", &["server", "show", &db]).json();
    assert_eq!(shown["description"], "still the db", "{shown}");
    assert!(
        run_at(
            "2.19",
            &[
                "server",
                "rebuild",
                "--image",
                "tiny",
                "--description",
                "rebuilt",
                "--wait",
                &db
            ]
        )
        .ok
    );
    let shown = json_at("2.19", &["server", "show", &db]).json();
    assert_eq!(shown["description"], "rebuilt", "{shown}");
    // Below 2.19 a description is an unexpected field.
    let (s18, b18) = {
        let r = c
            .http
            .put(format!("{}/compute/v2.1/servers/{db}", c.nodes[0].base()))
            .header("X-Auth-Token", &token)
            .header("X-OpenStack-Nova-API-Version", "2.18")
            .json(&serde_json::json!({"server": {"description": "x"}}))
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    assert_eq!(s18, 400, "{b18}");

    // 2.21: the actions of a deleted server stay readable; below 2.21 it is gone.
    assert!(osc.run(0, &["server", "delete", "--wait", &db]).ok);
    let (s21, _, gone) = get(
        &c,
        &token,
        &format!("/compute/v2.1/servers/{db}/os-instance-actions"),
        &[("X-OpenStack-Nova-API-Version", "2.21")],
    );
    assert_eq!(s21, 200, "{gone}");
    let mut names: Vec<&str> = gone["instanceActions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["create", "delete", "rebuild"], "{gone}");
    let (s20, _, _) = get(
        &c,
        &token,
        &format!("/compute/v2.1/servers/{db}/os-instance-actions"),
        &[("X-OpenStack-Nova-API-Version", "2.20")],
    );
    assert_eq!(s20, 404);
    let (s21, _, _) = get(
        &c,
        &token,
        &format!("/compute/v2.1/servers/{db}"),
        &[("X-OpenStack-Nova-API-Version", "2.21")],
    );
    assert_eq!(s21, 404);

    // 2.17: trigger_crash_dump injects an NMI through the host's libvirt; the action log
    // records it with the agent's event. Below 2.17 there is no such action.
    assert!(run_at("2.17", &["server", "dump", "create", &id]).ok);
    let event = wait_until("the crash dump event", Duration::from_secs(30), || {
        let (_, _, actions) = get(
            &c,
            &token,
            &format!("/compute/v2.1/servers/{id}/os-instance-actions"),
            &[],
        );
        let req = actions["instanceActions"]
            .as_array()?
            .iter()
            .find(|a| a["action"] == "trigger_crash_dump")?["request_id"]
            .as_str()?
            .to_owned();
        let (_, _, shown) = get(
            &c,
            &token,
            &format!("/compute/v2.1/servers/{id}/os-instance-actions/{req}"),
            &[],
        );
        let ev = shown["instanceAction"]["events"].get(0)?.clone();
        Some(ev)
    });
    assert_eq!(event["event"], "compute_trigger_crash_dump", "{event}");
    assert_eq!(event["result"], "Success", "{event}");
    let crash = |v: &str| {
        c.http
            .post(format!(
                "{}/compute/v2.1/servers/{id}/action",
                c.nodes[0].base()
            ))
            .header("X-Auth-Token", &token)
            .header("X-OpenStack-Nova-API-Version", v)
            .json(&serde_json::json!({"trigger_crash_dump": null}))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(crash("2.16"), 404);
    assert!(osc.run(0, &["server", "stop", &id]).ok);
    wait_until("the server to stop", Duration::from_secs(30), || {
        (osc.json(0, &["server", "show", &id])["status"] == "SHUTOFF").then_some(())
    });
    assert_eq!(crash("2.17"), 409);
    assert!(osc.run(0, &["server", "start", &id]).ok);
    wait_until("the server to start", Duration::from_secs(30), || {
        (osc.json(0, &["server", "show", &id])["status"] == "ACTIVE").then_some(())
    });

    // 2.11: a forced-down service reads down, its servers' host is DOWN, and it takes no new
    // servers; 2.1 lists no forced_down.
    assert!(
        run_at(
            "2.11",
            &["compute", "service", "set", "--down", &host, "nova-compute"]
        )
        .ok
    );
    let services = json_at("2.11", &["compute", "service", "list", "--long"]).json();
    let row = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Host"] == host.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["Forced Down"], true, "{services}");
    assert_eq!(row["State"], "down", "{services}");
    let v216 = json_at("2.16", &["server", "show", &id]).json();
    assert_eq!(v216["host_status"], "DOWN", "{v216}");
    let (_, _, plain) = get(&c, &token, "/compute/v2.1/os-services", &[]);
    assert!(plain["services"][0].get("forced_down").is_none(), "{plain}");
    assert!(plain["services"][0].get("state").is_some(), "{plain}");
    // With every service forced down, nothing fits: NoValidHost.
    for h in ["node1", "node2", "node3"] {
        assert!(
            run_at(
                "2.11",
                &["compute", "service", "set", "--down", h, "nova-compute"]
            )
            .ok
        );
    }
    let none = osc.json(
        0,
        &[
            "server", "create", "--flavor", "m1.tiny", "--image", "tiny", "nowhere",
        ],
    );
    let none = wait_until("the server to settle", Duration::from_secs(60), || {
        let v = osc.json(0, &["server", "show", none["id"].as_str().unwrap()]);
        (v["status"] != "BUILD").then_some(v)
    });
    assert_eq!(none["status"], "ERROR", "{none}");
    for h in ["node1", "node2", "node3"] {
        assert!(
            run_at(
                "2.11",
                &["compute", "service", "set", "--up", h, "nova-compute"]
            )
            .ok
        );
    }
    let v216 = json_at("2.16", &["server", "show", &id]).json();
    assert_eq!(v216["host_status"], "UP", "{v216}");
    // Disabled: MAINTENANCE.
    assert!(
        osc.run(
            0,
            &[
                "compute",
                "service",
                "set",
                "--disable",
                &host,
                "nova-compute"
            ]
        )
        .ok
    );
    let v216 = json_at("2.16", &["server", "show", &id]).json();
    assert_eq!(v216["host_status"], "MAINTENANCE", "{v216}");
    assert!(
        osc.run(
            0,
            &[
                "compute",
                "service",
                "set",
                "--enable",
                &host,
                "nova-compute"
            ]
        )
        .ok
    );

    // 2.13 and 2.15: server groups show their owners, and soft policies need 2.15.
    // (The client itself refuses a soft policy below 2.15, so the server's refusal is read
    // over HTTP.)
    let group = |v: &str| {
        c.http
            .post(format!(
                "{}/compute/v2.1/os-server-groups",
                c.nodes[0].base()
            ))
            .header("X-Auth-Token", &token)
            .header("X-OpenStack-Nova-API-Version", v)
            .json(&serde_json::json!({"server_group": {
                "name": "g0", "policies": ["soft-affinity"]}}))
            .send()
            .unwrap()
    };
    let refused = group("2.14");
    assert_eq!(refused.status().as_u16(), 400);
    let refused: Value = refused.json().unwrap();
    assert!(
        refused["badRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("'soft-affinity' is not one of"),
        "{refused}"
    );
    assert_eq!(group("2.15").status().as_u16(), 200);
    let g = json_at(
        "2.15",
        &[
            "server",
            "group",
            "create",
            "--policy",
            "soft-anti-affinity",
            "g1",
        ],
    )
    .json();
    assert_eq!(g["policies"][0], "soft-anti-affinity", "{g}");
    assert!(
        g["project_id"].as_str().is_some_and(|p| !p.is_empty()),
        "{g}"
    );
    let gid = g["id"].as_str().unwrap();
    let (_, _, g21) = get(
        &c,
        &token,
        &format!("/compute/v2.1/os-server-groups/{gid}"),
        &[],
    );
    assert!(g21["server_group"].get("project_id").is_none(), "{g21}");
    assert_eq!(g21["server_group"]["id"], gid, "{g21}");

    // 2.26: server tags, set and filtered through the client, bounded as Nova bounds them.
    assert!(
        run_at(
            "2.26",
            &["server", "set", "--tag", "web", "--tag", "db", &id]
        )
        .ok
    );
    let shown = json_at("2.26", &["server", "show", &id]).json();
    assert_eq!(shown["tags"], serde_json::json!(["db", "web"]), "{shown}");
    let listed = |filter: &str| {
        let out = json_at("2.26", &["server", "list", filter, "web,db"]).json();
        out.as_array()
            .unwrap()
            .iter()
            .any(|s| s["ID"] == id.as_str())
    };
    assert!(listed("--tags"));
    assert!(!listed("--not-tags"));
    assert!(run_at("2.26", &["server", "unset", "--tag", "web", &id]).ok);
    let ids = |query: &str| -> Vec<String> {
        let (_, _, l) = get(
            &c,
            &token,
            &format!("/compute/v2.1/servers?{query}"),
            &[("OpenStack-API-Version", "compute 2.26")],
        );
        l["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(ids("tags-any=x,db&not-tags-any=y").contains(&id));
    assert!(!ids("not-tags-any=x,db").contains(&id));
    // Below 2.26 the filters are dropped, as Nova drops them.
    let (_, _, l225) = get(
        &c,
        &token,
        "/compute/v2.1/servers?tags=nothing",
        &[("OpenStack-API-Version", "compute 2.25")],
    );
    assert!(!l225["servers"].as_array().unwrap().is_empty(), "{l225}");
    let tags_url = format!("{}/compute/v2.1/servers/{id}/tags", c.nodes[0].base());
    let call = |method: reqwest::Method, path: &str, v: &str, body: Option<Value>| {
        let mut req = c
            .http
            .request(method, format!("{tags_url}{path}"))
            .header("X-Auth-Token", &token)
            .header("OpenStack-API-Version", format!("compute {v}"));
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().unwrap()
    };
    use reqwest::Method;
    assert_eq!(call(Method::GET, "", "2.25", None).status().as_u16(), 404);
    let all: Value = call(Method::GET, "", "2.26", None).json().unwrap();
    assert_eq!(all["tags"], serde_json::json!(["db"]), "{all}");
    let added = call(Method::PUT, "/new", "2.26", None);
    assert_eq!(added.status().as_u16(), 201);
    assert!(header(added.headers(), "location").is_some_and(|l| l.ends_with("/tags/new")));
    assert_eq!(
        call(Method::PUT, "/new", "2.26", None).status().as_u16(),
        204
    );
    assert_eq!(
        call(Method::GET, "/new", "2.26", None).status().as_u16(),
        204
    );
    assert_eq!(
        call(Method::GET, "/old", "2.26", None).status().as_u16(),
        404
    );
    assert_eq!(
        call(Method::PUT, "/a,b", "2.26", None).status().as_u16(),
        400
    );
    let many: Vec<String> = (0..51).map(|i| format!("t{i}")).collect();
    let too_many = serde_json::json!({ "tags": many });
    assert_eq!(
        call(Method::PUT, "", "2.26", Some(too_many))
            .status()
            .as_u16(),
        400
    );
    let fifty = serde_json::json!({ "tags": many[..50] });
    let put: Value = call(Method::PUT, "", "2.26", Some(fifty)).json().unwrap();
    assert_eq!(put["tags"].as_array().unwrap().len(), 50, "{put}");
    let over = call(Method::PUT, "/one-more", "2.26", None);
    assert_eq!(over.status().as_u16(), 400);
    assert_eq!(
        call(Method::DELETE, "/t0", "2.26", None).status().as_u16(),
        204
    );
    assert_eq!(
        call(Method::DELETE, "/t0", "2.26", None).status().as_u16(),
        404
    );
    assert_eq!(
        call(Method::DELETE, "", "2.26", None).status().as_u16(),
        204
    );
    let (_, _, v226) = get(
        &c,
        &token,
        &format!("/compute/v2.1/servers/{id}"),
        &[("OpenStack-API-Version", "compute 2.26")],
    );
    assert_eq!(v226["server"]["tags"], serde_json::json!([]), "{v226}");
    let (_, _, v225) = get(
        &c,
        &token,
        &format!("/compute/v2.1/servers/{id}"),
        &[("OpenStack-API-Version", "compute 2.25")],
    );
    assert!(v225["server"].get("tags").is_none(), "{v225}");
}

/// `method path` with an optional JSON body at version `v`; the status and the JSON body.
fn call_at(
    c: &Cluster,
    token: &str,
    method: reqwest::Method,
    path: &str,
    v: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = c
        .http
        .request(method, format!("{}{path}", c.nodes[0].base()))
        .header("X-Auth-Token", token)
        .header("OpenStack-API-Version", format!("compute {v}"));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    (
        status,
        serde_json::from_str(&resp.text().unwrap()).unwrap_or(Value::Null),
    )
}

/// 2.27 to 2.36, each at its version and the one below, through the client where it shows
/// the change: the `cpu_info` object (2.28), device tags refused as Nova refuses them on a
/// driver without device tagging (2.32), hypervisor (2.33) and key pair (2.35) paging, and the
/// proxy APIs and network quotas gone at 2.36.
#[test]
fn versions_up_to_2_36() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };
    let token = c.token(0);
    let json_at = |v: &str, args: &[&str]| {
        let env = [("OS_COMPUTE_API_VERSION", v)];
        osc.json_as(0, &env, args)
    };
    use reqwest::Method;
    let at = |v: &str, method: Method, path: &str, body: Option<Value>| {
        call_at(&c, &token, method, path, v, body)
    };

    // 2.27: the new header alone names the version (and the legacy one is still read).
    let (s, h, _) = get(
        &c,
        &token,
        "/compute/v2.1/flavors",
        &[("OpenStack-API-Version", "compute 2.27")],
    );
    assert_eq!(s, 200);
    assert_eq!(header(&h, "openstack-api-version"), Some("compute 2.27"));

    // 2.28: cpu_info is an object, below it the same object as a JSON string.
    let hv = osc.json(0, &["hypervisor", "list"]);
    let first = hv
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["Hypervisor Hostname"] == "node1")
        .map(|h| h["ID"].to_string())
        .unwrap();
    let (_, h27) = at(
        "2.27",
        Method::GET,
        &format!("/compute/v2.1/os-hypervisors/{first}"),
        None,
    );
    let text = h27["hypervisor"]["cpu_info"]
        .as_str()
        .expect("a string below 2.28");
    let (_, h28) = at(
        "2.28",
        Method::GET,
        &format!("/compute/v2.1/os-hypervisors/{first}"),
        None,
    );
    assert!(h28["hypervisor"]["cpu_info"].is_object(), "{h28}");
    assert_eq!(
        serde_json::from_str::<Value>(text).unwrap(),
        h28["hypervisor"]["cpu_info"]
    );
    let shown = json_at("2.28", &["hypervisor", "show", &first]).json();
    assert!(shown["cpu_info"].is_object(), "{shown}");

    // 2.33: hypervisor paging by id; the client walks the pages.
    let (_, all32) = at(
        "2.32",
        Method::GET,
        "/compute/v2.1/os-hypervisors?limit=1",
        None,
    );
    assert_eq!(all32["hypervisors"].as_array().unwrap().len(), 3, "{all32}");
    assert!(all32.get("hypervisors_links").is_none());
    let (_, p1) = at(
        "2.33",
        Method::GET,
        "/compute/v2.1/os-hypervisors/detail?limit=2",
        None,
    );
    let page: Vec<i64> = p1["hypervisors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_i64().unwrap())
        .collect();
    assert_eq!(page.len(), 2, "{p1}");
    let next = p1["hypervisors_links"][0]["href"].as_str().unwrap();
    assert!(
        next.contains("/os-hypervisors/detail?") && next.contains(&format!("marker={}", page[1])),
        "{next}"
    );
    let (_, p2) = at(
        "2.33",
        Method::GET,
        &format!("/compute/v2.1/os-hypervisors?limit=2&marker={}", page[1]),
        None,
    );
    assert_eq!(p2["hypervisors"].as_array().unwrap().len(), 1, "{p2}");
    assert!(p2.get("hypervisors_links").is_none(), "{p2}");
    let (s, bad) = at(
        "2.33",
        Method::GET,
        "/compute/v2.1/os-hypervisors?marker=999",
        None,
    );
    assert_eq!(s, 400, "{bad}");
    assert_eq!(
        at(
            "2.33",
            Method::GET,
            "/compute/v2.1/os-hypervisors?limit=-1",
            None
        )
        .0,
        400
    );
    let listed = json_at("2.33", &["hypervisor", "list", "--limit", "1"]).json();
    assert!(!listed.as_array().unwrap().is_empty(), "{listed}");

    // 2.35: key pair paging by name.
    let dir = c.tmp.path();
    let ssh = dir.join("k.pub");
    std::fs::write(&ssh, ED25519).unwrap();
    for name in ["kc", "ka", "kb"] {
        json_at(
            "2.35",
            &[
                "keypair",
                "create",
                "--public-key",
                ssh.to_str().unwrap(),
                name,
            ],
        );
    }
    let (_, k34) = at(
        "2.34",
        Method::GET,
        "/compute/v2.1/os-keypairs?limit=1",
        None,
    );
    assert_eq!(k34["keypairs"].as_array().unwrap().len(), 3, "{k34}");
    let (_, k35) = at(
        "2.35",
        Method::GET,
        "/compute/v2.1/os-keypairs?limit=2&marker=ka",
        None,
    );
    let names: Vec<&str> = k35["keypairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["keypair"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["kb", "kc"], "{k35}");
    assert!(k35["keypairs_links"][0]["href"]
        .as_str()
        .unwrap()
        .contains("marker=kc"));
    let (s, bad) = at(
        "2.35",
        Method::GET,
        "/compute/v2.1/os-keypairs?marker=nope",
        None,
    );
    assert_eq!(s, 400, "{bad}");
    let first_page = json_at("2.35", &["keypair", "list", "--limit", "1"]).json();
    let first_names: Vec<&str> = first_page
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["Name"].as_str().unwrap())
        .collect();
    assert_eq!(first_names.first(), Some(&"ka"), "{first_page}");
    let after = json_at("2.35", &["keypair", "list", "--marker", "kb"]).json();
    assert_eq!(after.as_array().unwrap().len(), 1, "{after}");
    assert_eq!(after[0]["Name"], "kc", "{after}");

    // 2.32: device tags. Shoal's driver exposes no device metadata, so a tagged build is
    // aborted as Nova aborts it on such a driver; below 2.32 (and for block devices above it)
    // the field is refused.
    osc.json(0, &["network", "create", "tagnet"]);
    osc.json(
        0,
        &[
            "subnet",
            "create",
            "--network",
            "tagnet",
            "--subnet-range",
            "10.32.0.0/24",
            "tagsub",
        ],
    );
    osc.json(
        0,
        &[
            "flavor", "create", "--vcpus", "1", "--ram", "256", "--disk", "1", "m1.tiny",
        ],
    );
    let disk = dir.join("tiny.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let image = osc.json(
        0,
        &[
            "image",
            "create",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--file",
            disk.to_str().unwrap(),
            "tiny",
        ],
    );
    let net = osc.json(0, &["network", "show", "tagnet"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let flavor = osc.json(0, &["flavor", "show", "m1.tiny"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let create = |v: &str, nic_tag: Option<&str>, bdm_tag: Option<&str>| {
        let mut nic = serde_json::json!({"uuid": net});
        if let Some(t) = nic_tag {
            nic["tag"] = t.into();
        }
        let mut server = serde_json::json!({
            "name": "tagged", "flavorRef": flavor, "imageRef": image["id"], "networks": [nic],
        });
        if let Some(t) = bdm_tag {
            server["block_device_mapping_v2"] = serde_json::json!([{
                "uuid": image["id"], "source_type": "image", "destination_type": "local",
                "boot_index": 0, "tag": t,
            }]);
        }
        at(
            v,
            Method::POST,
            "/compute/v2.1/servers",
            Some(serde_json::json!({ "server": server })),
        )
    };
    assert_eq!(create("2.31", Some("nic1"), None).0, 400);
    assert_eq!(create("2.33", None, Some("disk1")).0, 400);
    assert_eq!(create("2.32", Some("a/b"), None).0, 400);
    for (v, nic, bdm) in [("2.32", None, Some("disk1")), ("2.36", Some("nic1"), None)] {
        let (s, made) = create(v, nic, bdm);
        assert_eq!(s, 202, "{v}: {made}");
        let id = made["server"]["id"].as_str().unwrap().to_owned();
        let shown = wait_until("the tagged build to end", Duration::from_secs(60), || {
            let v = osc.json(0, &["server", "show", &id]);
            (v["status"] != "BUILD").then_some(v)
        });
        assert_eq!(shown["status"], "ERROR", "{shown}");
        let fault = shown["fault"]["message"].as_str().unwrap_or_default();
        assert!(fault.contains("does not support tagging"), "{shown}");
        assert!(fault.contains(&id), "{shown}");
    }

    // 2.36: the proxies are gone, and so are the network quotas and limits.
    for path in [
        "/compute/v2.1/images",
        "/compute/v2.1/os-networks",
        "/compute/v2.1/os-tenant-networks",
    ] {
        assert_eq!(at("2.35", Method::GET, path, None).0, 200, "{path}");
        assert_eq!(at("2.36", Method::GET, path, None).0, 404, "{path}");
    }
    let image_id = image["id"].as_str().unwrap();
    assert_eq!(
        at(
            "2.36",
            Method::GET,
            &format!("/compute/v2.1/images/{image_id}"),
            None
        )
        .0,
        404
    );
    // The image metadata proxy stays until 2.38.
    assert_eq!(
        at(
            "2.36",
            Method::GET,
            &format!("/compute/v2.1/images/{image_id}/metadata"),
            None
        )
        .0,
        200
    );
    let (_, l35) = at("2.35", Method::GET, "/compute/v2.1/limits", None);
    let (_, l36) = at("2.36", Method::GET, "/compute/v2.1/limits", None);
    for k in [
        "maxTotalFloatingIps",
        "maxSecurityGroups",
        "maxSecurityGroupRules",
        "totalFloatingIpsUsed",
        "totalSecurityGroupsUsed",
    ] {
        assert!(l35["limits"]["absolute"].get(k).is_some(), "{k}: {l35}");
        assert!(l36["limits"]["absolute"].get(k).is_none(), "{k}: {l36}");
    }
    assert!(
        l36["limits"]["absolute"].get("maxImageMeta").is_some(),
        "{l36}"
    );
    let project = osc.json(0, &["project", "show", "admin"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let qs = format!("/compute/v2.1/os-quota-sets/{project}");
    for path in [qs.clone(), format!("{qs}/defaults"), format!("{qs}/detail")] {
        let (_, q35) = at("2.35", Method::GET, &path, None);
        let (_, q36) = at("2.36", Method::GET, &path, None);
        assert!(
            q35["quota_set"].get("floating_ips").is_some(),
            "{path}: {q35}"
        );
        for k in [
            "fixed_ips",
            "floating_ips",
            "security_groups",
            "security_group_rules",
        ] {
            assert!(q36["quota_set"].get(k).is_none(), "{path} {k}: {q36}");
        }
        assert!(q36["quota_set"].get("instances").is_some(), "{q36}");
    }
    let update = |v: &str, body: Value| {
        at(
            v,
            Method::PUT,
            &qs,
            Some(serde_json::json!({ "quota_set": body })),
        )
    };
    assert_eq!(
        update("2.35", serde_json::json!({"security_groups": 5})).0,
        200
    );
    assert_eq!(
        update("2.36", serde_json::json!({"security_groups": 5})).0,
        400
    );
    let (s, updated) = update("2.36", serde_json::json!({"cores": 30, "force": true}));
    assert_eq!(s, 200, "{updated}");
    assert_eq!(updated["quota_set"]["cores"], 30, "{updated}");
    assert!(
        updated["quota_set"].get("security_groups").is_none(),
        "{updated}"
    );
}

/// A key pair created without a public key is generated as Nova generates it, through
/// openstacksdk (what `openstack keypair create` uses; python-openstackclient 10.5.0 generates
/// the pair itself, so the library call is the real client of this path): the private key is
/// answered once, `ssh-keygen -y` derives the stored public key from it, and the fingerprint
/// is what `ssh-keygen -l -E md5` prints. From 2.2 `type: x509` generates a certificate.
#[test]
fn generated_key_pairs_as_nova() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(1, &[]);
    let osc = Osc { bin, cluster: &c };
    let python = osc.bin.with_file_name("python3");
    let script = "import json, sys, openstack\n\
                  k = openstack.connect().compute.create_keypair(name=sys.argv[1])\n\
                  print(json.dumps({'private_key': k.private_key, 'public_key': k.public_key,\n\
                  'fingerprint': k.fingerprint, 'type': k.type}))\n";
    let out = std::process::Command::new(&python)
        .envs(c.openrc_env(0))
        .args(["-c", script, "gen1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(made["type"], "ssh", "{made}");
    let private = c.tmp.path().join("gen1.pem");
    std::fs::write(&private, made["private_key"].as_str().unwrap()).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let derived = std::process::Command::new("ssh-keygen")
        .args(["-y", "-f", private.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        derived.status.success(),
        "{}",
        String::from_utf8_lossy(&derived.stderr)
    );
    let derived = String::from_utf8(derived.stdout).unwrap();
    // The stored key is the derived one, with Nova's comment.
    let stored = osc.run(0, &["keypair", "show", "--public-key", "gen1"]);
    assert!(stored.ok, "{}", stored.stderr);
    assert_eq!(
        stored.stdout.trim(),
        format!("{} Generated-by-Nova", derived.trim())
    );
    let public = c.tmp.path().join("gen1.pub");
    std::fs::write(&public, &stored.stdout).unwrap();
    let md5 = std::process::Command::new("ssh-keygen")
        .args(["-l", "-E", "md5", "-f", public.to_str().unwrap()])
        .output()
        .unwrap();
    let md5 = String::from_utf8(md5.stdout).unwrap();
    let shown = osc.json(0, &["keypair", "show", "gen1"]);
    assert_eq!(shown["fingerprint"], made["fingerprint"], "{shown}");
    assert!(
        md5.contains(&format!("MD5:{} ", made["fingerprint"].as_str().unwrap())),
        "{md5} vs {made}"
    );
    // The private key is never shown again.
    let token = c.token(0);
    let (_, _, again) = get(&c, &token, "/compute/v2.1/os-keypairs/gen1", &[]);
    assert!(again["keypair"].get("private_key").is_none(), "{again}");

    // 2.2: an x509 pair, a self-signed certificate fingerprinted with SHA-1.
    let x509 = serde_json::json!({"keypair": {"name": "gen2", "type": "x509"}});
    assert_eq!(
        post_keypair(&c, &token, "2.1", &x509).status().as_u16(),
        400
    );
    let created = post_keypair(&c, &token, "2.2", &x509);
    assert_eq!(created.status().as_u16(), 201);
    let x: Value = created.json().unwrap();
    let kp = &x["keypair"];
    assert_eq!(kp["type"], "x509", "{x}");
    let pem = kp["public_key"].as_str().unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{x}");
    assert!(kp["private_key"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap();
    let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &der);
    let hex: Vec<String> = sha1.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(kp["fingerprint"], hex.join(":"), "{x}");
}
