//! The real `openstack` client (python-openstackclient, installed by
//! `node/scripts/install-deps.sh`) against a three-node cluster, each command sent to a
//! different node.
//!
//! The client is found through `SHOAL_OPENSTACK_BIN` or `~/.cache/shoal/osc-venv`. Without it
//! the tests print why and pass, unless `CI=true`, where a missing client fails them.

mod common;

use std::time::Duration;

use common::osc::{names, openstack_bin, Osc};
use common::{wait_until, Cluster};
use serde_json::Value;

/// An administrator creates a project and a user, grants a role and reads it all back, each
/// step through another node; the member then sees only their own project and user, may not
/// create projects, and the project's deletion is seen everywhere.
#[test]
fn identity_commands_work_against_every_node() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };

    let tok = osc.json(0, &["token", "issue"]);
    for field in ["id", "expires", "project_id", "user_id"] {
        assert!(tok[field].is_string(), "token issue lacks {field}: {tok}");
    }
    let catalog = osc.json(1, &["catalog", "list"]);
    let identity = catalog
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Type"] == "identity")
        .unwrap_or_else(|| panic!("no identity service: {catalog}"));
    assert_eq!(identity["Name"], "keystone");

    let project = osc.json(
        0,
        &["project", "create", "--description", "demo things", "demo"],
    );
    assert_eq!(project["name"], "demo");
    assert_eq!(project["description"], "demo things");
    osc.run(1, &["project", "create", "demo"]).failed_with(409);
    assert_eq!(
        names(&osc.json(2, &["project", "list"]), "Name"),
        ["admin", "demo"]
    );
    let shown = osc.json(1, &["project", "show", "demo"]);
    assert_eq!(shown["id"], project["id"]);

    let user = osc.json(
        1,
        &[
            "user",
            "create",
            "--password",
            "s3cret-pw",
            "--project",
            "demo",
            "alice",
        ],
    );
    assert_eq!(user["name"], "alice");
    assert_eq!(user["default_project_id"], project["id"]);
    assert_eq!(
        names(&osc.json(2, &["user", "list"]), "Name"),
        ["admin", "alice"]
    );
    assert_eq!(
        names(&osc.json(0, &["role", "list"]), "Name"),
        ["admin", "member", "reader"]
    );

    let added = osc.run(
        2,
        &[
            "role",
            "add",
            "--project",
            "demo",
            "--user",
            "alice",
            "member",
        ],
    );
    assert!(added.ok, "{}", added.stderr);
    let by_project = osc.json(
        0,
        &["role", "assignment", "list", "--project", "demo", "--names"],
    );
    assert_eq!(by_project.as_array().unwrap().len(), 1, "{by_project}");
    assert_eq!(by_project[0]["Role"], "member");
    assert_eq!(by_project[0]["User"], "alice@Default");
    assert_eq!(by_project[0]["Project"], "demo@Default");
    let by_user = osc.json(1, &["role", "assignment", "list", "--user", "alice"]);
    assert_eq!(by_user.as_array().unwrap().len(), 1, "{by_user}");
    assert_eq!(by_user[0]["Project"], project["id"]);
    assert_eq!(by_user[0]["User"], user["id"]);

    // The member's view.
    let alice = [
        ("OS_USERNAME", "alice"),
        ("OS_PASSWORD", "s3cret-pw"),
        ("OS_PROJECT_NAME", "demo"),
    ];
    let as_alice = |node: usize, args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["-f", "json"]);
        osc.run_as(node, &alice, &a)
    };
    let tok = as_alice(2, &["token", "issue"]).json();
    assert_eq!(tok["project_id"], project["id"]);
    // As against Keystone, `GET /v3/projects` is refused to a member; the client then lists
    // the member's own projects through `/v3/users/{id}/projects`.
    assert_eq!(
        names(&as_alice(1, &["project", "list"]).json(), "Name"),
        ["demo"]
    );
    assert_eq!(
        names(
            &as_alice(1, &["project", "list", "--my-projects"]).json(),
            "Name"
        ),
        ["demo"]
    );
    assert_eq!(
        names(&as_alice(0, &["user", "list"]).json(), "Name"),
        ["alice"]
    );
    as_alice(1, &["project", "create", "mine"]).failed_with(403);
    as_alice(2, &["user", "create", "--password", "x", "bob"]).failed_with(403);

    // A reader may read but not write.
    osc.json(0, &["user", "create", "--password", "carol-pw-1", "carol"]);
    assert!(
        osc.run(
            1,
            &[
                "role",
                "add",
                "--project",
                "demo",
                "--user",
                "carol",
                "reader"
            ]
        )
        .ok
    );
    let carol = [
        ("OS_USERNAME", "carol"),
        ("OS_PASSWORD", "carol-pw-1"),
        ("OS_PROJECT_NAME", "demo"),
    ];
    let seen = osc
        .run_as(2, &carol, &["project", "list", "-f", "json"])
        .json();
    assert_eq!(names(&seen, "Name"), ["demo"]);
    osc.run_as(0, &carol, &["project", "create", "theirs"])
        .failed_with(403);
    // python-openstackclient 10 assigns roles through openstacksdk, which turns Shoal's 403
    // into a boolean and exits 0: what a user checks is that carol did not become admin.
    osc.run_as(
        1,
        &carol,
        &[
            "role",
            "add",
            "--project",
            "demo",
            "--user",
            "carol",
            "admin",
        ],
    );
    let roles = osc.json(
        2,
        &[
            "role",
            "assignment",
            "list",
            "--user",
            "carol",
            "--project",
            "demo",
            "--names",
        ],
    );
    assert!(
        !names(&roles, "Role").contains(&"admin".to_owned()),
        "a member gave herself admin: {roles}"
    );

    // Revoking carol's role and deleting her takes her out of every listing.
    let rm = osc.run(
        2,
        &[
            "role",
            "remove",
            "--project",
            "demo",
            "--user",
            "carol",
            "reader",
        ],
    );
    assert!(rm.ok, "{}", rm.stderr);
    let left = osc.json(
        0,
        &["role", "assignment", "list", "--project", "demo", "--names"],
    );
    assert_eq!(names(&left, "User"), ["alice@Default"]);
    assert!(osc.run(1, &["user", "delete", "carol"]).ok);
    assert_eq!(
        names(&osc.json(2, &["user", "list"]), "Name"),
        ["admin", "alice"]
    );

    let del = osc.run(1, &["project", "delete", "demo"]);
    assert!(del.ok, "{}", del.stderr);
    assert!(!osc.run(2, &["project", "show", "demo"]).ok);
    assert_eq!(names(&osc.json(0, &["project", "list"]), "Name"), ["admin"]);
    // Deleting the project took alice's role with it: she can no longer scope to it.
    assert!(!as_alice(0, &["token", "issue"]).ok);
}

/// What must be refused is refused: a wrong password (401), a token revoked through node1
/// when used at node3 (401), and a malformed body (400 saying what was wrong).
#[test]
fn refusals_through_the_client() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };

    osc.run_as(
        1,
        &[("OS_PASSWORD", "not-the-password")],
        &["token", "issue"],
    )
    .failed_with(401);

    let tok = osc.json(0, &["token", "issue"]);
    let id = tok["id"].as_str().unwrap().to_owned();
    let token_env = [
        ("OS_AUTH_TYPE", "token"),
        ("OS_TOKEN", id.as_str()),
        ("OS_USERNAME", ""),
        ("OS_PASSWORD", ""),
        ("OS_USER_DOMAIN_NAME", ""),
    ];
    let before = osc.run_as(2, &token_env, &["project", "list", "-f", "json"]);
    assert!(
        before.ok,
        "the token works before revocation: {}",
        before.stderr
    );
    let revoked = osc.run(0, &["token", "revoke", &id]);
    assert!(revoked.ok, "{}", revoked.stderr);
    wait_until(
        "node3 to refuse the revoked token",
        Duration::from_secs(10),
        || {
            let out = osc.run_as(2, &token_env, &["project", "list"]);
            (!out.ok && out.stderr.contains("401")).then_some(())
        },
    );

    let token = c.token(1);
    let resp = c
        .http
        .post(format!("{}/identity/v3/projects", c.nodes[1].base()))
        .header("X-Auth-Token", &token)
        .header("Content-Type", "application/json")
        .body("{\"project\": {\"name\": ")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("not valid"), "{msg}");

    // Compute answers in Nova's shape: a malformed body, a field Nova 2.1 does not accept, and
    // a microversion Shoal does not serve.
    let flavors = format!("{}/compute/v2.1/flavors", c.nodes[2].base());
    let post = |body: &str, version: &str| {
        c.http
            .post(&flavors)
            .header("X-Auth-Token", &token)
            .header("Content-Type", "application/json")
            .header("OpenStack-API-Version", format!("compute {version}"))
            .body(body.to_owned())
            .send()
            .unwrap()
    };
    let resp = post("{\"flavor\": [", "2.1");
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().unwrap();
    assert_eq!(body["badRequest"]["code"], 400, "{body}");
    let resp = post(
        r#"{"flavor": {"name": "x", "ram": 64, "vcpus": 1, "disk": 0, "gpus": 1}}"#,
        "2.1",
    );
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().unwrap();
    let msg = body["badRequest"]["message"].as_str().unwrap();
    assert!(msg.contains("unknown field `gpus`"), "{msg}");
    let resp = post(
        r#"{"flavor": {"name": "x", "ram": 64, "vcpus": 1, "disk": 0}}"#,
        "2.60",
    );
    assert_eq!(resp.status().as_u16(), 406);
    // As Nova: no version headers on a version it refuses, and the range in the message.
    assert!(resp.headers().get("openstack-api-version").is_none());
    let body: Value = resp.json().unwrap();
    let msg = body["computeFault"]["message"]
        .as_str()
        .or(body["notAcceptable"]["message"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(msg.contains("Minimum is 2.1 and maximum is 2.36"), "{body}");
}

/// Flavors through the compute API: an admin creates one with properties on one node, every
/// node lists and shows it with its extra specs, a member may read but not create flavors, and
/// a deleted flavor is gone everywhere.
#[test]
fn flavor_commands_work_against_every_node() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };

    assert!(osc.catalog_has(0, "compute", "nova"));

    let f = osc.json(
        0,
        &[
            "flavor",
            "create",
            "--ram",
            "1024",
            "--vcpus",
            "2",
            "--disk",
            "10",
            "--property",
            "hw:cpu_policy=dedicated",
            "m1.small",
        ],
    );
    assert_eq!(f["name"], "m1.small");
    assert_eq!(f["ram"], 1024);
    assert_eq!(f["vcpus"], 2);
    assert_eq!(f["properties"]["hw:cpu_policy"], "dedicated", "{f}");
    osc.run(
        1,
        &["flavor", "create", "--ram", "1", "--vcpus", "1", "m1.small"],
    )
    .failed_with(409);

    let list = osc.json(2, &["flavor", "list"]);
    assert_eq!(names(&list, "Name"), ["m1.small"]);
    assert_eq!(list[0]["RAM"], 1024);
    let shown = osc.json(1, &["flavor", "show", "m1.small"]);
    assert_eq!(shown["id"], f["id"]);
    assert_eq!(shown["properties"]["hw:cpu_policy"], "dedicated", "{shown}");

    let set = osc.run(
        2,
        &[
            "flavor",
            "set",
            "--property",
            "hw:mem_page_size=large",
            "m1.small",
        ],
    );
    assert!(set.ok, "{}", set.stderr);
    let shown = osc.json(0, &["flavor", "show", "m1.small"]);
    assert_eq!(shown["properties"]["hw:mem_page_size"], "large", "{shown}");

    // A member reads flavors but may not create them.
    osc.json(0, &["project", "create", "demo"]);
    osc.json(0, &["user", "create", "--password", "pw-bob-1", "bob"]);
    assert!(
        osc.run(
            0,
            &[
                "role",
                "add",
                "--project",
                "demo",
                "--user",
                "bob",
                "member"
            ]
        )
        .ok
    );
    let bob = [
        ("OS_USERNAME", "bob"),
        ("OS_PASSWORD", "pw-bob-1"),
        ("OS_PROJECT_NAME", "demo"),
    ];
    let seen = osc
        .run_as(1, &bob, &["flavor", "list", "-f", "json"])
        .json();
    assert_eq!(names(&seen, "Name"), ["m1.small"]);
    osc.run_as(
        2,
        &bob,
        &["flavor", "create", "--ram", "64", "--vcpus", "1", "tiny"],
    )
    .failed_with(403);

    let unset = osc.run(
        0,
        &["flavor", "unset", "--property", "hw:cpu_policy", "m1.small"],
    );
    assert!(unset.ok, "{}", unset.stderr);
    let shown = osc.json(2, &["flavor", "show", "m1.small"]);
    assert_eq!(
        shown["properties"],
        serde_json::json!({"hw:mem_page_size": "large"})
    );

    let del = osc.run(1, &["flavor", "delete", "m1.small"]);
    assert!(del.ok, "{}", del.stderr);
    assert_eq!(osc.json(2, &["flavor", "list"]), Value::Array(vec![]));
    assert!(!osc.run(0, &["flavor", "show", "m1.small"]).ok);
}

fn limit_of(quotas: &Value, resource: &str) -> i64 {
    quotas
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["Resource"] == resource)
        .unwrap_or_else(|| panic!("no {resource} in {quotas}"))["Limit"]
        .as_i64()
        .unwrap()
}

/// Compute administration: quotas start at Nova's defaults and a change made on one node is
/// read on another; every node is listed as a hypervisor and a compute service, and a service
/// disabled through one node shows as disabled from every node.
#[test]
fn compute_admin_commands_work_against_every_node() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };

    osc.json(0, &["project", "create", "demo"]);
    // Plain `quota show` asks every quota service in the catalog; python-openstackclient 10
    // skips block storage, which Shoal's catalog does not list yet.
    let plain = osc.json(1, &["quota", "show", "demo"]);
    assert_eq!(limit_of(&plain, "instances"), 10, "{plain}");
    let q = osc.json(1, &["quota", "show", "--compute", "demo"]);
    for (resource, limit) in [
        ("instances", 10),
        ("cores", 20),
        ("ram", 51200),
        ("key-pairs", 100),
        ("properties", 128),
        ("server-groups", 10),
        ("server-group-members", 10),
        ("injected-files", 5),
    ] {
        assert_eq!(limit_of(&q, resource), limit, "{resource}: {q}");
    }
    let set = osc.run(
        2,
        &["quota", "set", "--cores", "40", "--instances", "15", "demo"],
    );
    assert!(set.ok, "{}", set.stderr);
    let q = osc.json(0, &["quota", "show", "--compute", "demo"]);
    assert_eq!(limit_of(&q, "cores"), 40);
    assert_eq!(limit_of(&q, "instances"), 15);
    assert_eq!(limit_of(&q, "ram"), 51200);
    let d = osc.json(2, &["quota", "show", "--compute", "--default", "demo"]);
    assert_eq!(limit_of(&d, "cores"), 20, "the defaults stay Nova's");

    let limits = osc.json(1, &["limits", "show", "--absolute"]);
    let max_cores = limits
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["Name"] == "max_total_cores")
        .unwrap_or_else(|| panic!("{limits}"));
    assert_eq!(
        max_cores["Value"], 20,
        "the admin project keeps the default"
    );

    let hv = osc.json(2, &["hypervisor", "list"]);
    assert_eq!(
        names(&hv, "Hypervisor Hostname"),
        ["node1", "node2", "node3"]
    );
    // Another node's hypervisor: its uptime is asked of that node, and the client parses the
    // `uptime(1)` line into its fields.
    let shown = osc.json(0, &["hypervisor", "show", "node2"]);
    assert_eq!(shown["hypervisor_hostname"], "node2", "{shown}");
    assert!(
        shown["load_average"]
            .as_str()
            .is_some_and(|l| l.split(", ").count() == 3),
        "{shown}"
    );
    assert!(shown["users"].is_string(), "{shown}");
    let svcs = osc.json(0, &["compute", "service", "list"]);
    assert_eq!(names(&svcs, "Host"), ["node1", "node2", "node3"]);
    assert!(svcs
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["Binary"] == "nova-compute" && s["Status"] == "enabled"));

    let dis = osc.run(
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
    assert!(dis.ok, "{}", dis.stderr);
    let svcs = osc.json(2, &["compute", "service", "list"]);
    for s in svcs.as_array().unwrap() {
        let want = if s["Host"] == "node2" {
            "disabled"
        } else {
            "enabled"
        };
        assert_eq!(s["Status"], want, "{s}");
    }
    let en = osc.run(
        0,
        &[
            "compute",
            "service",
            "set",
            "--enable",
            "node2",
            "nova-compute",
        ],
    );
    assert!(en.ok, "{}", en.stderr);
    let svcs = osc.json(1, &["compute", "service", "list"]);
    assert!(
        svcs.as_array()
            .unwrap()
            .iter()
            .all(|s| s["Status"] == "enabled"),
        "{svcs}"
    );
    let agg = osc.json(0, &["aggregate", "create", "--zone", "az1", "agg1"]);
    assert_eq!(agg["availability_zone"], "az1", "{agg}");
    assert!(
        osc.run(1, &["aggregate", "add", "host", "agg1", "node2"])
            .ok
    );
    let set = osc.run(2, &["aggregate", "set", "--property", "ssd=true", "agg1"]);
    assert!(set.ok, "{}", set.stderr);
    let shown = osc.json(0, &["aggregate", "show", "agg1"]);
    assert_eq!(shown["hosts"], serde_json::json!(["node2"]), "{shown}");
    assert!(shown.to_string().contains("ssd"), "{shown}");
    osc.run(1, &["aggregate", "add", "host", "agg1", "node9"])
        .failed_with(404);
    let zones = osc.json(1, &["availability", "zone", "list", "--compute"]);
    assert_eq!(names(&zones, "Zone Name"), ["az1", "nova"]);
    let long = osc.json(2, &["availability", "zone", "list", "--compute", "--long"]);
    let node2 = long
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["Host Name"] == "node2")
        .unwrap_or_else(|| panic!("{long}"));
    assert_eq!(node2["Zone Name"], "az1");
    assert_eq!(node2["Service Name"], "nova-compute");
    // A host leaves its zone with its aggregate; an emptied aggregate can be deleted.
    assert!(
        osc.run(0, &["aggregate", "remove", "host", "agg1", "node2"])
            .ok
    );
    let zones = osc.json(2, &["availability", "zone", "list", "--compute"]);
    assert_eq!(names(&zones, "Zone Name"), ["nova"]);
    assert!(osc.run(1, &["aggregate", "delete", "agg1"]).ok);
    assert_eq!(osc.json(0, &["aggregate", "list"]), Value::Array(vec![]));

    let sg = osc.json(
        0,
        &[
            "server",
            "group",
            "create",
            "--policy",
            "anti-affinity",
            "sg1",
        ],
    );
    assert_eq!(sg["name"], "sg1");
    assert!(sg.to_string().contains("anti-affinity"), "{sg}");
    assert_eq!(
        names(&osc.json(2, &["server", "group", "list"]), "Name"),
        ["sg1"]
    );
    assert!(osc.run(1, &["server", "group", "delete", "sg1"]).ok);
    assert_eq!(
        osc.json(0, &["server", "group", "list"]),
        Value::Array(vec![])
    );

    let pubkey = c.tmp.path().join("k1.pub");
    std::fs::write(
        &pubkey,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f t@h\n",
    )
    .unwrap();
    let k1 = osc.json(
        0,
        &[
            "keypair",
            "create",
            "--public-key",
            pubkey.to_str().unwrap(),
            "k1",
        ],
    );
    assert_eq!(k1["name"], "k1");
    // Nova's fingerprint: the MD5 of the key's blob as hex pairs.
    assert_eq!(
        k1["fingerprint"].as_str().unwrap().split(':').count(),
        16,
        "{k1}"
    );
    // Without --public-key the client generates the pair and uploads the public half.
    let private = c.tmp.path().join("k2.pem");
    let k2 = osc.json(
        1,
        &[
            "keypair",
            "create",
            "--private-key",
            private.to_str().unwrap(),
            "k2",
        ],
    );
    assert_eq!(k2["name"], "k2");
    assert!(std::fs::read_to_string(&private)
        .unwrap()
        .contains("PRIVATE KEY"));
    assert_eq!(
        names(&osc.json(2, &["keypair", "list"]), "Name"),
        ["k1", "k2"]
    );
    let shown = osc.json(2, &["keypair", "show", "k1"]);
    assert_eq!(shown["fingerprint"], k1["fingerprint"]);
    osc.run(
        1,
        &[
            "keypair",
            "create",
            "--public-key",
            pubkey.to_str().unwrap(),
            "k1",
        ],
    )
    .failed_with(409);
    assert!(osc.run(1, &["keypair", "delete", "k1"]).ok);
    assert_eq!(names(&osc.json(0, &["keypair", "list"]), "Name"), ["k2"]);

    let missing = osc.run(
        0,
        &[
            "compute",
            "service",
            "set",
            "--disable",
            "node9",
            "nova-compute",
        ],
    );
    assert!(
        !missing.ok && missing.stderr.contains("failed to set"),
        "{}",
        missing.stderr
    );
}

/// A token past its expiry is refused by the node that issued it, through the client. The
/// node runs with the shortest lifetime the configuration allows (10 s).
#[test]
fn an_expired_token_is_refused() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::init(&["--token-ttl-secs", "10"]);
    let osc = Osc { bin, cluster: &c };

    let tok = osc.json(0, &["token", "issue"]);
    let id = tok["id"].as_str().unwrap().to_owned();
    let token_env = [
        ("OS_AUTH_TYPE", "token"),
        ("OS_TOKEN", id.as_str()),
        ("OS_USERNAME", ""),
        ("OS_PASSWORD", ""),
        ("OS_USER_DOMAIN_NAME", ""),
    ];
    let fresh = osc.run_as(0, &token_env, &["project", "list", "-f", "json"]);
    assert!(
        fresh.ok,
        "the token works before it expires: {}",
        fresh.stderr
    );
    std::thread::sleep(Duration::from_secs(12));
    osc.run_as(0, &token_env, &["project", "list"])
        .failed_with(401);
}
