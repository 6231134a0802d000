//! Roles on the system and the rest of Keystone's user and role management, with the real
//! `openstack` client: a reader on the system (`role add --system all`) gets a system-scoped
//! token, reads every user and project but changes nothing, and loses the token when the role
//! is removed; roles are created, renamed and deleted; a disabled user cannot log in; a
//! member changes their own password.

mod common;

use std::time::Duration;

use common::osc::{names, openstack_bin, Osc};
use common::{wait_until, Cluster};

#[test]
fn system_readers_read_everything_and_roles_and_users_change() {
    let Some(bin) = openstack_bin() else { return };
    let c = Cluster::start(3, &[]);
    let osc = Osc { bin, cluster: &c };

    // A user name of 255 characters is Keystone's limit, and Shoal's.
    let long = "u".repeat(255);
    osc.json(0, &["user", "create", "--password", "pw-long-1", &long]);
    osc.run(0, &["user", "create", "--password", "x", &"u".repeat(256)])
        .failed_with(400);

    osc.json(0, &["project", "create", "demo"]);
    osc.json(1, &["user", "create", "--password", "sys-pw-1", "sys"]);
    let added = osc.run(
        1,
        &["role", "add", "--system", "all", "--user", "sys", "reader"],
    );
    assert!(added.ok, "{}", added.stderr);
    let assignments = osc.json(2, &["role", "assignment", "list", "--system", "all"]);
    assert!(
        assignments
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["System"] == "all"),
        "{assignments}"
    );

    let sys = [
        ("OS_USERNAME", "sys"),
        ("OS_PASSWORD", "sys-pw-1"),
        ("OS_PROJECT_NAME", ""),
        ("OS_PROJECT_DOMAIN_NAME", ""),
        ("OS_SYSTEM_SCOPE", "all"),
    ];
    let as_sys = |node: usize, args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["-f", "json"]);
        osc.run_as(node, &sys, &a)
    };
    let users = as_sys(2, &["user", "list"]).json();
    let listed = names(&users, "Name");
    assert!(
        listed.contains(&"admin".to_owned()) && listed.contains(&long),
        "{users}"
    );
    assert!(names(&as_sys(1, &["project", "list"]).json(), "Name").contains(&"demo".to_owned()));
    as_sys(0, &["project", "create", "theirs"]).failed_with(403);

    // A system token ends when its holder's role on the system is removed.
    let tok = as_sys(0, &["token", "issue"]).json();
    let id = tok["id"].as_str().unwrap().to_owned();
    let token_env = [
        ("OS_AUTH_TYPE", "token"),
        ("OS_TOKEN", id.as_str()),
        ("OS_USERNAME", ""),
        ("OS_PASSWORD", ""),
        ("OS_USER_DOMAIN_NAME", ""),
        ("OS_PROJECT_NAME", ""),
        ("OS_PROJECT_DOMAIN_NAME", ""),
        ("OS_SYSTEM_SCOPE", "all"),
    ];
    assert!(osc.run_as(2, &token_env, &["user", "list"]).ok);
    let removed = osc.run(
        0,
        &[
            "role", "remove", "--system", "all", "--user", "sys", "reader",
        ],
    );
    assert!(removed.ok, "{}", removed.stderr);
    wait_until(
        "node3 to refuse the system token",
        Duration::from_secs(10),
        || {
            let out = osc.run_as(2, &token_env, &["user", "list"]);
            (!out.ok && out.stderr.contains("401")).then_some(())
        },
    );
    as_sys(1, &["token", "issue"]).failed_with(401);

    // Roles: create, rename, delete; built-in roles stay.
    osc.json(0, &["role", "create", "auditor"]);
    osc.run(1, &["role", "create", "auditor"]).failed_with(409);
    assert!(
        osc.run(1, &["role", "set", "--name", "inspector", "auditor"])
            .ok
    );
    let roles = names(&osc.json(2, &["role", "list"]), "Name");
    assert!(roles.contains(&"inspector".to_owned()) && !roles.contains(&"auditor".to_owned()));
    assert!(osc.run(2, &["role", "delete", "inspector"]).ok);
    osc.run(0, &["role", "delete", "admin"]).failed_with(403);

    // A disabled user cannot log in; enabled again, they can.
    osc.user_with_role(0, "alice", "alice-pw-1", "demo", "member");
    let alice = [
        ("OS_USERNAME", "alice"),
        ("OS_PASSWORD", "alice-pw-1"),
        ("OS_PROJECT_NAME", "demo"),
    ];
    assert!(osc.run(1, &["user", "set", "--disable", "alice"]).ok);
    osc.run_as(2, &alice, &["token", "issue"]).failed_with(401);
    assert!(osc.run(1, &["user", "set", "--enable", "alice"]).ok);
    assert!(osc.run_as(2, &alice, &["token", "issue"]).ok);

    // A member changes their own password by giving the old one.
    let set = osc.run_as(
        0,
        &alice,
        &[
            "user",
            "password",
            "set",
            "--original-password",
            "alice-pw-1",
            "--password",
            "alice-pw-2",
        ],
    );
    assert!(set.ok, "{}", set.stderr);
    osc.run_as(1, &alice, &["token", "issue"]).failed_with(401);
    let alice2 = [
        ("OS_USERNAME", "alice"),
        ("OS_PASSWORD", "alice-pw-2"),
        ("OS_PROJECT_NAME", "demo"),
    ];
    assert!(osc.run_as(1, &alice2, &["token", "issue"]).ok);
}
