//! An etcd 3.4 cluster on loopback as the baseline, driven through its v3 JSON gateway.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use crate::procs::{free_ports, ProcGuard};

/// Where Debian's etcd-server puts the binary.
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// Writes through one member's gateway: `POST /v3/kv/put` with base64 key and value.
#[derive(Debug, Clone)]
pub struct EtcdWriter {
    http: reqwest::Client,
    url: String,
}

impl EtcdWriter {
    pub fn new(http: reqwest::Client, endpoint: &str) -> Self {
        Self {
            http,
            url: format!("{endpoint}/v3/kv/put"),
        }
    }

    pub async fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        let body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        let resp = self.http.post(&self.url).json(&body).send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            bail!("{status}: {}", String::from_utf8_lossy(&bytes));
        }
        // A success carries the revision in its header; the gateway reports errors with a
        // non-2xx status, but check the body too rather than trust a bare 200.
        let reply: PutReply = serde_json::from_slice(&bytes)
            .with_context(|| format!("put reply: {}", String::from_utf8_lossy(&bytes)))?;
        if reply.header.revision.is_none() {
            bail!(
                "put reply without a revision: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct PutReply {
    header: ReplyHeader,
}

/// The gateway renders 64-bit integers as JSON strings.
#[derive(Debug, Deserialize)]
struct ReplyHeader {
    revision: Option<String>,
    member_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StatusReply {
    header: ReplyHeader,
    leader: Option<String>,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    pid: Option<u32>,
}

/// A cluster of etcd members started by us, one process each, with fsync on (the default).
#[derive(Debug)]
pub struct EtcdCluster {
    bin: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
}

impl EtcdCluster {
    /// Starts `nodes` members under `dir` and waits until every member reports healthy.
    pub async fn start(
        procs: &mut ProcGuard,
        bin: &Path,
        dir: &Path,
        nodes: usize,
        http: &reqwest::Client,
    ) -> Result<Self> {
        let ports = free_ports(2 * nodes)?;
        let members: Vec<Member> = (0..nodes)
            .map(|i| Member {
                name: format!("m{}", i + 1),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.join(format!("m{}", i + 1)),
                log: dir.join(format!("m{}.log", i + 1)),
                pid: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            bin: bin.to_owned(),
            members,
            initial_cluster,
        };
        for i in 0..nodes {
            cluster.spawn(procs, i, "new")?;
        }
        cluster
            .wait_healthy(procs, http, Duration::from_secs(60))
            .await?;
        Ok(cluster)
    }

    fn spawn(&mut self, procs: &mut ProcGuard, i: usize, state: &str) -> Result<()> {
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "shoal-loadtest"]);
        let pid = procs.spawn(&format!("etcd {}", m.name), cmd, &m.log)?;
        self.members[i].pid = Some(pid);
        Ok(())
    }

    /// Client URLs of all members, `http://127.0.0.1:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// Waits until every member answers `GET /health` with `{"health":"true"}` (it has a
    /// leader and no alarm), failing early if one of our processes died.
    pub async fn wait_healthy(
        &self,
        procs: &mut ProcGuard,
        http: &reqwest::Client,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            procs.check_running().map_err(|e| self.with_logs(e))?;
            let mut all = true;
            for ep in self.endpoints() {
                if !member_healthy(http, &ep).await {
                    all = false;
                    break;
                }
            }
            if all {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(
                    self.with_logs(anyhow!("etcd members not all healthy after {timeout:?}"))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the current leader, by asking each member's `/v3/maintenance/status` which
    /// member it follows and who it is itself.
    pub async fn leader(&self, http: &reqwest::Client) -> Result<usize> {
        let mut ids = Vec::with_capacity(self.members.len());
        let mut leader = None;
        for ep in self.endpoints() {
            let st = member_status(http, &ep).await?;
            let me = st.header.member_id.unwrap_or_default();
            if let Some(l) = st.leader.filter(|l| l != "0") {
                if leader.get_or_insert_with(|| l.clone()) != &l {
                    bail!("members disagree on the leader ({l} and {leader:?})");
                }
            }
            ids.push(me);
        }
        let leader = leader.context("no member knows a leader")?;
        ids.iter()
            .position(|id| *id == leader)
            .with_context(|| format!("leader {leader} is not among the members {ids:?}"))
    }

    /// SIGKILLs member `i`; returns when the signal was sent.
    pub fn kill(&mut self, procs: &mut ProcGuard, i: usize) -> Result<Instant> {
        let pid = self.members[i]
            .pid
            .take()
            .with_context(|| format!("{} is not running", self.members[i].name))?;
        let sent = Instant::now();
        procs.kill(pid)?;
        Ok(sent)
    }

    /// Starts member `i` again on its data directory, rejoining the existing cluster.
    pub fn restart(&mut self, procs: &mut ProcGuard, i: usize) -> Result<()> {
        self.spawn(procs, i, "existing")
    }

    fn with_logs(&self, err: anyhow::Error) -> anyhow::Error {
        let logs: Vec<String> = self
            .members
            .iter()
            .map(|m| m.log.display().to_string())
            .collect();
        err.context(format!("etcd logs: {}", logs.join(", ")))
    }
}

async fn member_healthy(http: &reqwest::Client, endpoint: &str) -> bool {
    let resp = http
        .get(format!("{endpoint}/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    let Ok(resp) = resp else { return false };
    if !resp.status().is_success() {
        return false;
    }
    match resp.json::<serde_json::Value>().await {
        Ok(v) => v["health"] == "true",
        Err(_) => false,
    }
}

async fn member_status(http: &reqwest::Client, endpoint: &str) -> Result<StatusReply> {
    let resp = http
        .post(format!("{endpoint}/v3/maintenance/status"))
        .json(&json!({}))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .with_context(|| format!("status of {endpoint}"))?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        bail!(
            "status of {endpoint}: {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "status of {endpoint}: unexpected reply {}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{drive_load, http_client, LoadConfig, TempDir, Writer};

    #[test]
    fn status_reply_parses() {
        let body = r#"{"header":{"cluster_id":"1","member_id":"8211f1d0f64f3269","revision":"5",
            "raft_term":"2"},"version":"3.4.23","dbSize":"20480","leader":"8211f1d0f64f3269",
            "raftIndex":"9","raftTerm":"2","raftAppliedIndex":"9","dbSizeInUse":"20480"}"#;
        let st: StatusReply = serde_json::from_str(body).unwrap();
        assert_eq!(st.leader.as_deref(), Some("8211f1d0f64f3269"));
        assert_eq!(st.header.member_id.as_deref(), Some("8211f1d0f64f3269"));
    }

    /// A real three-member etcd on loopback takes a 2-second load from 4 clients without a
    /// single failed write, and the leader can be found, killed and replaced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_member_etcd_takes_load_and_fails_over() {
        if !Path::new(ETCD_BIN).exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{ETCD_BIN} is missing and CI=true: install etcd-server"
            );
            eprintln!("skipping: {ETCD_BIN} is missing (apt install etcd-server)");
            return;
        }
        crate::raft::install_crypto_provider();
        let dir = TempDir::new(None).unwrap();
        let mut procs = ProcGuard::new();
        let http = http_client(Duration::from_secs(5)).unwrap();
        let mut cluster = EtcdCluster::start(&mut procs, Path::new(ETCD_BIN), dir.path(), 3, &http)
            .await
            .unwrap();
        let endpoints = cluster.endpoints();
        let cfg = LoadConfig {
            clients: 4,
            value_size: 64,
            warmup: Duration::from_millis(200),
            duration: Duration::from_secs(2),
        };
        let load = drive_load(&cfg, |i| {
            let http = http_client(Duration::from_secs(10))?;
            Ok(Writer::Etcd(EtcdWriter::new(
                http,
                &endpoints[i % endpoints.len()],
            )))
        })
        .await
        .unwrap();
        assert!(!load.hist.is_empty(), "no write succeeded");
        assert_eq!(load.errors, 0, "first error: {:?}", load.first_error);

        let leader = cluster.leader(&http).await.unwrap();
        let took = crate::raft::etcd_failover_trial(&mut procs, &mut cluster, &http, leader, 0)
            .await
            .unwrap();
        assert!(took < Duration::from_secs(30));
        let new_leader = cluster.leader(&http).await.unwrap();
        assert!(new_leader < 3);
        drop(procs);
    }
}
