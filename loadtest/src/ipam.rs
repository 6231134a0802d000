//! `shoal-loadtest ipam`: port creates through the Network API of every node of a `shoal dev`
//! cluster at once, onto one subnet. `clients` concurrent clients, round-robin over the
//! members, send `POST /network/v2.0/ports` until `ports` creates were answered.
//!
//! Two shapes: a subnet with room for every port (`--free` unset: a /16), and a nearly-full
//! one (`--free K`: the subnet's allocation pool holds only K addresses, fewer than the ports
//! asked for, so the last creates race for the last addresses and the rest must be refused
//! with 409 `IpAddressGenerationFailure`).
//!
//! Reports accepted creates per second (first create sent to last answer), the create call's
//! latency (accepted ones), and checks at the end, through every node after a linearizable
//! barrier (a list through each node): no address is held by two ports, every accepted create
//! is listed with the address it was answered with, nothing else is listed, and with `--free`
//! exactly K creates were accepted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::procs::ProcGuard;
use crate::raft::{http_client, install_crypto_provider, shoal_bin, TempDir};
use crate::report::{self, fmt_us};
use crate::shoal_client::ShoalCluster;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Members of the `shoal dev` cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub nodes: u16,
    /// Concurrent clients, round-robin over the members.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub clients: u32,
    /// Port creates to send in all.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    pub ports: u32,
    /// A nearly-full subnet: an allocation pool of only this many addresses (fewer than
    /// `--ports`), so the creates past it must be refused.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    pub free: Option<u32>,
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

#[derive(Debug, Clone, Serialize)]
pub struct IpamSummary {
    pub nodes: u16,
    pub clients: u32,
    pub ports: u32,
    pub pool: u32,
    pub accepted: u64,
    /// 409 `IpAddressGenerationFailure`: the pool was full.
    pub pool_full: u64,
    /// 409 `Conflict`: a row the create must change kept changing (the project's quota guard
    /// under many concurrent creates); the client may retry. Counted, not a failure.
    pub contended: u64,
    /// Any other answer (or no answer): always 0, or the run fails.
    pub failed: u64,
    pub accepted_per_second: f64,
    pub api_p50_us: u64,
    pub api_p99_us: u64,
    pub api_max_us: u64,
    pub elapsed_s: f64,
    /// Distinct addresses held at the end (must equal `accepted`).
    pub distinct_addresses: usize,
}

#[derive(Default)]
struct Outcomes {
    /// Accepted port id → the address it was answered with.
    accepted: HashMap<String, String>,
    pool_full: u64,
    contended: u64,
    first_contended: Option<String>,
    failed: u64,
    first_failure: Option<String>,
}

pub async fn run(args: Args) -> Result<()> {
    install_crypto_provider();
    if let Some(free) = args.free {
        ensure!(
            free < args.ports,
            "--free {free} must be below --ports {}: it makes a pool the creates fill",
            args.ports
        );
    }
    let bin = shoal_bin(args.shoal_bin.as_deref())?;
    let dir = TempDir::new(args.keep_dir.as_deref())?;
    let mut procs = ProcGuard::new();
    eprintln!("[ipam] data and logs in {}", dir.path().display());
    let res = bench(&args, &mut procs, &bin, dir.path()).await;
    procs.shutdown(Duration::from_secs(10));
    report::finish("ipam", dir, res, args.json, print_table)
}

/// One call: the status and the JSON body (`null` when it is not JSON).
pub async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let mut req = http.request(method, url).header("x-auth-token", token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.with_context(|| url.to_owned())?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// As [`call`], failing unless the answer is 2xx.
pub async fn ok(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> Result<Value> {
    let (status, v) = call(http, method, url, token, body).await?;
    if !(200..300).contains(&status) {
        bail!("{url}: {status} {v}");
    }
    Ok(v)
}

/// The admin project's id, with its port, network and subnet quotas lifted.
pub async fn unlimited_admin_project(
    http: &reqwest::Client,
    base: &str,
    token: &str,
) -> Result<String> {
    use reqwest::Method;
    let projects = ok(
        http,
        Method::GET,
        &format!("{base}/identity/v3/projects?name=admin"),
        token,
        None,
    )
    .await?;
    let project = projects["projects"][0]["id"]
        .as_str()
        .context("no admin project")?
        .to_owned();
    ok(
        http,
        Method::PUT,
        &format!("{base}/network/v2.0/quotas/{project}"),
        token,
        Some(json!({"quota": {"port": -1, "network": -1, "subnet": -1}})),
    )
    .await?;
    Ok(project)
}

async fn bench(
    args: &Args,
    procs: &mut ProcGuard,
    bin: &std::path::Path,
    dir: &std::path::Path,
) -> Result<IpamSummary> {
    use reqwest::Method;
    let http = http_client(Duration::from_secs(60))?;
    let cluster = ShoalCluster::start(
        procs,
        bin,
        &dir.join("shoal"),
        dir,
        args.nodes.into(),
        &http,
    )
    .await?;
    let bases: Vec<String> = cluster.status.members.iter().map(|m| m.base()).collect();
    let token = cluster.token.clone();
    let b0 = &bases[0];
    unlimited_admin_project(&http, b0, &token).await?;
    let net = ok(
        &http,
        Method::POST,
        &format!("{b0}/network/v2.0/networks"),
        &token,
        Some(json!({"network": {"name": "ipam-bench"}})),
    )
    .await?["network"]["id"]
        .as_str()
        .context("no network id")?
        .to_owned();
    // 10.64.0.0/16: 65,533 addresses besides the gateway; `--free K` keeps K of them.
    let pool = args.free.unwrap_or(65_533);
    let mut subnet = json!({"network_id": net, "cidr": "10.64.0.0/16", "ip_version": 4});
    if let Some(free) = args.free {
        let last = 2 + free - 1;
        subnet["allocation_pools"] = json!([{
            "start": "10.64.0.2",
            "end": format!("10.64.{}.{}", last / 256, last % 256),
        }]);
    }
    ok(
        &http,
        Method::POST,
        &format!("{b0}/network/v2.0/subnets"),
        &token,
        Some(json!({"subnet": subnet})),
    )
    .await?;
    eprintln!(
        "[ipam] {} port creates through {} clients over {} nodes onto a pool of {pool}",
        args.ports, args.clients, args.nodes
    );

    let hist = Arc::new(Mutex::new(report::new_histogram()));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let next = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    let clients: Vec<_> = (0..args.clients as usize)
        .map(|i| {
            let (base, token, net) = (bases[i % bases.len()].clone(), token.clone(), net.clone());
            let (hist, outcomes, next) = (hist.clone(), outcomes.clone(), next.clone());
            let total = args.ports;
            tokio::spawn(async move {
                let http = http_client(Duration::from_secs(60))?;
                let url = format!("{base}/network/v2.0/ports");
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let body = json!({"port": {"network_id": net, "name": format!("p{n}")}});
                    let t0 = Instant::now();
                    let res = call(&http, Method::POST, &url, &token, Some(body)).await;
                    let took = t0.elapsed();
                    let mut o = outcomes.lock().expect("lock");
                    match res {
                        Ok((201, v)) => {
                            let id = v["port"]["id"].as_str().unwrap_or_default().to_owned();
                            let ip = v["port"]["fixed_ips"][0]["ip_address"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned();
                            o.accepted.insert(id, ip);
                            hist.lock()
                                .expect("lock")
                                .record(took.as_micros().max(1) as u64)?;
                        }
                        Ok((409, v))
                            if v["NeutronError"]["type"] == "IpAddressGenerationFailure" =>
                        {
                            o.pool_full += 1;
                        }
                        Ok((409, v)) if v["NeutronError"]["type"] == "Conflict" => {
                            o.contended += 1;
                            o.first_contended.get_or_insert(format!("{v}"));
                        }
                        Ok((status, v)) => {
                            o.failed += 1;
                            o.first_failure.get_or_insert(format!("{status} {v}"));
                        }
                        Err(e) => {
                            o.failed += 1;
                            o.first_failure.get_or_insert(format!("{e:#}"));
                        }
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.await??;
    }
    let elapsed = start.elapsed();
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("lock"));
    if let Some(f) = &outcomes.first_failure {
        bail!(
            "{} creates failed other than by a full pool; the first: {f}",
            outcomes.failed
        );
    }

    // The check: the same ports through every node, each address once, each accepted create
    // listed with the address it was answered with.
    let mut distinct = 0;
    for base in &bases {
        // A linearizable read first (of a key that need not exist: a 404 passed the barrier
        // too), so the list that follows shows every acknowledged write.
        let (status, v) = call(
            &http,
            Method::GET,
            &format!("{base}/shoal/v1/kv/ipam-bench-barrier?consistency=linearizable"),
            &token,
            None,
        )
        .await?;
        ensure!(
            status == 200 || status == 404,
            "{base}: read barrier: {status} {v}"
        );
        let list = ok(
            &http,
            Method::GET,
            &format!("{base}/network/v2.0/ports?network_id={net}"),
            &token,
            None,
        )
        .await?;
        let ports = list["ports"].as_array().context("no ports in the list")?;
        let mut by_ip: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut listed = HashSet::new();
        for p in ports {
            let id = p["id"].as_str().unwrap_or_default().to_owned();
            for f in p["fixed_ips"].as_array().into_iter().flatten() {
                let ip = f["ip_address"].as_str().unwrap_or_default().to_owned();
                by_ip.entry(ip).or_default().push(id.clone());
            }
            listed.insert(id);
        }
        if let Some((ip, holders)) = by_ip.iter().find(|(_, h)| h.len() > 1) {
            bail!("{base}: address {ip} is held by {holders:?}");
        }
        for (id, ip) in &outcomes.accepted {
            ensure!(
                listed.contains(id),
                "{base}: accepted port {id} is not listed"
            );
            ensure!(
                by_ip.get(ip).is_some_and(|h| h.len() == 1 && &h[0] == id),
                "{base}: port {id} was answered with {ip}, which the list does not give it"
            );
        }
        ensure!(
            listed.len() == outcomes.accepted.len(),
            "{base}: {} ports listed, {} creates accepted",
            listed.len(),
            outcomes.accepted.len()
        );
        distinct = by_ip.len();
    }
    if let Some(c) = &outcomes.first_contended {
        eprintln!(
            "[ipam] {} creates refused as contended; the first: {c}",
            outcomes.contended
        );
    }
    if let (Some(free), 0) = (args.free, outcomes.contended) {
        ensure!(
            outcomes.accepted.len() == free as usize,
            "{} creates accepted onto a pool of {free}",
            outcomes.accepted.len()
        );
    }
    let hist = hist.lock().expect("lock");
    let q = |x: f64| {
        if hist.is_empty() {
            0
        } else {
            hist.value_at_quantile(x)
        }
    };
    Ok(IpamSummary {
        nodes: args.nodes,
        clients: args.clients,
        ports: args.ports,
        pool,
        accepted: outcomes.accepted.len() as u64,
        pool_full: outcomes.pool_full,
        contended: outcomes.contended,
        failed: outcomes.failed,
        accepted_per_second: outcomes.accepted.len() as f64 / elapsed.as_secs_f64(),
        api_p50_us: q(0.5),
        api_p99_us: q(0.99),
        api_max_us: if hist.is_empty() { 0 } else { hist.max() },
        elapsed_s: elapsed.as_secs_f64(),
        distinct_addresses: distinct,
    })
}

fn print_table(s: &IpamSummary) {
    println!(
        "port creates through {} nodes, {} clients, pool of {} addresses",
        s.nodes, s.clients, s.pool
    );
    println!(
        "  accepted {} ({:.1}/s over {:.1} s), pool full {}, contended (409 Conflict) {}, failed {}",
        s.accepted, s.accepted_per_second, s.elapsed_s, s.pool_full, s.contended, s.failed
    );
    println!(
        "  create latency p50 {}  p99 {}  max {}",
        fmt_us(s.api_p50_us),
        fmt_us(s.api_p99_us),
        fmt_us(s.api_max_us)
    );
    println!(
        "  {} distinct addresses held, every accepted port listed on every node",
        s.distinct_addresses
    );
}
