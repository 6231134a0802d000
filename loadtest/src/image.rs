//! `shoal-loadtest image`: the image streamer on a real local cluster of `shoal` processes.
//!
//! - `pull`: a 3-node `shoal dev` cluster; an image of incompressible bytes is uploaded through
//!   the Image API to node1 (replication 2, so node1 and one replica hold every chunk) and the
//!   third node pulls it into its cache (`POST /shoal/v1/images/{id}/pull`), alternating with a
//!   `cp` of the same source file onto the same disk followed by an fsync of the copy (the pull
//!   fsyncs too). The cached copy is deleted between runs.
//! - `storm`: an N-node cluster; a 1 GiB image is uploaded the same way, one non-holder pulls it
//!   alone, then every non-holder pulls it at once. The ratio of the storm's wall time to the
//!   lone pull is what a central image server would make N×.
//!
//! Around every timed pull it reads each node's CPU time (/proc/PID/stat) and the machine's
//! (/proc/stat), so that the numbers say what they were bound by. Overlay creation against
//! `qemu-img create` is `shoal-loadtest overlay`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::procs::{self, pid_listening_on, ProcGuard};
use crate::raft::{install_crypto_provider, shoal_bin, until_signal, TempDir};
use crate::shoal_client::ShoalCluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    Pull,
    Storm,
    All,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Which measurement to run.
    #[arg(long, value_enum, default_value_t = Phase::All)]
    pub phase: Phase,
    /// Image size of the pull phase (K/M/G as qemu-img reads them).
    #[arg(long, default_value = "2G")]
    pub size: String,
    /// Image size of the storm phase.
    #[arg(long, default_value = "1G")]
    pub storm_size: String,
    /// Members of the storm cluster (two hold the image, the others pull it).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u16).range(3..=9))]
    pub nodes: u16,
    /// Runs of each method; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub runs: u32,
    /// One JSON object per phase on stdout instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// The `shoal` binary (default: next to this executable, then on PATH).
    #[arg(long)]
    pub shoal_bin: Option<PathBuf>,
    /// Keep the clusters' data and logs here (default: a temporary directory, removed). The
    /// source image, the clusters' chunks and caches and the `cp` copies all go under it, on one
    /// disk.
    #[arg(long)]
    pub keep_dir: Option<PathBuf>,
}

/// Progress goes to stderr so that stdout holds only the results.
fn note(msg: &str) {
    eprintln!("[image] {msg}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const MIB: f64 = (1u64 << 20) as f64;

/// A member of the cluster as this benchmark sees it.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    base: String,
    pid: u32,
    data: PathBuf,
}

impl Node {
    fn cached(&self, id: &str) -> PathBuf {
        self.data.join("images").join("cache").join(id)
    }

    /// Whether this node stores any chunk (the uploader and its replica do).
    fn holds_chunks(&self) -> bool {
        dir_bytes(&self.data.join("images").join("chunks")) > 0
    }
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Writes `size` pseudo-random (incompressible) bytes to `path`.
fn generate(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut block = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ size;
    let mut left = size;
    while left > 0 {
        crate::uring::pseudo_random(&mut block, &mut x);
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.into_inner()?.sync_all()?;
    Ok(())
}

/// CPU seconds of each node and of the whole machine over a timed section.
#[derive(Debug, Clone, Serialize)]
struct CpuUse {
    /// Per node, in node order.
    nodes_s: Vec<f64>,
    machine_busy_s: f64,
    machine_cpus: usize,
}

struct CpuMark {
    nodes: Vec<Duration>,
    machine: procs::MachineCpu,
}

fn cpu_mark(nodes: &[Node]) -> Result<CpuMark> {
    Ok(CpuMark {
        nodes: nodes
            .iter()
            .map(|n| procs::cpu_time(Some(n.pid)))
            .collect::<Result<_>>()?,
        machine: procs::machine_cpu()?,
    })
}

impl CpuMark {
    fn since(&self, nodes: &[Node]) -> Result<CpuUse> {
        let now = cpu_mark(nodes)?;
        Ok(CpuUse {
            nodes_s: now
                .nodes
                .iter()
                .zip(&self.nodes)
                .map(|(a, b)| a.saturating_sub(*b).as_secs_f64())
                .collect(),
            machine_busy_s: now
                .machine
                .busy
                .saturating_sub(self.machine.busy)
                .as_secs_f64(),
            machine_cpus: now.machine.cpus,
        })
    }
}

/// Chunks of a pull that were asked of a second holder.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Redone {
    /// After a failure (or a timeout) of the first.
    retried: u64,
    /// Because the first had not started answering within the hedging delay.
    hedged: u64,
}

impl std::ops::AddAssign for Redone {
    fn add_assign(&mut self, o: Redone) {
        self.retried += o.retried;
        self.hedged += o.hedged;
    }
}

#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    token: String,
}

impl Client {
    /// Pulls `id` into `node`'s cache through the admin API; returns when it is there, with the
    /// chunks that were retried or served by a hedged request.
    async fn pull(&self, node: &Node, id: &str) -> Result<Redone> {
        let text = self
            .http
            .post(format!("{}/shoal/v1/images/{id}/pull", node.base))
            .header("X-Auth-Token", &self.token)
            .send()
            .await?
            .error_for_status()
            .with_context(|| format!("pull on {}", node.name))?
            .text()
            .await?;
        let last: Value = serde_json::from_str(text.lines().last().unwrap_or("{}"))
            .with_context(|| format!("pull progress of {}: {text:?}", node.name))?;
        if last["status"] != "done" {
            bail!("pull on {} did not finish: {last}", node.name);
        }
        let count = |k: &str| last[k].as_u64().unwrap_or(0);
        Ok(Redone {
            retried: count("retried_chunks"),
            hedged: count("hedged_chunks"),
        })
    }
}

struct Bench {
    http: reqwest::Client,
    token: String,
    nodes: Vec<Node>,
    _cluster: ShoalCluster,
}

impl Bench {
    async fn start(procs: &mut ProcGuard, args: &Args, dir: &Path, n: usize) -> Result<Self> {
        let bin = shoal_bin(args.shoal_bin.as_deref())?;
        let http = crate::raft::http_client(Duration::from_secs(3600))?;
        let data = dir.join("shoal");
        note(&format!("starting `{} dev --nodes {n}`", bin.display()));
        let cluster = ShoalCluster::start(procs, &bin, &data, dir, n, &http).await?;
        let mut nodes = Vec::new();
        for m in &cluster.status.members {
            let pid = pid_listening_on(m.port()?)
                .with_context(|| format!("finding the process of {}", m.name))?;
            let node_dir = data.join(&m.name);
            if !node_dir.is_dir() {
                bail!("no data directory {} for {}", node_dir.display(), m.name);
            }
            nodes.push(Node {
                name: m.name.clone(),
                base: m.base(),
                pid,
                data: node_dir,
            });
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            http,
            token: cluster.token.clone(),
            nodes,
            _cluster: cluster,
        })
    }

    /// Creates an image on `node` and uploads `file` as its data; returns the image id.
    async fn upload(&self, node: &Node, file: &Path) -> Result<String> {
        let created: Value = self
            .http
            .post(format!("{}/image/v2/images", node.base))
            .header("X-Auth-Token", &self.token)
            .json(&json!({"name": "loadtest", "disk_format": "raw", "container_format": "bare"}))
            .send()
            .await?
            .error_for_status()
            .context("creating the image")?
            .json()
            .await?;
        let id = created["id"]
            .as_str()
            .context("the created image has no id")?
            .to_owned();
        let f = tokio::fs::File::open(file).await?;
        let resp = self
            .http
            .put(format!("{}/image/v2/images/{id}/file", node.base))
            .header("X-Auth-Token", &self.token)
            .header("Content-Type", "application/octet-stream")
            .body(reqwest::Body::from(f))
            .send()
            .await?;
        if !resp.status().is_success() {
            let st = resp.status();
            bail!("uploading the image: {st}: {}", resp.text().await?);
        }
        Ok(id)
    }

    /// A copy of the HTTP side, for concurrent pulls.
    fn client(&self) -> Client {
        Client {
            http: self.http.clone(),
            token: self.token.clone(),
        }
    }

    async fn pull(&self, node: &Node, id: &str) -> Result<Redone> {
        self.client().pull(node, id).await
    }

    fn evict(&self, node: &Node, id: &str) -> Result<()> {
        let p = node.cached(id);
        std::fs::remove_file(&p).with_context(|| format!("evicting {}", p.display()))
    }

    /// Uploads a generated image of `size` bytes to node1 and returns (id, source file,
    /// holders, non-holders).
    async fn prepare(
        &self,
        dir: &Path,
        size: u64,
    ) -> Result<(String, PathBuf, Vec<Node>, Vec<Node>)> {
        let src = dir.join("source.img");
        note(&format!(
            "generating {} MiB of pseudo-random bytes",
            size >> 20
        ));
        generate(&src, size)?;
        let t = Instant::now();
        let id = self.upload(&self.nodes[0], &src).await?;
        let took = t.elapsed().as_secs_f64();
        note(&format!(
            "uploaded {id} to {} in {took:.1} s ({:.0} MiB/s, with replication)",
            self.nodes[0].name,
            size as f64 / MIB / took
        ));
        let (holders, others): (Vec<Node>, Vec<Node>) =
            self.nodes.iter().cloned().partition(Node::holds_chunks);
        note(&format!(
            "holders: {}; pullers: {}",
            names(&holders),
            names(&others)
        ));
        if holders.len() != 2 || others.is_empty() {
            bail!("expected two holders (replication 2) and at least one other node");
        }
        Ok((id, src, holders, others))
    }
}

fn names(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| n.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn cp_sync(src: &Path, dst: &Path) -> Result<()> {
    let status = std::process::Command::new("cp")
        .arg(src)
        .arg(dst)
        .status()
        .context("running cp")?;
    if !status.success() {
        bail!("cp failed: {status}");
    }
    std::fs::File::open(dst)?.sync_all()?;
    Ok(())
}

#[derive(Debug, Serialize)]
struct PullResult {
    phase: &'static str,
    size_bytes: u64,
    runs: u32,
    pull_s: Vec<f64>,
    cp_s: Vec<f64>,
    pull_median_mib_s: f64,
    cp_median_mib_s: f64,
    /// pull throughput / cp throughput (medians).
    ratio: f64,
    /// Node CPU and machine CPU over each pull run.
    pull_cpu: Vec<CpuUse>,
    /// Chunks asked of a second holder, each run.
    redone: Vec<Redone>,
    /// One more pull with one holder frozen (SIGSTOP) throughout: what a dead holder costs.
    frozen_holder_pull_s: f64,
    frozen_redone: Redone,
    node_names: Vec<String>,
}

async fn pull_phase(procs: &mut ProcGuard, args: &Args, dir: &Path) -> Result<PullResult> {
    let size = shoal_disk::qcow2::parse_size(&args.size)?;
    let bench = Bench::start(procs, args, dir, 3).await?;
    let (id, src, holders, others) = bench.prepare(dir, size).await?;
    let puller = &others[0];
    let (mut pull_s, mut cp_s, mut cpu, mut redone) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        let mark = cpu_mark(&bench.nodes)?;
        let t = Instant::now();
        redone.push(bench.pull(puller, &id).await?);
        let p = t.elapsed().as_secs_f64();
        cpu.push(mark.since(&bench.nodes)?);
        bench.evict(puller, &id)?;

        let dst = puller.data.join("cp.img");
        let t = Instant::now();
        cp_sync(&src, &dst)?;
        let c = t.elapsed().as_secs_f64();
        std::fs::remove_file(&dst)?;
        note(&format!(
            "run {}: pull {p:.2} s ({:.0} MiB/s), cp+sync {c:.2} s ({:.0} MiB/s)",
            run + 1,
            size as f64 / MIB / p,
            size as f64 / MIB / c
        ));
        pull_s.push(p);
        cp_s.push(c);
    }
    std::fs::remove_file(&src)?;

    // A holder that is alive to the kernel but never answers, as a hung or partitioned node
    // looks: the pull must get every chunk from the other holder.
    let frozen = &holders[1];
    note(&format!(
        "freezing {} (SIGSTOP) for one more pull",
        frozen.name
    ));
    procs::signal(frozen.pid, libc::SIGSTOP)?;
    let t = Instant::now();
    let r = bench.pull(puller, &id).await;
    let frozen_s = t.elapsed().as_secs_f64();
    procs::signal(frozen.pid, libc::SIGCONT)?;
    let frozen_redone = r?;
    bench.evict(puller, &id)?;
    note(&format!(
        "pull with {} frozen: {frozen_s:.2} s ({:.0} MiB/s), {frozen_redone:?}",
        frozen.name,
        size as f64 / MIB / frozen_s
    ));
    let (pm, cm) = (median(pull_s.clone()), median(cp_s.clone()));
    Ok(PullResult {
        phase: "pull",
        size_bytes: size,
        runs: args.runs,
        pull_s,
        cp_s,
        pull_median_mib_s: size as f64 / MIB / pm,
        cp_median_mib_s: size as f64 / MIB / cm,
        ratio: cm / pm,
        pull_cpu: cpu,
        redone,
        frozen_holder_pull_s: frozen_s,
        frozen_redone,
        node_names: bench.nodes.iter().map(|n| n.name.clone()).collect(),
    })
}

#[derive(Debug, Serialize)]
struct StormResult {
    phase: &'static str,
    size_bytes: u64,
    nodes: usize,
    pullers: usize,
    runs: u32,
    alone_s: Vec<f64>,
    storm_s: Vec<f64>,
    alone_median_s: f64,
    storm_median_s: f64,
    /// storm wall time / lone pull wall time (medians).
    ratio: f64,
    /// Bytes delivered per second in the storm, all pullers together.
    storm_aggregate_mib_s: f64,
    alone_cpu: Vec<CpuUse>,
    storm_cpu: Vec<CpuUse>,
    /// Chunks asked of a second holder, each run, all pullers together.
    alone_redone: Vec<Redone>,
    storm_redone: Vec<Redone>,
    node_names: Vec<String>,
}

async fn storm_phase(procs: &mut ProcGuard, args: &Args, dir: &Path) -> Result<StormResult> {
    let size = shoal_disk::qcow2::parse_size(&args.storm_size)?;
    let n = usize::from(args.nodes);
    let bench = Bench::start(procs, args, dir, n).await?;
    let (id, src, _holders, others) = bench.prepare(dir, size).await?;
    std::fs::remove_file(&src)?;
    let (mut alone, mut storm) = (Vec::new(), Vec::new());
    let (mut alone_cpu, mut storm_cpu) = (Vec::new(), Vec::new());
    let (mut alone_redone, mut storm_redone) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let lone = &others[run as usize % others.len()];
        let mark = cpu_mark(&bench.nodes)?;
        let t = Instant::now();
        alone_redone.push(bench.pull(lone, &id).await?);
        let a = t.elapsed().as_secs_f64();
        alone_cpu.push(mark.since(&bench.nodes)?);
        bench.evict(lone, &id)?;

        let mark = cpu_mark(&bench.nodes)?;
        let t = Instant::now();
        let mut all = tokio::task::JoinSet::new();
        for p in &others {
            let (bench, p, id) = (bench.client(), p.clone(), id.clone());
            all.spawn(async move { bench.pull(&p, &id).await });
        }
        let mut results = Vec::new();
        while let Some(r) = all.join_next().await {
            results.push(r?);
        }
        let s = t.elapsed().as_secs_f64();
        storm_cpu.push(mark.since(&bench.nodes)?);
        let mut redone = Redone::default();
        for r in results {
            redone += r?;
        }
        storm_redone.push(redone);
        for p in &others {
            bench.evict(p, &id)?;
        }
        note(&format!(
            "run {}: {} alone {a:.2} s; {} at once {s:.2} s ({:.2}x)",
            run + 1,
            lone.name,
            others.len(),
            s / a
        ));
        alone.push(a);
        storm.push(s);
    }
    let (am, sm) = (median(alone.clone()), median(storm.clone()));
    Ok(StormResult {
        phase: "storm",
        size_bytes: size,
        nodes: n,
        pullers: others.len(),
        runs: args.runs,
        alone_s: alone,
        storm_s: storm,
        alone_median_s: am,
        storm_median_s: sm,
        ratio: sm / am,
        storm_aggregate_mib_s: size as f64 / MIB * others.len() as f64 / sm,
        alone_cpu,
        storm_cpu,
        alone_redone,
        storm_redone,
        node_names: bench.nodes.iter().map(|n| n.name.clone()).collect(),
    })
}

fn cpu_line(c: &CpuUse, names: &[String], wall: f64) -> String {
    let per: Vec<String> = names
        .iter()
        .zip(&c.nodes_s)
        .map(|(n, s)| format!("{n} {s:.1}"))
        .collect();
    format!(
        "cpu s: {}; machine busy {:.1} of {:.1} cpu-s available",
        per.join(", "),
        c.machine_busy_s,
        wall * c.machine_cpus as f64
    )
}

fn print_pull(r: &PullResult) {
    let mib = r.size_bytes as f64 / MIB;
    println!(
        "pull phase: {mib:.0} MiB image, 3 nodes (2 holders, 1 puller), {} runs (medians)",
        r.runs
    );
    println!(
        "pull from 2 holders  {:>8.2} s  {:>6.0} MiB/s",
        mib / r.pull_median_mib_s,
        r.pull_median_mib_s
    );
    println!(
        "cp + fsync           {:>8.2} s  {:>6.0} MiB/s",
        mib / r.cp_median_mib_s,
        r.cp_median_mib_s
    );
    println!("pull throughput / cp throughput: {:.2}x", r.ratio);
    println!(
        "pull with one holder frozen (SIGSTOP): {:.2} s ({:.0} MiB/s); {:?}",
        r.frozen_holder_pull_s,
        mib / r.frozen_holder_pull_s,
        r.frozen_redone
    );
    for ((c, wall), x) in r.pull_cpu.iter().zip(&r.pull_s).zip(&r.redone) {
        println!(
            "  pull {wall:.2} s, {}; {x:?}",
            cpu_line(c, &r.node_names, *wall)
        );
    }
}

fn print_storm(r: &StormResult) {
    println!(
        "storm phase: {:.0} MiB image, {} nodes (2 holders, {} pullers), {} runs (medians)",
        r.size_bytes as f64 / MIB,
        r.nodes,
        r.pullers,
        r.runs
    );
    println!("one node alone      {:>8.2} s", r.alone_median_s);
    println!(
        "{} nodes at once     {:>8.2} s  ({:.0} MiB/s delivered in all)",
        r.pullers, r.storm_median_s, r.storm_aggregate_mib_s
    );
    println!("storm / alone: {:.2}x", r.ratio);
    for ((c, wall), x) in r.alone_cpu.iter().zip(&r.alone_s).zip(&r.alone_redone) {
        println!(
            "  alone {wall:.2} s, {}; {x:?}",
            cpu_line(c, &r.node_names, *wall)
        );
    }
    for ((c, wall), x) in r.storm_cpu.iter().zip(&r.storm_s).zip(&r.storm_redone) {
        println!(
            "  storm {wall:.2} s, {}; {x:?}",
            cpu_line(c, &r.node_names, *wall)
        );
    }
}

pub async fn run(args: Args) -> Result<()> {
    install_crypto_provider();
    let work = async {
        if matches!(args.phase, Phase::Pull | Phase::All) {
            let dir = TempDir::new(args.keep_dir.as_deref().map(|d| d.join("pull")).as_deref())?;
            let mut procs = ProcGuard::new();
            let r = pull_phase(&mut procs, &args, dir.path()).await;
            procs.shutdown(Duration::from_secs(10));
            let r = r?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print_pull(&r);
            }
        }
        if matches!(args.phase, Phase::Storm | Phase::All) {
            let dir = TempDir::new(args.keep_dir.as_deref().map(|d| d.join("storm")).as_deref())?;
            let mut procs = ProcGuard::new();
            let r = storm_phase(&mut procs, &args, dir.path()).await;
            procs.shutdown(Duration::from_secs(10));
            let r = r?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print_storm(&r);
            }
        }
        Ok(())
    };
    until_signal(work).await?
}
