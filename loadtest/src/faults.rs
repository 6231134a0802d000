//! `shoal-loadtest faults`: a Shoal cluster under the nemesis of `node/tests/t23_nemesis.rs`
//! for a chosen time, and how available it stays, as a client sees it. One fault at a time,
//! each healed before the next: `kill -9` and restart of the leader and of a random node,
//! SIGSTOP/SIGCONT of a random node, and (root and `nft`) partitions of the leader and of a
//! minority, made of nftables rules on the nodes' QUIC ports in a table of our own.
//!
//! For every fault, every node gets a write attempt every few milliseconds from the moment the
//! fault begins (nodes the fault hits: from the moment it is healed) until one is acknowledged.
//! The table gives, per kind of fault, the time from the fault to the first acknowledged write
//! through any node it did not hit and through every node it did not hit (the serving nodes),
//! and the time from healing to the first acknowledged write through every node it hit. Clients
//! write through random nodes all along; their answers are counted.
//!
//! The linearizability of what the clients see is checked by the test, not here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::procs::{free_ports, signal, ProcGuard};
use crate::raft::{http_client, install_crypto_provider, parse_duration, shoal_bin, TempDir};
use crate::report::nearest_rank;
use crate::shoal_client::{issue_token, OpenRc, ShoalWriter};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// How long faults are injected: 5m, 300s.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub duration: Duration,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(3..=9))]
    pub nodes: u16,
    /// Voters among them (1, 3 or 5; the rest are learners).
    #[arg(long, default_value_t = 5)]
    pub voters: u16,
    /// Clients writing through random nodes throughout.
    #[arg(long, default_value_t = 10)]
    pub clients: u32,
    /// Seed of the nemesis' choices (default: random, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The `shoal` binary (default: next to this executable, then on PATH).
    #[arg(long)]
    pub shoal_bin: Option<PathBuf>,
    /// Keep the cluster's data and logs here.
    #[arg(long)]
    pub keep_dir: Option<PathBuf>,
    /// One JSON object per fault kind instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillLeader,
    KillRandom,
    Pause,
    PartitionLeader,
    PartitionMinority,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill -9 leader",
            Fault::KillRandom => "kill -9 random node",
            Fault::Pause => "SIGSTOP random node",
            Fault::PartitionLeader => "partition leader",
            Fault::PartitionMinority => "partition minority",
        }
    }
}

/// An nftables table of ours on the output hook, deleted on drop.
struct Firewall {
    table: String,
}

impl Firewall {
    fn new() -> Result<Self> {
        let fw = Self {
            table: format!("shoal_loadtest_faults_{}", std::process::id()),
        };
        fw.run(&format!(
            "add table inet {t}\nadd chain inet {t} out {{ type filter hook output priority 0; \
             policy accept; }}\n",
            t = fw.table
        ))?;
        Ok(fw)
    }

    fn run(&self, script: &str) -> Result<()> {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("running nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())?;
        if !child.wait()?.success() {
            bail!("nft -f failed on:\n{script}");
        }
        Ok(())
    }

    /// Drops the UDP packets between the ports of `a` and those of `b`, both ways.
    fn partition(&self, a: &[u16], b: &[u16]) -> Result<()> {
        let set = |p: &[u16]| {
            let v: Vec<String> = p.iter().map(u16::to_string).collect();
            format!("{{ {} }}", v.join(", "))
        };
        let (a, b) = (set(a), set(b));
        self.run(&format!(
            "add rule inet {t} out udp sport {a} udp dport {b} drop\n\
             add rule inet {t} out udp sport {b} udp dport {a} drop\n",
            t = self.table
        ))
    }

    fn heal(&self) -> Result<()> {
        self.run(&format!("flush chain inet {} out\n", self.table))
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

struct Node {
    name: String,
    dir: PathBuf,
    peer_port: u16,
    base: String,
    pid: u32,
}

/// N `shoal` processes we started ourselves (init, then joins), so that each can be killed,
/// paused and restarted alone.
struct Cluster {
    bin: PathBuf,
    logs: PathBuf,
    nodes: Vec<Node>,
    token: String,
    restarts: usize,
}

impl Cluster {
    async fn start(
        procs: &mut ProcGuard,
        bin: &Path,
        dir: &Path,
        n: usize,
        voters: u16,
        http: &reqwest::Client,
    ) -> Result<Self> {
        let ports = free_ports(2 * n)?;
        let node = |i: usize| Node {
            name: format!("node{}", i + 1),
            dir: dir.join(format!("node{}", i + 1)),
            peer_port: ports[2 * i],
            base: format!("http://127.0.0.1:{}", ports[2 * i + 1]),
            pid: 0,
        };
        let mut nodes: Vec<Node> = (0..n).map(node).collect();
        let common = |nd: &Node| -> Vec<String> {
            vec![
                "--data-dir".into(),
                nd.dir.display().to_string(),
                "--name".into(),
                nd.name.clone(),
                "--listen".into(),
                format!("127.0.0.1:{}", nd.peer_port),
                "--api".into(),
                nd.base.trim_start_matches("http://").to_owned(),
                "--libvirt-uri".into(),
                "test:///default".into(),
            ]
        };
        let mut cmd = Command::new(bin);
        cmd.arg("init")
            .args(common(&nodes[0]))
            .args(["--voters", &voters.to_string()]);
        nodes[0].pid = procs.spawn("node1", cmd, &dir.join("node1.log"))?;
        let openrc = nodes[0].dir.join("admin-openrc");
        let deadline = Instant::now() + Duration::from_secs(120);
        let token = loop {
            procs.check_running()?;
            if let Ok(text) = std::fs::read_to_string(&openrc) {
                if let Ok(rc) = OpenRc::parse(&text) {
                    if let Ok(t) = issue_token(http, &rc).await {
                        break t;
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("node1 did not issue a token within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let resp = http
            .post(format!("{}/shoal/v1/join-tokens", nodes[0].base))
            .header("x-auth-token", &token)
            .json(&json!({ "uses": n - 1, "ttl_secs": 3600 }))
            .send()
            .await?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await?;
        if !status.is_success() {
            bail!("creating a join token: {status}: {body}");
        }
        let join_token = body["token"]
            .as_str()
            .context("no token in the join-token reply")?;
        let token_file = dir.join("join-token");
        std::fs::write(&token_file, join_token)?;
        for i in 1..n {
            let mut cmd = Command::new(bin);
            // `--voters` on every node, not only at init: each leader plans the voter set from
            // its own setting, so a joiner left at the default 3 would shrink the voter set
            // whenever it leads (a bug this scenario found, see docs/benchmarks.md).
            cmd.arg("join")
                .args(common(&nodes[i]))
                .args(["--voters", &voters.to_string()])
                .arg("--token-file")
                .arg(&token_file)
                .arg(format!("127.0.0.1:{}", nodes[0].peer_port));
            let name = nodes[i].name.clone();
            nodes[i].pid = procs.spawn(&name, cmd, &dir.join(format!("{name}.log")))?;
            // One join at a time: each waits to be served before the next is started.
            let w = ShoalWriter::new(http.clone(), &nodes[i].base, &token);
            let deadline = Instant::now() + Duration::from_secs(120);
            while w.status().await.is_err() {
                procs.check_running()?;
                if Instant::now() > deadline {
                    bail!("{name} did not join within 120 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let cluster = Self {
            bin: bin.to_owned(),
            logs: dir.to_owned(),
            nodes,
            token,
            restarts: 0,
        };
        let want_voters = usize::from(voters).min(n);
        let w = cluster.writer(http, 0);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(st) = w.status().await {
                let voters = st
                    .members
                    .iter()
                    .filter(|m| m.role == "leader" || m.role == "voter")
                    .count();
                if st.settled(n) && voters == want_voters {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("the cluster did not settle with {want_voters} voters within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(cluster)
    }

    fn writer(&self, http: &reqwest::Client, i: usize) -> ShoalWriter {
        ShoalWriter::new(http.clone(), &self.nodes[i].base, &self.token)
    }

    /// The current leader's index, as node `asker` sees it; tries every node.
    async fn leader(&self, http: &reqwest::Client) -> Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for i in 0..self.nodes.len() {
                if let Ok(st) = self.writer(http, i).status().await {
                    if let Some(l) = st.leader {
                        if let Some(pos) = self.nodes.iter().position(|n| n.name == l) {
                            return Ok(pos);
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no leader known after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn restart(&mut self, procs: &mut ProcGuard, i: usize) -> Result<()> {
        self.restarts += 1;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("start").arg("--data-dir").arg(&self.nodes[i].dir);
        let log = self.logs.join(format!("{}.log", self.nodes[i].name));
        self.nodes[i].pid = procs.spawn(
            &format!("{} (restart {})", self.nodes[i].name, self.restarts),
            cmd,
            &log,
        )?;
        Ok(())
    }
}

/// A write attempt through one node is started this often until one is acknowledged.
const ATTEMPT_EVERY: Duration = Duration::from_millis(20);
/// Each attempt's own limit: longer than an election, so a slow success still counts.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// A node that serves no write this long after its fault (or its healing) fails the run.
const SERVE_LIMIT: Duration = Duration::from_secs(60);

/// Starts overlapping writes through `via` from now on until one is acknowledged; the time from
/// `since` to that acknowledgement.
async fn first_write(via: ShoalWriter, prefix: String, since: Instant) -> Result<Duration> {
    let mut attempts = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(ATTEMPT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let deadline = tokio::time::sleep_until((since + SERVE_LIMIT).into());
    tokio::pin!(deadline);
    let mut n = 0u64;
    let mut last = String::new();
    loop {
        tokio::select! {
            _ = &mut deadline => bail!("{} served no write within {SERVE_LIMIT:?}; last error: {last}", via.base()),
            Some(done) = attempts.join_next() => match done? {
                Ok(_) => return Ok(since.elapsed()),
                Err(e) => last = format!("{e:#}"),
            },
            _ = tick.tick() => {
                let (via, key) = (via.clone(), format!("{prefix}/{n}"));
                n += 1;
                attempts.spawn(async move { via.put(&key, b"probe").await });
            }
        }
    }
}

/// Seconds since the Unix epoch, as the nodes' logs and their `shoal::failover` trace count
/// time, so a fault can be lined up with what each node saw
/// (`loadtest/scripts/faults_breakdown.py`).
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One fault's measurements.
#[derive(Debug, Clone)]
struct Trial {
    fault: Fault,
    /// The names of the nodes it hit.
    hit: Vec<String>,
    /// Wall clock (Unix seconds) of the fault and of its healing (restart, SIGCONT, rules
    /// flushed).
    fault_unix: f64,
    healed_unix: f64,
    /// Per node, the wall clock of its first acknowledged write after the fault (after the
    /// healing for a node it hit).
    served_unix: BTreeMap<String, f64>,
    /// To the first write through any node the fault did not hit, from the fault.
    any: Duration,
    /// To the first write through every node the fault did not hit, from the fault.
    every: Duration,
    /// To the last hit node's first write after healing.
    healed: Option<Duration>,
}

/// What the background clients saw.
#[derive(Default)]
struct Load {
    answers: BTreeMap<String, u64>,
    /// The slowest acknowledged write and the slowest error.
    slowest_ok: Duration,
    slowest_error: Duration,
}

async fn load_client(
    writers: Vec<ShoalWriter>,
    id: u32,
    seed: u64,
    stop: Arc<AtomicBool>,
    load: Arc<Mutex<Load>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let w = &writers[rng.random_range(0..writers.len())];
        seq += 1;
        let started = Instant::now();
        let res = w.put(&format!("load/{id}/{seq}"), b"value").await;
        let took = started.elapsed();
        let label = match &res {
            Ok(_) => "200".to_owned(),
            Err(e) => {
                // An answer's error starts with its status; anything else never got one.
                let text = format!("{e:#}");
                match text.get(..3) {
                    Some(code) if code.bytes().all(|b| b.is_ascii_digit()) => code.to_owned(),
                    _ if text.contains("timed out") => "timeout".into(),
                    _ => "connection".into(),
                }
            }
        };
        {
            let mut l = load.lock().unwrap();
            *l.answers.entry(label).or_default() += 1;
            if res.is_ok() {
                l.slowest_ok = l.slowest_ok.max(took);
            } else {
                l.slowest_error = l.slowest_error.max(took);
            }
        }
        if res.is_err() {
            // A refused connection fails in microseconds: do not spin on a dead node.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn note(msg: &str) {
    eprintln!("[faults] {msg}");
}

pub async fn run(args: Args) -> Result<()> {
    install_crypto_provider();
    if ![1, 3, 5].contains(&args.voters) {
        bail!("--voters must be 1, 3 or 5");
    }
    let bin = shoal_bin(args.shoal_bin.as_deref())?;
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    note(&format!("seed {seed}"));
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let firewall = if root && Command::new("nft").arg("--version").output().is_ok() {
        Some(Firewall::new()?)
    } else {
        note("not root or no nft: partitions are left out");
        None
    };
    let dir = TempDir::new(args.keep_dir.as_deref())?;
    let mut procs = ProcGuard::new();
    note(&format!("data and logs in {}", dir.path().display()));
    let work = run_nemesis(&args, &bin, seed, firewall.as_ref(), &mut procs, dir.path());
    let res = crate::raft::until_signal(work).await?;
    // Heal before anything else, so a stopped node does not outlive us.
    if let Some(fw) = &firewall {
        let _ = fw.heal();
    }
    match res {
        Ok(trials) => {
            print_table(&args, &trials)?;
            Ok(())
        }
        Err(e) => {
            drop(procs);
            note(&format!("kept {} for its logs", dir.path().display()));
            dir.keep();
            Err(e)
        }
    }
}

async fn run_nemesis(
    args: &Args,
    bin: &Path,
    seed: u64,
    firewall: Option<&Firewall>,
    procs: &mut ProcGuard,
    dir: &Path,
) -> Result<Vec<Trial>> {
    let http = http_client(Duration::from_secs(5))?;
    let n = usize::from(args.nodes);
    note(&format!("starting {n} nodes, {} voters", args.voters));
    let mut cluster = Cluster::start(procs, bin, dir, n, args.voters, &http).await?;
    let mut rng = StdRng::seed_from_u64(seed);
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(Load::default()));
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..args.clients {
        let writers: Vec<ShoalWriter> = (0..n)
            .map(|i| {
                Ok(ShoalWriter::new(
                    http_client(Duration::from_secs(15))?,
                    &cluster.nodes[i].base,
                    &cluster.token,
                ))
            })
            .collect::<Result<_>>()?;
        clients.spawn(load_client(
            writers,
            id,
            seed.wrapping_add(u64::from(id) + 1),
            stop.clone(),
            load.clone(),
        ));
    }
    let mut kinds = vec![Fault::KillLeader, Fault::KillRandom, Fault::Pause];
    if firewall.is_some() {
        kinds.extend([Fault::PartitionLeader, Fault::PartitionMinority]);
    }
    let probe_http = http_client(ATTEMPT_TIMEOUT)?;
    let end = Instant::now() + args.duration;
    let mut round: Vec<Fault> = Vec::new();
    let mut trials = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..2500))).await;
        if round.is_empty() {
            round = kinds.clone();
            round.shuffle(&mut rng);
        }
        let fault = round.pop().expect("a round is never empty");
        let hold = Duration::from_millis(rng.random_range(2000..4500));
        let leader = cluster.leader(&http).await?;
        let hit: Vec<usize> = match fault {
            Fault::KillLeader | Fault::PartitionLeader => vec![leader],
            Fault::KillRandom | Fault::Pause => vec![rng.random_range(0..n)],
            Fault::PartitionMinority => {
                let mut order: Vec<usize> = (0..n).collect();
                order.shuffle(&mut rng);
                order.truncate((n - 1) / 2);
                order
            }
        };
        let trial_no = trials.len();
        let fault_at = Instant::now();
        let fault_unix = unix_now();
        match fault {
            Fault::KillLeader | Fault::KillRandom => procs.kill(cluster.nodes[hit[0]].pid)?,
            Fault::Pause => signal(cluster.nodes[hit[0]].pid, libc::SIGSTOP)?,
            Fault::PartitionLeader | Fault::PartitionMinority => {
                let port = |i: &usize| cluster.nodes[*i].peer_port;
                let a: Vec<u16> = hit.iter().map(port).collect();
                let b: Vec<u16> = (0..n)
                    .filter(|i| !hit.contains(i))
                    .map(|i| port(&i))
                    .collect();
                firewall
                    .expect("partitions need the firewall")
                    .partition(&a, &b)?;
            }
        }
        let mut probes = tokio::task::JoinSet::new();
        for i in (0..n).filter(|i| !hit.contains(i)) {
            let w = ShoalWriter::new(probe_http.clone(), &cluster.nodes[i].base, &cluster.token);
            let prefix = format!("probe/{trial_no}/{i}");
            probes.spawn(async move { (i, first_write(w, prefix, fault_at).await) });
        }
        tokio::time::sleep(hold).await;
        match fault {
            Fault::KillLeader | Fault::KillRandom => cluster.restart(procs, hit[0])?,
            Fault::Pause => signal(cluster.nodes[hit[0]].pid, libc::SIGCONT)?,
            Fault::PartitionLeader | Fault::PartitionMinority => {
                firewall.expect("partitions need the firewall").heal()?
            }
        }
        let healed_at = Instant::now();
        let healed_unix = unix_now();
        for &i in &hit {
            let w = ShoalWriter::new(probe_http.clone(), &cluster.nodes[i].base, &cluster.token);
            let prefix = format!("probe/{trial_no}/{i}");
            probes.spawn(async move { (i, first_write(w, prefix, healed_at).await) });
        }
        let mut any = Duration::MAX;
        let mut every = Duration::ZERO;
        let mut healed: Option<Duration> = None;
        let mut served_unix = BTreeMap::new();
        while let Some(done) = probes.join_next().await {
            let (i, took) = done?;
            let took = took
                .with_context(|| format!("after {} ({})", fault.name(), cluster.nodes[i].name))?;
            if hit.contains(&i) {
                served_unix.insert(
                    cluster.nodes[i].name.clone(),
                    healed_unix + took.as_secs_f64(),
                );
                healed = Some(healed.unwrap_or_default().max(took));
            } else {
                served_unix.insert(
                    cluster.nodes[i].name.clone(),
                    fault_unix + took.as_secs_f64(),
                );
                any = any.min(took);
                every = every.max(took);
            }
        }
        let hit: Vec<String> = hit.iter().map(|&i| cluster.nodes[i].name.clone()).collect();
        note(&format!(
            "{:>4} {} ({}), held {:.1} s: first write {:.0} ms, every node {:.0} ms, hit nodes \
             {:.0} ms after healing; fault at {fault_unix:.6}, healed at {healed_unix:.6} \
             (unix s); served at {}",
            trial_no,
            fault.name(),
            hit.join("+"),
            hold.as_secs_f64(),
            any.as_secs_f64() * 1e3,
            every.as_secs_f64() * 1e3,
            healed.unwrap_or_default().as_secs_f64() * 1e3,
            served_unix
                .iter()
                .map(|(n, t)| format!("{n}={t:.6}"))
                .collect::<Vec<_>>()
                .join(" "),
        ));
        trials.push(Trial {
            fault,
            hit,
            fault_unix,
            healed_unix,
            served_unix,
            any,
            every,
            healed,
        });
        procs.check_running()?;
    }
    stop.store(true, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    let l = load.lock().unwrap();
    note(&format!(
        "client writes: {:?}; slowest acknowledged {:.2} s, slowest error {:.2} s",
        l.answers,
        l.slowest_ok.as_secs_f64(),
        l.slowest_error.as_secs_f64()
    ));
    Ok(trials)
}

fn print_table(args: &Args, trials: &[Trial]) -> Result<()> {
    let mut by_kind: BTreeMap<Fault, Vec<&Trial>> = BTreeMap::new();
    for t in trials {
        by_kind.entry(t.fault).or_default().push(t);
    }
    let stats = |mut v: Vec<Duration>| -> Option<[f64; 3]> {
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        Some([
            ms(nearest_rank(&v, 0.5)),
            ms(nearest_rank(&v, 0.99)),
            ms(v[v.len() - 1]),
        ])
    };
    let mut out = String::new();
    if args.json {
        // One object per fault first, on the wall clock, then one per kind.
        let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        for (i, t) in trials.iter().enumerate() {
            println!(
                "{}",
                json!({"trial": i, "fault": t.fault.name(), "hit": t.hit,
                       "fault_unix": t.fault_unix, "healed_unix": t.healed_unix,
                       "served_unix": t.served_unix, "any_ms": ms(t.any),
                       "every_ms": ms(t.every), "hit_after_heal_ms": t.healed.map(ms)})
            );
        }
    } else {
        writeln!(
            out,
            "{:<22} {:>3}  {:>24}  {:>24}  {:>24}",
            "fault",
            "n",
            "any node p50/p99/max",
            "every serving p50/p99/max",
            "hit, after heal p50/p99/max"
        )?;
    }
    for (fault, ts) in &by_kind {
        let any = stats(ts.iter().map(|t| t.any).collect());
        let every = stats(ts.iter().map(|t| t.every).collect());
        let healed = stats(ts.iter().filter_map(|t| t.healed).collect());
        if args.json {
            println!(
                "{}",
                json!({"fault": fault.name(), "trials": ts.len(), "any_ms": any,
                       "every_ms": every, "hit_after_heal_ms": healed})
            );
            continue;
        }
        let cell = |s: Option<[f64; 3]>| {
            s.map_or("-".to_owned(), |[a, b, c]| format!("{a:.0}/{b:.0}/{c:.0}"))
        };
        writeln!(
            out,
            "{:<22} {:>3}  {:>24}  {:>24}  {:>24}",
            fault.name(),
            ts.len(),
            cell(any),
            cell(every),
            cell(healed)
        )?;
    }
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        faults: Args,
    }

    #[test]
    fn args_defaults_and_flags() {
        let a = Cli::try_parse_from(["faults"]).unwrap().faults;
        assert_eq!(
            (a.duration, a.nodes, a.voters),
            (Duration::from_secs(300), 5, 5)
        );
        let a = Cli::try_parse_from(["faults", "--duration", "90s", "--nodes", "3", "--seed", "7"])
            .unwrap()
            .faults;
        assert_eq!(
            (a.duration, a.nodes, a.seed),
            (Duration::from_secs(90), 3, Some(7))
        );
        assert!(Cli::try_parse_from(["faults", "--nodes", "2"]).is_err());
    }
}
