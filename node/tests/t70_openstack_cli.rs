//! The real `openstack` client (python-openstackclient, installed by
//! `node/scripts/install-deps.sh`) against a three-node cluster, each command sent to a
//! different node.
//!
//! The client is found through `SHOAL_OPENSTACK_BIN` or `~/.cache/shoal/osc-venv`. Without it
//! the tests print why and pass, unless `CI=true`, where a missing client fails them.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{wait_until, Cluster};
use serde_json::Value;

fn openstack_bin() -> Option<PathBuf> {
    let path = match std::env::var_os("SHOAL_OPENSTACK_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            PathBuf::from(std::env::var_os("HOME")?).join(".cache/shoal/osc-venv/bin/openstack")
        }
    };
    if path.is_file() {
        return Some(path);
    }
    let msg = format!(
        "the openstack client is not at {}: run node/scripts/install-deps.sh or set SHOAL_OPENSTACK_BIN",
        path.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

struct Osc<'a> {
    bin: PathBuf,
    cluster: &'a Cluster,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        assert!(self.ok, "command failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }

    fn failed_with(&self, status: u16) {
        assert!(!self.ok, "command succeeded: {}", self.stdout);
        // keystoneclient prints "(HTTP 403)", openstacksdk "ForbiddenException: 403: ...".
        assert!(
            self.stderr.contains(&format!("HTTP {status}"))
                || self.stderr.contains(&format!("Exception: {status}:")),
            "expected HTTP {status}: {}",
            self.stderr
        );
    }
}

impl Osc<'_> {
    /// Runs `openstack` against node `node` with `env` overriding the admin credentials.
    fn run_as(&self, node: usize, env: &[(&str, &str)], args: &[&str]) -> Out {
        let mut cmd = Command::new(&self.bin);
        for (k, _) in std::env::vars() {
            if k.starts_with("OS_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.cluster.openrc_env(node));
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let out = cmd.args(args).output().expect("run openstack");
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn run(&self, node: usize, args: &[&str]) -> Out {
        self.run_as(node, &[], args)
    }

    fn json(&self, node: usize, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-f", "json"]);
        self.run(node, &a).json()
    }
}

fn names(list: &Value, key: &str) -> Vec<String> {
    let mut v: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|i| i[key].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

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
    assert_eq!(
        names(&as_alice(1, &["project", "list"]).json(), "Name"),
        ["demo"]
    );
    assert_eq!(
        names(&as_alice(0, &["user", "list"]).json(), "Name"),
        ["alice"]
    );
    as_alice(1, &["project", "create", "mine"]).failed_with(403);
    as_alice(2, &["user", "create", "--password", "x", "bob"]).failed_with(403);

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
}
