//! `shoal-loadtest schedule`: decisions per second of the scheduler library.
//!
//! For each host count it builds a synthetic cloud (3 availability zones, aggregates with
//! metadata, mixed hardware, partly used), then runs a stream of requests through
//! `Scheduler::select`, committing each placement with `Scheduler::apply_claim` as a node
//! does after its Raft transaction. One decision is one `select` plus the `apply_claim` of
//! its claims, timed on one thread. Times are the thread's CPU time (so other processes on a
//! shared machine do not inflate them); the wall-clock rate is reported beside it. The workload can be written to and read from a JSON file
//! (format in docs/scheduler.md).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use shoal_scheduler::{
    Aggregate, AllocationRatios, Flavor, GroupPolicy, Host, ImageProperties, Request,
    ScheduleError, Scheduler, SchedulerConfig, SchedulerHints, ServerGroup,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Host counts to benchmark, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    hosts: Vec<usize>,
    /// Scheduling requests per host count (ignored with --workload: the file's requests run).
    #[arg(long, default_value_t = 20_000)]
    decisions: usize,
    /// Seed of the workload generator and of the scheduler's random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object per host count instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the generated workload to this file (JSON) before running it.
    #[arg(long)]
    write_workload: Option<PathBuf>,
    /// Also print latency per kind of request (extra specs, zone, query, group, …) to stderr.
    #[arg(long)]
    by_kind: bool,
    /// Run the workload in this file instead of generating one.
    #[arg(long, conflicts_with = "write_workload")]
    workload: Option<PathBuf>,
}

/// The workload file: one scenario per host count.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub scenarios: Vec<Scenario>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub hosts: Vec<Host>,
    pub aggregates: Vec<Aggregate>,
    #[serde(default)]
    pub groups: Vec<GroupSpec>,
    pub requests: Vec<WorkRequest>,
}

/// A server group that requests can name; its members are the instances placed so far.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub name: String,
    pub policy: GroupPolicy,
}

/// One `POST /servers` (with `min_count = instances`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkRequest {
    pub instances: usize,
    pub flavor: Flavor,
    #[serde(default)]
    pub image: ImageProperties,
    #[serde(default)]
    pub availability_zone: Option<String>,
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
}

/// Results for one host count.
#[derive(Debug, Serialize)]
struct Report {
    hosts: usize,
    decisions: usize,
    instances_placed: usize,
    no_valid_host: usize,
    rejected_requests: usize,
    /// Decisions per second of thread CPU time: the rate one dedicated core would sustain.
    decisions_per_second: f64,
    /// Decisions per second of wall-clock time on this (possibly shared) machine.
    wall_decisions_per_second: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    index_build_ms: f64,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let workload = match &args.workload {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading workload {}", path.display()))?;
            serde_json::from_str::<Workload>(&text)
                .with_context(|| format!("parsing workload {}", path.display()))?
        }
        None => Workload {
            scenarios: args
                .hosts
                .iter()
                .map(|&n| generate(n, args.decisions, args.seed))
                .collect(),
        },
    };
    if let Some(path) = &args.write_workload {
        let text = serde_json::to_string(&workload)?;
        std::fs::write(path, text)
            .with_context(|| format!("writing workload {}", path.display()))?;
    }
    if workload.scenarios.is_empty() {
        bail!("the workload has no scenarios");
    }
    if !args.json {
        println!(
            "{:>8} {:>9} {:>9} {:>8} {:>12} {:>11} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9}",
            "hosts",
            "decisions",
            "placed",
            "no-host",
            "decisions/s",
            "wall dec/s",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
            "index ms"
        );
    }
    for scenario in workload.scenarios {
        let r = run_scenario(scenario, args.seed, args.by_kind)?;
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{:>8} {:>9} {:>9} {:>8} {:>12.0} {:>11.0} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9.1}",
                r.hosts,
                r.decisions,
                r.instances_placed,
                r.no_valid_host,
                r.decisions_per_second,
                r.wall_decisions_per_second,
                r.p50_us,
                r.p90_us,
                r.p99_us,
                r.p999_us,
                r.max_us,
                r.index_build_ms
            );
        }
    }
    Ok(())
}

/// The kind of a request, for `--by-kind`: its most selective feature.
fn kind(w: &WorkRequest) -> &'static str {
    let specs = &w.flavor.extra_specs;
    if specs.contains_key("aggregate_instance_extra_specs:gpu") {
        "extra-spec gpu (5% of hosts)"
    } else if specs.contains_key("pinned") {
        "extra-spec pinned (10%)"
    } else if specs.contains_key("aggregate_instance_extra_specs:memory") {
        "extra-spec highmem (12%)"
    } else if !specs.is_empty() {
        "extra-spec ssd/hdd (50%)"
    } else if w.query.is_some() {
        "json query"
    } else if w.group.is_some() {
        "server group"
    } else if w.image.architecture.is_some() {
        "image properties"
    } else if w.availability_zone.is_some() {
        "availability zone"
    } else {
        "plain"
    }
}

fn run_scenario(s: Scenario, seed: u64, by_kind: bool) -> anyhow::Result<Report> {
    let hosts = s.hosts.len();
    let config = SchedulerConfig {
        seed,
        ..SchedulerConfig::default()
    };
    let started = Instant::now();
    let mut sched = Scheduler::new(config, s.hosts, s.aggregates).context("indexing the hosts")?;
    let index_build_ms = started.elapsed().as_secs_f64() * 1e3;
    let policies: HashMap<&str, GroupPolicy> = s
        .groups
        .iter()
        .map(|g| (g.name.as_str(), g.policy))
        .collect();
    let mut members: HashMap<String, Vec<String>> = HashMap::new();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let (mut placed, mut no_valid_host, mut rejected) = (0, 0, 0);
    let mut total_ns: u64 = 0;
    let wall = Instant::now();
    let mut kinds: BTreeMap<&'static str, Histogram<u64>> = BTreeMap::new();
    for (k, w) in s.requests.iter().enumerate() {
        let group = match &w.group {
            Some(name) => {
                let Some(&policy) = policies.get(name.as_str()) else {
                    bail!("request {k} names group `{name}`, which the workload does not define");
                };
                Some(ServerGroup {
                    policy,
                    members: members.get(name).cloned().unwrap_or_default(),
                    max_server_per_host: None,
                })
            }
            None => None,
        };
        let req = Request {
            instance_ids: (0..w.instances).map(|n| format!("i{k}-{n}")).collect(),
            flavor: w.flavor.clone(),
            image: w.image.clone(),
            availability_zone: w.availability_zone.clone(),
            is_admin: false,
            hints: SchedulerHints {
                query: w.query.clone(),
                group,
                ..Default::default()
            },
        };
        let t = thread_cpu_ns();
        let res = sched.select(&req);
        if let Ok(claims) = &res {
            for c in claims {
                sched.apply_claim(c).context("committing a fresh claim")?;
            }
        }
        let ns = thread_cpu_ns().saturating_sub(t);
        total_ns += ns;
        hist.record(ns.max(1))?;
        if by_kind {
            kinds
                .entry(kind(w))
                .or_insert_with(|| {
                    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
                })
                .record(ns.max(1))?;
        }
        match res {
            Ok(claims) => {
                placed += claims.len();
                if let Some(name) = &w.group {
                    members
                        .entry(name.clone())
                        .or_default()
                        .extend(req.instance_ids);
                }
            }
            Err(ScheduleError::NoValidHost(_)) => no_valid_host += 1,
            Err(_) => rejected += 1,
        }
    }
    let wall_s = wall.elapsed().as_secs_f64();
    let decisions = s.requests.len();
    for (k, h) in &kinds {
        eprintln!(
            "{hosts:>8} hosts  {k:<28} n={:<6} mean={:>9.1} µs  p50={:>8.1} µs  p99={:>9.1} µs",
            h.len(),
            h.mean() / 1e3,
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3
        );
    }
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    Ok(Report {
        hosts,
        decisions,
        instances_placed: placed,
        no_valid_host,
        rejected_requests: rejected,
        decisions_per_second: decisions as f64 / (total_ns.max(1) as f64 / 1e9),
        wall_decisions_per_second: decisions as f64 / wall_s,
        p50_us: us(0.5),
        p90_us: us(0.9),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: hist.max() as f64 / 1e3,
        index_build_ms,
    })
}

/// CPU time consumed by the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_THREAD_CPUTIME_ID is supported on
    // Linux; clock_gettime writes only into `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

const AZS: [&str; 3] = ["az1", "az2", "az3"];

/// A synthetic cloud of `n` hosts and `decisions` requests.
pub fn generate(n: usize, decisions: usize, seed: u64) -> Scenario {
    let mut rng = StdRng::seed_from_u64(seed ^ (n as u64).rotate_left(32));
    let mut aggregates = Vec::new();
    for az in AZS {
        let agg = |name: &str, meta: &[(&str, &str)]| Aggregate {
            name: format!("{az}-{name}"),
            metadata: meta
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
        };
        aggregates.push(agg("ssd", &[("ssd", "true")]));
        aggregates.push(agg("hdd", &[("ssd", "false")]));
        aggregates.push(agg("gpu", &[("gpu", "2"), ("cpu_allocation_ratio", "4.0")]));
        aggregates.push(agg(
            "highmem",
            &[("memory", "high"), ("ram_allocation_ratio", "1.0")],
        ));
        aggregates.push(agg(
            "pinned",
            &[("pinned", "true"), ("cpu_allocation_ratio", "1.0")],
        ));
    }
    // (weight, vCPUs, RAM GB, disk GB, kind)
    let shapes: [(u32, u32, u64, u64, &str); 4] = [
        (60, 64, 256, 2000, "general"),
        (25, 128, 768, 4000, "large"),
        (10, 32, 128, 1000, "small"),
        (5, 64, 512, 2000, "gpu"),
    ];
    let hosts = (0..n)
        .map(|i| {
            let az = AZS[rng.random_range(0..AZS.len())];
            let pick = rng.random_range(0..100);
            let mut acc = 0;
            let shape = shapes
                .iter()
                .find(|s| {
                    acc += s.0;
                    pick < acc
                })
                .expect("weights sum to 100");
            let mut aggs = vec![format!(
                "{az}-{}",
                if rng.random_bool(0.5) { "ssd" } else { "hdd" }
            )];
            if shape.4 == "gpu" {
                aggs.push(format!("{az}-gpu"));
            }
            if shape.4 == "large" && rng.random_bool(0.5) {
                aggs.push(format!("{az}-highmem"));
            }
            if rng.random_bool(0.1) {
                aggs.push(format!("{az}-pinned"));
            }
            // Already 0-60% used, so hosts differ and the spread weighers have work to do.
            let fill = rng.random_range(0.0..0.6);
            let ram_mb_total = shape.2 * 1024;
            let disk_gb_total = shape.3;
            Host {
                name: format!("cmp{i:06}"),
                enabled: rng.random_bool(0.99),
                up: rng.random_bool(0.995),
                availability_zone: az.to_owned(),
                aggregates: aggs,
                vcpus_total: shape.1,
                vcpus_used: (f64::from(shape.1) * fill) as u32,
                ram_mb_total,
                ram_mb_used: (ram_mb_total as f64 * fill) as u64,
                disk_gb_total,
                disk_mb_used: (disk_gb_total as f64 * 1024.0 * fill) as u64,
                vcpus_reserved: 0,
                ram_mb_reserved: 0,
                disk_mb_reserved: 0,
                allocation_ratios: AllocationRatios::default(),
                hypervisor_type: if rng.random_bool(0.9) { "kvm" } else { "qemu" }.to_owned(),
                architecture: if rng.random_bool(0.95) {
                    "x86_64"
                } else {
                    "aarch64"
                }
                .to_owned(),
                hypervisor_version: *[6_002_000u64, 7_001_000, 8_000_000]
                    .choose(&mut rng)
                    .expect("non-empty"),
                instances: Vec::new(),
                generation: 0,
            }
        })
        .collect();
    let policies = [
        GroupPolicy::AntiAffinity,
        GroupPolicy::SoftAntiAffinity,
        GroupPolicy::Affinity,
        GroupPolicy::SoftAffinity,
    ];
    let groups: Vec<GroupSpec> = (0..200)
        .map(|g| GroupSpec {
            name: format!("group-{g}"),
            policy: policies[g % policies.len()],
        })
        .collect();
    // (weight, name, vCPUs, RAM MB, root GB)
    let flavors: [(u32, &str, u32, u64, u64); 5] = [
        (10, "m1.tiny", 1, 512, 1),
        (35, "m1.small", 1, 2048, 20),
        (30, "m1.medium", 2, 4096, 40),
        (18, "m1.large", 4, 8192, 80),
        (7, "m1.xlarge", 8, 16384, 160),
    ];
    let specs: [&[(&str, &str)]; 5] = [
        &[("aggregate_instance_extra_specs:ssd", "true")],
        &[("ssd", "false")],
        &[("aggregate_instance_extra_specs:gpu", ">= 1")],
        &[("aggregate_instance_extra_specs:memory", "s== high")],
        &[("pinned", "true"), ("hw:cpu_policy", "dedicated")],
    ];
    let queries = [
        r#"[">=", "$free_ram_mb", 65536]"#,
        r#"["and", [">=", "$free_ram_mb", 8192], ["<", "$vcpus_used", 200]]"#,
        r#"["or", [">", "$vcpus_total", 64], [">=", "$free_disk_mb", 1048576]]"#,
    ];
    let requests = (0..decisions)
        .map(|_| {
            let pick = rng.random_range(0..100);
            let mut acc = 0;
            let f = flavors
                .iter()
                .find(|f| {
                    acc += f.0;
                    pick < acc
                })
                .expect("weights sum to 100");
            let extra_specs = if rng.random_bool(0.2) {
                specs[rng.random_range(0..specs.len())]
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect()
            } else {
                BTreeMap::new()
            };
            let image = if rng.random_bool(0.1) {
                ImageProperties {
                    architecture: Some("x86_64".to_owned()),
                    hypervisor_type: Some("kvm".to_owned()),
                    hypervisor_version_requires: Some(">=6.0".to_owned()),
                }
            } else {
                ImageProperties::default()
            };
            WorkRequest {
                instances: if rng.random_bool(0.9) {
                    1
                } else {
                    rng.random_range(2..=5)
                },
                flavor: Flavor {
                    name: f.1.to_owned(),
                    vcpus: f.2,
                    ram_mb: f.3,
                    root_gb: f.4,
                    ephemeral_gb: 0,
                    swap_mb: 0,
                    extra_specs,
                },
                image,
                availability_zone: rng
                    .random_bool(0.2)
                    .then(|| AZS[rng.random_range(0..AZS.len())].to_owned()),
                query: rng
                    .random_bool(0.1)
                    .then(|| queries[rng.random_range(0..queries.len())].to_owned()),
                group: rng
                    .random_bool(0.05)
                    .then(|| groups[rng.random_range(0..groups.len())].name.clone()),
            }
        })
        .collect();
    Scenario {
        hosts,
        aggregates,
        groups,
        requests,
    }
}
