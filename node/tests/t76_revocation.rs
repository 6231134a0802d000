//! Access ends when a user, a role assignment, a project or a token does: on every node, as
//! soon as the call that ended it has answered. And tokens are seen only by those who may.

mod common;

use common::Cluster;
use reqwest::blocking::Response;
use serde_json::{json, Value};

/// Thin HTTP helpers over the cluster's client.
struct Api<'a> {
    c: &'a Cluster,
}

impl Api<'_> {
    fn url(&self, node: usize, path: &str) -> String {
        format!("{}{path}", self.c.nodes[node].base())
    }

    fn get(&self, node: usize, token: &str, path: &str) -> Response {
        self.c
            .http
            .get(self.url(node, path))
            .header("X-Auth-Token", token)
            .send()
            .unwrap()
    }

    fn send(&self, node: usize, token: &str, method: &str, path: &str, body: Value) -> Response {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .c
            .http
            .request(m, self.url(node, path))
            .header("X-Auth-Token", token);
        if !body.is_null() {
            req = req.json(&body);
        }
        req.send().unwrap()
    }

    fn create(&self, token: &str, path: &str, body: Value, key: &str) -> String {
        let resp = self.send(0, token, "POST", path, body);
        assert_eq!(resp.status().as_u16(), 201, "POST {path}");
        resp.json::<Value>().unwrap()[key]["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// A token for `user` scoped to `project`, from `node`; `(token, body)`.
    fn password_token(&self, node: usize, user: &str, project_id: &str) -> (String, Value) {
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": user, "domain": {"id": "default"}, "password": "pw-secret-1"}}},
            "scope": {"project": {"id": project_id}}}});
        let resp = self
            .c
            .http
            .post(self.url(node, "/identity/v3/auth/tokens"))
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201, "token for {user}");
        let token = resp.headers()["x-subject-token"]
            .to_str()
            .unwrap()
            .to_owned();
        (token, resp.json().unwrap())
    }

    /// The status `GET os-keypairs` gets with `token` on each node.
    fn keypair_statuses(&self, token: &str) -> Vec<u16> {
        (0..self.c.nodes.len())
            .map(|n| {
                self.get(n, token, "/compute/v2.1/os-keypairs")
                    .status()
                    .as_u16()
            })
            .collect()
    }
}

fn member_role(api: &Api<'_>, admin: &str) -> String {
    let roles: Value = api
        .get(0, admin, "/identity/v3/roles")
        .json::<Value>()
        .unwrap();
    roles["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "member")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A user with the member role on a new project: `(project id, user id)`.
fn member_of_new_project(api: &Api<'_>, admin: &str, name: &str) -> (String, String) {
    let project = api.create(
        admin,
        "/identity/v3/projects",
        json!({"project": {"name": format!("p-{name}"), "domain_id": "default"}}),
        "project",
    );
    let user = api.create(
        admin,
        "/identity/v3/users",
        json!({"user": {"name": name, "domain_id": "default", "password": "pw-secret-1"}}),
        "user",
    );
    let role = member_role(api, admin);
    let path = format!("/identity/v3/projects/{project}/users/{user}/roles/{role}");
    assert_eq!(api.send(0, admin, "PUT", &path, Value::Null).status(), 204);
    (project, user)
}

/// Deleting a user, removing a user's role on a project, deleting a project and revoking a
/// token each end the affected tokens on every node by the time the call has answered (no
/// wait in between), while other users' tokens keep working; a user granted the role again
/// gets a working token.
#[test]
fn deletions_and_revocations_end_access_on_every_node_at_once() {
    let c = Cluster::start(3, &[]);
    let api = Api { c: &c };
    let admin = c.token(0);

    let (p_user, u_del) = member_of_new_project(&api, &admin, "rv-deleted");
    let (p_grant, u_grant) = member_of_new_project(&api, &admin, "rv-ungranted");
    let (p_del, _) = member_of_new_project(&api, &admin, "rv-projectless");
    let (p_keep, _) = member_of_new_project(&api, &admin, "rv-bystander");

    let (t_del, _) = api.password_token(1, "rv-deleted", &p_user);
    let (t_grant, _) = api.password_token(2, "rv-ungranted", &p_grant);
    let (t_proj, _) = api.password_token(0, "rv-projectless", &p_del);
    let (t_keep, _) = api.password_token(1, "rv-bystander", &p_keep);
    let (t_revoked, _) = api.password_token(2, "rv-bystander", &p_keep);
    for t in [&t_del, &t_grant, &t_proj, &t_keep, &t_revoked] {
        assert_eq!(api.keypair_statuses(t), vec![200, 200, 200]);
    }

    let resp = api.send(
        0,
        &admin,
        "DELETE",
        &format!("/identity/v3/users/{u_del}"),
        Value::Null,
    );
    assert_eq!(resp.status(), 204);
    assert_eq!(
        api.keypair_statuses(&t_del),
        vec![401, 401, 401],
        "deleted user"
    );

    let role = member_role(&api, &admin);
    let grant = format!("/identity/v3/projects/{p_grant}/users/{u_grant}/roles/{role}");
    assert_eq!(
        api.send(1, &admin, "DELETE", &grant, Value::Null).status(),
        204
    );
    assert_eq!(
        api.keypair_statuses(&t_grant),
        vec![401, 401, 401],
        "role removed"
    );

    assert_eq!(
        api.send(
            2,
            &admin,
            "DELETE",
            &format!("/identity/v3/projects/{p_del}"),
            Value::Null
        )
        .status(),
        204
    );
    assert_eq!(
        api.keypair_statuses(&t_proj),
        vec![401, 401, 401],
        "project deleted"
    );

    let resp = api
        .c
        .http
        .delete(api.url(0, "/identity/v3/auth/tokens"))
        .header("X-Auth-Token", &admin)
        .header("X-Subject-Token", &t_revoked)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        api.keypair_statuses(&t_revoked),
        vec![401, 401, 401],
        "revoked token"
    );

    // Bystanders are untouched, and a grant given again works for a new token.
    assert_eq!(api.keypair_statuses(&t_keep), vec![200, 200, 200]);
    assert_eq!(
        api.send(2, &admin, "PUT", &grant, Value::Null).status(),
        204
    );
    let (t_again, _) = api.password_token(0, "rv-ungranted", &p_grant);
    assert_eq!(api.keypair_statuses(&t_again), vec![200, 200, 200]);
    assert_eq!(api.keypair_statuses(&t_grant), vec![401, 401, 401]);
}

/// A member may validate only its own token (Keystone's `identity:validate_token`); an admin
/// may validate any. A token obtained with the token method expires when its source does.
/// A non-public flavor does not exist for a project without access.
#[test]
fn tokens_and_private_flavors_are_seen_only_by_those_allowed() {
    let c = Cluster::start(1, &[]);
    let api = Api { c: &c };
    let admin = c.token(0);
    let (p1, _) = member_of_new_project(&api, &admin, "vt-alice");
    let (p2, _) = member_of_new_project(&api, &admin, "vt-bob");
    let (alice, _) = api.password_token(0, "vt-alice", &p1);
    let (bob, _) = api.password_token(0, "vt-bob", &p2);

    let check = |caller: &str, subject: &str| {
        let get = c
            .http
            .get(api.url(0, "/identity/v3/auth/tokens"))
            .header("X-Auth-Token", caller)
            .header("X-Subject-Token", subject)
            .send()
            .unwrap()
            .status()
            .as_u16();
        let head = c
            .http
            .head(api.url(0, "/identity/v3/auth/tokens"))
            .header("X-Auth-Token", caller)
            .header("X-Subject-Token", subject)
            .send()
            .unwrap()
            .status()
            .as_u16();
        (get, head)
    };
    assert_eq!(
        check(&alice, &bob),
        (403, 403),
        "member validating another's token"
    );
    assert_eq!(check(&alice, &alice), (200, 200), "own token");
    assert_eq!(check(&admin, &bob), (200, 200), "admin");

    // Rescope (token method) keeps the original expiry: wait into the next second, so a
    // fresh lifetime would end later than the source's.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let resp = c
        .http
        .post(api.url(0, "/identity/v3/auth/tokens"))
        .json(
            &json!({"auth": {"identity": {"methods": ["token"], "token": {"id": alice}},
                       "scope": {"project": {"id": p1}}}}),
        )
        .send()
        .unwrap();
    assert_eq!(resp.status(), 201);
    let rescoped: Value = resp.json().unwrap();
    let src_claims: Value = c
        .http
        .get(api.url(0, "/identity/v3/auth/tokens"))
        .header("X-Auth-Token", &admin)
        .header("X-Subject-Token", &alice)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        rescoped["token"]["expires_at"], src_claims["token"]["expires_at"],
        "a rescoped token must not outlive its source"
    );

    // A private flavor: the admin sees it, a member gets 404 for it and its extra specs.
    let resp = api.send(
        0,
        &admin,
        "POST",
        "/compute/v2.1/flavors",
        json!({"flavor": {"name": "secret", "ram": 256, "vcpus": 1, "disk": 1,
                          "id": "secret-1", "os-flavor-access:is_public": false}}),
    );
    assert_eq!(resp.status(), 200);
    let resp = api.send(
        0,
        &admin,
        "POST",
        "/compute/v2.1/flavors/secret-1/os-extra_specs",
        json!({"extra_specs": {"hw:cpu_policy": "dedicated"}}),
    );
    assert_eq!(resp.status(), 200);
    assert_eq!(
        api.get(0, &admin, "/compute/v2.1/flavors/secret-1")
            .status(),
        200
    );
    for path in [
        "/compute/v2.1/flavors/secret-1",
        "/compute/v2.1/flavors/secret-1/os-extra_specs",
        "/compute/v2.1/flavors/secret-1/os-extra_specs/hw:cpu_policy",
    ] {
        assert_eq!(api.get(0, &alice, path).status(), 404, "{path}");
    }
    let listed: Value = api
        .get(0, &alice, "/compute/v2.1/flavors/detail")
        .json()
        .unwrap();
    assert!(
        !listed.to_string().contains("secret-1"),
        "listed to a member: {listed}"
    );
}
