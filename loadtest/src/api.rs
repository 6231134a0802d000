//! `shoal-loadtest api`: the read side of the OpenStack API under concurrent clients. Starts
//! `shoal dev` (or targets a running cluster given by `--url`), obtains tokens with Keystone
//! password auth, creates a few flavors, then runs one phase per `--mix`: N clients, each with
//! its own keep-alive connection pool, sending a weighted interleave of token validations,
//! flavor listings and version discovery round-robin over the nodes.
//!
//! Around every phase (and an idle control window before them) it samples each node's
//! `/metrics` (Raft log and applied index, token validations) and `/proc/PID/io` and CPU time,
//! so that a read-only phase shows whether it touched Raft or the disk.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use reqwest::{Method, Url};
use serde::Serialize;
use serde_json::json;

use crate::procs::{self, pid_listening_on, ProcGuard, ProcIo};
use crate::raft::{
    http_client_builder, install_crypto_provider, parse_duration, shoal_bin, until_signal, TempDir,
};
use crate::report::{self, Summary};
use crate::shoal_client::{issue_token, OpenRc, ShoalCluster};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Members of the `shoal dev` cluster started here (ignored with --url).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub nodes: u16,
    /// Concurrent clients, each with its own keep-alive connection pool; each client sends
    /// its requests round-robin over all nodes.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: u32,
    /// Operations and their relative weights, as `validate=70,flavors=30`. Operations:
    /// validate (GET /identity/v3/auth/tokens), check (HEAD of it), flavors
    /// (GET /compute/v2.1/flavors/detail), versions (GET /identity/v3, no token). Repeat the
    /// flag to run several phases one after the other.
    #[arg(long = "mix", value_parser = Mix::parse,
          default_values = ["validate=100", "validate=70,flavors=30"])]
    pub mixes: Vec<Mix>,
    /// Measured load time of each phase (after its warm-up): 20s, 2m, 500ms.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before each phase's measurement starts; its requests are not counted.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Length of the idle control window sampled before the phases (what the nodes do with no
    /// load: heartbeats, timers, logs); 0 to skip it.
    #[arg(long, default_value = "5s", value_parser = parse_duration_or_zero)]
    pub idle: Duration,
    /// Subject tokens issued (round-robin over the nodes) and validated in turn.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub tokens: u32,
    /// Flavors `apibench-K` created (or found) before the load.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub flavors: u32,
    /// API base of a running node, http or https (repeat, or comma-separate, for each node):
    /// target that cluster instead of starting one.
    #[arg(long = "url", value_delimiter = ',')]
    pub urls: Vec<String>,
    /// Credentials for --url: an openrc file (default: the OS_* environment variables).
    #[arg(long)]
    pub openrc: Option<PathBuf>,
    /// PEM file of the CA that signed the nodes' certificates (default: OS_CACERT).
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// One JSON object per phase on stdout instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// The `shoal` binary (default: next to this executable, then on PATH).
    #[arg(long)]
    pub shoal_bin: Option<PathBuf>,
    /// Keep the cluster's data and logs here (default: a temporary directory, removed).
    #[arg(long)]
    pub keep_dir: Option<PathBuf>,
}

/// `parse_duration`, plus `0` for "none".
fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    match s.trim() {
        "0" | "0s" | "0ms" => Ok(Duration::ZERO),
        _ => parse_duration(s),
    }
}

/// One kind of request the load sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// `GET /identity/v3/auth/tokens`: X-Auth-Token is the admin token, X-Subject-Token the
    /// token validated; the reply is the token body with its catalog.
    Validate,
    /// `HEAD /identity/v3/auth/tokens`: the same check without building a body.
    Check,
    /// `GET /compute/v2.1/flavors/detail` with a subject token as X-Auth-Token.
    Flavors,
    /// `GET /identity/v3`: version discovery, unauthenticated; the HTTP floor.
    Versions,
}

impl Op {
    const ALL: [Op; 4] = [Op::Validate, Op::Check, Op::Flavors, Op::Versions];

    pub fn name(self) -> &'static str {
        match self {
            Op::Validate => "validate",
            Op::Check => "check",
            Op::Flavors => "flavors",
            Op::Versions => "versions",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Whether the node validates an X-Auth-Token for it (and counts it in
    /// `shoal_api_token_validations_total`).
    fn authenticated(self) -> bool {
        self != Op::Versions
    }
}

/// Operations with relative weights, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix(Vec<(Op, u32)>);

/// The largest weight accepted; the interleave is as long as the sum of the weights.
const MAX_WEIGHT: u32 = 10_000;

impl Mix {
    /// Parses `validate=70,flavors=30`. Weights are relative whole numbers (they need not sum
    /// to 100); an operation with weight 0 is left out.
    pub fn parse(s: &str) -> Result<Self, String> {
        let names = Op::ALL.map(Op::name).join(", ");
        let mut ops: Vec<(Op, u32)> = Vec::new();
        for item in s.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(format!(
                    "empty entry in mix {s:?}: give OP=WEIGHT pairs separated by commas, as \
                     validate=70,flavors=30"
                ));
            }
            let Some((name, weight)) = item.split_once('=') else {
                return Err(format!(
                    "{item:?} in mix {s:?} is not OP=WEIGHT (as validate=70)"
                ));
            };
            let (name, weight) = (name.trim(), weight.trim());
            let op = Op::from_name(name)
                .ok_or_else(|| format!("unknown operation {name:?} in mix {s:?}: use {names}"))?;
            let weight: u32 = weight
                .parse()
                .ok()
                .filter(|w| *w <= MAX_WEIGHT)
                .ok_or_else(|| {
                    format!(
                        "weight {weight:?} of {name} is not a whole number from 0 to {MAX_WEIGHT}"
                    )
                })?;
            if ops.iter().any(|(o, _)| *o == op) {
                return Err(format!("{name} appears twice in mix {s:?}"));
            }
            ops.push((op, weight));
        }
        ops.retain(|(_, w)| *w > 0);
        if ops.is_empty() {
            return Err(format!(
                "every weight in mix {s:?} is 0: at least one must be positive"
            ));
        }
        Ok(Self(ops))
    }

    pub fn ops(&self) -> impl Iterator<Item = Op> + '_ {
        self.0.iter().map(|(op, _)| *op)
    }

    /// The operations interleaved as evenly as the weights allow (smooth weighted
    /// round-robin), one cycle of `sum(weights) / gcd(weights)` entries: each client walks
    /// it from its own offset, so the mix holds exactly over every cycle.
    pub fn schedule(&self) -> Vec<Op> {
        let g = self.0.iter().fold(0, |g, (_, w)| gcd(g, *w as usize)) as u32;
        let weights: Vec<i64> = self.0.iter().map(|(_, w)| i64::from(*w / g)).collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        (0..total)
            .map(|_| {
                for (c, w) in current.iter_mut().zip(&weights) {
                    *c += w;
                }
                let (best, _) = current
                    .iter()
                    .enumerate()
                    .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
                    .expect("a mix is never empty");
                current[best] -= total;
                self.0[best].0
            })
            .collect()
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(op, w)| format!("{}={w}", op.name()))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// The cluster under load: the API base of each node, the pid serving it when it can be seen
/// from here, and the tokens.
#[derive(Debug)]
struct Target {
    nodes: Vec<Node>,
    admin_token: String,
    subject_tokens: Vec<String>,
    ca: Option<Vec<reqwest::Certificate>>,
}

#[derive(Debug, Clone)]
struct Node {
    base: String,
    pid: Option<u32>,
}

impl Target {
    fn http(&self, timeout: Duration) -> Result<reqwest::Client> {
        let mut b = http_client_builder(timeout);
        for c in self.ca.iter().flatten() {
            b = b.add_root_certificate(c.clone());
        }
        b.build().context("building the HTTP client")
    }
}

fn note(msg: &str) {
    eprintln!("[api] {msg}");
}

pub async fn run(args: Args) -> Result<()> {
    install_crypto_provider();
    let dir = TempDir::new(args.keep_dir.as_deref())?;
    let mut procs = ProcGuard::new();
    let work = async {
        let target = if args.urls.is_empty() {
            note(&format!("data and logs in {}", dir.path().display()));
            start_cluster(&args, &mut procs, dir.path()).await?
        } else {
            existing_cluster(&args).await?
        };
        bench(&args, &target, &mut procs).await
    };
    let res = until_signal(work).await?;
    procs.shutdown(Duration::from_secs(10));
    if res.is_err() && args.urls.is_empty() {
        note(&format!("kept {} for its logs", dir.path().display()));
        dir.keep();
    }
    res
}

async fn start_cluster(args: &Args, procs: &mut ProcGuard, dir: &Path) -> Result<Target> {
    let bin = shoal_bin(args.shoal_bin.as_deref())?;
    let http = crate::raft::http_client(Duration::from_secs(30))?;
    let data = dir.join("shoal");
    note(&format!(
        "starting `{} dev --nodes {}`",
        bin.display(),
        args.nodes
    ));
    let cluster = ShoalCluster::start(procs, &bin, &data, dir, args.nodes.into(), &http).await?;
    let openrc = data.join("node1").join("admin-openrc");
    let rc = OpenRc::parse(&std::fs::read_to_string(&openrc)?)?;
    let mut nodes = Vec::new();
    for m in &cluster.status.members {
        // `shoal dev` spawned the nodes: find each by the port it serves.
        let pid = pid_listening_on(m.port()?)
            .with_context(|| format!("finding the process of {}", m.name))?;
        nodes.push(Node {
            base: m.base(),
            pid: Some(pid),
        });
    }
    finish_target(args, nodes, &rc, None).await
}

async fn existing_cluster(args: &Args) -> Result<Target> {
    let rc = match &args.openrc {
        Some(p) => OpenRc::parse(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?,
        None => OpenRc::from_env()?,
    };
    let mut nodes = Vec::new();
    for u in &args.urls {
        let url = Url::parse(u.trim())
            .with_context(|| format!("--url {u:?} is not a URL (as https://10.0.0.1:8774)"))?;
        // The process serving a loopback URL can be sampled from here; a remote one cannot.
        let local = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
        let pid = url
            .port_or_known_default()
            .filter(|_| local)
            .and_then(|p| pid_listening_on(p).ok());
        nodes.push(Node {
            base: url.origin().ascii_serialization(),
            pid,
        });
    }
    let cacert = args
        .cacert
        .clone()
        .or_else(|| rc.cacert.as_ref().map(PathBuf::from));
    finish_target(args, nodes, &rc, cacert.as_deref()).await
}

/// Reads the CA, issues the admin token and the subject tokens (round-robin over the nodes),
/// and creates the flavors.
async fn finish_target(
    args: &Args,
    nodes: Vec<Node>,
    rc: &OpenRc,
    cacert: Option<&Path>,
) -> Result<Target> {
    let ca = cacert
        .map(|p| {
            let pem = std::fs::read(p).with_context(|| format!("reading CA {}", p.display()))?;
            reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{} holds no PEM certificate", p.display()))
        })
        .transpose()?;
    let mut target = Target {
        nodes,
        admin_token: String::new(),
        subject_tokens: Vec::new(),
        ca,
    };
    let http = target.http(Duration::from_secs(30))?;
    let at = |i: usize| {
        let base = &target.nodes[i % target.nodes.len()].base;
        OpenRc {
            auth_url: format!("{base}/identity/v3"),
            ..rc.clone()
        }
    };
    target.admin_token = issue_token(&http, &at(0)).await?;
    for i in 0..args.tokens as usize {
        let t = issue_token(&http, &at(i))
            .await
            .with_context(|| format!("issuing subject token {i}"))?;
        target.subject_tokens.push(t);
    }
    for k in 0..args.flavors {
        create_flavor(&http, &target, k).await?;
    }
    note(&format!(
        "{} nodes ({}), {} subject tokens, {} flavors",
        target.nodes.len(),
        target
            .nodes
            .iter()
            .map(|n| n.base.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        target.subject_tokens.len(),
        args.flavors
    ));
    Ok(target)
}

/// Creates flavor `apibench-K`; one that exists already (a rerun on the same cluster) is fine.
async fn create_flavor(http: &reqwest::Client, target: &Target, k: u32) -> Result<()> {
    let base = &target.nodes[k as usize % target.nodes.len()].base;
    let name = format!("apibench-{k}");
    let body = json!({"flavor": {
        "name": name, "id": name, "vcpus": 1 << (k % 4), "ram": 512 << (k % 6), "disk": 1 + k,
    }});
    let resp = http
        .post(format!("{base}/compute/v2.1/flavors"))
        .header("x-auth-token", &target.admin_token)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("creating flavor {name}"))?;
    let status = resp.status();
    if !status.is_success() && status != reqwest::StatusCode::CONFLICT {
        bail!(
            "creating flavor {name}: {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// One request of `op` to `base`, prepared once: what a client sends again and again.
#[derive(Debug, Clone)]
struct Endpoint {
    validate: Url,
    flavors: Url,
    versions: Url,
}

impl Endpoint {
    fn new(base: &str) -> Result<Self> {
        let url = |path: &str| {
            Url::parse(&format!("{base}{path}")).with_context(|| format!("{base}{path}"))
        };
        Ok(Self {
            validate: url("/identity/v3/auth/tokens")?,
            flavors: url("/compute/v2.1/flavors/detail")?,
            versions: url("/identity/v3")?,
        })
    }

    fn request(
        &self,
        http: &reqwest::Client,
        op: Op,
        admin: &str,
        subject: &str,
    ) -> reqwest::RequestBuilder {
        match op {
            Op::Validate | Op::Check => {
                let method = if op == Op::Validate {
                    Method::GET
                } else {
                    Method::HEAD
                };
                http.request(method, self.validate.clone())
                    .header("x-auth-token", admin)
                    .header("x-subject-token", subject)
            }
            Op::Flavors => http
                .get(self.flavors.clone())
                .header("x-auth-token", subject),
            Op::Versions => http.get(self.versions.clone()),
        }
    }
}

/// What one client (or, merged, all of them) saw of one operation.
#[derive(Debug)]
struct OpTally {
    /// Latency of each 2xx answer to a request sent after the warm-up, µs.
    hist: Histogram<u64>,
    /// Failed measured requests by kind (`HTTP 401`, `transport`), never left out.
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    /// Requests that got an HTTP answer, warm-up included: what the nodes saw.
    answered: u64,
}

impl OpTally {
    fn new() -> Self {
        Self {
            hist: report::new_histogram(),
            errors: BTreeMap::new(),
            first_error: None,
            answered: 0,
        }
    }

    fn merge(&mut self, other: Self) -> Result<()> {
        self.hist.add(&other.hist).context("merging histograms")?;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.first_error = self.first_error.take().or(other.first_error);
        self.answered += other.answered;
        Ok(())
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

#[derive(Debug)]
struct ClientTally {
    ops: BTreeMap<Op, OpTally>,
    last_done: Instant,
}

struct Shared {
    endpoints: Vec<Endpoint>,
    schedule: Vec<Op>,
    admin: String,
    subjects: Vec<String>,
    measure_from: Instant,
    end: Instant,
}

async fn client(id: usize, http: reqwest::Client, s: Arc<Shared>) -> ClientTally {
    let mut t = ClientTally {
        ops: s.schedule.iter().map(|op| (*op, OpTally::new())).collect(),
        last_done: s.measure_from,
    };
    // Clients start at different points of the interleave, the node rotation and the tokens,
    // so that at any moment the mix and the nodes are evenly loaded.
    for k in id.. {
        let sent = Instant::now();
        if sent >= s.end {
            break;
        }
        let (op, node) = pick(k, s.schedule.len(), s.endpoints.len());
        let (op, node) = (s.schedule[op], &s.endpoints[node]);
        let subject = &s.subjects[k % s.subjects.len()];
        let res = match node.request(&http, op, &s.admin, subject).send().await {
            // The body is part of the answer: read it all before the clock stops.
            Ok(resp) => {
                let status = resp.status();
                resp.bytes().await.map(|_| status)
            }
            Err(e) => Err(e),
        };
        let done = Instant::now();
        let measured = sent >= s.measure_from;
        let tally = t
            .ops
            .get_mut(&op)
            .expect("every op of the schedule has a tally");
        let failure = match res {
            Ok(status) => {
                tally.answered += 1;
                if status.is_success() {
                    if measured {
                        let us = u64::try_from((done - sent).as_micros()).unwrap_or(u64::MAX);
                        tally.hist.saturating_record(us.max(1));
                    }
                    None
                } else {
                    Some((format!("HTTP {}", status.as_u16()), None))
                }
            }
            Err(e) => Some(("transport".to_owned(), Some(format!("{e:#}")))),
        };
        if measured {
            t.last_done = done;
        }
        if let Some((kind, detail)) = failure {
            if measured {
                *tally.errors.entry(kind.clone()).or_default() += 1;
                tally.first_error.get_or_insert_with(|| {
                    format!("{} {}: {}", op.name(), kind, detail.unwrap_or_default())
                });
            }
            if kind == "transport" {
                // A refused connection fails in microseconds: do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    t
}

/// The slot of the interleave (of `ops` entries) and the node (of `nodes`) for a client's
/// `k`-th request. Both advance by one per request, and the node is shifted by one more after
/// every `lcm(ops, nodes)` requests: otherwise, when `ops` and `nodes` share a factor, an op
/// would stay paired with a subset of the nodes.
fn pick(k: usize, ops: usize, nodes: usize) -> (usize, usize) {
    let lcm = ops / gcd(ops, nodes) * nodes;
    (k % ops, (k + k / lcm) % nodes)
}

/// One node's counters at an instant; a field is `None` when it could not be read.
#[derive(Debug, Clone, Default)]
struct NodeSample {
    metrics: BTreeMap<&'static str, u64>,
    io: Option<ProcIo>,
    cpu: Option<Duration>,
}

/// The gauges and counters of `/metrics` that the report uses.
const METRICS: [&str; 5] = [
    "shoal_raft_last_log_index",
    "shoal_raft_applied_index",
    "shoal_raft_commit_index",
    "shoal_api_token_validations_total",
    // Outgoing peer RPCs of every kind: Raft heartbeats and appends, read-index requests.
    "shoal_peer_rpc_duration_seconds_count",
];

/// Values of `names` in a Prometheus text exposition, each summed over its label sets.
fn prometheus_values(text: &str, names: &[&'static str]) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = l.rsplit_once(' ') else {
            continue;
        };
        let name = series.split_once('{').map_or(series, |(n, _)| n);
        let (Some(name), Ok(v)) = (names.iter().find(|n| **n == name), value.parse::<f64>()) else {
            continue;
        };
        *out.entry(*name).or_default() += v as u64;
    }
    out
}

#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    nodes: Vec<NodeSample>,
    /// CPU time of this process (the load clients).
    client_cpu: Option<Duration>,
    machine: Option<procs::MachineCpu>,
}

/// Reads `/metrics` of every node first and the /proc counters last when `metrics_first`
/// (the start of a window), the other way round at its end, so that the scrapes themselves
/// stay outside the window the /proc counters cover.
async fn sample(http: &reqwest::Client, target: &Target, metrics_first: bool) -> Sample {
    let mut nodes = vec![NodeSample::default(); target.nodes.len()];
    let mut metrics = Vec::new();
    if metrics_first {
        metrics = scrape_all(http, target).await;
    }
    for (n, s) in target.nodes.iter().zip(&mut nodes) {
        s.io = n.pid.and_then(|p| ProcIo::read(p).ok());
        s.cpu = n.pid.and_then(|p| procs::cpu_time(Some(p)).ok());
    }
    let at = Instant::now();
    let client_cpu = procs::cpu_time(None).ok();
    let machine = procs::machine_cpu().ok();
    if !metrics_first {
        metrics = scrape_all(http, target).await;
    }
    for (s, m) in nodes.iter_mut().zip(metrics) {
        s.metrics = m;
    }
    Sample {
        at,
        nodes,
        client_cpu,
        machine,
    }
}

async fn scrape_all(http: &reqwest::Client, target: &Target) -> Vec<BTreeMap<&'static str, u64>> {
    let mut out = Vec::new();
    for n in &target.nodes {
        let text = match http.get(format!("{}/metrics", n.base)).send().await {
            Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
            _ => String::new(),
        };
        out.push(prometheus_values(&text, &METRICS));
    }
    out
}

/// What one node did during a window.
#[derive(Debug, Clone, Serialize)]
pub struct NodeDelta {
    pub node: String,
    pub pid: Option<u32>,
    pub last_log_index_before: Option<u64>,
    pub last_log_index_after: Option<u64>,
    pub applied_index_before: Option<u64>,
    pub applied_index_after: Option<u64>,
    pub commit_index_delta: Option<u64>,
    pub token_validations: Option<u64>,
    /// Outgoing peer RPCs (Raft heartbeats and appends, read-index requests to the leader).
    pub peer_rpcs: Option<u64>,
    pub io: Option<ProcIo>,
    /// CPU time over the window, in cores (1.0 = one core busy all along).
    pub cpu_cores: Option<f64>,
}

/// How far an index moved between two samples, when both could be read.
fn advance(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(after?.saturating_sub(before?))
}

#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    /// Cores, averaged over the window: the whole machine busy (not idle nor iowait).
    pub busy: Option<f64>,
    pub nodes: Option<f64>,
    pub loadtest: Option<f64>,
    /// `busy` less the nodes and the load tester: other processes (builds sharing the
    /// machine), kernel threads, softirqs that interrupted the idle task.
    pub other: Option<f64>,
    /// Interrupts and softirqs, machine-wide (loopback TCP is mostly softirq work). With
    /// tick-based accounting they are also charged to the process they interrupted, so this
    /// overlaps the figures above rather than adding to them.
    pub interrupts: Option<f64>,
    pub cores: Option<usize>,
}

fn deltas(target: &Target, before: &Sample, after: &Sample) -> (Vec<NodeDelta>, CpuUse) {
    let secs = (after.at - before.at).as_secs_f64().max(1e-9);
    let cores =
        |a: Option<Duration>, b: Option<Duration>| Some(a?.saturating_sub(b?).as_secs_f64() / secs);
    let nodes: Vec<NodeDelta> = target
        .nodes
        .iter()
        .zip(before.nodes.iter().zip(&after.nodes))
        .map(|(n, (b, a))| {
            let get = |s: &NodeSample, k: &str| s.metrics.get(k).copied();
            let diff = |k: &str| Some(get(a, k)?.saturating_sub(get(b, k)?));
            NodeDelta {
                node: n.base.clone(),
                pid: n.pid,
                last_log_index_before: get(b, METRICS[0]),
                last_log_index_after: get(a, METRICS[0]),
                applied_index_before: get(b, METRICS[1]),
                applied_index_after: get(a, METRICS[1]),
                commit_index_delta: diff(METRICS[2]),
                token_validations: diff(METRICS[3]),
                peer_rpcs: diff(METRICS[4]),
                io: a.io.zip(b.io).map(|(a, b)| a.since(&b)),
                cpu_cores: cores(a.cpu, b.cpu),
            }
        })
        .collect();
    let node_cores: Option<f64> = nodes.iter().map(|n| n.cpu_cores).sum();
    let loadtest = cores(after.client_cpu, before.client_cpu);
    let machine = |f: fn(&procs::MachineCpu) -> Duration| {
        cores(
            after.machine.as_ref().map(f),
            before.machine.as_ref().map(f),
        )
    };
    let (busy, interrupts) = (machine(|m| m.busy), machine(|m| m.interrupts));
    let other = match (busy, node_cores, loadtest) {
        (Some(b), Some(n), Some(l)) => Some((b - n - l).max(0.0)),
        _ => None,
    };
    let cpu = CpuUse {
        busy,
        nodes: node_cores,
        loadtest,
        other,
        interrupts,
        cores: after.machine.map(|m| m.cpus),
    };
    (nodes, cpu)
}

/// One operation's figures: [`Summary`] (`target` is the operation, `ops` its 2xx answers)
/// and the failures by kind.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    #[serde(flatten)]
    pub summary: Summary,
    pub errors_by_kind: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// The mix, or `idle` for the control window.
    pub phase: String,
    pub clients: u32,
    pub nodes: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Per operation, then `total` (absent for the idle window).
    pub ops: Vec<OpReport>,
    /// Requests of authenticated operations the nodes answered, warm-up included: what
    /// `token_validations` should have grown by.
    pub authenticated_answered: u64,
    /// Node-side deltas over the whole phase, warm-up included.
    pub node_side: Vec<NodeDelta>,
    /// Length of the window the node-side deltas cover.
    pub window_s: f64,
    pub cpu: CpuUse,
}

async fn bench(args: &Args, target: &Target, procs: &mut ProcGuard) -> Result<()> {
    let http = target.http(Duration::from_secs(10))?;
    smoke(&http, target, &args.mixes).await?;
    wait_quiet(&http, target).await;
    if !args.idle.is_zero() {
        note(&format!("idle control window: {:?}", args.idle));
        let before = sample(&http, target, true).await;
        tokio::time::sleep(args.idle).await;
        let after = sample(&http, target, false).await;
        let (node_side, cpu) = deltas(target, &before, &after);
        emit(
            args,
            &PhaseReport {
                phase: "idle".into(),
                clients: 0,
                nodes: target.nodes.len(),
                warmup_s: 0.0,
                duration_s: (after.at - before.at).as_secs_f64(),
                ops: Vec::new(),
                authenticated_answered: 0,
                node_side,
                window_s: (after.at - before.at).as_secs_f64(),
                cpu,
            },
        )?;
    }
    for mix in &args.mixes {
        note(&format!(
            "phase {mix}: {} clients, {:?} warm-up + {:?}",
            args.clients, args.warmup, args.duration
        ));
        let report = phase(args, target, &http, mix).await?;
        procs.check_running()?;
        emit(args, &report)?;
    }
    Ok(())
}

/// Waits until no node's Raft log has grown for 2 s (a fresh cluster still commits its
/// membership changes for a while, and the setup wrote tokens' users and flavors), at most a
/// minute, so that the idle window and the first phase do not see the tail of the setup.
async fn wait_quiet(http: &reqwest::Client, target: &Target) {
    let logs = |m: Vec<BTreeMap<&'static str, u64>>| -> Vec<Option<u64>> {
        m.iter().map(|m| m.get(METRICS[0]).copied()).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = logs(scrape_all(http, target).await);
    let mut still = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = logs(scrape_all(http, target).await);
        if now != last {
            (last, still) = (now, Instant::now());
        } else if still.elapsed() >= Duration::from_secs(2) {
            return;
        }
    }
    note("the Raft log was still growing after a minute; measuring anyway");
}

/// One request of each operation in the mixes to each node, so that a wrong URL, token or
/// CA fails here with its reason rather than as a column of errors.
async fn smoke(http: &reqwest::Client, target: &Target, mixes: &[Mix]) -> Result<()> {
    let mut ops: Vec<Op> = mixes.iter().flat_map(Mix::ops).collect();
    ops.sort_unstable();
    ops.dedup();
    for n in &target.nodes {
        let ep = Endpoint::new(&n.base)?;
        for op in &ops {
            let resp = ep
                .request(http, *op, &target.admin_token, &target.subject_tokens[0])
                .send()
                .await
                .with_context(|| format!("{} against {}", op.name(), n.base))?;
            let status = resp.status();
            if !status.is_success() {
                bail!(
                    "{} against {}: {status}: {}",
                    op.name(),
                    n.base,
                    resp.text().await.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

async fn phase(
    args: &Args,
    target: &Target,
    http: &reqwest::Client,
    mix: &Mix,
) -> Result<PhaseReport> {
    let endpoints = target
        .nodes
        .iter()
        .map(|n| Endpoint::new(&n.base))
        .collect::<Result<Vec<_>>>()?;
    // Build every client (its TLS setup included) before the clock starts.
    let clients = (0..args.clients)
        .map(|_| target.http(Duration::from_secs(10)))
        .collect::<Result<Vec<_>>>()?;
    let before = sample(http, target, true).await;
    let start = Instant::now();
    let shared = Arc::new(Shared {
        endpoints,
        schedule: mix.schedule(),
        admin: target.admin_token.clone(),
        subjects: target.subject_tokens.clone(),
        measure_from: start + args.warmup,
        end: start + args.warmup + args.duration,
    });
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(client(i, c, shared.clone())))
        .collect();
    let mut merged: BTreeMap<Op, OpTally> = mix.ops().map(|op| (op, OpTally::new())).collect();
    let mut last_done = shared.measure_from;
    for t in tasks {
        let c = t.await.context("a load client panicked")?;
        last_done = last_done.max(c.last_done);
        for (op, tally) in c.ops {
            merged
                .get_mut(&op)
                .expect("clients tally the mix's ops")
                .merge(tally)?;
        }
    }
    let after = sample(http, target, false).await;
    let elapsed = last_done - shared.measure_from;

    let mut ops = Vec::new();
    let mut total = OpTally::new();
    let mut authenticated_answered = 0;
    for op in mix.ops() {
        let tally = merged.remove(&op).expect("one tally per op");
        if let Some(e) = &tally.first_error {
            note(&format!("{} errors; first: {e}", tally.error_count()));
        }
        if op.authenticated() {
            authenticated_answered += tally.answered;
        }
        ops.push(op_report(op.name(), &tally, elapsed));
        total.merge(tally)?;
    }
    ops.push(op_report("total", &total, elapsed));
    let (node_side, cpu) = deltas(target, &before, &after);
    Ok(PhaseReport {
        phase: mix.to_string(),
        clients: args.clients,
        nodes: target.nodes.len(),
        warmup_s: args.warmup.as_secs_f64(),
        duration_s: elapsed.as_secs_f64(),
        ops,
        authenticated_answered,
        node_side,
        window_s: (after.at - before.at).as_secs_f64(),
        cpu,
    })
}

fn op_report(name: &str, t: &OpTally, elapsed: Duration) -> OpReport {
    OpReport {
        summary: Summary::new(name, &t.hist, t.error_count(), elapsed),
        errors_by_kind: t.errors.clone(),
    }
}

fn emit(args: &Args, r: &PhaseReport) -> Result<()> {
    if args.json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!("{}", table(r));
    }
    Ok(())
}

fn opt<T: fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| v.to_string())
}

/// The human-readable report of a phase: the operations, then what the nodes did.
fn table(r: &PhaseReport) -> String {
    let mut out = String::new();
    if r.ops.is_empty() {
        let _ = writeln!(
            out,
            "idle control: no load for {:.1}s, {} nodes",
            r.duration_s, r.nodes
        );
    } else {
        let _ = writeln!(
            out,
            "mix {}: {} clients over {} nodes, {:.1}s measured after {:.1}s warm-up",
            r.phase, r.clients, r.nodes, r.duration_s, r.warmup_s
        );
        let summaries: Vec<Summary> = r.ops.iter().map(|o| o.summary.clone()).collect();
        out.push_str(&report::table(&summaries, None));
        for o in r.ops.iter().filter(|o| !o.errors_by_kind.is_empty()) {
            let kinds: Vec<String> = o
                .errors_by_kind
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = writeln!(out, "{} errors: {}", o.summary.target, kinds.join(", "));
        }
    }
    let _ = writeln!(
        out,
        "{:<24} {:>7} {:>15} {:>15} {:>11} {:>9} {:>10} {:>11} {:>8} {:>6}",
        "node (whole phase)",
        "pid",
        "raft last log",
        "raft applied",
        "validations",
        "peer rpc/s",
        "read_bytes",
        "write_bytes",
        "syscr",
        "cpu"
    );
    let span = |b: Option<u64>, a: Option<u64>| match (b, a) {
        (Some(b), Some(a)) => format!("{b}→{a}"),
        _ => "n/a".into(),
    };
    for n in &r.node_side {
        let _ = writeln!(
            out,
            "{:<24} {:>7} {:>15} {:>15} {:>11} {:>9} {:>10} {:>11} {:>8} {:>6}",
            n.node,
            opt(n.pid),
            span(n.last_log_index_before, n.last_log_index_after),
            span(n.applied_index_before, n.applied_index_after),
            opt(n.token_validations.map(|v| format!("+{v}"))),
            opt(n.peer_rpcs.map(|v| format!("{:.0}", v as f64 / r.window_s))),
            opt(n.io.map(|io| io.read_bytes)),
            opt(n.io.map(|io| io.write_bytes)),
            opt(n.io.map(|io| io.syscr)),
            opt(n.cpu_cores.map(|c| format!("{c:.2}"))),
        );
    }
    let _ = writeln!(out, "{}", verdict(r));
    let c = &r.cpu;
    let _ = write!(
        out,
        "cpu (cores): machine busy {} = nodes {} + loadtest {} + other {}; of it in \
         irq+softirq {}; cores {}",
        opt(c.busy.map(|v| format!("{v:.2}"))),
        opt(c.nodes.map(|v| format!("{v:.2}"))),
        opt(c.loadtest.map(|v| format!("{v:.2}"))),
        opt(c.other.map(|v| format!("{v:.2}"))),
        opt(c.interrupts.map(|v| format!("{v:.2}"))),
        opt(c.cores)
    );
    out
}

/// What the node-side deltas say about Raft and the disk, in a sentence.
fn verdict(r: &PhaseReport) -> String {
    let log: Option<u64> = r
        .node_side
        .iter()
        .map(|n| advance(n.last_log_index_before, n.last_log_index_after))
        .sum();
    let applied: Option<u64> = r
        .node_side
        .iter()
        .map(|n| advance(n.applied_index_before, n.applied_index_after))
        .collect::<Option<Vec<_>>>()
        .and_then(|v| v.into_iter().max());
    let io: Option<Vec<ProcIo>> = r.node_side.iter().map(|n| n.io).collect();
    let validations: Option<u64> = r.node_side.iter().map(|n| n.token_validations).sum();
    let rpcs: Option<u64> = r.node_side.iter().map(|n| n.peer_rpcs).sum();
    let mut s = match (log, applied) {
        (Some(0), Some(0)) => "raft: no node's log or applied index moved".to_owned(),
        (Some(l), Some(a)) => format!(
            "raft: MOVED, {l} log entries appended over the nodes, applied index up to +{a}"
        ),
        _ => "raft: n/a (the nodes' /metrics lack the Raft indexes)".to_owned(),
    };
    let _ = write!(
        s,
        ", peer RPCs {}/s",
        opt(rpcs.map(|v| format!("{:.0}", v as f64 / r.window_s)))
    );
    match io {
        Some(io) => {
            let rb: u64 = io.iter().map(|i| i.read_bytes).sum();
            let wb: u64 = io.iter().map(|i| i.write_bytes).sum();
            let _ = write!(s, "; storage: {rb} B read, {wb} B written by the nodes");
        }
        None => s.push_str("; storage: n/a (node processes not visible from here)"),
    }
    if !r.ops.is_empty() {
        let _ = write!(
            s,
            "; token validations counted {} for {} authenticated answers",
            opt(validations),
            r.authenticated_answered
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        api: Args,
    }

    #[test]
    fn mix_parses_weights_in_order() {
        let m = Mix::parse("validate=70, flavors=30").unwrap();
        assert_eq!(m.0, vec![(Op::Validate, 70), (Op::Flavors, 30)]);
        assert_eq!(m.to_string(), "validate=70,flavors=30");
        let m = Mix::parse("check=1,versions=0,validate=2").unwrap();
        assert_eq!(
            m.0,
            vec![(Op::Check, 1), (Op::Validate, 2)],
            "a 0 weight drops the op"
        );
    }

    #[test]
    fn bad_mixes_say_what_is_wrong() {
        let err = |s: &str| Mix::parse(s).unwrap_err();
        assert!(err("").contains("empty entry"), "{}", err(""));
        assert!(err("validate=70,").contains("empty entry"));
        assert!(err("validate").contains("is not OP=WEIGHT"));
        let e = err("validate=70,list=30");
        assert!(e.contains("unknown operation \"list\""), "{e}");
        assert!(e.contains("validate, check, flavors, versions"), "{e}");
        assert!(err("validate=seventy").contains("not a whole number from 0 to 10000"));
        assert!(err("validate=-1").contains("not a whole number"));
        assert!(err("validate=10001").contains("not a whole number"));
        assert!(err("validate=1,validate=2").contains("appears twice"));
        assert!(err("validate=0,flavors=0").contains("at least one must be positive"));
    }

    #[test]
    fn schedule_holds_the_mix_exactly_and_spreads_it() {
        let s = Mix::parse("validate=70,flavors=30").unwrap().schedule();
        assert_eq!(s.len(), 10, "reduced by the gcd");
        assert_eq!(s.iter().filter(|o| **o == Op::Flavors).count(), 3);
        // Never more than three validations in a row, cycling round.
        let run = s
            .iter()
            .cycle()
            .take(20)
            .collect::<Vec<_>>()
            .split(|o| **o == Op::Flavors)
            .map(<[_]>::len)
            .max()
            .unwrap();
        assert!(run <= 3, "{s:?}");
        let s = Mix::parse("validate=1,check=1,flavors=1,versions=1")
            .unwrap()
            .schedule();
        assert_eq!(s, Op::ALL.to_vec());
        assert_eq!(
            Mix::parse("versions=100").unwrap().schedule(),
            vec![Op::Versions]
        );
    }

    #[test]
    fn every_op_meets_every_node() {
        for (ops, nodes) in [(1, 3), (2, 3), (3, 3), (10, 3), (4, 2), (6, 4), (5, 1)] {
            let mut seen = std::collections::HashMap::new();
            let cycle = ops * nodes * nodes;
            for k in 0..cycle {
                let (o, n) = pick(k, ops, nodes);
                assert!(o < ops && n < nodes);
                *seen.entry((o, n)).or_insert(0) += 1;
            }
            assert_eq!(
                seen.len(),
                ops * nodes,
                "{ops} ops over {nodes} nodes: {seen:?}"
            );
            let per_node = (0..nodes)
                .map(|n| {
                    seen.iter()
                        .filter(|((_, m), _)| *m == n)
                        .map(|(_, c)| c)
                        .sum()
                })
                .collect::<Vec<usize>>();
            assert!(per_node.iter().all(|c| *c == cycle / nodes), "{per_node:?}");
        }
    }

    #[test]
    fn args_defaults_and_bad_flags() {
        let a = Cli::try_parse_from(["api"]).unwrap().api;
        assert_eq!((a.clients, a.nodes, a.tokens, a.flavors), (32, 3, 16, 5));
        assert_eq!(
            a.mixes.iter().map(Mix::to_string).collect::<Vec<_>>(),
            ["validate=100", "validate=70,flavors=30"]
        );
        assert_eq!(a.idle, Duration::from_secs(5));
        let a = Cli::try_parse_from([
            "api",
            "--mix",
            "flavors=1",
            "--mix",
            "versions=1",
            "--url",
            "https://a:1,https://b:2",
            "--idle",
            "0",
        ])
        .unwrap()
        .api;
        assert_eq!(a.mixes.len(), 2);
        assert_eq!(a.urls, ["https://a:1", "https://b:2"]);
        assert!(a.idle.is_zero());
        let e = Cli::try_parse_from(["api", "--mix", "validate=70,flavor=30"]).unwrap_err();
        assert!(
            e.to_string().contains("unknown operation \"flavor\""),
            "{e}"
        );
        assert!(Cli::try_parse_from(["api", "--clients", "0"]).is_err());
        assert!(Cli::try_parse_from(["api", "--duration", "0"]).is_err());
    }

    #[test]
    fn reads_the_metrics_it_needs() {
        let text = "# HELP shoal_raft_applied_index x\n# TYPE shoal_raft_applied_index gauge\n\
                    shoal_raft_applied_index 42\nshoal_raft_role{role=\"leader\"} 1\n\
                    shoal_api_token_validations_total 7\nshoal_raft_applied_index_other 9\n";
        let v = prometheus_values(text, &METRICS);
        assert_eq!(v.get("shoal_raft_applied_index"), Some(&42));
        assert_eq!(v.get("shoal_api_token_validations_total"), Some(&7));
        assert_eq!(v.get("shoal_raft_last_log_index"), None);
        let rpcs = "shoal_peer_rpc_duration_seconds_bucket{rpc=\"vote\",le=\"0.1\"} 3\n\
                    shoal_peer_rpc_duration_seconds_count{rpc=\"append_entries\"} 40\n\
                    shoal_peer_rpc_duration_seconds_count{rpc=\"linearizable_read\"} 2\n";
        let v = prometheus_values(rpcs, &METRICS);
        assert_eq!(v.get("shoal_peer_rpc_duration_seconds_count"), Some(&42));
    }

    fn phase_with(log: (u64, u64), read_bytes: u64) -> PhaseReport {
        let node = NodeDelta {
            node: "http://127.0.0.1:1".into(),
            pid: Some(1),
            last_log_index_before: Some(log.0),
            last_log_index_after: Some(log.1),
            applied_index_before: Some(log.0),
            applied_index_after: Some(log.1),
            commit_index_delta: Some(log.1 - log.0),
            token_validations: Some(10),
            peer_rpcs: Some(30),
            io: Some(ProcIo {
                read_bytes,
                ..ProcIo::default()
            }),
            cpu_cores: Some(0.5),
        };
        let mut h = report::new_histogram();
        h.record(100).unwrap();
        PhaseReport {
            phase: "validate=100".into(),
            clients: 1,
            nodes: 1,
            warmup_s: 0.0,
            duration_s: 1.0,
            ops: vec![OpReport {
                summary: Summary::new("validate", &h, 2, Duration::from_secs(1)),
                errors_by_kind: BTreeMap::from([("HTTP 401".to_owned(), 2)]),
            }],
            authenticated_answered: 10,
            node_side: vec![node],
            window_s: 3.0,
            cpu: CpuUse {
                nodes: Some(0.5),
                busy: Some(0.6),
                loadtest: Some(0.1),
                other: Some(0.0),
                interrupts: Some(0.2),
                cores: Some(2),
            },
        }
    }

    #[test]
    fn the_verdict_reports_raft_and_disk_as_measured() {
        let quiet = phase_with((5, 5), 0);
        let v = verdict(&quiet);
        assert!(v.contains("no node's log or applied index moved"), "{v}");
        assert!(v.contains("0 B read"), "{v}");
        assert!(v.contains("counted 10 for 10"), "{v}");
        let busy = phase_with((5, 9), 4096);
        let v = verdict(&busy);
        assert!(v.contains("MOVED, 4 log entries"), "{v}");
        assert!(v.contains("4096 B read"), "{v}");
        let t = table(&busy);
        assert!(t.contains("validate errors: HTTP 401: 2"), "{t}");
        assert!(t.contains("5→9"), "{t}");
        assert!(t.contains(" 10 "), "30 peer RPCs in 3 s: {t}");
        let j = serde_json::to_value(&busy).unwrap();
        assert_eq!(j["ops"][0]["target"], "validate");
        assert_eq!(j["ops"][0]["errors"], 2);
        assert_eq!(j["ops"][0]["errors_by_kind"]["HTTP 401"], 2);
        assert_eq!(j["node_side"][0]["io"]["read_bytes"], 4096);
    }
}
