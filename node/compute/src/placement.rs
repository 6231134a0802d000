//! Compute hosts and placement claims in the replicated state.
//!
//! Two tables: `hosts` (host name → JSON [`Host`]) and `instances` (instance id → JSON
//! [`InstanceRecord`]). A host's *generation* is its row's `mod_revision`: every change to the
//! row moves it (registration is conditioned on it). The `generation` field stored inside the
//! JSON is not authoritative and is overwritten with the row's `mod_revision` on every read.
//! Claims are bounded adds to the row's usage that the state machine checks when it applies
//! them ([`claims_txn`]), so claims on one host do not conflict unless they overfill it.
//!
//! [`place`] runs the pure scheduler over the local replica and commits every claim of a
//! request in one Raft transaction; see docs/scheduler.md, "Claims in the cluster".

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use shoal_consensus::cluster::{Cluster, ClusterError};
use shoal_scheduler::{
    Aggregate, AllocationRatios, Claim, Host, Request, RequestError, ScheduleError, Scheduler,
    SchedulerConfig,
};
use shoal_types::{AddField, Expect, Row, Txn};

use crate::host_view::HostView;

pub const HOSTS: &str = "hosts";
pub const INSTANCES: &str = "instances";

/// How many times a request is scheduled and proposed before a conflict is reported.
pub const MAX_ATTEMPTS: u32 = 10;
/// Concurrent schedulers pick at random among this many best hosts, so that they do not all
/// race for the single best one (Nova's `host_subset_size`).
pub const HOST_SUBSET_SIZE: usize = 4;

/// Whether `name` is usable as a host, zone or aggregate name in a registration: 1-63 ASCII
/// letters, digits, `-` or `_`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A host's resources, as detected or as an operator or test declares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub vcpus: u32,
    pub ram_mb: u64,
    pub disk_gb: u64,
}

/// Reads `MemTotal` (in kB) from the text of `/proc/meminfo` and returns it in MB.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let kb: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(kb / 1024),
        Some(_) => None,
    }
}

/// The machine's vCPUs, RAM and the size of the file system holding `data_dir`.
pub fn detect_capacity(data_dir: &Path) -> std::io::Result<Capacity> {
    let vcpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let ram_mb = parse_meminfo(&meminfo).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "/proc/meminfo has no MemTotal line in kB",
        )
    })?;
    let c_path = std::ffi::CString::new(data_dir.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs is a plain C struct of integers, for which all-zero bytes are valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated string and `st` a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let disk_gb = (st.f_blocks as u64).saturating_mul(st.f_frsize as u64) >> 30;
    Ok(Capacity {
        vcpus,
        ram_mb,
        disk_gb,
    })
}

/// What a host registration sets; usage is never part of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    pub vcpus: u32,
    pub ram_mb: u64,
    pub disk_gb: u64,
    #[serde(default = "default_zone")]
    pub availability_zone: String,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub aggregates: Vec<String>,
    #[serde(default = "default_hv")]
    pub hypervisor_type: String,
    #[serde(default = "default_arch")]
    pub architecture: String,
    #[serde(default)]
    pub hypervisor_version: u64,
    #[serde(default)]
    pub allocation_ratios: Option<AllocationRatios>,
    /// Held back for the host itself (Nova's `reserved_host_*`); instances may claim
    /// `(total - reserved) × ratio`.
    #[serde(default)]
    pub vcpus_reserved: u32,
    #[serde(default)]
    pub ram_mb_reserved: u64,
    #[serde(default)]
    pub disk_mb_reserved: u64,
    /// Single ratios a node's `[compute]` sets (`cpu`, `ram`, `disk`), applied over the host's
    /// current ones after `allocation_ratios`; an unset one keeps the host's value.
    #[serde(skip)]
    pub ratio_overrides: [Option<f64>; 3],
    /// The ratios a new host starts with (Nova's `initial_*_allocation_ratio`); a host that
    /// exists keeps its own.
    #[serde(skip, default = "nova_initial_ratios")]
    pub initial_ratios: AllocationRatios,
}

/// Nova's `initial_cpu_allocation_ratio`, `initial_ram_allocation_ratio` and
/// `initial_disk_allocation_ratio` defaults.
pub fn nova_initial_ratios() -> AllocationRatios {
    AllocationRatios {
        cpu: 4.0,
        ram: 1.0,
        disk: 1.0,
    }
}

fn default_zone() -> String {
    "nova".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_hv() -> String {
    "QEMU".to_owned()
}
fn default_arch() -> String {
    std::env::consts::ARCH.to_owned()
}

impl HostSpec {
    pub fn from_capacity(cap: Capacity, zone: &str) -> Self {
        Self {
            vcpus: cap.vcpus,
            ram_mb: cap.ram_mb,
            disk_gb: cap.disk_gb,
            availability_zone: zone.to_owned(),
            enabled: true,
            aggregates: Vec::new(),
            hypervisor_type: default_hv(),
            architecture: default_arch(),
            hypervisor_version: 0,
            allocation_ratios: None,
            vcpus_reserved: 0,
            ram_mb_reserved: 0,
            disk_mb_reserved: 0,
            ratio_overrides: [None; 3],
            initial_ratios: nova_initial_ratios(),
        }
    }

    /// Says what is wrong with a registration, in words an API client can act on.
    pub fn validate(&self) -> Result<(), String> {
        if self.vcpus == 0 || self.vcpus > 4096 {
            return Err(format!("vcpus must be 1-4096, got {}", self.vcpus));
        }
        if self.ram_mb == 0 || self.ram_mb > 1 << 34 {
            return Err(format!(
                "ram_mb must be 1-{}, got {}",
                1u64 << 34,
                self.ram_mb
            ));
        }
        if self.disk_gb > 1 << 30 {
            return Err(format!(
                "disk_gb must be at most {}, got {}",
                1u64 << 30,
                self.disk_gb
            ));
        }
        if !valid_name(&self.availability_zone) {
            return Err(format!(
                "availability_zone {:?} must be 1-63 characters from a-z, A-Z, 0-9, '-', '_'",
                self.availability_zone
            ));
        }
        for a in &self.aggregates {
            if !valid_name(a) {
                return Err(format!(
                    "aggregate name {a:?} must be 1-63 characters from a-z, A-Z, 0-9, '-', '_'"
                ));
            }
        }
        if self.vcpus_reserved > 4096 {
            return Err(format!(
                "vcpus_reserved must be at most 4096, got {}",
                self.vcpus_reserved
            ));
        }
        if self.ram_mb_reserved > 1 << 34 {
            return Err(format!(
                "ram_mb_reserved must be at most {}, got {}",
                1u64 << 34,
                self.ram_mb_reserved
            ));
        }
        if self.disk_mb_reserved > 1 << 40 {
            return Err(format!(
                "disk_mb_reserved must be at most {}, got {}",
                1u64 << 40,
                self.disk_mb_reserved
            ));
        }
        let [cpu, ram, disk] = self.ratio_overrides;
        let i = self.initial_ratios;
        for (name, v) in [
            ("cpu", cpu),
            ("ram", ram),
            ("disk", disk),
            ("initial_cpu", Some(i.cpu)),
            ("initial_ram", Some(i.ram)),
            ("initial_disk", Some(i.disk)),
        ] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v > 0.0 && *v <= 1000.0)) {
                return Err(format!(
                    "{name}_allocation_ratio must be a number in (0, 1000], got {v}"
                ));
            }
        }
        if let Some(r) = self.allocation_ratios {
            for (name, v) in [("cpu", r.cpu), ("ram", r.ram), ("disk", r.disk)] {
                if !(v.is_finite() && v > 0.0 && v <= 1000.0) {
                    return Err(format!(
                        "allocation_ratios.{name} must be a number in (0, 1000], got {v}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One placed instance, written in the same transaction as its host's claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub host: String,
    pub vcpus: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("host row {0:?} is not valid JSON")]
    Corrupt(String, #[source] serde_json::Error),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("host {0:?} kept changing while it was being registered")]
    Contended(String),
}

/// Decodes a host row; its generation is the row's `mod_revision`. Its `instances` are left
/// empty: see [`fill_instances`].
pub fn decode_host(key: &str, row: &Row) -> Result<Host, HostError> {
    let mut h: Host =
        serde_json::from_slice(&row.value).map_err(|e| HostError::Corrupt(key.to_owned(), e))?;
    h.name = key.to_owned();
    h.generation = row.mod_revision;
    // Rows written before claims stopped listing instances may still carry a list; it is not
    // kept up to date, so nothing reads it (`fill_instances` reads the `instances` table).
    h.instances.clear();
    Ok(h)
}

/// Every host in the local replica.
pub async fn list_hosts(cluster: &Cluster) -> Result<Vec<Host>, HostError> {
    let rows = cluster.list(HOSTS, "", usize::MAX).await?;
    rows.iter().map(|(k, r)| decode_host(k, r)).collect()
}

/// Creates host `name` or, if it exists, replaces what `spec` sets and keeps its usage and
/// instances. Conditioned on the row's revision, so a concurrent claim is never lost.
/// Returns the host as written, with its new generation.
pub async fn upsert_host(
    cluster: &Cluster,
    name: &str,
    spec: &HostSpec,
) -> Result<Host, HostError> {
    for _ in 0..MAX_ATTEMPTS {
        let existing = cluster.get(HOSTS, name).await?;
        let (mut host, expect) = match &existing {
            Some(row) => (decode_host(name, row)?, Expect::Revision(row.mod_revision)),
            None => (
                Host {
                    name: name.to_owned(),
                    enabled: true,
                    up: true,
                    availability_zone: String::new(),
                    aggregates: Vec::new(),
                    vcpus_total: 0,
                    vcpus_used: 0,
                    ram_mb_total: 0,
                    ram_mb_used: 0,
                    disk_gb_total: 0,
                    disk_mb_used: 0,
                    vcpus_reserved: 0,
                    ram_mb_reserved: 0,
                    disk_mb_reserved: 0,
                    allocation_ratios: spec.initial_ratios,
                    hypervisor_type: String::new(),
                    architecture: String::new(),
                    hypervisor_version: 0,
                    instances: Vec::new(),
                    generation: 0,
                },
                Expect::Absent,
            ),
        };
        host.enabled = spec.enabled;
        host.up = true;
        host.availability_zone = spec.availability_zone.clone();
        host.aggregates = spec.aggregates.clone();
        host.vcpus_total = spec.vcpus;
        host.ram_mb_total = spec.ram_mb;
        host.disk_gb_total = spec.disk_gb;
        host.hypervisor_type = spec.hypervisor_type.clone();
        host.architecture = spec.architecture.clone();
        host.hypervisor_version = spec.hypervisor_version;
        host.vcpus_reserved = spec.vcpus_reserved;
        host.ram_mb_reserved = spec.ram_mb_reserved;
        host.disk_mb_reserved = spec.disk_mb_reserved;
        if let Some(r) = spec.allocation_ratios {
            host.allocation_ratios = r;
        }
        let [cpu, ram, disk] = spec.ratio_overrides;
        let r = &mut host.allocation_ratios;
        r.cpu = cpu.unwrap_or(r.cpu);
        r.ram = ram.unwrap_or(r.ram);
        r.disk = disk.unwrap_or(r.disk);
        let value = serde_json::to_vec(&host).expect("a host serialises");
        let resp = cluster
            .write(Txn::new().when(HOSTS, name, expect).put(HOSTS, name, value))
            .await?;
        if resp.succeeded {
            host.generation = resp.revision;
            return Ok(host);
        }
        // A claim or another registration got in first: re-read through a barrier and retry.
        cluster.read_barrier().await?;
    }
    Err(HostError::Contended(name.to_owned()))
}

/// The outcome of a placement: one host per instance, and how many times it was proposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placed {
    pub placements: Vec<Placement>,
    pub attempts: u32,
    pub revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub instance_id: String,
    pub host: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Hosts(#[from] HostError),
    #[error("the host view is inconsistent: {0}")]
    View(String),
    #[error("instance {0:?} already exists")]
    InstanceExists(String),
    #[error("the claims conflicted with concurrent placements {0} times in a row; try again")]
    Contended(u32),
    /// A precondition the caller added (`place_with`) no longer holds.
    #[error("row {key:?} of table {table} changed while the placement was made")]
    ExtraPrecondition { table: String, key: String },
}

impl From<ClusterError> for PlaceError {
    fn from(e: ClusterError) -> Self {
        PlaceError::Hosts(HostError::Cluster(e))
    }
}

/// The tables the Compute API writes that decide where instances may go.
pub(crate) const AGGREGATES: &str = "aggregates";
pub(crate) const COMPUTE_SERVICES: &str = "compute_services";

/// What placement reads of an `aggregates` row (the Compute API owns the full record).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct AggregateRow {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) hosts: BTreeSet<String>,
    #[serde(default)]
    pub(crate) metadata: BTreeMap<String, String>,
}

/// What placement reads of a `compute_services` row.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct ServiceRow {
    pub(crate) disabled: bool,
    /// Forced down by an admin (microversion 2.11): Nova's ComputeFilter passes no such host.
    #[serde(default)]
    pub(crate) forced_down: bool,
}

impl ServiceRow {
    /// Whether placement leaves the host out: its service is disabled or forced down.
    pub(crate) fn excluded(&self) -> bool {
        self.disabled || self.forced_down
    }
}

pub(crate) fn decode_aggregate(key: &str, row: &Row) -> Result<AggregateRow, HostError> {
    serde_json::from_slice(&row.value)
        .map_err(|e| HostError::Corrupt(format!("{AGGREGATES}/{key}"), e))
}

pub(crate) fn decode_service(key: &str, row: &Row) -> Result<ServiceRow, HostError> {
    serde_json::from_slice(&row.value)
        .map_err(|e| HostError::Corrupt(format!("{COMPUTE_SERVICES}/{key}"), e))
}

/// The scheduler's view: the hosts as registered, with what the Compute API set on them
/// applied. A host whose `nova-compute` service an admin disabled is not enabled; a host in an
/// aggregate carries that aggregate's name, and the aggregate's `availability_zone` metadata
/// is its zone, as in Nova. Aggregate names a host's own registration lists (the `[host]`
/// config) are aggregates without metadata. The view is never written back: claims are applied
/// to the stored rows (`stored`), so nothing derived here ends up in a `hosts` row.
pub async fn host_view(
    cluster: &Cluster,
    stored: &[Host],
) -> Result<(Vec<Host>, Vec<Aggregate>), HostError> {
    let aggregates = cluster
        .list(AGGREGATES, "", usize::MAX)
        .await?
        .iter()
        .map(|(k, r)| decode_aggregate(k, r))
        .collect::<Result<Vec<_>, _>>()?;
    let mut disabled = BTreeSet::new();
    for (key, row) in cluster.list(COMPUTE_SERVICES, "", usize::MAX).await? {
        if decode_service(&key, &row)?.excluded() {
            disabled.insert(key);
        }
    }
    Ok(compose(stored, aggregates.iter(), &disabled))
}

/// [`host_view`]'s rules over rows already read: the listing's and the watched view's
/// (`host_view::HostView`) one definition.
pub(crate) fn compose<'a>(
    stored: &[Host],
    aggregate_rows: impl Iterator<Item = &'a AggregateRow>,
    disabled: &BTreeSet<String>,
) -> (Vec<Host>, Vec<Aggregate>) {
    let mut hosts = stored.to_vec();
    let mut aggregates: BTreeMap<String, Aggregate> = BTreeMap::new();
    for a in aggregate_rows {
        for h in hosts.iter_mut().filter(|h| a.hosts.contains(&h.name)) {
            if !h.aggregates.contains(&a.name) {
                h.aggregates.push(a.name.clone());
            }
            if let Some(zone) = a.metadata.get("availability_zone") {
                h.availability_zone = zone.clone();
            }
        }
        aggregates.insert(
            a.name.clone(),
            Aggregate {
                name: a.name.clone(),
                metadata: a.metadata.clone(),
            },
        );
    }
    for h in &hosts {
        for name in &h.aggregates {
            aggregates.entry(name.clone()).or_insert_with(|| Aggregate {
                name: name.clone(),
                metadata: BTreeMap::new(),
            });
        }
    }
    for h in hosts.iter_mut().filter(|h| disabled.contains(&h.name)) {
        h.enabled = false;
    }
    (hosts, aggregates.into_values().collect())
}

/// What a host may hold of each resource, as the scheduler's filters count it: Placement's
/// `(total - reserved) × ratio`, with the ratios the host's aggregates set (Nova's
/// Aggregate{Core,Ram,Disk}Filter). `None`: no bound (a host reporting no vCPUs is not judged
/// on them, as Nova's CoreFilter does).
pub fn capacity_limits(host: &Host, aggregates: &[Aggregate]) -> [Option<i64>; 3] {
    let metadata = shoal_scheduler::filters::merge_metadata(
        aggregates
            .iter()
            .filter(|a| host.aggregates.contains(&a.name))
            .map(|a| &a.metadata),
    );
    let r = shoal_scheduler::filters::effective_ratios(host.allocation_ratios, &metadata);
    let bound = |usable: f64, ratio: f64| (usable * ratio).floor() as i64;
    [
        (host.vcpus_total > 0).then(|| bound(f64::from(host.vcpus_usable()), r.cpu)),
        Some(bound(host.ram_mb_usable() as f64, r.ram)),
        Some(bound(host.disk_mb_usable() as f64, r.disk)),
    ]
}

/// The fields of a `hosts` row a claim adds to, in the order of [`capacity_limits`].
const USAGE_FIELDS: [&str; 3] = ["vcpus_used", "ram_mb_used", "disk_mb_used"];

/// Builds the one transaction that commits every claim of a request: a precondition on each
/// instance's absence, one `instances` row per claim, and for each touched host one bounded
/// [`Op::Add`](shoal_types::Op::Add) of the request's resources to its usage. The state machine
/// checks the bound when it applies the entry, so claims on one host through different nodes
/// do not conflict unless together they would overfill it (then the later one is refused, and
/// the transaction's `failed_precondition` points past the preconditions, at that add).
/// `hosts` and `aggregates` are the scheduler's view, for the limits.
pub fn claims_txn(
    hosts: &[Host],
    aggregates: &[Aggregate],
    claims: &[Claim],
) -> Result<Txn, PlaceError> {
    let mut touched: BTreeMap<&str, [i64; 3]> = BTreeMap::new();
    let mut txn = Txn::new();
    for c in claims {
        let sum = touched.entry(c.host.as_str()).or_default();
        sum[0] += i64::from(c.vcpus);
        sum[1] += c.ram_mb as i64;
        sum[2] += c.disk_mb as i64;
        txn = txn.when(INSTANCES, &c.instance_id, Expect::Absent);
        let rec = InstanceRecord {
            host: c.host.clone(),
            vcpus: c.vcpus,
            ram_mb: c.ram_mb,
            disk_mb: c.disk_mb,
        };
        txn = txn.put(
            INSTANCES,
            &c.instance_id,
            serde_json::to_vec(&rec).expect("an instance record serialises"),
        );
    }
    for (name, sum) in touched {
        let h = hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| PlaceError::View(format!("claim names unknown host {name:?}")))?;
        let limits = capacity_limits(h, aggregates);
        let fields = USAGE_FIELDS
            .iter()
            .zip(sum)
            .zip(limits)
            .map(|((field, delta), max)| AddField {
                name: (*field).to_owned(),
                delta,
                max,
            })
            .collect();
        txn = txn.add(HOSTS, name, fields);
    }
    Ok(txn)
}

/// The hosts' instances, from the `instances` table: host rows do not list them (a list that
/// grew with every claim would make every claim rewrite it). Only the requests whose filters
/// look at which instances a host runs (server groups, `same_host`, `different_host`, JSON
/// queries on `$num_instances`) need them.
pub async fn fill_instances(cluster: &Cluster, hosts: &mut [Host]) -> Result<(), HostError> {
    let mut by_host: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, row) in cluster.list(INSTANCES, "", usize::MAX).await? {
        let rec: InstanceRecord = serde_json::from_slice(&row.value)
            .map_err(|e| HostError::Corrupt(format!("{INSTANCES}/{id}"), e))?;
        by_host.entry(rec.host).or_default().push(id);
    }
    for h in hosts {
        h.instances = by_host.remove(&h.name).unwrap_or_default();
    }
    Ok(())
}

/// Whether the request's filters read the instances each host runs.
fn needs_instances(request: &Request) -> bool {
    let h = &request.hints;
    h.group.is_some()
        || !h.same_host.is_empty()
        || !h.different_host.is_empty()
        || h.query.is_some()
}

/// Schedules `request` over the replica and commits its claims, re-reading and retrying when
/// a concurrent placement changed a chosen host first. With a [`HostView`], the first attempt
/// schedules from it instead of reading every row.
pub async fn place(
    cluster: &Cluster,
    view: Option<&HostView>,
    request: &Request,
) -> Result<Placed, PlaceError> {
    place_with(cluster, view, request, |txn, _| txn).await
}

/// How long a retry waits for the host view to reach its read barrier before it reads the
/// tables instead (the watches deliver an applied entry within a scheduling round or two).
const VIEW_CATCH_UP: Duration = Duration::from_millis(20);

/// Where an attempt's hosts came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The watched view, not known to include every acknowledged write.
    View,
    /// The watched view, complete through the attempt's read barrier.
    ExactView,
    /// The tables, listed.
    Listing,
}

/// Like [`place`], with `extra` adding the caller's own preconditions and writes (the server
/// rows) to each attempt's claim transaction, so that the claims and what they are for commit
/// together. A failed precondition of `extra` ends the placement with `ExtraPrecondition`.
///
/// Correctness never rests on `view`: the state machine checks every claim against the host's
/// usage when it applies, a "no valid host" is answered only from a listing read after a read
/// barrier, and after a refusal on a view that claimed to be exact the next attempt lists.
pub async fn place_with(
    cluster: &Cluster,
    view: Option<&HostView>,
    request: &Request,
    extra: impl Fn(Txn, &[Claim]) -> Txn,
) -> Result<Placed, PlaceError> {
    // Whether the hosts read include every write acknowledged before this call.
    let mut fresh = false;
    // The previous attempt already read a fresh view and proposed nothing.
    let mut refreshed = false;
    // The revision of the last read barrier, and where the last attempt's hosts came from.
    let mut barrier: Option<u64> = None;
    let mut last: Option<Source> = None;
    for attempt in 1..=MAX_ATTEMPTS {
        let confirm = std::mem::take(&mut refreshed);
        if attempt > 1 && !confirm {
            // Jittered, growing backoff, then a view that includes the winner's commit.
            let cap = 2u64 << attempt.min(6);
            let ms = rand::rng().random_range(1..=cap);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            barrier = Some(cluster.read_barrier().await?);
            fresh = true;
        }
        let viewed = match (view, barrier) {
            (Some(v), None) => v.current().await.map(|s| (s, Source::View)),
            // A "no valid host" is confirmed from the tables, and a conflict on an exact view
            // is retried from them once, so a wrong view cannot decide an answer.
            (Some(_), Some(_)) if confirm || last == Some(Source::ExactView) => None,
            (Some(v), Some(b)) => v
                .at_least(b, VIEW_CATCH_UP)
                .await
                .map(|s| (s, Source::ExactView)),
            (None, _) => None,
        };
        let (mut view_hosts, aggregates, source) = match viewed {
            Some(((snap, _), source)) => (snap.hosts.clone(), snap.aggregates.clone(), source),
            None => {
                let hosts = list_hosts(cluster).await?;
                let (view_hosts, aggregates) = host_view(cluster, &hosts).await?;
                (view_hosts, aggregates, Source::Listing)
            }
        };
        if needs_instances(request) {
            // Read after the caller read the server group (the local replica only moves
            // forward), so every member the group row names has its `instances` row here: it
            // was written in the same transaction that made it a member.
            fill_instances(cluster, &mut view_hosts).await?;
        }
        last = Some(source);
        let config = SchedulerConfig {
            host_subset_size: HOST_SUBSET_SIZE,
            seed: rand::rng().random(),
            ..SchedulerConfig::default()
        };
        let mut scheduler = Scheduler::new(config, view_hosts.clone(), aggregates.clone())
            .map_err(|e| PlaceError::View(e.to_string()))?;
        let claims = match scheduler.select(request) {
            Ok(claims) => claims,
            // A lagging replica may not have a host registered or freed through another node
            // yet, nor may the view: refuse only what a listing after a barrier refuses.
            Err(
                ScheduleError::NoValidHost(_)
                | ScheduleError::Request(RequestError::UnknownForcedHost(_)),
            ) if !fresh || source != Source::Listing => {
                barrier = Some(cluster.read_barrier().await?);
                fresh = true;
                refreshed = true;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let own = claims_txn(&view_hosts, &aggregates, &claims)?;
        let own_preconditions = own.preconditions.len();
        let txn = extra(own, &claims);
        let resp = cluster.write(txn.clone()).await?;
        if resp.succeeded {
            return Ok(Placed {
                placements: claims
                    .into_iter()
                    .map(|c| Placement {
                        instance_id: c.instance_id,
                        host: c.host,
                    })
                    .collect(),
                attempts: attempt,
                revision: resp.revision,
            });
        }
        if let Some(i) = resp.failed_precondition {
            if let Some(p) = txn.preconditions.get(i as usize) {
                if p.table == INSTANCES {
                    return Err(PlaceError::InstanceExists(p.key.clone()));
                }
                if i as usize >= own_preconditions {
                    return Err(PlaceError::ExtraPrecondition {
                        table: p.table.clone(),
                        key: p.key.clone(),
                    });
                }
            }
        }
    }
    Err(PlaceError::Contended(MAX_ATTEMPTS))
}

/// Gives back the resources instance `instance_id` holds on its host and deletes its claim,
/// in one transaction with whatever `extra` adds (the server row's delete). An instance with
/// no claim (never placed, or already released) commits `extra` alone.
pub async fn release(
    cluster: &Cluster,
    instance_id: &str,
    extra: impl Fn(Txn) -> Txn,
) -> Result<(), PlaceError> {
    for attempt in 0..MAX_ATTEMPTS * 3 {
        if attempt > 0 {
            let ms = rand::rng().random_range(1..=(4u64 << attempt.min(5)));
            tokio::time::sleep(Duration::from_millis(ms)).await;
            cluster.read_barrier().await?;
        }
        let Some(claim_row) = cluster.get(INSTANCES, instance_id).await? else {
            let resp = cluster.write(extra(Txn::new())).await?;
            if resp.succeeded {
                return Ok(());
            }
            continue;
        };
        let claim: InstanceRecord = serde_json::from_slice(&claim_row.value)
            .map_err(|e| HostError::Corrupt(format!("instances/{instance_id}"), e))?;
        let mut txn = Txn::new().when(
            INSTANCES,
            instance_id,
            Expect::Revision(claim_row.mod_revision),
        );
        if cluster.get(HOSTS, &claim.host).await?.is_some() {
            // Unbounded and unconditioned: giving resources back never conflicts with claims.
            txn = txn.add(HOSTS, &claim.host, give_back(&claim));
        }
        let resp = cluster
            .write(extra(txn.delete(INSTANCES, instance_id)))
            .await?;
        if resp.succeeded {
            return Ok(());
        }
    }
    Err(PlaceError::Contended(MAX_ATTEMPTS * 3))
}

/// Confirms a resize or migration of `instance_id`: the source's claim (`instance_id`) is
/// given back, and the target's claim (`claim_key`, made when the migration was placed) becomes
/// the instance's own, in one transaction with whatever `extra` adds (the server row). Without a
/// target claim (confirmed already) only the source's is released.
pub async fn confirm_migration(
    cluster: &Cluster,
    instance_id: &str,
    claim_key: &str,
    extra: impl Fn(Txn) -> Txn,
) -> Result<(), PlaceError> {
    for attempt in 0..MAX_ATTEMPTS * 3 {
        if attempt > 0 {
            let ms = rand::rng().random_range(1..=(4u64 << attempt.min(5)));
            tokio::time::sleep(Duration::from_millis(ms)).await;
            cluster.read_barrier().await?;
        }
        let Some(target_row) = cluster.get(INSTANCES, claim_key).await? else {
            return release(cluster, instance_id, &extra).await;
        };
        let mut txn = Txn::new().when(
            INSTANCES,
            claim_key,
            Expect::Revision(target_row.mod_revision),
        );
        if let Some(own) = cluster.get(INSTANCES, instance_id).await? {
            let claim: InstanceRecord = serde_json::from_slice(&own.value)
                .map_err(|e| HostError::Corrupt(format!("instances/{instance_id}"), e))?;
            txn = txn.when(INSTANCES, instance_id, Expect::Revision(own.mod_revision));
            if cluster.get(HOSTS, &claim.host).await?.is_some() {
                txn = txn.add(HOSTS, &claim.host, give_back(&claim));
            }
        } else {
            txn = txn.when(INSTANCES, instance_id, Expect::Absent);
        }
        let txn =
            txn.delete(INSTANCES, claim_key)
                .put(INSTANCES, instance_id, target_row.value.clone());
        if cluster.write(extra(txn)).await?.succeeded {
            return Ok(());
        }
    }
    Err(PlaceError::Contended(MAX_ATTEMPTS * 3))
}

/// An instance's claim as it stands (see [`claim_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentClaim {
    /// The revision of its `instances` row.
    pub revision: u64,
    pub record: InstanceRecord,
    /// Whether its host still has a `hosts` row to give the resources back to.
    pub host_known: bool,
}

/// An instance's claim as it stands now in the local replica, if it has one.
pub async fn claim_of(
    cluster: &Cluster,
    instance_id: &str,
) -> Result<Option<CurrentClaim>, PlaceError> {
    let Some(row) = cluster.get(INSTANCES, instance_id).await? else {
        return Ok(None);
    };
    let record: InstanceRecord = serde_json::from_slice(&row.value)
        .map_err(|e| HostError::Corrupt(format!("{INSTANCES}/{instance_id}"), e))?;
    let host_known = cluster.get(HOSTS, &record.host).await?.is_some();
    Ok(Some(CurrentClaim {
        revision: row.mod_revision,
        record,
        host_known,
    }))
}

/// Turns the claim transaction [`place_with`] built for `placeholder` (a name the scheduler
/// placed, absent from the `instances` table) into a move of `instance_id`'s claim to the
/// chosen host: the new claim is written under `instance_id`, conditioned on the claim it
/// replaces (`current`, as [`claim_of`] read it; absent if it had none), whose resources go
/// back to its host in the same transaction. An evacuation moves a server's claim this way.
pub fn move_claim(
    mut txn: Txn,
    placeholder: &str,
    instance_id: &str,
    current: Option<&CurrentClaim>,
) -> Txn {
    for p in &mut txn.preconditions {
        if p.table == INSTANCES && p.key == placeholder {
            p.key = instance_id.to_owned();
            p.expect = match current {
                Some(c) => Expect::Revision(c.revision),
                None => Expect::Absent,
            };
        }
    }
    for op in &mut txn.ops {
        if let shoal_types::Op::Put { table, key, .. } = op {
            if table == INSTANCES && key == placeholder {
                *key = instance_id.to_owned();
            }
        }
    }
    match current {
        // Unbounded and unconditioned, as a release gives back.
        Some(c) if c.host_known => txn.add(HOSTS, &c.record.host, give_back(&c.record)),
        _ => txn,
    }
}

/// The unbounded subtraction of a claim from its host's usage.
fn give_back(claim: &InstanceRecord) -> Vec<AddField> {
    USAGE_FIELDS
        .iter()
        .zip([
            i64::from(claim.vcpus),
            claim.ram_mb as i64,
            claim.disk_mb as i64,
        ])
        .map(|(field, used)| AddField {
            name: (*field).to_owned(),
            delta: -used,
            max: None,
        })
        .collect()
}

/// Registers this machine as a compute host once the cluster can take writes, retrying until
/// it succeeds or `stop` fires. An existing row keeps its usage; its totals are updated.
pub async fn register_self(
    cluster: Cluster,
    name: String,
    spec: HostSpec,
    stop: impl std::future::Future<Output = ()>,
) {
    let work = async {
        loop {
            match upsert_host(&cluster, &name, &spec).await {
                Ok(h) => {
                    tracing::info!(
                        host = %name,
                        vcpus = h.vcpus_total,
                        ram_mb = h.ram_mb_total,
                        disk_gb = h.disk_gb_total,
                        "registered as a compute host"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register as a compute host yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = stop => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_total_is_read_in_mb() {
        let text = "MemTotal:       16316412 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_meminfo(text), Some(16316412 / 1024));
        assert_eq!(parse_meminfo("MemFree: 12 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: many kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 12 MB\n"), None);
    }

    #[test]
    fn detected_capacity_is_plausible() {
        let dir = tempfile::tempdir().unwrap();
        let c = detect_capacity(dir.path()).unwrap();
        assert!(c.vcpus >= 1);
        assert!(c.ram_mb >= 64, "{c:?}");
    }

    #[test]
    fn host_spec_validation_names_the_field() {
        let ok = HostSpec::from_capacity(
            Capacity {
                vcpus: 4,
                ram_mb: 4096,
                disk_gb: 10,
            },
            "nova",
        );
        assert_eq!(ok.validate(), Ok(()));
        let mut bad = ok.clone();
        bad.vcpus = 0;
        assert!(bad.validate().unwrap_err().contains("vcpus"));
        let mut bad = ok.clone();
        bad.availability_zone = "a:b".into();
        assert!(bad.validate().unwrap_err().contains("availability_zone"));
        let mut bad = ok;
        bad.allocation_ratios = Some(AllocationRatios {
            cpu: 1.0,
            ram: f64::NAN,
            disk: 1.0,
        });
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("allocation_ratios.ram"));
    }

    fn host(name: &str, generation: u64) -> Host {
        let mut h: Host = serde_json::from_value(serde_json::json!({
            "name": name, "enabled": true, "up": true, "availability_zone": "nova",
            "vcpus_total": 4, "vcpus_used": 0, "ram_mb_total": 4096, "ram_mb_used": 0,
            "disk_gb_total": 10, "disk_mb_used": 0, "hypervisor_type": "QEMU",
            "architecture": "x86_64"
        }))
        .unwrap();
        h.generation = generation;
        h
    }

    fn claim(host: &str, generation: u64, id: &str) -> Claim {
        Claim {
            host: host.into(),
            generation,
            instance_id: id.into(),
            vcpus: 1,
            ram_mb: 512,
            disk_mb: 1024,
        }
    }

    type Adds = Vec<(String, Vec<(i64, Option<i64>)>)>;

    fn adds(txn: &Txn) -> Adds {
        txn.ops
            .iter()
            .filter_map(|op| match op {
                shoal_types::Op::Add(a) if a.table == HOSTS => Some((
                    a.key.clone(),
                    a.fields.iter().map(|f| (f.delta, f.max)).collect(),
                )),
                _ => None,
            })
            .collect()
    }

    /// Two claims on one host give one bounded add of both, with the host's limits; no
    /// precondition on any host row, one on each instance's absence.
    #[test]
    fn claims_txn_adds_each_hosts_claims_once_bounded() {
        let hosts = vec![host("a", 7), host("b", 9)];
        let claims = vec![
            claim("a", 7, "i1"),
            claim("a", 8, "i2"),
            claim("b", 9, "i3"),
        ];
        let txn = claims_txn(&hosts, &[], &claims).unwrap();
        assert!(txn.preconditions.iter().all(|p| p.table == INSTANCES));
        assert_eq!(
            txn.preconditions
                .iter()
                .filter(|p| p.expect == Expect::Absent)
                .count(),
            3
        );
        let [cpu, ram, disk] = capacity_limits(&hosts[0], &[]);
        assert_eq!(
            adds(&txn),
            vec![
                ("a".to_owned(), vec![(2, cpu), (1024, ram), (2048, disk)]),
                ("b".to_owned(), vec![(1, cpu), (512, ram), (1024, disk)]),
            ]
        );
        assert!(matches!(
            claims_txn(&hosts, &[], &[claim("z", 1, "i1")]),
            Err(PlaceError::View(_))
        ));
    }

    /// A moved claim is the placed one under the instance's own key, conditioned on the claim
    /// it replaces, and the old host gets its resources back unbounded; with no claim before,
    /// the key must be absent and nothing is given back.
    #[test]
    fn move_claim_rekeys_the_placed_claim_and_gives_the_old_back() {
        let hosts = vec![host("a", 7), host("b", 9)];
        let placed = claims_txn(&hosts, &[], &[claim("b", 9, "s.evacuation")]).unwrap();
        let old = CurrentClaim {
            revision: 42,
            record: InstanceRecord {
                host: "a".into(),
                vcpus: 1,
                ram_mb: 512,
                disk_mb: 1024,
            },
            host_known: true,
        };
        let txn = move_claim(placed.clone(), "s.evacuation", "s", Some(&old));
        assert_eq!(txn.preconditions.len(), 1);
        assert_eq!(txn.preconditions[0].key, "s");
        assert_eq!(txn.preconditions[0].expect, Expect::Revision(42));
        let puts: Vec<&str> = txn
            .ops
            .iter()
            .filter(|op| op.table() == INSTANCES)
            .map(|op| op.key())
            .collect();
        assert_eq!(puts, vec!["s"]);
        let [cpu, ram, disk] = capacity_limits(&hosts[1], &[]);
        assert_eq!(
            adds(&txn),
            vec![
                ("b".to_owned(), vec![(1, cpu), (512, ram), (1024, disk)]),
                (
                    "a".to_owned(),
                    vec![(-1, None), (-512, None), (-1024, None)]
                ),
            ]
        );
        let fresh = move_claim(placed, "s.evacuation", "s", None);
        assert_eq!(fresh.preconditions[0].expect, Expect::Absent);
        assert_eq!(adds(&fresh).len(), 1);
    }

    /// The bound is what the filters check: `(total - reserved) × ratio`, with an aggregate's
    /// ratio over the host's own.
    #[test]
    fn capacity_limits_follow_the_filters() {
        let mut h = host("a", 1);
        h.allocation_ratios = AllocationRatios {
            cpu: 4.0,
            ram: 1.5,
            disk: 1.0,
        };
        h.ram_mb_reserved = 1024;
        assert_eq!(
            capacity_limits(&h, &[]),
            [Some(16), Some(4608), Some(10240)]
        );
        h.aggregates = vec!["slow".into()];
        let agg = Aggregate {
            name: "slow".into(),
            metadata: [("cpu_allocation_ratio".to_owned(), "2.0".to_owned())].into(),
        };
        assert_eq!(capacity_limits(&h, &[agg])[0], Some(8));
        h.vcpus_total = 0;
        assert_eq!(capacity_limits(&h, &[])[0], None);
    }
}
