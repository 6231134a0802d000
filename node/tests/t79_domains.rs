//! Identity v3 domains as Keystone serves them: the default domain found by name (Tempest's
//! first call), create, show, update, disable (which ends the domain's tokens) and delete with
//! the real `openstack` client, and domains hidden from those who may not see them.

mod common;

use common::osc::{openstack_bin, Osc};
use common::Cluster;
use serde_json::Value;

fn get(c: &Cluster, token: &str, path: &str) -> (u16, Value) {
    let resp = c
        .http
        .get(format!("{}{path}", c.nodes[0].base()))
        .header("X-Auth-Token", token)
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

#[test]
fn domains_are_listed_created_disabled_and_deleted() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(1, &[]);
    let osc = Osc { bin, cluster: &c };
    let admin = c.token(0);

    let (s, v) = get(&c, &admin, "/identity/v3/domains?name=Default");
    assert_eq!(s, 200, "{v}");
    let found = v["domains"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{v}");
    assert_eq!(found[0]["id"], "default");
    let (s, v) = get(&c, &admin, "/identity/v3/domains/default");
    assert_eq!((s, v["domain"]["name"].as_str()), (200, Some("Default")));

    let d = osc.json(
        0,
        &[
            "domain",
            "create",
            "--description",
            "lab",
            "-f",
            "json",
            "lab",
        ],
    );
    let id = d["id"].as_str().unwrap().to_owned();
    assert_eq!(d["enabled"], true);
    osc.run(0, &["domain", "create", "lab"]).failed_with(409);
    let list = osc.json(0, &["domain", "list", "-f", "json"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["Name"].as_str())
        .collect();
    assert!(
        names.contains(&"lab") && names.contains(&"Default"),
        "{list}"
    );

    // A user of the new domain, and a project there: disabling the domain ends their token.
    let p = osc.json(
        0,
        &[
            "project", "create", "--domain", "lab", "-f", "json", "lab-p",
        ],
    );
    // Projects list by parent: a project's parent is its domain.
    let lab_id = p["domain_id"].as_str().unwrap().to_owned();
    let (status, by_parent) = get(
        &c,
        &admin,
        &format!("/identity/v3/projects?parent_id={lab_id}"),
    );
    assert_eq!(status, 200, "{by_parent}");
    let listed: Vec<&str> = by_parent["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["lab-p"], "{by_parent}");
    let (_, under_default) = get(&c, &admin, "/identity/v3/projects?parent_id=default");
    let projects = under_default["projects"].as_array().unwrap();
    assert!(
        projects.iter().any(|p| p["name"] == "admin"),
        "{under_default}"
    );
    assert!(
        projects.iter().all(|p| p["parent_id"] == "default"),
        "{under_default}"
    );
    let out = osc.run(
        0,
        &[
            "user",
            "create",
            "--domain",
            "lab",
            "--password",
            "pw-secret-1",
            "lab-u",
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    let out = osc.run(
        0,
        &[
            "role",
            "add",
            "--project",
            p["id"].as_str().unwrap(),
            "--user",
            "lab-u",
            "--user-domain",
            "lab",
            "member",
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    let env = [
        ("OS_USERNAME", "lab-u"),
        ("OS_PASSWORD", "pw-secret-1"),
        ("OS_USER_DOMAIN_NAME", "lab"),
        ("OS_PROJECT_NAME", "lab-p"),
        ("OS_PROJECT_DOMAIN_NAME", "lab"),
    ];
    let tok = osc.run_as(0, &env, &["token", "issue", "-f", "value", "-c", "id"]);
    assert!(tok.ok, "{}", tok.stderr);
    let tok = tok.stdout.trim().to_owned();
    // A member of the domain sees that domain only.
    let (s, v) = get(&c, &tok, "/identity/v3/domains");
    assert_eq!(s, 200);
    assert_eq!(v["domains"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(get(&c, &tok, "/identity/v3/domains/default").0, 403);

    // An enabled domain may not be deleted; disabled, its tokens end at once.
    osc.run(0, &["domain", "delete", &id]).failed_with(403);
    let out = osc.run(0, &["domain", "set", "--disable", &id]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(get(&c, &tok, "/compute/v2.1/os-keypairs").0, 401);
    // Still holding a project and a user: refused until they are gone.
    osc.run(0, &["domain", "delete", &id]).failed_with(409);
    for args in [
        vec!["project", "delete", "--domain", "lab", "lab-p"],
        vec!["user", "delete", "--domain", "lab", "lab-u"],
        vec!["domain", "delete", id.as_str()],
    ] {
        let out = osc.run(0, &args);
        assert!(out.ok, "{args:?}: {}", out.stderr);
    }
    assert_eq!(
        get(&c, &admin, &format!("/identity/v3/domains/{id}")).0,
        404
    );
    osc.run(0, &["domain", "delete", "default"])
        .failed_with(403);
}
