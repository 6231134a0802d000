//! `shoal-loadtest boot`: servers created through the Compute API on a `shoal dev` cluster
//! whose compute agents drive libvirt's test hypervisor (`test:///default`: real libvirt
//! calls, domains that run nothing). `clients` concurrent clients, spread over the members,
//! send `POST /servers` until `servers` creates were accepted; a poller lists
//! `/servers/detail` and notes when each server is first seen ACTIVE or ERROR.
//!
//! Reports servers ACTIVE per second (from the first create sent to the last server seen
//! ACTIVE), time-to-ACTIVE percentiles (create sent → first seen ACTIVE, so they carry up to
//! one poll interval of slack), the create call's latency, and checks at the end that every
//! host's claimed vCPUs and RAM equal what its ACTIVE servers hold (no double booking).
//!
//! The real nodes' capacity is raised through `PUT /shoal/v1/hosts/{name}` so that placement
//! never runs out of room: the benchmark measures the control plane, not the machine.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
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
    /// Concurrent clients (the concurrency C), round-robin over the members.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub clients: u32,
    /// Servers to create in all.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub servers: u32,
    /// How often the poller lists the servers.
    #[arg(long, default_value = "200ms", value_parser = crate::raft::parse_duration)]
    pub poll: Duration,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// The `shoal` binary (default: next to this executable, then on PATH).
    #[arg(long)]
    pub shoal_bin: Option<PathBuf>,
    /// Keep the cluster's data and logs here (default: a temporary directory, removed).
    #[arg(long)]
    pub keep_dir: Option<PathBuf>,
    /// Boot real guests instead (root): `--real N` times a TCG boot of the busybox guest
    /// (node/scripts/guest-image.sh) through `server create` to ACTIVE and to its console
    /// marker, N times one after another, and `virsh create` of the same domain XML to the
    /// marker (the floor).
    #[arg(long, value_name = "RUNS")]
    pub real: Option<u32>,
}

/// The flavor every server gets: small, so that RAM is not what limits a run.
const FLAVOR: (u32, u64, u64) = (1, 64, 1);

#[derive(Debug, Clone, Serialize)]
pub struct BootSummary {
    pub nodes: u16,
    pub clients: u32,
    pub servers: u32,
    pub active: u64,
    pub error: u64,
    /// Creates refused (not 202).
    pub refused: u64,
    pub active_per_second: f64,
    pub to_active_p50_us: u64,
    pub to_active_p99_us: u64,
    pub to_active_max_us: u64,
    pub api_p50_us: u64,
    pub api_p99_us: u64,
    pub api_max_us: u64,
    pub elapsed_s: f64,
    /// Hosts whose claims equal their ACTIVE servers (all of them, or the run fails).
    pub hosts_checked: usize,
}

struct Shared {
    /// Create sent time per accepted server id.
    sent: Mutex<HashMap<String, Instant>>,
    api: Mutex<hdrhistogram::Histogram<u64>>,
    refused: AtomicU32,
    next: AtomicU32,
}

async fn api(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> Result<Value> {
    let mut req = http.request(method, &url).header("x-auth-token", token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("{url}: {status} {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub async fn run(args: Args) -> Result<()> {
    install_crypto_provider();
    let bin = shoal_bin(args.shoal_bin.as_deref())?;
    let dir = TempDir::new(args.keep_dir.as_deref())?;
    let mut procs = ProcGuard::new();
    eprintln!("[boot] data and logs in {}", dir.path().display());
    if let Some(runs) = args.real {
        let res = real(runs, &args, &mut procs, &bin, dir.path()).await;
        procs.shutdown(Duration::from_secs(10));
        return report::finish("boot", dir, res, args.json, print_real);
    }
    let res = bench(&args, &mut procs, &bin, dir.path()).await;
    procs.shutdown(Duration::from_secs(10));
    report::finish("boot", dir, res, args.json, print_table)
}

async fn bench(
    args: &Args,
    procs: &mut ProcGuard,
    bin: &std::path::Path,
    dir: &std::path::Path,
) -> Result<BootSummary> {
    use reqwest::Method;
    let http = http_client(Duration::from_secs(60))?;
    let data = dir.join("shoal");
    let cluster = ShoalCluster::start(procs, bin, &data, dir, args.nodes.into(), &http).await?;
    let members = cluster.status.members.clone();
    let bases: Vec<String> = members.iter().map(|m| m.base()).collect();
    let token = cluster.token.clone();
    let b0 = &bases[0];

    // Room on every real node, an unlimited project, a flavor and a 1 MiB raw image.
    for m in &members {
        api(
            &http,
            Method::PUT,
            format!("{b0}/shoal/v1/hosts/{}", m.name),
            &token,
            Some(json!({"vcpus": 4096, "ram_mb": 1u64 << 30, "disk_gb": 1u64 << 20})),
        )
        .await?;
    }
    let projects = api(
        &http,
        Method::GET,
        format!("{b0}/identity/v3/projects?name=admin"),
        &token,
        None,
    )
    .await?;
    let project = projects["projects"][0]["id"]
        .as_str()
        .context("no admin project")?
        .to_owned();
    api(
        &http,
        Method::PUT,
        format!("{b0}/compute/v2.1/os-quota-sets/{project}"),
        &token,
        Some(json!({"quota_set": {"instances": -1, "cores": -1, "ram": -1}})),
    )
    .await?;
    let flavor = api(
        &http,
        Method::POST,
        format!("{b0}/compute/v2.1/flavors"),
        &token,
        Some(json!({"flavor": {"name": "bench", "vcpus": FLAVOR.0, "ram": FLAVOR.1, "disk": FLAVOR.2}})),
    )
    .await?["flavor"]["id"]
        .as_str()
        .context("no flavor id")?
        .to_owned();
    let image = api(
        &http,
        Method::POST,
        format!("{b0}/image/v2/images"),
        &token,
        Some(json!({"name": "bench", "disk_format": "raw", "container_format": "bare"})),
    )
    .await?["id"]
        .as_str()
        .context("no image id")?
        .to_owned();
    let resp = http
        .put(format!("{b0}/image/v2/images/{image}/file"))
        .header("x-auth-token", &token)
        .header("content-type", "application/octet-stream")
        .body(vec![0u8; 1 << 20])
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("image upload: {} {}", resp.status(), resp.text().await?);
    }
    // What the hosts report as used before any server exists: Nova counts a host's reserved
    // RAM (and disk) as used, so the double-booking check compares growth, not totals.
    let before = hypervisor_usage(&http, b0, &token).await?;
    eprintln!(
        "[boot] {} servers through {} clients over {} nodes",
        args.servers, args.clients, args.nodes
    );

    let shared = Arc::new(Shared {
        sent: Mutex::new(HashMap::new()),
        api: Mutex::new(report::new_histogram()),
        refused: AtomicU32::new(0),
        next: AtomicU32::new(0),
    });
    let start = Instant::now();
    let clients: Vec<_> = (0..args.clients as usize)
        .map(|i| {
            let (base, token, flavor, image, shared) = (
                bases[i % bases.len()].clone(),
                token.clone(),
                flavor.clone(),
                image.clone(),
                shared.clone(),
            );
            let total = args.servers;
            tokio::spawn(async move {
                let http = http_client(Duration::from_secs(60))?;
                loop {
                    let n = shared.next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let body = json!({"server": {"name": format!("b{n}"),
                        "flavorRef": flavor, "imageRef": image, "networks": "none"}});
                    let t0 = Instant::now();
                    let resp = http
                        .post(format!("{base}/compute/v2.1/servers"))
                        .header("x-auth-token", &token)
                        .json(&body)
                        .send()
                        .await;
                    let took = t0.elapsed();
                    match resp {
                        Ok(r) if r.status().as_u16() == 202 => {
                            let v: Value = r.json().await?;
                            let id = v["server"]["id"].as_str().unwrap_or_default().to_owned();
                            shared.sent.lock().expect("lock").insert(id, t0);
                            shared
                                .api
                                .lock()
                                .expect("lock")
                                .record(took.as_micros().max(1) as u64)?;
                        }
                        Ok(r) => {
                            if shared.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!(
                                    "[boot] create refused: {} {}",
                                    r.status(),
                                    r.text().await?
                                );
                            }
                        }
                        Err(e) => {
                            if shared.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("[boot] create failed: {e:#}");
                            }
                        }
                    }
                }
            })
        })
        .collect();

    // The poller: first time each server is seen ACTIVE or ERROR.
    let mut settled: HashMap<String, (Instant, String, Option<String>)> = HashMap::new();
    let deadline = start + Duration::from_secs(600);
    let mut clients_done = false;
    let mut clients = clients;
    loop {
        tokio::time::sleep(args.poll).await;
        let list = api(
            &http,
            Method::GET,
            format!("{}/compute/v2.1/servers/detail", bases[1 % bases.len()]),
            &token,
            None,
        )
        .await?;
        let now = Instant::now();
        for s in list["servers"].as_array().into_iter().flatten() {
            let status = s["status"].as_str().unwrap_or_default();
            if status == "ACTIVE" || status == "ERROR" {
                let id = s["id"].as_str().unwrap_or_default().to_owned();
                settled.entry(id).or_insert((
                    now,
                    status.to_owned(),
                    s["OS-EXT-SRV-ATTR:host"].as_str().map(str::to_owned),
                ));
            }
        }
        if !clients_done && clients.iter().all(|c| c.is_finished()) {
            for c in clients.drain(..) {
                c.await.context("client task")??;
            }
            clients_done = true;
        }
        let accepted = shared.sent.lock().expect("lock").len();
        if clients_done && settled.len() >= accepted {
            break;
        }
        if now > deadline {
            bail!(
                "{} of {accepted} servers settled after 600 s",
                settled.len()
            );
        }
    }
    procs.check_running()?;

    let sent = shared.sent.lock().expect("lock").clone();
    let mut to_active = report::new_histogram();
    let mut last_active = start;
    let (mut active, mut error) = (0u64, 0u64);
    let mut per_host: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (id, (seen, status, host)) in &settled {
        if status == "ACTIVE" {
            active += 1;
            last_active = last_active.max(*seen);
            if let Some(t0) = sent.get(id) {
                to_active.record(seen.duration_since(*t0).as_micros().max(1) as u64)?;
            }
            let e = per_host
                .entry(host.clone().unwrap_or_default())
                .or_default();
            e.0 += u64::from(FLAVOR.0);
            e.1 += FLAVOR.1;
        } else {
            error += 1;
        }
    }
    // No double booking: what each host's claims grew by is exactly its ACTIVE servers.
    let mut hosts_checked = 0;
    for (name, (used_vcpus, used_ram)) in hypervisor_usage(&http, b0, &token).await? {
        let (vcpus, ram) = per_host.get(&name).copied().unwrap_or((0, 0));
        let (base_vcpus, base_ram) = before.get(&name).copied().unwrap_or((0, 0));
        let (claimed_vcpus, claimed_ram) = (
            used_vcpus.saturating_sub(base_vcpus),
            used_ram.saturating_sub(base_ram),
        );
        if error == 0 && (claimed_vcpus, claimed_ram) != (vcpus, ram) {
            bail!("host {name} claims {claimed_vcpus} vCPUs / {claimed_ram} MB more than before the run but runs {vcpus} / {ram}");
        }
        hosts_checked += 1;
    }
    let api_hist = shared.api.lock().expect("lock").clone();
    let q = |h: &hdrhistogram::Histogram<u64>, x: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(x)
        }
    };
    let elapsed = last_active.duration_since(start).as_secs_f64();
    Ok(BootSummary {
        nodes: args.nodes,
        clients: args.clients,
        servers: args.servers,
        active,
        error,
        refused: u64::from(shared.refused.load(Ordering::Relaxed)),
        active_per_second: if elapsed > 0.0 {
            active as f64 / elapsed
        } else {
            0.0
        },
        to_active_p50_us: q(&to_active, 0.5),
        to_active_p99_us: q(&to_active, 0.99),
        to_active_max_us: if to_active.is_empty() {
            0
        } else {
            to_active.max()
        },
        api_p50_us: q(&api_hist, 0.5),
        api_p99_us: q(&api_hist, 0.99),
        api_max_us: if api_hist.is_empty() {
            0
        } else {
            api_hist.max()
        },
        elapsed_s: elapsed,
        hosts_checked,
    })
}

fn print_table(s: &BootSummary) {
    println!(
        "servers through the Compute API: {} nodes (libvirt test driver), {} clients, {} servers",
        s.nodes, s.clients, s.servers
    );
    println!(
        "{:>7} {:>6} {:>8} {:>9} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "ACTIVE",
        "ERROR",
        "refused",
        "ACTIVE/s",
        "toA p50",
        "toA p99",
        "toA max",
        "api p50",
        "api p99",
        "api max"
    );
    println!(
        "{:>7} {:>6} {:>8} {:>9.1} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}",
        s.active,
        s.error,
        s.refused,
        s.active_per_second,
        fmt_us(s.to_active_p50_us),
        fmt_us(s.to_active_p99_us),
        fmt_us(s.to_active_max_us),
        fmt_us(s.api_p50_us),
        fmt_us(s.api_p99_us),
        fmt_us(s.api_max_us),
    );
    println!(
        "{:.1} s from the first create to the last ACTIVE; claims equal ACTIVE servers on all {} hosts",
        s.elapsed_s, s.hosts_checked
    );
}

#[derive(Debug, Clone, Serialize)]
pub struct RealSummary {
    pub runs: u32,
    /// `POST /servers` sent → the server first seen ACTIVE (polled every 50 ms).
    pub to_active_ms: Vec<u64>,
    /// `POST /servers` sent → `SHOAL-GUEST-UP` in `os-getConsoleOutput` (polled every 100 ms).
    pub to_marker_ms: Vec<u64>,
    /// `virsh create` of the same XML → `SHOAL-GUEST-UP` in its log file (polled every 50 ms).
    pub virsh_to_marker_ms: Vec<u64>,
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn script(name: &str, args: &[&str]) -> Result<String> {
    let path = format!("{}/../node/scripts/{name}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash")
        .arg(&path)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn virsh(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("virsh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Each hypervisor's `vcpus_used` and `memory_mb_used` as `os-hypervisors/detail` reports them.
async fn hypervisor_usage(
    http: &reqwest::Client,
    base: &str,
    token: &str,
) -> Result<BTreeMap<String, (u64, u64)>> {
    let hyper = api(
        http,
        reqwest::Method::GET,
        format!("{base}/compute/v2.1/os-hypervisors/detail"),
        token,
        None,
    )
    .await?;
    let mut usage = BTreeMap::new();
    for h in hyper["hypervisors"].as_array().into_iter().flatten() {
        let name = h["hypervisor_hostname"].as_str().unwrap_or_default();
        let used = (
            h["vcpus_used"]
                .as_u64()
                .context("hypervisor without vcpus_used")?,
            h["memory_mb_used"]
                .as_u64()
                .context("hypervisor without memory_mb_used")?,
        );
        usage.insert(name.to_owned(), used);
    }
    Ok(usage)
}

async fn upload(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    meta: Value,
    file: &std::path::Path,
) -> Result<String> {
    use reqwest::Method;
    let id = api(
        http,
        Method::POST,
        format!("{base}/image/v2/images"),
        token,
        Some(meta),
    )
    .await?["id"]
        .as_str()
        .context("no image id")?
        .to_owned();
    let resp = http
        .put(format!("{base}/image/v2/images/{id}/file"))
        .header("x-auth-token", token)
        .header("content-type", "application/octet-stream")
        .body(std::fs::read(file)?)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("upload {}: {}", file.display(), resp.status());
    }
    Ok(id)
}

async fn real(
    runs: u32,
    args: &Args,
    procs: &mut ProcGuard,
    bin: &std::path::Path,
    dir: &std::path::Path,
) -> Result<RealSummary> {
    use reqwest::Method;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("--real boots guests through libvirtd and needs root");
    }
    script("libvirtd.sh", &[])?;
    let guest = PathBuf::from(std::env::var("HOME")?).join(".cache/shoal/guest");
    script("guest-image.sh", &[guest.to_str().context("path")?])?;
    let http = http_client(Duration::from_secs(60))?;
    let cluster = ShoalCluster::start_with(
        procs,
        bin,
        &dir.join("shoal"),
        dir,
        args.nodes.into(),
        &http,
        &["--libvirt-uri", "qemu:///system", "--virt-type", "qemu"],
    )
    .await?;
    let base = cluster.status.members[0].base();
    let token = cluster.token.clone();
    let kernel = upload(
        &http,
        &base,
        &token,
        json!({"name": "k", "disk_format": "aki", "container_format": "aki"}),
        &guest.join("vmlinuz"),
    )
    .await?;
    let ramdisk = upload(
        &http,
        &base,
        &token,
        json!({"name": "r", "disk_format": "ari", "container_format": "ari"}),
        &guest.join("initrd.img"),
    )
    .await?;
    let image = upload(
        &http,
        &base,
        &token,
        json!({"name": "guest", "disk_format": "ami", "container_format": "ami",
               "kernel_id": kernel, "ramdisk_id": ramdisk}),
        &guest.join("disk.raw"),
    )
    .await?;
    let flavor = api(
        &http,
        Method::POST,
        format!("{base}/compute/v2.1/flavors"),
        &token,
        Some(json!({"flavor": {"name": "g", "vcpus": 1, "ram": 256, "disk": 1}})),
    )
    .await?["flavor"]["id"]
        .as_str()
        .context("no flavor id")?
        .to_owned();

    let mut s = RealSummary {
        runs,
        to_active_ms: vec![],
        to_marker_ms: vec![],
        virsh_to_marker_ms: vec![],
    };
    let mut last_xml = None;
    for i in 0..runs {
        let t0 = Instant::now();
        let v = api(&http, Method::POST, format!("{base}/compute/v2.1/servers"), &token,
            Some(json!({"server": {"name": format!("g{i}"), "flavorRef": flavor, "imageRef": image}})))
            .await?;
        let id = v["server"]["id"]
            .as_str()
            .context("no server id")?
            .to_owned();
        let url = format!("{base}/compute/v2.1/servers/{id}");
        loop {
            let v = api(&http, Method::GET, url.clone(), &token, None).await?;
            match v["server"]["status"].as_str() {
                Some("ACTIVE") => break,
                Some("ERROR") => bail!("server {id} went to ERROR: {}", v["server"]["fault"]),
                _ => {}
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("server {id} not ACTIVE after 120 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.to_active_ms.push(t0.elapsed().as_millis() as u64);
        loop {
            let v = api(
                &http,
                Method::POST,
                format!("{url}/action"),
                &token,
                Some(json!({"os-getConsoleOutput": {"length": null}})),
            )
            .await?;
            if v["output"]
                .as_str()
                .unwrap_or_default()
                .contains("SHOAL-GUEST-UP")
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(180) {
                bail!("no marker from server {id} after 180 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s.to_marker_ms.push(t0.elapsed().as_millis() as u64);
        last_xml = Some(virsh(&["dumpxml", &id])?);
        api(&http, Method::DELETE, url.clone(), &token, None).await?;
        while http
            .get(&url)
            .header("x-auth-token", &token)
            .send()
            .await?
            .status()
            != 404
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The floor: the same XML through virsh, on a fresh overlay of the same base.
    let xml = last_xml.context("no run")?;
    let cache = dir.join("shoal/node1/images/cache");
    let backing = std::fs::read_dir(&cache)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.len() == 1 << 20)
                .unwrap_or(false)
        })
        .or_else(|| {
            // The server may have run on another node: any node's cached 1 MiB machine image.
            (1..=args.nodes).find_map(|n| {
                std::fs::read_dir(dir.join(format!("shoal/node{n}/images/cache")))
                    .ok()?
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .find(|p| {
                        std::fs::metadata(p)
                            .map(|m| m.len() == 1 << 20)
                            .unwrap_or(false)
                    })
            })
        })
        .context("no cached machine image")?;
    for i in 0..runs {
        let overlay = dir.join(format!("floor{i}.qcow2"));
        let log = dir.join(format!("floor{i}.log"));
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&backing)
            .arg(&overlay)
            .arg("1G")
            .status()?;
        if !status.success() {
            bail!("qemu-img create failed");
        }
        let name = format!("shoal-floor-{i}");
        let mut x = String::new();
        // libvirt's live XML describes the backing chain too; the new overlay names its own.
        let mut depth = 0u32;
        for line in xml.lines() {
            let t = line.trim_start();
            if t.starts_with("<backingStore") {
                if !t.ends_with("/>") {
                    depth += 1;
                }
                continue;
            }
            if t.starts_with("</backingStore>") {
                depth = depth.saturating_sub(1);
                continue;
            }
            if depth > 0 {
                continue;
            }
            if t.starts_with("<uuid>") {
                continue;
            } else if t.starts_with("<name>") {
                x.push_str(&format!("  <name>{name}</name>\n"));
            } else if t.starts_with("<source file=") {
                x.push_str(&format!("      <source file='{}'/>\n", overlay.display()));
            } else if t.starts_with("<source path=") {
                x.push_str(&format!("      <source path='{}'/>\n", log.display()));
            } else {
                x.push_str(line);
                x.push('\n');
            }
        }
        let xml_path = dir.join(format!("floor{i}.xml"));
        std::fs::write(&xml_path, &x)?;
        let t0 = Instant::now();
        virsh(&["create", xml_path.to_str().context("path")?])?;
        let found = loop {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("SHOAL-GUEST-UP")
            {
                break true;
            }
            if t0.elapsed() > Duration::from_secs(180) {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let took = t0.elapsed().as_millis() as u64;
        let _ = virsh(&["destroy", &name]);
        if !found {
            bail!("virsh create: no marker after 180 s");
        }
        s.virsh_to_marker_ms.push(took);
    }
    Ok(s)
}

fn print_real(s: &RealSummary) {
    println!(
        "real TCG boots of the busybox guest, {} runs one after another (medians)",
        s.runs
    );
    println!(
        "  server create -> ACTIVE:         {:>6} ms  {:?}",
        median(&s.to_active_ms),
        s.to_active_ms
    );
    println!(
        "  server create -> console marker: {:>6} ms  {:?}",
        median(&s.to_marker_ms),
        s.to_marker_ms
    );
    println!(
        "  virsh create  -> console marker: {:>6} ms  {:?}",
        median(&s.virsh_to_marker_ms),
        s.virsh_to_marker_ms
    );
    let (a, b) = (median(&s.to_marker_ms), median(&s.virsh_to_marker_ms));
    if b > 0 {
        println!(
            "  Shoal's overhead over the floor: {} ms ({:.2}x)",
            a as i64 - b as i64,
            a as f64 / b as f64
        );
    }
}
