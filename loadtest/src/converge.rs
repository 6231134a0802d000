//! `shoal-loadtest converge` (root): how long from `POST /network/v2.0/ports` with
//! `binding:host_id` = node A until node B's datapath forwards to that port.
//!
//! The cluster is `shoal dev --netns --network-driver D` on libvirt's test hypervisor: each node
//! has its own namespace, underlay and network agent. Node B (`node2`) is given one bound port
//! on the benchmark's network with a tap (a veth in its namespace), so the network is one B
//! takes part in and B's agent must carry every remote port of it. Then `ports` ports bound to
//! node A (`node1`) are created through A's API by `clients` concurrent clients.
//!
//! "Node B forwards to it" is read from what B's datapath holds, never from an API field:
//! - eBPF: the entry `shoal_endpoints[(VNI, address)]` in B's pinned map names A's VTEP (the
//!   tc program encapsulates a frame for that address to it); looked up every millisecond for
//!   the ports not yet seen.
//! - kernel: a static FDB entry for the port's MAC with `dst` = A's VTEP on B's vxlan device,
//!   seen on a `bridge monitor fdb` in B's namespace (the time the kernel announced it).
//!
//! The clock starts when the create is sent. Reports p50/p99/max convergence, the create call's
//! latency, and ports per second (first create sent to the last port seen on B).

use std::collections::HashMap;
use std::io::BufRead as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::json;
use shoal_dataplane::abi::{self, Endpoint, EpKey};

use crate::ipam::{call, ok, unlimited_admin_project};
use crate::procs::ProcGuard;
use crate::raft::{http_client, install_crypto_provider, shoal_bin, TempDir};
use crate::report::{self, fmt_us};
use crate::shoal_client::ShoalCluster;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Ports bound to node A to create.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    pub ports: u32,
    /// Concurrent clients sending the creates through node A.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub clients: u32,
    /// The datapath driver of every node: ebpf or kernel.
    #[arg(long, default_value = "ebpf", value_parser = ["ebpf", "kernel"])]
    pub driver: String,
    /// Members of the `shoal dev` cluster (node1 is A, node2 is B).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(2..=9))]
    pub nodes: u16,
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
pub struct ConvergeSummary {
    pub driver: String,
    pub nodes: u16,
    pub clients: u32,
    pub ports: u32,
    pub converge_p50_us: u64,
    pub converge_p99_us: u64,
    pub converge_max_us: u64,
    pub api_p50_us: u64,
    pub api_p99_us: u64,
    pub ports_per_second: f64,
    pub elapsed_s: f64,
}

/// One port: when its create was sent, what B's datapath is looked up by, when B had it.
struct Track {
    sent: Instant,
    mac: String,
    ip: Ipv4Addr,
    seen: Option<Instant>,
}

#[derive(Default)]
struct Shared {
    tracks: Mutex<Vec<Track>>,
    /// Kernel driver: MAC → first time B's FDB announced it towards A's VTEP.
    fdb_seen: Mutex<HashMap<String, Instant>>,
}

pub async fn run(args: Args) -> Result<()> {
    install_crypto_provider();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("converge runs `shoal dev --netns` (network namespaces, eBPF) and needs root");
    }
    let bin = shoal_bin(args.shoal_bin.as_deref())?;
    let dir = TempDir::new(args.keep_dir.as_deref())?;
    let mut procs = ProcGuard::new();
    eprintln!("[converge] data and logs in {}", dir.path().display());
    let res = bench(&args, &mut procs, &bin, dir.path()).await;
    // SIGTERM lets `shoal dev` delete its namespaces and pins.
    procs.shutdown(Duration::from_secs(15));
    report::finish("converge", dir, res, args.json, print_table)
}

/// Kills the `bridge monitor` child however the benchmark ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ip` with `args`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

async fn bench(
    args: &Args,
    procs: &mut ProcGuard,
    bin: &Path,
    dir: &Path,
) -> Result<ConvergeSummary> {
    use reqwest::Method;
    let http = http_client(Duration::from_secs(60))?;
    let data = dir.join("shoal");
    let cluster = ShoalCluster::start_with(
        procs,
        bin,
        &data,
        dir,
        args.nodes.into(),
        &http,
        &[
            "--libvirt-uri",
            "test:///default",
            "--netns",
            "--network-driver",
            &args.driver,
        ],
    )
    .await?;
    // `shoal dev --netns` lists its namespaces: the underlay hub, then node1, node2, ...
    let namespaces: Vec<String> = std::fs::read_to_string(data.join("netns"))
        .context("reading the dev cluster's namespace list")?
        .lines()
        .map(str::to_owned)
        .collect();
    let ns_b = namespaces.get(2).context("no namespace for node2")?.clone();
    let member = |name: &str| {
        cluster
            .status
            .members
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.base())
            .with_context(|| format!("no member {name}"))
    };
    let (base_a, base_b) = (member("node1")?, member("node2")?);
    let token = cluster.token.clone();
    unlimited_admin_project(&http, &base_a, &token).await?;

    // Both agents running and their VTEPs published.
    let deadline = Instant::now() + Duration::from_secs(60);
    let vtep_a: Ipv4Addr = loop {
        let v = ok(
            &http,
            Method::GET,
            &format!("{base_a}/network/v2.0/agents"),
            &token,
            None,
        )
        .await?;
        let agents = v["agents"].as_array().cloned().unwrap_or_default();
        let a = agents.iter().find(|a| a["host"] == "node1");
        if agents.len() >= 2 {
            if let Some(vtep) = a.and_then(|a| a["configurations"]["vtep"].as_str()) {
                break vtep.parse().context("node1's VTEP")?;
            }
        }
        ensure!(Instant::now() < deadline, "network agents not listed: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let net = ok(
        &http,
        Method::POST,
        &format!("{base_a}/network/v2.0/networks"),
        &token,
        Some(json!({"network": {"name": "converge"}})),
    )
    .await?["network"]
        .clone();
    let net_id = net["id"].as_str().context("no network id")?.to_owned();
    let vni = u32::try_from(
        net["provider:segmentation_id"]
            .as_u64()
            .context("no VNI shown to the admin")?,
    )?;
    ok(
        &http,
        Method::POST,
        &format!("{base_a}/network/v2.0/subnets"),
        &token,
        Some(json!({"subnet": {"network_id": net_id, "cidr": "10.66.0.0/16", "ip_version": 4}})),
    )
    .await?;

    // B's own port, with a tap in B's namespace: B now carries the network.
    let anchor = ok(
        &http,
        Method::POST,
        &format!("{base_b}/network/v2.0/ports"),
        &token,
        Some(
            json!({"port": {"network_id": net_id, "binding:host_id": "node2",
            "name": "converge-anchor"}}),
        ),
    )
    .await?["port"]
        .clone();
    let anchor_id = anchor["id"].as_str().context("no port id")?.to_owned();
    let tap = format!("tap{}", &anchor_id[..11]);
    ip(&[
        "-n", &ns_b, "link", "add", &tap, "type", "veth", "peer", "name", "cvgpeer",
    ])?;
    ip(&["-n", &ns_b, "link", "set", "cvgpeer", "up"])?;
    ip(&["-n", &ns_b, "link", "set", &tap, "up"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = call(
            &http,
            Method::GET,
            &format!("{base_b}/network/v2.0/ports/{anchor_id}"),
            &token,
            None,
        )
        .await?;
        if v["port"]["status"] == "ACTIVE" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "node2's own port never went ACTIVE: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "[converge] {} driver: {} ports bound to node1 through {} clients, watched on node2 ({ns_b})",
        args.driver, args.ports, args.clients
    );

    let shared = Arc::new(Shared::default());
    let stop = Arc::new(AtomicBool::new(false));
    // The watcher of B's datapath.
    let (watcher, _monitor) = if args.driver == "ebpf" {
        let pin = PathBuf::from("/sys/fs/bpf/shoal")
            .join(&ns_b)
            .join(abi::MAP_ENDPOINTS);
        let map = aya::maps::MapData::from_pin(&pin)
            .with_context(|| format!("opening {}", pin.display()))?;
        let map: aya::maps::HashMap<_, EpKey, Endpoint> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map))?;
        let (shared, stop) = (shared.clone(), stop.clone());
        let want_vtep = abi::ip_be(vtep_a);
        let h = std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let pending: Vec<(usize, Ipv4Addr)> = {
                    let t = shared.tracks.lock().expect("lock");
                    t.iter()
                        .enumerate()
                        .filter(|(_, t)| t.seen.is_none())
                        .map(|(i, t)| (i, t.ip))
                        .collect()
                };
                let mut hits = Vec::new();
                for (i, addr) in pending {
                    let key = EpKey {
                        vni,
                        ip_be: abi::ip_be(addr),
                    };
                    if let Ok(ep) = map.get(&key, 0) {
                        if ep.vtep_be == want_vtep {
                            hits.push(i);
                        }
                    }
                }
                if !hits.is_empty() {
                    let now = Instant::now();
                    let mut t = shared.tracks.lock().expect("lock");
                    for i in hits {
                        t[i].seen = Some(now);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        (h, None)
    } else {
        let mut child = Command::new("bridge")
            .args(["-n", &ns_b, "monitor", "fdb"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bridge monitor fdb")?;
        let out = child.stdout.take().context("monitor stdout")?;
        let guard = ChildGuard(child);
        let shared = shared.clone();
        let dst = format!("dst {vtep_a} ");
        let h = std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("Deleted") || !line.contains(&dst) {
                    continue;
                }
                let now = Instant::now();
                if let Some(mac) = line.split_whitespace().next() {
                    shared
                        .fdb_seen
                        .lock()
                        .expect("lock")
                        .entry(mac.to_owned())
                        .or_insert(now);
                }
            }
        });
        // Let the monitor subscribe before the first create.
        tokio::time::sleep(Duration::from_millis(300)).await;
        (h, Some(guard))
    };

    let api_hist = Arc::new(Mutex::new(report::new_histogram()));
    let next = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|_| {
            let (base, token, net_id) = (base_a.clone(), token.clone(), net_id.clone());
            let (shared, next, api_hist) = (shared.clone(), next.clone(), api_hist.clone());
            let total = args.ports;
            tokio::spawn(async move {
                let http = http_client(Duration::from_secs(60))?;
                let url = format!("{base}/network/v2.0/ports");
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let body = json!({"port": {"network_id": net_id,
                        "binding:host_id": "node1", "name": format!("c{n}")}});
                    let sent = Instant::now();
                    let (status, v) =
                        call(&http, reqwest::Method::POST, &url, &token, Some(body)).await?;
                    api_hist
                        .lock()
                        .expect("lock")
                        .record(sent.elapsed().as_micros().max(1) as u64)?;
                    ensure!(status == 201, "port create: {status} {v}");
                    let p = &v["port"];
                    let track = Track {
                        sent,
                        mac: p["mac_address"].as_str().unwrap_or_default().to_owned(),
                        ip: p["fixed_ips"][0]["ip_address"]
                            .as_str()
                            .unwrap_or_default()
                            .parse()
                            .context("port address")?,
                        seen: None,
                    };
                    shared.tracks.lock().expect("lock").push(track);
                }
            })
        })
        .collect();
    let mut failure = None;
    for c in clients {
        if let Err(e) = c.await? {
            failure.get_or_insert(e);
        }
    }
    if let Some(e) = failure {
        stop.store(true, Ordering::Relaxed);
        return Err(e);
    }
    // Every port seen on B, or 60 s after the last create.
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        if args.driver == "kernel" {
            let seen = shared.fdb_seen.lock().expect("lock").clone();
            for t in shared.tracks.lock().expect("lock").iter_mut() {
                if t.seen.is_none() {
                    t.seen = seen.get(&t.mac).copied();
                }
            }
        }
        let missing = shared
            .tracks
            .lock()
            .expect("lock")
            .iter()
            .filter(|t| t.seen.is_none())
            .count();
        if missing == 0 || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::Relaxed);
    if args.driver == "ebpf" {
        let _ = watcher.join();
    }
    ensure!(
        missing == 0,
        "{missing} of {} ports never reached node2's datapath within 60 s",
        args.ports
    );

    let tracks = shared.tracks.lock().expect("lock");
    let mut hist = report::new_histogram();
    let mut last = start;
    for t in tracks.iter() {
        let seen = t.seen.expect("all seen");
        // An entry may be announced before the create's answer is read: count it as instant.
        hist.record(seen.saturating_duration_since(t.sent).as_micros().max(1) as u64)?;
        last = last.max(seen);
    }
    let elapsed = last - start;
    let api = api_hist.lock().expect("lock");
    Ok(ConvergeSummary {
        driver: args.driver.clone(),
        nodes: args.nodes,
        clients: args.clients,
        ports: args.ports,
        converge_p50_us: hist.value_at_quantile(0.5),
        converge_p99_us: hist.value_at_quantile(0.99),
        converge_max_us: hist.max(),
        api_p50_us: api.value_at_quantile(0.5),
        api_p99_us: api.value_at_quantile(0.99),
        ports_per_second: f64::from(args.ports) / elapsed.as_secs_f64(),
        elapsed_s: elapsed.as_secs_f64(),
    })
}

fn print_table(s: &ConvergeSummary) {
    println!(
        "convergence ({} driver, {} nodes): {} ports bound to node1, {} clients, seen in node2's datapath",
        s.driver, s.nodes, s.ports, s.clients
    );
    println!(
        "  create sent -> node2 forwards: p50 {}  p99 {}  max {}",
        fmt_us(s.converge_p50_us),
        fmt_us(s.converge_p99_us),
        fmt_us(s.converge_max_us)
    );
    println!(
        "  create call: p50 {}  p99 {}",
        fmt_us(s.api_p50_us),
        fmt_us(s.api_p99_us)
    );
    println!(
        "  {:.1} ports/s ({:.1} s from the first create to the last port on node2)",
        s.ports_per_second, s.elapsed_s
    );
}
