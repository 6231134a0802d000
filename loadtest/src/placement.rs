//! `shoal-loadtest placement`: placement claims through Raft. Starts `shoal dev`, registers
//! synthetic hosts over `PUT /shoal/v1/hosts/{name}`, and drives `POST /shoal/v1/placements`
//! (one instance per request) from concurrent clients spread over the members. Reports
//! claims per second, latency percentiles and the conflict-retry rate (the sum of
//! `attempts - 1` over the acknowledged requests, per request), then checks linearizably that
//! every acknowledged placement is in the `instances` table.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

use crate::procs::ProcGuard;
use crate::raft::{http_client, install_crypto_provider, parse_duration, shoal_bin, TempDir};
use crate::report::{self, fmt_us};
use crate::shoal_client::ShoalCluster;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Members of the `shoal dev` cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub nodes: u16,
    /// Concurrent clients, each with its own keep-alive connection, round-robin over members.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: u32,
    /// Synthetic hosts registered before the load.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub hosts: u32,
    /// Measured load time (after the warm-up): 20s, 2m, 500ms.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before measuring starts; its requests are not counted.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// The `shoal` binary (default: next to this executable, then on PATH).
    #[arg(long)]
    pub shoal_bin: Option<PathBuf>,
    /// Keep the cluster's data and logs here (default: a temporary directory, removed).
    #[arg(long)]
    pub keep_dir: Option<PathBuf>,
}

/// Each synthetic host: 64 cores, 256 GiB, 10 TB; a 1 vCPU / 512 MB / 1 GB flavor, so the
/// hosts do not fill up within a run and every refusal would be an error.
const HOST: (u32, u64, u64) = (64, 262_144, 10_000);
const FLAVOR: (u32, u64, u64) = (1, 512, 1);

#[derive(Debug, Clone, Serialize)]
pub struct PlacementSummary {
    pub nodes: u16,
    pub clients: u32,
    pub hosts: u32,
    pub placements: u64,
    pub claims_per_second: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Sum of `attempts - 1` over the measured placements.
    pub conflict_retries: u64,
    /// `conflict_retries / placements`.
    pub retries_per_placement: f64,
    /// Requests answered 409 after every attempt conflicted.
    pub contended: u64,
    /// Any other failed request.
    pub errors: u64,
    /// Placements acknowledged over the whole run (warm-up included) and found in `instances`.
    pub verified_instances: u64,
}

#[derive(Default)]
struct ClientResult {
    hist: Option<Histogram<u64>>,
    retries: u64,
    contended: u64,
    errors: u64,
    acked: Vec<(String, String)>,
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
) -> Result<(u16, Value)> {
    let resp = http
        .post(url)
        .header("x-auth-token", token)
        .json(body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    Ok((status, v))
}

async fn client(
    base: String,
    token: Arc<String>,
    start: Instant,
    warmup: Duration,
    end: Instant,
) -> Result<ClientResult> {
    let http = http_client(Duration::from_secs(30))?;
    let url = format!("{base}/shoal/v1/placements");
    let body = json!({"flavor": {"vcpus": FLAVOR.0, "ram_mb": FLAVOR.1, "disk_gb": FLAVOR.2}});
    let mut r = ClientResult {
        hist: Some(report::new_histogram()),
        ..ClientResult::default()
    };
    let hist = r.hist.as_mut().expect("set above");
    while Instant::now() < end {
        let t0 = Instant::now();
        let res = post(&http, &url, &token, &body).await;
        let took = t0.elapsed();
        let measured = t0 >= start + warmup;
        match res {
            Ok((200, v)) => {
                for p in v["placements"].as_array().into_iter().flatten() {
                    r.acked.push((
                        p["instance_id"].as_str().unwrap_or_default().to_owned(),
                        p["host"].as_str().unwrap_or_default().to_owned(),
                    ));
                }
                if measured {
                    hist.record(took.as_micros().max(1) as u64)?;
                    r.retries += v["attempts"].as_u64().unwrap_or(1).saturating_sub(1);
                }
            }
            Ok((409, v)) if v.to_string().contains("conflicted") => {
                if measured {
                    r.contended += 1;
                }
            }
            Ok((status, v)) => {
                if r.errors == 0 {
                    eprintln!("[placement] {base}: {status} {v}");
                }
                r.errors += 1;
            }
            Err(e) => {
                if r.errors == 0 {
                    eprintln!("[placement] {base}: {e:#}");
                }
                r.errors += 1;
            }
        }
    }
    Ok(r)
}

pub async fn run(args: Args) -> Result<()> {
    install_crypto_provider();
    let bin = shoal_bin(args.shoal_bin.as_deref())?;
    let dir = TempDir::new(args.keep_dir.as_deref())?;
    let mut procs = ProcGuard::new();
    eprintln!("[placement] data and logs in {}", dir.path().display());
    let res = bench(&args, &mut procs, &bin, dir.path()).await;
    procs.shutdown(Duration::from_secs(10));
    report::finish("placement", dir, res, args.json, print_table)
}

async fn bench(
    args: &Args,
    procs: &mut ProcGuard,
    bin: &std::path::Path,
    dir: &std::path::Path,
) -> Result<PlacementSummary> {
    let http = http_client(Duration::from_secs(30))?;
    let data = dir.join("shoal");
    let cluster = ShoalCluster::start(procs, bin, &data, dir, args.nodes.into(), &http).await?;
    let bases: Vec<String> = cluster.status.members.iter().map(|m| m.base()).collect();
    let token = Arc::new(cluster.token.clone());

    for h in 0..args.hosts {
        let url = format!(
            "{}/shoal/v1/hosts/bench-host{h:05}",
            bases[h as usize % bases.len()]
        );
        let resp = http
            .put(&url)
            .header("x-auth-token", token.as_str())
            .json(
                &json!({"vcpus": HOST.0, "ram_mb": HOST.1, "disk_gb": HOST.2,
                          "availability_zone": "nova"}),
            )
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!(
                "registering host {h}: {} {}",
                resp.status(),
                resp.text().await?
            );
        }
    }
    eprintln!(
        "[placement] {} hosts registered; {} clients for {:?} + {:?} warm-up",
        args.hosts, args.clients, args.duration, args.warmup
    );

    let start = Instant::now();
    let end = start + args.warmup + args.duration;
    let tasks: Vec<_> = (0..args.clients as usize)
        .map(|i| {
            tokio::spawn(client(
                bases[i % bases.len()].clone(),
                token.clone(),
                start,
                args.warmup,
                end,
            ))
        })
        .collect();
    let mut hist = report::new_histogram();
    let (mut retries, mut contended, mut errors) = (0, 0, 0);
    let mut acked = Vec::new();
    for t in tasks {
        let r = t.await.context("client task")??;
        hist.add(r.hist.as_ref().expect("set by client"))?;
        retries += r.retries;
        contended += r.contended;
        errors += r.errors;
        acked.extend(r.acked);
    }
    procs.check_running()?;

    // Every acknowledged placement is in the state, on the host the client was told.
    let resp: Value = http
        .get(format!("{}/shoal/v1/instances", bases[0]))
        .header("x-auth-token", token.as_str())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let instances = resp["instances"]
        .as_object()
        .context("no instances in the answer")?;
    for (id, host) in &acked {
        if instances.get(id).and_then(|i| i["host"].as_str()) != Some(host.as_str()) {
            bail!("acknowledged placement {id} on {host} is not in the instances table");
        }
    }

    let placements = hist.len();
    let q = |x: f64| {
        if placements == 0 {
            0
        } else {
            hist.value_at_quantile(x)
        }
    };
    Ok(PlacementSummary {
        nodes: args.nodes,
        clients: args.clients,
        hosts: args.hosts,
        placements,
        claims_per_second: placements as f64 / args.duration.as_secs_f64(),
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: if placements == 0 { 0 } else { hist.max() },
        conflict_retries: retries,
        retries_per_placement: if placements == 0 {
            0.0
        } else {
            retries as f64 / placements as f64
        },
        contended,
        errors,
        verified_instances: acked.len() as u64,
    })
}

fn print_table(s: &PlacementSummary) {
    println!(
        "placement claims through Raft: {} nodes, {} clients, {} hosts",
        s.nodes, s.clients, s.hosts
    );
    println!(
        "{:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7}",
        "claims", "claims/s", "p50", "p90", "p99", "p99.9", "max", "retries", "retry/pl", "errors"
    );
    println!(
        "{:>10} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10.3} {:>7}",
        s.placements,
        s.claims_per_second,
        fmt_us(s.p50_us),
        fmt_us(s.p90_us),
        fmt_us(s.p99_us),
        fmt_us(s.p999_us),
        fmt_us(s.max_us),
        s.conflict_retries,
        s.retries_per_placement,
        s.errors + s.contended
    );
    println!(
        "{} acknowledged placements (warm-up included) verified in the instances table",
        s.verified_instances
    );
}
