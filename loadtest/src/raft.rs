//! `shoal-loadtest raft`: write throughput, latency and leader failover of Shoal's Raft-backed
//! key-value API against a three-member etcd, both started here on loopback and driven the same
//! way (HTTP/1.1 keep-alive, same concurrency, same value size).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::etcd::{EtcdCluster, EtcdWriter, ETCD_BIN};
use crate::procs::ProcGuard;
use crate::report::{self, FailoverSummary, Ratio, Summary};
use crate::shoal_client::{ShoalCluster, ShoalWriter};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Members per cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub nodes: u16,
    /// Concurrent client tasks, each with its own keep-alive connection, spread round-robin
    /// over the members.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: u32,
    /// Bytes of random value per write.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Measured load time per target (after the warm-up): 30s, 2m, 500ms.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before measuring starts; its requests are not counted.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub warmup: Duration,
    #[arg(long, value_enum, default_value_t = TargetArg::Both)]
    pub target: TargetArg,
    /// One JSON object per line per target (and a ratio line) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Kill the leader this many times and time until a write succeeds (20 if no number).
    #[arg(long, num_args = 0..=1, default_missing_value = "20")]
    pub failover_trials: Option<u32>,
    /// The `shoal` binary (default: next to this executable, then on PATH).
    #[arg(long)]
    pub shoal_bin: Option<PathBuf>,
    /// The `etcd` binary.
    #[arg(long, default_value = ETCD_BIN)]
    pub etcd_bin: PathBuf,
    /// Put the clusters' data and logs here and keep them (default: a temporary directory,
    /// removed at exit).
    #[arg(long)]
    pub keep_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetArg {
    Shoal,
    Etcd,
    Both,
}

/// Parses `30s`, `2m`, `500ms`, `1h`, `1.5s`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("{s:?} is not a duration: use a number and a unit, as 30s, 2m, 500ms")
    })?;
    let secs = match unit.trim() {
        "ms" => n / 1e3,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use ms, s, m or h"
            ))
        }
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{s:?}: the duration must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// reqwest is built with rustls but without a default provider; ring is the one in the tree.
pub fn install_crypto_provider() {
    // Fails only if a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP/1.1 client. Each load client has its own, so that it holds exactly one keep-alive
/// connection to the member it was assigned.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    http_client_builder(timeout)
        .build()
        .context("building the HTTP client")
}

/// The settings of [`http_client`], for a caller that adds to them (a CA to trust).
pub fn http_client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1)
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout)
}

/// The write path of one target, through one member.
#[derive(Debug, Clone)]
pub enum Writer {
    Etcd(EtcdWriter),
    Shoal(ShoalWriter),
}

impl Writer {
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        match self {
            Writer::Etcd(w) => w.put(key, value).await,
            Writer::Shoal(w) => w.put(key, value).await.map(|_revision| ()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub clients: usize,
    pub value_size: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

#[derive(Debug)]
pub struct LoadResult {
    /// Latency of each successful write started after the warm-up, in µs.
    pub hist: Histogram<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the end of the warm-up to the last measured write's completion.
    pub elapsed: Duration,
}

/// Runs `cfg.clients` tasks, each writing `bench/<client>/<seq>` sequentially through the
/// writer `writer(client)` gives it, for the warm-up and then the measured duration.
pub async fn drive_load(
    cfg: &LoadConfig,
    mut writer: impl FnMut(usize) -> Result<Writer>,
) -> Result<LoadResult> {
    let start = Instant::now();
    let measure_from = start + cfg.warmup;
    let end = measure_from + cfg.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..cfg.clients {
        let w = writer(id)?;
        let value_size = cfg.value_size;
        tasks.spawn(client_loop(id, w, value_size, measure_from, end));
    }
    let mut hist = report::new_histogram();
    let mut errors = 0;
    let mut first_error = None;
    let mut last_done = measure_from;
    while let Some(res) = tasks.join_next().await {
        let c = res.context("a load client panicked")?;
        hist.add(&c.hist).context("merging histograms")?;
        errors += c.errors;
        first_error = first_error.or(c.first_error);
        last_done = last_done.max(c.last_done);
    }
    Ok(LoadResult {
        hist,
        errors,
        first_error,
        elapsed: last_done - measure_from,
    })
}

struct ClientResult {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    last_done: Instant,
}

async fn client_loop(
    id: usize,
    writer: Writer,
    value_size: usize,
    measure_from: Instant,
    end: Instant,
) -> ClientResult {
    let mut rng = StdRng::from_os_rng();
    let mut value = vec![0u8; value_size];
    let mut out = ClientResult {
        hist: report::new_histogram(),
        errors: 0,
        first_error: None,
        last_done: measure_from,
    };
    let mut seq: u64 = 0;
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let key = format!("bench/{id}/{seq}");
        seq += 1;
        rng.fill_bytes(&mut value);
        let res = writer.put(&key, &value).await;
        let done = Instant::now();
        let measured = sent >= measure_from;
        match res {
            Ok(()) if measured => {
                let us = (done - sent).as_micros().max(1);
                out.hist
                    .saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
                out.last_done = done;
            }
            Ok(()) => {}
            Err(e) => {
                if measured {
                    out.errors += 1;
                    out.last_done = done;
                    out.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
                // A refused connection fails in microseconds: do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    out
}

/// The directory holding the clusters' data and logs; removed on drop unless kept.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new(keep: Option<&Path>) -> Result<Self> {
        let (path, keep) = match keep {
            Some(p) => (p.to_owned(), true),
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                let name = format!("shoal-loadtest-{}-{nanos:08x}", std::process::id());
                (std::env::temp_dir().join(name), false)
            }
        };
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, keep })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Do not remove the directory on drop.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Starts a write through `via` every [`FAILOVER_ATTEMPT_EVERY`], each with its own key under
/// `key_prefix`, until one is acknowledged; returns the time from `since` to that
/// acknowledgement and the key written. Attempts overlap on purpose: a write sent just after
/// the kill may hang until its timeout (etcd forwards it to the dead leader and waits), and a
/// strictly sequential retry would measure that timeout instead of the election.
async fn time_until_write(
    via: &Writer,
    key_prefix: &str,
    value: &[u8],
    since: Instant,
    limit: Duration,
) -> Result<(Duration, String)> {
    let mut attempts = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(FAILOVER_ATTEMPT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let deadline = tokio::time::sleep_until((since + limit).into());
    tokio::pin!(deadline);
    let mut n = 0u64;
    let mut last_err = None;
    loop {
        tokio::select! {
            _ = &mut deadline => {
                let e = last_err.map(|e: anyhow::Error| format!("{e:#}")).unwrap_or_default();
                bail!("no write acknowledged within {limit:?} of killing the leader; last error: {e}");
            }
            Some(done) = attempts.join_next() => {
                let (key, res) = done.context("a failover write attempt panicked")?;
                match res {
                    // Dropping the set aborts the attempts still in flight.
                    Ok(()) => return Ok((since.elapsed(), key)),
                    Err(e) => last_err = Some(e),
                }
            }
            _ = tick.tick() => {
                let key = format!("{key_prefix}/{n}");
                n += 1;
                let (via, value) = (via.clone(), value.to_vec());
                attempts.spawn(async move {
                    let res = via.put(&key, &value).await;
                    (key, res)
                });
            }
        }
    }
}

/// A write attempt is started this often during a failover, which bounds the resolution of
/// the measured time.
const FAILOVER_ATTEMPT_EVERY: Duration = Duration::from_millis(5);
/// Per-attempt timeout of the failover writes: longer than an election.
const FAILOVER_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const FAILOVER_LIMIT: Duration = Duration::from_secs(60);

/// Kills etcd member `leader`, times until a write through the next member succeeds, then
/// restarts the member and waits until all members are healthy.
pub async fn etcd_failover_trial(
    procs: &mut ProcGuard,
    cluster: &mut EtcdCluster,
    http: &reqwest::Client,
    leader: usize,
    trial: u32,
) -> Result<Duration> {
    let survivor = (leader + 1) % cluster.len();
    let via = Writer::Etcd(EtcdWriter::new(
        http_client(FAILOVER_ATTEMPT_TIMEOUT)?,
        &cluster.endpoints()[survivor],
    ));
    // Open the connection to the survivor before the kill, as a client already running would.
    via.put(&format!("failover/{trial}/before"), b"x").await?;
    let killed = cluster.kill(procs, leader)?;
    let (took, _key) = time_until_write(
        &via,
        &format!("failover/{trial}/after"),
        b"x",
        killed,
        FAILOVER_LIMIT,
    )
    .await
    .with_context(|| format!("etcd failover trial {trial}"))?;
    cluster.restart(procs, leader)?;
    cluster
        .wait_healthy(procs, http, Duration::from_secs(60))
        .await?;
    Ok(took)
}

/// Kills the Shoal leader, times until a write through a surviving member succeeds and reads
/// it back linearizably, then restarts the member and waits until the cluster is settled.
async fn shoal_failover_trial(
    procs: &mut ProcGuard,
    cluster: &mut ShoalCluster,
    http: &reqwest::Client,
    trial: u32,
) -> Result<Duration> {
    let status = cluster.status.clone();
    let leader = status.leader.clone().context("no leader in the status")?;
    let survivor = status
        .members
        .iter()
        .find(|m| m.name != leader)
        .context("no member besides the leader")?;
    let writer = ShoalWriter::new(
        http_client(FAILOVER_ATTEMPT_TIMEOUT)?,
        &survivor.base(),
        &cluster.token,
    );
    let via = Writer::Shoal(writer.clone());
    via.put(&format!("failover/{trial}/before"), b"x").await?;
    let killed = cluster.kill(procs, &leader).await?;
    // The wall clock of the kill, to line the trial up with the nodes' logs.
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(killed.elapsed());
    note(&format!(
        "shoal failover {trial}: killed {leader} at {:.6} (unix s), writing through {}",
        killed_at.as_secs_f64(),
        survivor.name
    ));
    let value = format!("trial {trial}");
    let prefix = format!("failover/{trial}/after");
    let (took, key) = time_until_write(&via, &prefix, value.as_bytes(), killed, FAILOVER_LIMIT)
        .await
        .with_context(|| format!("shoal failover trial {trial} (killed {leader})"))?;
    let read = writer.get_linearizable(&key).await?;
    if read != value.as_bytes() {
        bail!(
            "after failover, {key} reads {:?} through {}, not the acknowledged {value:?}",
            String::from_utf8_lossy(&read),
            survivor.name
        );
    }
    cluster.restart(procs, &leader)?;
    let via_all = cluster.writers(http);
    cluster.status = cluster
        .wait_settled(procs, &via_all, Duration::from_secs(120))
        .await?;
    // Raft elects a new leader only in a higher term: an unchanged term means the kill did not
    // take the leader down and the trial measured nothing.
    if cluster.status.term <= status.term {
        bail!(
            "shoal failover trial {trial}: term stayed at {} after killing leader {leader}",
            status.term
        );
    }
    Ok(took)
}

/// The shoal binary: `--shoal-bin`, else next to this executable, else `shoal` on PATH.
pub fn shoal_bin(arg: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p.to_owned());
    }
    if let Some(sibling) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("shoal")))
        .filter(|p| p.is_file())
    {
        return Ok(sibling);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("shoal"))
        .find(|p| p.is_file())
        .context("no shoal binary: not next to shoal-loadtest nor on PATH; pass --shoal-bin")
}

/// Runs `work` until it ends or a Ctrl-C or SIGTERM arrives, which is turned into an error
/// (the outer `Result` fails only if the handler cannot be installed). SIGTERM as well as
/// Ctrl-C: the clusters run in their own process groups, so nothing but the process guard's
/// drop would stop them after we are gone.
pub async fn until_signal<T>(
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<Result<T>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    Ok(tokio::select! {
        res = work => res,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; stopping the clusters")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated; stopping the clusters")),
    })
}

/// Progress goes to stderr so that stdout holds only the results.
fn note(msg: &str) {
    eprintln!("[raft] {msg}");
}

pub async fn run(args: Args) -> Result<()> {
    install_crypto_provider();
    let trials = args.failover_trials.unwrap_or(0);
    if trials > 0 && args.nodes < 3 {
        bail!("failover trials need at least 3 nodes (a quorum must survive the leader)");
    }
    let (etcd, shoal) = match args.target {
        TargetArg::Both => (true, true),
        TargetArg::Etcd => (true, false),
        TargetArg::Shoal => (false, true),
    };
    // Resolve both binaries before starting anything, so a missing one fails in a second.
    let shoal_bin = if shoal {
        Some(shoal_bin(args.shoal_bin.as_deref())?)
    } else {
        None
    };
    if etcd && !args.etcd_bin.is_file() {
        bail!(
            "no etcd at {} (apt install etcd-server, or pass --etcd-bin)",
            args.etcd_bin.display()
        );
    }

    // Dropped in reverse order: the processes are stopped before their directory is removed.
    let dir = TempDir::new(args.keep_dir.as_deref())?;
    let mut procs = ProcGuard::new();
    note(&format!("data and logs in {}", dir.path().display()));

    let mut summaries = Vec::new();
    let work = async {
        if etcd {
            summaries.push(bench_etcd(&args, &mut procs, dir.path()).await?);
            // One cluster at a time: the other must not compete for the CPU and the disk.
            procs.shutdown(Duration::from_secs(10));
        }
        if let Some(bin) = &shoal_bin {
            summaries.push(bench_shoal(&args, &mut procs, bin, dir.path()).await?);
            procs.shutdown(Duration::from_secs(10));
        }
        anyhow::Ok(())
    };
    let res = until_signal(work).await?;
    // A target that finished keeps its figures even if the next one failed.
    if !summaries.is_empty() {
        print_results(&args, &summaries)?;
    }
    if res.is_err() {
        // The error names logs in there: stop the processes, but keep their files.
        drop(procs);
        note(&format!("kept {} for its logs", dir.path().display()));
        dir.keep();
    }
    res
}

fn print_results(args: &Args, summaries: &[Summary]) -> Result<()> {
    let find = |t: &str| summaries.iter().find(|s| s.target == t);
    let ratio = match (find("shoal"), find("etcd")) {
        (Some(s), Some(e)) => Some(Ratio::new(s, e)),
        _ => None,
    };
    if args.json {
        for s in summaries {
            println!("{}", serde_json::to_string(s)?);
        }
        if let Some(r) = &ratio {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", report::table(summaries, ratio.as_ref()));
    }
    Ok(())
}

fn load_config(args: &Args) -> LoadConfig {
    LoadConfig {
        clients: args.clients as usize,
        value_size: args.value_size,
        warmup: args.warmup,
        duration: args.duration,
    }
}

fn summarize(target: &str, load: &LoadResult) -> Summary {
    if let Some(e) = &load.first_error {
        note(&format!("{target}: {} errors, first: {e}", load.errors));
    }
    Summary::new(target, &load.hist, load.errors, load.elapsed)
}

async fn bench_etcd(args: &Args, procs: &mut ProcGuard, dir: &Path) -> Result<Summary> {
    let dir = dir.join("etcd");
    std::fs::create_dir_all(&dir)?;
    let http = http_client(Duration::from_secs(5))?;
    note(&format!("starting {} etcd members", args.nodes));
    let mut cluster =
        EtcdCluster::start(procs, &args.etcd_bin, &dir, usize::from(args.nodes), &http).await?;
    let endpoints = cluster.endpoints();
    note(&format!("etcd up at {}; loading", endpoints.join(" ")));
    let load = drive_load(&load_config(args), |i| {
        Ok(Writer::Etcd(EtcdWriter::new(
            http_client(Duration::from_secs(10))?,
            &endpoints[i % endpoints.len()],
        )))
    })
    .await?;
    let mut summary = summarize("etcd", &load);
    let mut times = Vec::new();
    for trial in 0..args.failover_trials.unwrap_or(0) {
        let leader = cluster.leader(&http).await?;
        let took = etcd_failover_trial(procs, &mut cluster, &http, leader, trial).await?;
        note(&format!(
            "etcd failover {trial}: killed {}, write after {took:?}",
            cluster.name(leader)
        ));
        times.push(took);
    }
    summary.failover = FailoverSummary::new(&times);
    Ok(summary)
}

async fn bench_shoal(
    args: &Args,
    procs: &mut ProcGuard,
    bin: &Path,
    dir: &Path,
) -> Result<Summary> {
    let http = http_client(Duration::from_secs(5))?;
    note(&format!(
        "starting `{} dev --nodes {}`",
        bin.display(),
        args.nodes
    ));
    let mut cluster = ShoalCluster::start(
        procs,
        bin,
        &dir.join("shoal"),
        dir,
        usize::from(args.nodes),
        &http,
    )
    .await?;
    let bases: Vec<String> = cluster
        .writers(&http)
        .iter()
        .map(|w| w.base().to_owned())
        .collect();
    note(&format!("shoal up at {}; loading", bases.join(" ")));
    let token = cluster.token.clone();
    let load = drive_load(&load_config(args), |i| {
        Ok(Writer::Shoal(ShoalWriter::new(
            http_client(Duration::from_secs(10))?,
            &bases[i % bases.len()],
            &token,
        )))
    })
    .await?;
    let mut summary = summarize("shoal", &load);
    let mut times = Vec::new();
    for trial in 0..args.failover_trials.unwrap_or(0) {
        let took = shoal_failover_trial(procs, &mut cluster, &http, trial).await?;
        note(&format!("shoal failover {trial}: write after {took:?}"));
        times.push(took);
    }
    summary.failover = FailoverSummary::new(&times);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        raft: Args,
    }

    #[test]
    fn durations_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("30x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("0s").unwrap_err().contains("positive"));
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn args_defaults_and_flags() {
        let a = Cli::try_parse_from(["raft"]).unwrap().raft;
        assert_eq!(
            (
                a.nodes,
                a.clients,
                a.value_size,
                a.duration,
                a.target,
                a.json
            ),
            (3, 64, 256, Duration::from_secs(30), TargetArg::Both, false)
        );
        assert_eq!(a.failover_trials, None);

        let a = Cli::try_parse_from([
            "raft",
            "--nodes",
            "5",
            "--clients",
            "8",
            "--duration",
            "2m",
            "--target",
            "etcd",
            "--json",
            "--failover-trials",
        ])
        .unwrap()
        .raft;
        assert_eq!((a.nodes, a.clients), (5, 8));
        assert_eq!(a.duration, Duration::from_secs(120));
        assert_eq!(a.target, TargetArg::Etcd);
        assert!(a.json);
        assert_eq!(
            a.failover_trials,
            Some(20),
            "the flag alone means 20 trials"
        );

        let a = Cli::try_parse_from(["raft", "--failover-trials", "3"])
            .unwrap()
            .raft;
        assert_eq!(a.failover_trials, Some(3));
        assert!(Cli::try_parse_from(["raft", "--duration", "10parsecs"]).is_err());
        assert!(Cli::try_parse_from(["raft", "--clients", "0"]).is_err());
        assert!(Cli::try_parse_from(["raft", "--target", "zookeeper"]).is_err());
    }

    #[test]
    fn temp_dir_is_removed_unless_kept() {
        let t = TempDir::new(None).unwrap();
        let p = t.path().to_owned();
        std::fs::write(p.join("f"), b"x").unwrap();
        drop(t);
        assert!(!p.exists());

        let kept = std::env::temp_dir().join(format!("shoal-lt-keep-{}", std::process::id()));
        drop(TempDir::new(Some(&kept)).unwrap());
        assert!(kept.is_dir());
        std::fs::remove_dir_all(&kept).unwrap();

        let t = TempDir::new(None).unwrap();
        let p = t.path().to_owned();
        t.keep();
        assert!(p.is_dir(), "kept after a failure");
        std::fs::remove_dir_all(p).unwrap();
    }

    /// A fake etcd gateway: the first request hangs (as a write forwarded to a dead leader
    /// does), later ones fail fast with 503 until `ready_after`, then succeed.
    async fn flaky_gateway(ready_after: Duration) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request per read is enough for these small bodies on loopback.
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        let nth = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if nth == 0 {
                            std::future::pending::<()>().await;
                        }
                        let (status, body) = if started.elapsed() < ready_after {
                            ("503 Service Unavailable", r#"{"error":"no leader"}"#)
                        } else {
                            ("200 OK", r#"{"header":{"revision":"7"}}"#)
                        };
                        let resp = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn failover_time_is_the_election_not_the_attempt_timeout() {
        install_crypto_provider();
        let ready_after = Duration::from_millis(300);
        let endpoint = flaky_gateway(ready_after).await;
        let via = Writer::Etcd(EtcdWriter::new(
            http_client(FAILOVER_ATTEMPT_TIMEOUT).unwrap(),
            &endpoint,
        ));
        let since = Instant::now();
        let (took, key) = time_until_write(&via, "failover/0", b"x", since, FAILOVER_LIMIT)
            .await
            .unwrap();
        assert!(
            took >= ready_after,
            "acknowledged before the fake was ready: {took:?}"
        );
        assert!(
            took < FAILOVER_ATTEMPT_TIMEOUT,
            "measured the hung attempt's timeout, not the recovery: {took:?}"
        );
        assert!(
            key.starts_with("failover/0/") && key != "failover/0/0",
            "{key}"
        );
    }

    #[tokio::test]
    async fn failover_gives_up_at_the_limit() {
        install_crypto_provider();
        let endpoint = flaky_gateway(Duration::from_secs(3600)).await;
        let via = Writer::Etcd(EtcdWriter::new(
            http_client(FAILOVER_ATTEMPT_TIMEOUT).unwrap(),
            &endpoint,
        ));
        let limit = Duration::from_millis(200);
        let err = time_until_write(&via, "k", b"x", Instant::now(), limit)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("503"), "{err:#}");
    }

    #[test]
    fn explicit_shoal_bin_wins() {
        let p = shoal_bin(Some(Path::new("/opt/shoal"))).unwrap();
        assert_eq!(p, Path::new("/opt/shoal"));
    }
}
