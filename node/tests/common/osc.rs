//! The real `openstack` client (python-openstackclient, installed by
//! `node/scripts/install-deps.sh`), run against a test cluster with its `admin-openrc`
//! environment.
//!
//! The client is found through `SHOAL_OPENSTACK_BIN` or `~/.cache/shoal/osc-venv`. Without it
//! the tests print why and pass, unless `CI=true`, where a missing client fails them.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use super::Cluster;

pub fn openstack_bin() -> Option<PathBuf> {
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

pub struct Osc<'a> {
    pub bin: PathBuf,
    pub cluster: &'a Cluster,
}

pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> Value {
        assert!(self.ok, "command failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }

    pub fn failed_with(&self, status: u16) {
        assert!(!self.ok, "command succeeded: {}", self.stdout);
        // keystoneclient prints "(HTTP 403)", openstacksdk "ForbiddenException: 403: ..." or,
        // when the body carries a message, "ForbiddenException: 403, ...".
        assert!(
            self.stderr.contains(&format!("HTTP {status}"))
                || self.stderr.contains(&format!("Exception: {status}:"))
                || self.stderr.contains(&format!("Exception: {status},")),
            "expected HTTP {status}: {}",
            self.stderr
        );
    }
}

impl Osc<'_> {
    /// Runs `openstack` against node `node` with `env` overriding the admin credentials.
    pub fn run_as(&self, node: usize, env: &[(&str, &str)], args: &[&str]) -> Out {
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

    pub fn run(&self, node: usize, args: &[&str]) -> Out {
        self.run_as(node, &[], args)
    }

    /// Creates user `name` and gives them `role` on `project`, through `node`.
    pub fn user_with_role(
        &self,
        node: usize,
        name: &str,
        password: &str,
        project: &str,
        role: &str,
    ) {
        self.json(node, &["user", "create", "--password", password, name]);
        let added = self.run(
            node,
            &["role", "add", "--project", project, "--user", name, role],
        );
        assert!(added.ok, "role add: {}", added.stderr);
    }

    /// Like `run_as`, asking for JSON.
    pub fn json_as(&self, node: usize, env: &[(&str, &str)], args: &[&str]) -> Out {
        let mut a = args.to_vec();
        a.extend(["-f", "json"]);
        self.run_as(node, env, &a)
    }

    /// Whether `catalog list` through `node` names a service of `kind` called `name`.
    pub fn catalog_has(&self, node: usize, kind: &str, name: &str) -> bool {
        let catalog = self.json(node, &["catalog", "list"]);
        catalog
            .as_array()
            .unwrap_or_else(|| panic!("not a list: {catalog}"))
            .iter()
            .any(|s| s["Type"] == kind && s["Name"] == name)
    }

    pub fn json(&self, node: usize, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-f", "json"]);
        self.run(node, &a).json()
    }
}

/// The environment that logs in as `user` with `password`, scoped to `project`.
pub fn login<'a>(
    user: &'a str,
    password: &'a str,
    project: &'a str,
) -> [(&'static str, &'a str); 3] {
    [
        ("OS_USERNAME", user),
        ("OS_PASSWORD", password),
        ("OS_PROJECT_NAME", project),
    ]
}

pub fn names(list: &Value, key: &str) -> Vec<String> {
    let mut v: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|i| i[key].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}
