//! A Shoal cluster started with `shoal dev`, and the client side of the node's API contract:
//! Keystone password auth, `PUT/GET /shoal/v1/kv/{key}`, `GET /shoal/v1/status`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::json;

use crate::procs::{kill_pid, pid_alive, pid_listening_on, ProcGuard};

/// The credentials `shoal dev` writes to `DIR/node1/admin-openrc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRc {
    pub auth_url: String,
    pub username: String,
    pub password: String,
    pub project_name: String,
    pub user_domain_name: String,
    pub project_domain_name: String,
    /// `OS_CACERT`: the PEM file of the CA that signed the API's certificate, for https URLs.
    pub cacert: Option<String>,
}

impl OpenRc {
    /// Parses the `export OS_X=value` lines of an openrc file. Values may be single- or
    /// double-quoted; comments and other lines are ignored. The domains default to `Default`
    /// as in python-openstackclient.
    pub fn parse(text: &str) -> Result<Self> {
        let mut vars = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if !key.starts_with("OS_") {
                continue;
            }
            vars.insert(key.trim().to_owned(), unquote(value.trim()));
        }
        Self::from_vars(vars)
    }

    /// The credentials in this process's `OS_*` environment variables, as the openstack CLI
    /// reads them after `source admin-openrc`.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(
            std::env::vars()
                .filter(|(k, _)| k.starts_with("OS_"))
                .collect(),
        )
        .context("no credentials in the environment (source an openrc, or pass --openrc)")
    }

    fn from_vars(mut vars: HashMap<String, String>) -> Result<Self> {
        let mut take = |k: &str| vars.remove(k);
        let auth_url = take("OS_AUTH_URL").context("openrc has no OS_AUTH_URL")?;
        let password = take("OS_PASSWORD").context("openrc has no OS_PASSWORD")?;
        Ok(Self {
            auth_url: auth_url.trim_end_matches('/').to_owned(),
            username: take("OS_USERNAME").unwrap_or_else(|| "admin".into()),
            password,
            project_name: take("OS_PROJECT_NAME").unwrap_or_else(|| "admin".into()),
            user_domain_name: take("OS_USER_DOMAIN_NAME").unwrap_or_else(|| "Default".into()),
            project_domain_name: take("OS_PROJECT_DOMAIN_NAME").unwrap_or_else(|| "Default".into()),
            cacert: take("OS_CACERT"),
        })
    }

    /// `scheme://host:port` of the auth URL: the API base of the node that wrote the file.
    pub fn api_base(&self) -> Result<String> {
        let url = reqwest::Url::parse(&self.auth_url)
            .with_context(|| format!("OS_AUTH_URL {:?} is not a URL", self.auth_url))?;
        Ok(url.origin().ascii_serialization())
    }

    /// The Keystone v3 password-auth request body, scoped to the project.
    pub fn auth_body(&self) -> serde_json::Value {
        json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": self.username,
                "domain": {"name": self.user_domain_name},
                "password": self.password,
            }}},
            "scope": {"project": {
                "name": self.project_name,
                "domain": {"name": self.project_domain_name},
            }},
        }})
    }
}

fn unquote(v: &str) -> String {
    for q in ['\'', '"'] {
        if let Some(inner) = v.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner.to_owned();
        }
    }
    v.to_owned()
}

/// `GET /shoal/v1/status`.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub leader: Option<String>,
    pub term: u64,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub role: String,
    /// `127.0.0.1:PORT`, the member's API address.
    pub api: String,
    pub healthy: bool,
}

impl Status {
    /// A leader is known and listed in the role of leader, and `nodes` members are listed,
    /// all healthy.
    pub fn settled(&self, nodes: usize) -> bool {
        let Some(leader) = &self.leader else {
            return false;
        };
        self.member(leader).is_some_and(|m| m.role == "leader")
            && self.members.len() == nodes
            && self.members.iter().all(|m| m.healthy)
    }

    pub fn member(&self, name: &str) -> Option<&MemberStatus> {
        self.members.iter().find(|m| m.name == name)
    }
}

impl MemberStatus {
    pub fn base(&self) -> String {
        format!("http://{}", self.api)
    }

    pub fn port(&self) -> Result<u16> {
        self.api
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .with_context(|| format!("member {} has no port in api {:?}", self.name, self.api))
    }
}

/// Authenticates against Keystone; returns the `X-Subject-Token`.
pub async fn issue_token(http: &reqwest::Client, rc: &OpenRc) -> Result<String> {
    let resp = http
        .post(format!("{}/auth/tokens", rc.auth_url))
        .json(&rc.auth_body())
        .send()
        .await
        .context("POST /auth/tokens")?;
    let status = resp.status();
    let token = resp
        .headers()
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!("POST /auth/tokens: {status}: {body}");
    }
    token.context("POST /auth/tokens: no X-Subject-Token header in the reply")
}

/// One client's view of one node: a keep-alive HTTP client, the node's API base and a token.
#[derive(Debug, Clone)]
pub struct ShoalWriter {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl ShoalWriter {
    pub fn new(http: reqwest::Client, base: &str, token: &str) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        }
    }

    /// `PUT /shoal/v1/kv/{key}`; returns the revision of the write.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<u64> {
        let resp = self
            .http
            .put(format!("{}/shoal/v1/kv/{key}", self.base))
            .header("x-auth-token", &self.token)
            .body(value.to_vec())
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            bail!("{status}: {}", String::from_utf8_lossy(&bytes));
        }
        let reply: PutReply = serde_json::from_slice(&bytes)
            .with_context(|| format!("put reply: {}", String::from_utf8_lossy(&bytes)))?;
        Ok(reply.revision)
    }

    /// `GET /shoal/v1/kv/{key}?consistency=linearizable`; the stored bytes.
    pub async fn get_linearizable(&self, key: &str) -> Result<Vec<u8>> {
        let resp = self
            .http
            .get(format!("{}/shoal/v1/kv/{key}", self.base))
            .query(&[("consistency", "linearizable")])
            .header("x-auth-token", &self.token)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            bail!("GET {key}: {status}: {}", String::from_utf8_lossy(&bytes));
        }
        Ok(bytes.to_vec())
    }

    pub async fn status(&self) -> Result<Status> {
        let resp = self
            .http
            .get(format!("{}/shoal/v1/status", self.base))
            .header("x-auth-token", &self.token)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            bail!(
                "GET /shoal/v1/status: {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "GET /shoal/v1/status: unexpected reply {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }
}

#[derive(Debug, Deserialize)]
struct PutReply {
    revision: u64,
}

/// `shoal dev --nodes N --dir DIR` in the foreground (it starts the nodes), and the members we
/// restarted ourselves with `shoal start` after killing them.
#[derive(Debug)]
pub struct ShoalCluster {
    bin: PathBuf,
    dir: PathBuf,
    logs: PathBuf,
    nodes: usize,
    dev_pid: u32,
    pub token: String,
    /// The last status seen with all members healthy.
    pub status: Status,
    restarts: usize,
}

impl ShoalCluster {
    /// Starts `shoal dev` with its data under `dir` (which it creates) and logs in `logs`,
    /// waits for the admin openrc, authenticates, and waits until the status shows a leader
    /// and all `nodes` members healthy.
    pub async fn start(
        procs: &mut ProcGuard,
        bin: &Path,
        dir: &Path,
        logs: &Path,
        nodes: usize,
        http: &reqwest::Client,
    ) -> Result<Self> {
        // The benchmarks measure the control plane: compute agents drive libvirt's in-memory
        // test hypervisor, so no libvirtd is needed and nothing boots.
        Self::start_with(
            procs,
            bin,
            dir,
            logs,
            nodes,
            http,
            &["--libvirt-uri", "test:///default"],
        )
        .await
    }

    /// [`start`](Self::start) with `dev_args` added to `shoal dev` (the libvirt to drive).
    pub async fn start_with(
        procs: &mut ProcGuard,
        bin: &Path,
        dir: &Path,
        logs: &Path,
        nodes: usize,
        http: &reqwest::Client,
        dev_args: &[&str],
    ) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(["dev", "--nodes", &nodes.to_string(), "--dir"])
            .arg(dir)
            .args(dev_args);
        let log = logs.join("shoal-dev.log");
        let dev_pid = procs.spawn("shoal dev", cmd, &log)?;
        let with_log = |e: anyhow::Error| e.context(format!("shoal dev log: {}", log.display()));

        let openrc = dir.join("node1").join("admin-openrc");
        let deadline = Instant::now() + Duration::from_secs(120);
        let rc = loop {
            procs.check_running().map_err(with_log)?;
            // The file may be seen half-written: retry until it parses.
            if let Ok(rc) = std::fs::read_to_string(&openrc)
                .map_err(anyhow::Error::from)
                .and_then(|t| OpenRc::parse(&t))
            {
                break rc;
            }
            if Instant::now() > deadline {
                return Err(with_log(anyhow!("{} did not appear", openrc.display())));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let base = rc.api_base()?;
        let token = loop {
            procs.check_running().map_err(with_log)?;
            match issue_token(http, &rc).await {
                Ok(t) => break t,
                Err(e) if Instant::now() > deadline => return Err(with_log(e)),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let mut cluster = Self {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            logs: logs.to_owned(),
            nodes,
            dev_pid,
            token: token.clone(),
            status: Status {
                leader: None,
                term: 0,
                members: Vec::new(),
            },
            restarts: 0,
        };
        let entry = ShoalWriter::new(http.clone(), &base, &token);
        cluster.status = cluster
            .wait_settled(procs, &[entry], Duration::from_secs(120))
            .await
            .map_err(with_log)?;
        Ok(cluster)
    }

    /// Polls the status through `via` (the first that answers) until it is settled.
    pub async fn wait_settled(
        &self,
        procs: &mut ProcGuard,
        via: &[ShoalWriter],
        timeout: Duration,
    ) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no status answered");
        loop {
            procs.check_running()?;
            for w in via {
                match w.status().await {
                    Ok(st) if st.settled(self.nodes) => return Ok(st),
                    Ok(st) => last = format!("{st:?}"),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            if Instant::now() > deadline {
                bail!("shoal cluster not settled after {timeout:?}; last: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A writer for each member, in status order.
    pub fn writers(&self, http: &reqwest::Client) -> Vec<ShoalWriter> {
        self.status
            .members
            .iter()
            .map(|m| ShoalWriter::new(http.clone(), &m.base(), &self.token))
            .collect()
    }

    /// SIGKILLs the process serving member `name`'s API and returns when the signal was sent.
    /// It is found by its listening port because `shoal dev` spawned it (the /proc scan is done
    /// before the clock starts); a member we restarted earlier is our own child.
    pub async fn kill(&mut self, procs: &mut ProcGuard, name: &str) -> Result<Instant> {
        let member = self
            .status
            .member(name)
            .with_context(|| format!("no member {name} in the status"))?;
        let port = member.port()?;
        let pid = pid_listening_on(port)?;
        if pid == self.dev_pid {
            bail!(
                "member {name} runs inside the `shoal dev` process (pid {pid}): one member \
                 cannot be killed alone, so failover cannot be measured with this layout"
            );
        }
        let sent = Instant::now();
        if procs.owns(pid) {
            procs.kill(pid)?;
            return Ok(sent);
        }
        kill_pid(pid)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) {
            if Instant::now() > deadline {
                bail!("member {name} (pid {pid}) survived SIGKILL for 5s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(sent)
    }

    /// `shoal start --data-dir DIR/<name>`: brings a killed member back on its data.
    pub fn restart(&mut self, procs: &mut ProcGuard, name: &str) -> Result<()> {
        self.restarts += 1;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("start").arg("--data-dir").arg(self.dir.join(name));
        let log = self.logs.join(format!("shoal-{name}-restart.log"));
        procs.spawn(
            &format!("shoal start {name} (#{})", self.restarts),
            cmd,
            &log,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-process stand-in for a Shoal node that serves the API contract the load tester
    /// relies on: Keystone password auth, token-checked kv and status.
    mod fake_node {
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex};

        use axum::body::Bytes;
        use axum::extract::{Path, Query, State};
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::{IntoResponse, Response};
        use axum::routing::{get, post};
        use axum::{Json, Router};

        pub const PASSWORD: &str = "fake-pw";
        pub const TOKEN: &str = "fake-token-1";

        #[derive(Default)]
        pub struct Store {
            pub kv: HashMap<String, Vec<u8>>,
            pub revision: u64,
        }

        type Shared = Arc<Mutex<Store>>;

        fn authed(h: &HeaderMap) -> bool {
            h.get("x-auth-token").and_then(|v| v.to_str().ok()) == Some(TOKEN)
        }

        async fn tokens(Json(body): Json<serde_json::Value>) -> Response {
            let user = &body["auth"]["identity"]["password"]["user"];
            let scoped = body["auth"]["scope"]["project"]["name"] == "admin";
            if user["password"] == PASSWORD && user["name"] == "admin" && scoped {
                (StatusCode::CREATED, [("x-subject-token", TOKEN)], "{}").into_response()
            } else {
                StatusCode::UNAUTHORIZED.into_response()
            }
        }

        async fn put(
            State(st): State<Shared>,
            Path(key): Path<String>,
            h: HeaderMap,
            body: Bytes,
        ) -> Response {
            if !authed(&h) {
                return StatusCode::UNAUTHORIZED.into_response();
            }
            let mut st = st.lock().unwrap();
            st.revision += 1;
            st.kv.insert(key, body.to_vec());
            Json(serde_json::json!({ "revision": st.revision })).into_response()
        }

        async fn read(
            State(st): State<Shared>,
            Path(key): Path<String>,
            Query(q): Query<HashMap<String, String>>,
            h: HeaderMap,
        ) -> Response {
            if !authed(&h) {
                return StatusCode::UNAUTHORIZED.into_response();
            }
            if q.get("consistency").map(String::as_str) != Some("linearizable") {
                return StatusCode::BAD_REQUEST.into_response();
            }
            match st.lock().unwrap().kv.get(&key) {
                Some(v) => v.clone().into_response(),
                None => StatusCode::NOT_FOUND.into_response(),
            }
        }

        /// Serves on a free loopback port; every member of the status is this same address.
        pub async fn serve() -> (String, Shared) {
            let store = Shared::default();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let status = serde_json::json!({"leader": "node1", "term": 2, "members": [
                {"name": "node1", "role": "leader", "api": addr.to_string(),
                 "applied_index": 5, "healthy": true},
                {"name": "node2", "role": "voter", "api": addr.to_string(),
                 "applied_index": 5, "healthy": true},
                {"name": "node3", "role": "voter", "api": addr.to_string(),
                 "applied_index": 5, "healthy": true},
            ]});
            let app = Router::new()
                .route("/identity/v3/auth/tokens", post(tokens))
                .route("/shoal/v1/kv/{*key}", get(read).put(put))
                .route(
                    "/shoal/v1/status",
                    get(move |h: HeaderMap| async move {
                        if authed(&h) {
                            Json(status).into_response()
                        } else {
                            StatusCode::UNAUTHORIZED.into_response()
                        }
                    }),
                )
                .with_state(store.clone());
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            (format!("http://{addr}"), store)
        }
    }

    /// Against a node serving the contract: `shoal dev` is invoked as documented, the openrc it
    /// writes is found and used to authenticate, the status is read, and a load writes every
    /// key (slashes included) with the token, readable back linearizably.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drives_a_node_that_serves_the_contract() {
        use std::os::unix::fs::PermissionsExt;

        use crate::raft::Writer;
        use crate::raft::{drive_load, http_client, install_crypto_provider, LoadConfig, TempDir};

        install_crypto_provider();
        let (base, store) = fake_node::serve().await;
        let dir = TempDir::new(None).unwrap();
        // A stand-in `shoal` that checks its arguments, writes the openrc and stays up.
        let bin = dir.path().join("fake-shoal");
        let script = format!(
            "#!/bin/sh\nset -e\n\
             [ \"$1 $2 $3 $4\" = \"dev --nodes 3 --dir\" ] || {{ echo \"bad args: $*\"; exit 3; }}\n\
             mkdir -p \"$5/node1\"\n\
             printf 'export OS_AUTH_URL={}/identity/v3\\nexport OS_USERNAME=admin\\n\
             export OS_PASSWORD={}\\nexport OS_PROJECT_NAME=admin\\n' > \"$5/node1/admin-openrc\"\n\
             exec sleep 600\n",
            base,
            fake_node::PASSWORD
        );
        std::fs::write(&bin, script).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

        let mut procs = ProcGuard::new();
        let http = http_client(Duration::from_secs(5)).unwrap();
        let cluster = ShoalCluster::start(
            &mut procs,
            &bin,
            &dir.path().join("shoal"),
            dir.path(),
            3,
            &http,
        )
        .await
        .unwrap();
        assert_eq!(cluster.token, fake_node::TOKEN);
        assert_eq!(cluster.status.leader.as_deref(), Some("node1"));
        let writers = cluster.writers(&http);
        assert_eq!(writers.len(), 3);

        let cfg = LoadConfig {
            clients: 3,
            value_size: 32,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(500),
        };
        let load = drive_load(&cfg, |i| Ok(Writer::Shoal(writers[i % 3].clone())))
            .await
            .unwrap();
        assert!(!load.hist.is_empty());
        assert_eq!(load.errors, 0, "{:?}", load.first_error);
        let stored = store.lock().unwrap().kv.get("bench/2/0").cloned().unwrap();
        assert_eq!(stored.len(), 32);
        let read = writers[0].get_linearizable("bench/2/0").await.unwrap();
        assert_eq!(read, stored);

        let rev = writers[1].put("a/b", b"v").await.unwrap();
        assert_eq!(rev, store.lock().unwrap().revision);
        let stranger = ShoalWriter::new(http.clone(), &base, "not-a-token");
        let err = stranger.put("a/b", b"v").await.unwrap_err();
        assert!(err.to_string().contains("401"), "{err:#}");
        let mut wrong = OpenRc::parse(&format!(
            "export OS_AUTH_URL={base}/identity/v3\nexport OS_PASSWORD=nope\n"
        ))
        .unwrap();
        assert!(issue_token(&http, &wrong).await.is_err());
        wrong.password = fake_node::PASSWORD.into();
        assert_eq!(issue_token(&http, &wrong).await.unwrap(), fake_node::TOKEN);
        drop(procs);
    }

    #[test]
    fn parses_the_openrc_shoal_dev_writes() {
        let text = "\
# Source this file: . admin-openrc
export OS_AUTH_URL=http://127.0.0.1:40123/identity/v3
export OS_USERNAME=admin
export OS_PASSWORD='s3cr=t'
export OS_PROJECT_NAME=\"admin\"
export OS_USER_DOMAIN_NAME=Default
export OS_PROJECT_DOMAIN_NAME=Default
export OS_IDENTITY_API_VERSION=3
";
        let rc = OpenRc::parse(text).unwrap();
        assert_eq!(rc.cacert, None);
        let tls = OpenRc::parse(&format!("{text}export OS_CACERT=/etc/shoal/ca.pem\n")).unwrap();
        assert_eq!(tls.cacert.as_deref(), Some("/etc/shoal/ca.pem"));
        assert_eq!(rc.auth_url, "http://127.0.0.1:40123/identity/v3");
        assert_eq!(rc.password, "s3cr=t");
        assert_eq!(rc.project_name, "admin");
        assert_eq!(rc.username, "admin");
        assert_eq!(rc.api_base().unwrap(), "http://127.0.0.1:40123");
        let body = rc.auth_body();
        assert_eq!(
            body["auth"]["identity"]["password"]["user"]["password"],
            "s3cr=t"
        );
        assert_eq!(
            body["auth"]["identity"]["password"]["user"]["domain"]["name"],
            "Default"
        );
        assert_eq!(body["auth"]["scope"]["project"]["name"], "admin");
        assert_eq!(body["auth"]["identity"]["methods"][0], "password");
    }

    #[test]
    fn openrc_without_password_or_url_is_rejected() {
        let no_pw = "export OS_AUTH_URL=http://127.0.0.1:1/identity/v3\n";
        assert!(OpenRc::parse(no_pw)
            .unwrap_err()
            .to_string()
            .contains("OS_PASSWORD"));
        let no_url = "export OS_PASSWORD=x\n";
        assert!(OpenRc::parse(no_url)
            .unwrap_err()
            .to_string()
            .contains("OS_AUTH_URL"));
        // A half-written file (as seen while `shoal dev` writes it) is not yet complete.
        assert!(OpenRc::parse("export OS_AUTH_URL=http://127.0.0.1:1/ide").is_err());
    }

    #[test]
    fn status_parses_and_settles() {
        let body = r#"{"leader":"node2","term":3,"members":[
            {"name":"node1","role":"voter","api":"127.0.0.1:4001","applied_index":10,"healthy":true},
            {"name":"node2","role":"leader","api":"127.0.0.1:4002","applied_index":10,"healthy":true},
            {"name":"node3","role":"voter","api":"127.0.0.1:4003","applied_index":9,"healthy":false}
        ]}"#;
        let mut st: Status = serde_json::from_str(body).unwrap();
        assert!(!st.settled(3), "an unhealthy member means not settled");
        st.members[2].healthy = true;
        assert!(st.settled(3));
        assert!(!st.settled(5), "fewer members than asked for");
        st.members[1].role = "voter".into();
        assert!(!st.settled(3), "the named leader does not say it leads");
        st.members[1].role = "leader".into();
        let leader = st.member("node2").unwrap();
        assert_eq!(leader.port().unwrap(), 4002);
        assert_eq!(leader.base(), "http://127.0.0.1:4002");
        st.leader = None;
        assert!(!st.settled(3));
        let no_leader: Status =
            serde_json::from_str(r#"{"leader":null,"term":1,"members":[]}"#).unwrap();
        assert!(no_leader.leader.is_none());
    }
}
