//! Process-level test harness: real `shoal` processes on loopback with OS-picked ports, each
//! with its own data directory in a temporary directory, killed on drop.

#![allow(dead_code)]

pub mod guest;
pub mod nft;
pub mod osc;
pub mod servers;
pub mod vmnet;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

pub fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls `f` every 100 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub api: SocketAddr,
    /// `http` or `https`, as node1's `admin-openrc` says.
    pub scheme: &'static str,
    pub child: Option<Child>,
}

impl Node {
    pub fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.api)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }
}

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub password: String,
    pub http: reqwest::blocking::Client,
    pub extra_args: Vec<String>,
    /// `OS_CACERT` of node1's `admin-openrc`, for an HTTPS API.
    pub cacert: Option<PathBuf>,
}

/// The value of `export NAME=...` in an openrc text.
pub fn openrc_var(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("export {name}=")))
        .map(str::to_owned)
}

/// A blocking client that trusts `cacert` (PEM) besides the public roots.
pub fn http_client(cacert: Option<&Path>) -> reqwest::blocking::Client {
    install_crypto();
    let mut b = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30));
    if let Some(path) = cacert {
        for cert in reqwest::Certificate::from_pem_bundle(&std::fs::read(path).unwrap()).unwrap() {
            b = b.add_root_certificate(cert);
        }
    }
    b.build().unwrap()
}

fn spawn(dir: &Path, args: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))
        .unwrap();
    // Nodes drive libvirt's in-memory test hypervisor unless a test names another libvirt
    // with --libvirt-uri (real TCG guests need qemu:///system and a running libvirtd).
    let libvirt =
        std::env::var("SHOAL_LIBVIRT_URI").unwrap_or_else(|_| "test:///default".to_owned());
    Command::new(SHOAL)
        .args(args)
        .env("RUST_LOG", "info,openraft=warn")
        .env("SHOAL_LIBVIRT_URI", libvirt)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// reqwest is built with rustls and no default crypto provider; pick ring once per process.
pub fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Cluster {
    /// Starts node1 with `init` and returns once its admin credential works.
    pub fn init(extra_args: &[&str]) -> Cluster {
        install_crypto();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("node1");
        let listen = free_udp();
        let api = free_tcp();
        let mut args: Vec<String> = vec![
            "init".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--name".into(),
            "node1".into(),
            "--listen".into(),
            listen.to_string(),
            "--api".into(),
            api.to_string(),
        ];
        let extra: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().cloned());
        let child = spawn(&dir, &args);
        let openrc = dir.join("admin-openrc");
        // The file is written with one write; wait until it is there in full.
        let text = wait_until("admin-openrc", Duration::from_secs(60), || {
            std::fs::read_to_string(&openrc)
                .ok()
                .filter(|t| t.contains("OS_REGION_NAME") && t.ends_with('\n'))
        });
        let password = openrc_var(&text, "OS_PASSWORD").unwrap();
        let scheme = if openrc_var(&text, "OS_AUTH_URL")
            .unwrap()
            .starts_with("https://")
        {
            "https"
        } else {
            "http"
        };
        let cacert = openrc_var(&text, "OS_CACERT").map(PathBuf::from);
        let mut c = Cluster {
            tmp,
            nodes: vec![Node {
                name: "node1".into(),
                dir,
                listen,
                api,
                scheme,
                child: Some(child),
            }],
            password,
            http: http_client(cacert.as_deref()),
            extra_args: extra,
            cacert,
        };
        wait_until("node1 to issue tokens", Duration::from_secs(30), || {
            c.try_token(0).ok()
        });
        c.nodes[0].child.as_mut().unwrap();
        c
    }

    /// Starts `n` nodes: init then joins, and waits until all are healthy members.
    pub fn start(n: usize, extra_args: &[&str]) -> Cluster {
        let mut c = Cluster::init(extra_args);
        for _ in 1..n {
            c.join_new();
        }
        c.wait_healthy(n);
        c
    }

    /// One HTTP call to node `node`'s API; returns the status and the JSON body (or `null`).
    pub fn api(
        &self,
        node: usize,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.nodes[node].base());
        let mut req = self
            .http
            .request(method.parse().unwrap(), url)
            .header("X-Auth-Token", token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn openrc_env(&self, node: usize) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "OS_AUTH_URL".into(),
                format!("{}/identity/v3", self.nodes[node].base()),
            ),
            ("OS_USERNAME".into(), "admin".into()),
            ("OS_PASSWORD".into(), self.password.clone()),
            ("OS_PROJECT_NAME".into(), "admin".into()),
            ("OS_USER_DOMAIN_NAME".into(), "Default".into()),
            ("OS_PROJECT_DOMAIN_NAME".into(), "Default".into()),
            ("OS_IDENTITY_API_VERSION".into(), "3".into()),
        ];
        if let Some(ca) = &self.cacert {
            env.push(("OS_CACERT".into(), ca.display().to_string()));
        }
        env
    }

    /// Runs a `shoal` client command against node `node`; returns (status ok, stdout, stderr).
    pub fn cli(&self, node: usize, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(SHOAL)
            .args(args)
            .envs(self.openrc_env(node))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn try_token(&self, node: usize) -> Result<String, String> {
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": "admin", "domain": {"name": "Default"}, "password": self.password}}},
            "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}}}});
        let resp = self
            .http
            .post(format!(
                "{}/identity/v3/auth/tokens",
                self.nodes[node].base()
            ))
            .json(&body)
            .send()
            .map_err(|e| e.to_string())?;
        if resp.status().as_u16() != 201 {
            return Err(format!("status {}", resp.status()));
        }
        Ok(resp
            .headers()
            .get("x-subject-token")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned())
    }

    pub fn token(&self, node: usize) -> String {
        wait_until("a token", Duration::from_secs(30), || {
            self.try_token(node).ok()
        })
    }

    pub fn create_join_token(&self, node: usize, ttl_secs: u64) -> String {
        let (ok, out, err) = self.cli(
            node,
            &["token", "create", "--ttl-secs", &ttl_secs.to_string()],
        );
        assert!(ok, "token create failed: {err}");
        out.lines().last().unwrap().trim().to_owned()
    }

    /// Spawns `shoal join` for a new node; does not wait for it.
    pub fn spawn_join(&mut self, token: &str, extra: &[&str]) -> usize {
        let i = self.nodes.len() + 1;
        let name = format!("node{i}");
        let dir = self.tmp.path().join(&name);
        let listen = free_udp();
        let api = free_tcp();
        let token_file = self.tmp.path().join(format!("{name}.join-token"));
        std::fs::write(&token_file, token).unwrap();
        let mut args: Vec<String> = vec![
            "join".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--name".into(),
            name.clone(),
            "--listen".into(),
            listen.to_string(),
            "--api".into(),
            api.to_string(),
            "--token-file".into(),
            token_file.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.nodes[0].listen.to_string());
        let child = spawn(&dir, &args);
        let scheme = self.nodes[0].scheme;
        self.nodes.push(Node {
            name,
            dir,
            listen,
            api,
            scheme,
            child: Some(child),
        });
        self.nodes.len() - 1
    }

    /// Joins a new node through node1 and waits until it serves tokens.
    pub fn join_new(&mut self) -> usize {
        let token = self.create_join_token(0, 3600);
        let extra = self.extra_args.clone();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let i = self.spawn_join(&token, &extra);
        wait_until(
            &format!("{} to serve", self.nodes[i].name),
            Duration::from_secs(60),
            || self.try_token(i).ok(),
        );
        i
    }

    pub fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node is still running");
        let args = vec![
            "start".to_owned(),
            "--data-dir".to_owned(),
            self.nodes[i].dir.display().to_string(),
        ];
        self.nodes[i].child = Some(spawn(&self.nodes[i].dir, &args));
    }

    /// `GET /shoal/v1/status` through node `i`.
    pub fn status(&self, i: usize) -> Option<Value> {
        let token = self.try_token(i).ok()?;
        let resp = self
            .http
            .get(format!("{}/shoal/v1/status", self.nodes[i].base()))
            .header("X-Auth-Token", token)
            .send()
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json().ok()
    }

    /// Index of a running node to ask.
    pub fn any_running(&mut self) -> usize {
        (0..self.nodes.len())
            .find(|i| self.nodes[*i].is_running())
            .expect("a running node")
    }

    /// Waits until `n` members are healthy, a leader is known, and the voter set has grown to
    /// `min(n, 3)` (the default voter count).
    pub fn wait_healthy(&mut self, n: usize) -> Value {
        let asker = self.any_running();
        wait_until(
            &format!("{n} healthy members with a leader and {} voters", n.min(3)),
            Duration::from_secs(90),
            || {
                let s = self.status(asker)?;
                let members = s["members"].as_array()?;
                let healthy = members.iter().filter(|m| m["healthy"] == true).count();
                let voters = members
                    .iter()
                    .filter(|m| m["role"] == "leader" || m["role"] == "voter")
                    .count();
                (s["leader"].is_string() && healthy == n && voters == n.min(3)).then_some(s)
            },
        )
    }

    pub fn leader_index(&mut self) -> usize {
        let asker = self.any_running();
        let name = wait_until("a leader", Duration::from_secs(30), || {
            self.status(asker)?["leader"].as_str().map(str::to_owned)
        });
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }

    pub fn kv_put(&self, i: usize, key: &str, value: &str) -> Result<u64, String> {
        let token = self.try_token(i)?;
        let resp = self
            .http
            .put(format!("{}/shoal/v1/kv/{key}", self.nodes[i].base()))
            .header("X-Auth-Token", token)
            .body(value.to_owned())
            .send()
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!(
                "{}: {}",
                resp.status(),
                resp.text().unwrap_or_default()
            ));
        }
        let v: Value = resp.json().map_err(|e| e.to_string())?;
        Ok(v["revision"].as_u64().unwrap())
    }

    pub fn kv_get(&self, i: usize, key: &str, consistency: &str) -> Result<Option<String>, String> {
        let token = self.try_token(i)?;
        let resp = self
            .http
            .get(format!(
                "{}/shoal/v1/kv/{key}?consistency={consistency}",
                self.nodes[i].base()
            ))
            .header("X-Auth-Token", token)
            .send()
            .map_err(|e| e.to_string())?;
        match resp.status().as_u16() {
            200 => Ok(Some(resp.text().unwrap())),
            404 => Ok(None),
            s => Err(format!("{s}: {}", resp.text().unwrap_or_default())),
        }
    }

    pub fn dump_logs(&self) {
        for n in &self.nodes {
            if let Ok(text) = std::fs::read_to_string(n.log_path()) {
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("---- {} (last lines) ----", n.name);
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for n in &mut self.nodes {
            n.kill9();
        }
    }
}
