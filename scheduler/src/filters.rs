//! The filters, one host at a time, with Nova's semantics. The indexed selector and the
//! reference selector in the tests both call these predicates; they differ only in which
//! hosts they ask about and in what order.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::json_query::{self, HostVars, Query, QueryError};
use crate::model::{AllocationRatios, GroupPolicy, Host, Request};

/// The filters, in the order they run by default (cheap and selective first, as Nova's
/// documentation recommends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FilterKind {
    Compute,
    AvailabilityZone,
    Ram,
    Disk,
    Core,
    AggregateInstanceExtraSpecs,
    ImageProperties,
    Json,
    ServerGroupAntiAffinity,
    ServerGroupAffinity,
    SameHost,
    DifferentHost,
}

impl FilterKind {
    /// Every filter, in the default order.
    pub const ALL: [FilterKind; 12] = [
        FilterKind::Compute,
        FilterKind::AvailabilityZone,
        FilterKind::Ram,
        FilterKind::Disk,
        FilterKind::Core,
        FilterKind::AggregateInstanceExtraSpecs,
        FilterKind::ImageProperties,
        FilterKind::Json,
        FilterKind::ServerGroupAntiAffinity,
        FilterKind::ServerGroupAffinity,
        FilterKind::SameHost,
        FilterKind::DifferentHost,
    ];

    /// Nova's class name, as it appears in its "Filtering removed all hosts" log line.
    pub fn name(self) -> &'static str {
        match self {
            FilterKind::Compute => "ComputeFilter",
            FilterKind::AvailabilityZone => "AvailabilityZoneFilter",
            FilterKind::Ram => "AggregateRamFilter",
            FilterKind::Disk => "AggregateDiskFilter",
            FilterKind::Core => "AggregateCoreFilter",
            FilterKind::AggregateInstanceExtraSpecs => "AggregateInstanceExtraSpecsFilter",
            FilterKind::ImageProperties => "ImagePropertiesFilter",
            FilterKind::Json => "JsonFilter",
            FilterKind::ServerGroupAntiAffinity => "ServerGroupAntiAffinityFilter",
            FilterKind::ServerGroupAffinity => "ServerGroupAffinityFilter",
            FilterKind::SameHost => "SameHostFilter",
            FilterKind::DifferentHost => "DifferentHostFilter",
        }
    }

    /// Filters that still run when an admin forces a host. Nova skips all filters for a
    /// forced host; here the resource filters still run because the claim would exceed the
    /// host's capacity otherwise (Placement refuses such a claim in Nova too).
    pub(crate) fn runs_on_forced_host(self) -> bool {
        matches!(self, FilterKind::Ram | FilterKind::Disk | FilterKind::Core)
    }
}

/// Why a request cannot be scheduled at all, whatever the hosts. An API answers these with
/// HTTP 400 (or 403 for `ForcedHostNotAdmin`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("invalid scheduler hint `query`")]
    Query(#[from] QueryError),
    #[error("forcing a host with `zone:host` in the availability zone is allowed only for admins")]
    ForcedHostNotAdmin,
    #[error("availability zone `{0}` is not of the form `zone`, `zone:host` or `zone:host:node`")]
    InvalidAvailabilityZone(String),
    #[error("forced host `{0}` is not a known compute host")]
    UnknownForcedHost(String),
    #[error(
        "image property img_hv_requested_version `{0}` is not a list of comparisons such as \
         `>=6.0,<7.0` (operators < <= == != > >=)"
    )]
    InvalidVersionRequirement(String),
    #[error("a request must place at least one instance")]
    NoInstances,
}

/// A host's effective allocation ratios: Nova's Aggregate{Core,Ram,Disk}Filter take the
/// minimum of the values set on the host's aggregates, and the host's own value if none is
/// set or any set value is not a number (Nova's `validate_num_values`).
pub fn effective_ratios(
    own: AllocationRatios,
    metadata: &BTreeMap<String, Vec<String>>,
) -> AllocationRatios {
    let pick = |key: &str, default: f64| -> f64 {
        let Some(values) = metadata.get(key) else {
            return default;
        };
        let mut min = f64::INFINITY;
        for v in values {
            match v.trim().parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 => min = min.min(x),
                _ => return default,
            }
        }
        if values.is_empty() {
            default
        } else {
            min
        }
    };
    AllocationRatios {
        cpu: pick("cpu_allocation_ratio", own.cpu),
        ram: pick("ram_allocation_ratio", own.ram),
        disk: pick("disk_allocation_ratio", own.disk),
    }
}

/// The metadata of a host's aggregates merged as Nova's `aggregate_metadata_get_by_host`:
/// key → every distinct value.
pub fn merge_metadata<'a>(
    aggregates: impl IntoIterator<Item = &'a BTreeMap<String, String>>,
) -> BTreeMap<String, Vec<String>> {
    let mut merged: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for meta in aggregates {
        for (k, v) in meta {
            let values = merged.entry(k.clone()).or_default();
            if !values.contains(v) {
                values.push(v.clone());
            }
        }
    }
    merged
}

/// A host and what is derived from its aggregates.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostCtx<'a> {
    pub host: &'a Host,
    pub ratios: AllocationRatios,
    pub metadata: &'a BTreeMap<String, Vec<String>>,
    /// The host's architecture and hypervisor type, canonicalised.
    pub arch: &'a str,
    pub hv: &'a str,
}

/// A hypervisor version requirement (`>=6.0,<7.0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VersionReq(Vec<(VersionOp, [u64; 3])>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VersionOp {
    Lt,
    Le,
    Eq,
    Ne,
    Gt,
    Ge,
}

impl VersionReq {
    fn parse(text: &str) -> Option<Self> {
        let mut out = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            let (op, rest) = [
                ("<=", VersionOp::Le),
                (">=", VersionOp::Ge),
                ("==", VersionOp::Eq),
                ("!=", VersionOp::Ne),
                ("<", VersionOp::Lt),
                (">", VersionOp::Gt),
            ]
            .iter()
            .find_map(|(s, op)| part.strip_prefix(s).map(|r| (*op, r.trim())))?;
            out.push((op, parse_version(rest)?));
        }
        Some(Self(out))
    }

    pub(crate) fn satisfied_by(&self, v: [u64; 3]) -> bool {
        self.0.iter().all(|(op, want)| match op {
            VersionOp::Lt => v < *want,
            VersionOp::Le => v <= *want,
            VersionOp::Eq => v == *want,
            VersionOp::Ne => v != *want,
            VersionOp::Gt => v > *want,
            VersionOp::Ge => v >= *want,
        })
    }
}

/// `major.minor[.patch]`, as distutils' StrictVersion (without pre-release tags).
fn parse_version(s: &str) -> Option<[u64; 3]> {
    let parts: Vec<&str> = s.split('.').collect();
    if !(2..=3).contains(&parts.len()) {
        return None;
    }
    let mut v = [0u64; 3];
    for (slot, p) in v.iter_mut().zip(&parts) {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = p.parse().ok()?;
    }
    Some(v)
}

/// Nova's `convert_version_to_str`: 6002000 → 6.2.0 (groups of three digits).
pub(crate) fn version_from_int(mut n: u64) -> [u64; 3] {
    // Least significant group first; a u64 has at most 7 groups.
    let mut groups = [0u64; 7];
    let mut len = 0;
    while n != 0 {
        groups[len] = n % 1000;
        n /= 1000;
        len += 1;
    }
    let mut v = [0u64; 3];
    for (j, slot) in v.iter_mut().enumerate().take(len) {
        *slot = groups[len - 1 - j];
    }
    v
}

/// Nova's `Architecture.canonicalize` (without rejecting names it does not know).
pub(crate) fn canonical_arch(a: &str) -> String {
    let a = a.to_ascii_lowercase();
    match a.as_str() {
        "i386" | "i486" | "i586" | "x86_32" | "x86_32p" => "i686".to_owned(),
        "amd64" | "x64" => "x86_64".to_owned(),
        "arm64" => "aarch64".to_owned(),
        _ => a,
    }
}

/// Nova's `HVType.canonicalize`.
pub(crate) fn canonical_hv(h: &str) -> String {
    let h = h.to_ascii_lowercase();
    if h == "xapi" {
        "xen".to_owned()
    } else {
        h
    }
}

/// The server-group part of a request, with the request's own instances counted as members
/// (Nova adds them to the group before scheduling).
#[derive(Debug, Clone)]
pub(crate) struct PreparedGroup {
    pub policy: GroupPolicy,
    pub max_per_host: u32,
    pub members: HashSet<String>,
}

/// A request checked once and turned into what the filters read.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub vcpus: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
    pub az: Option<String>,
    pub forced_host: Option<String>,
    /// Extra specs the AggregateInstanceExtraSpecsFilter checks, scope removed.
    pub extra_specs: Vec<(String, String)>,
    pub image_arch: Option<String>,
    pub image_hv: Option<String>,
    pub image_version: Option<VersionReq>,
    pub query: Option<Query>,
    pub group: Option<PreparedGroup>,
    pub same_host: HashSet<String>,
    pub different_host: HashSet<String>,
}

const EXTRA_SPECS_SCOPE: &str = "aggregate_instance_extra_specs";

/// Validates a request.
pub(crate) fn prepare(req: &Request) -> Result<Prepared, RequestError> {
    if req.instance_ids.is_empty() {
        return Err(RequestError::NoInstances);
    }
    let (az, forced_host) = match req.availability_zone.as_deref() {
        None | Some("") => (None, None),
        Some(text) => {
            let mut parts = text.split(':');
            let zone = parts.next().unwrap_or_default();
            let host = parts.next().filter(|h| !h.is_empty());
            let node = parts.next().filter(|n| !n.is_empty());
            if parts.next().is_some() || (node.is_some() && node != host) {
                return Err(RequestError::InvalidAvailabilityZone(text.to_owned()));
            }
            if host.is_some() && !req.is_admin {
                return Err(RequestError::ForcedHostNotAdmin);
            }
            let zone = (!zone.is_empty()).then(|| zone.to_owned());
            (zone, host.map(str::to_owned))
        }
    };
    // AggregateInstanceExtraSpecsFilter: keys scoped `aggregate_instance_extra_specs:` are
    // checked without the scope; unscoped keys are checked as they are, except keys with a
    // `:` in them, which belong to another scope and are ignored.
    let extra_specs = req
        .flavor
        .extra_specs
        .iter()
        .filter_map(|(k, v)| match k.split_once(':') {
            Some((scope, rest)) if scope == EXTRA_SPECS_SCOPE => Some((rest.to_owned(), v.clone())),
            Some(_) => None,
            None => Some((k.clone(), v.clone())),
        })
        .collect();
    let image_version = match req.image.hypervisor_version_requires.as_deref() {
        None | Some("") => None,
        Some(text) => Some(
            VersionReq::parse(text)
                .ok_or_else(|| RequestError::InvalidVersionRequirement(text.to_owned()))?,
        ),
    };
    let query = match req.hints.query.as_deref() {
        None | Some("") => None,
        Some(text) => Some(json_query::parse(text)?),
    };
    let group = req.hints.group.as_ref().map(|g| PreparedGroup {
        policy: g.policy,
        max_per_host: g.max_server_per_host.unwrap_or(1),
        members: g.members.iter().chain(&req.instance_ids).cloned().collect(),
    });
    Ok(Prepared {
        vcpus: req.flavor.vcpus,
        ram_mb: req.flavor.ram_mb,
        disk_mb: req.flavor.disk_mb(),
        az,
        forced_host,
        extra_specs,
        image_arch: req.image.architecture.as_deref().map(canonical_arch),
        image_hv: req.image.hypervisor_type.as_deref().map(canonical_hv),
        image_version,
        query,
        group,
        same_host: req.hints.same_host.iter().cloned().collect(),
        different_host: req.hints.different_host.iter().cloned().collect(),
    })
}

/// What the server-group filters need to know about one host during one pick.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupView {
    /// Group members on this host, counting earlier picks of the same request.
    pub members_on_host: u32,
    /// Whether any host holds a member yet.
    pub group_has_hosts: bool,
}

/// Whether `filter` lets the host through. Filters that do not apply to the request pass.
pub(crate) fn passes(
    filter: FilterKind,
    ctx: &HostCtx<'_>,
    p: &Prepared,
    group: GroupView,
) -> bool {
    if p.forced_host.is_some() && !filter.runs_on_forced_host() {
        return true;
    }
    let h = ctx.host;
    match filter {
        FilterKind::Compute => h.enabled && h.up,
        FilterKind::AvailabilityZone => p.az.as_deref().is_none_or(|az| h.availability_zone == az),
        // Capacity is Placement's `(total - reserved) × ratio`.
        FilterKind::Ram => {
            // Nova: an instance may overcommit against others, never against itself.
            let total = h.ram_mb_usable() as f64;
            let req = p.ram_mb as f64;
            total >= req && total * ctx.ratios.ram - h.ram_mb_used as f64 >= req
        }
        FilterKind::Disk => {
            let total = h.disk_mb_usable() as f64;
            let req = p.disk_mb as f64;
            total >= req && total * ctx.ratios.disk - h.disk_mb_used as f64 >= req
        }
        FilterKind::Core => {
            // Nova's fail-safe: a host that reports no vCPUs is not judged on them.
            if h.vcpus_total == 0 {
                return true;
            }
            let total = f64::from(h.vcpus_usable());
            let req = f64::from(p.vcpus);
            req <= total && total * ctx.ratios.cpu - f64::from(h.vcpus_used) >= req
        }
        FilterKind::AggregateInstanceExtraSpecs => extra_specs_pass(ctx.metadata, &p.extra_specs),
        FilterKind::ImageProperties => image_passes(ctx, p),
        FilterKind::Json
        | FilterKind::ServerGroupAntiAffinity
        | FilterKind::ServerGroupAffinity
        | FilterKind::SameHost
        | FilterKind::DifferentHost => record_passes(filter, h, p, group).unwrap_or(true),
    }
}

/// The filters that read nothing but the host record and the request (JSON query, server
/// groups, same and different host): whether `filter` lets the host through, or `None` if
/// `filter` is not one of them. The caller has dealt with a forced host.
pub(crate) fn record_passes(
    filter: FilterKind,
    h: &Host,
    p: &Prepared,
    group: GroupView,
) -> Option<bool> {
    Some(match filter {
        FilterKind::Json => p
            .query
            .as_ref()
            .is_none_or(|q| q.host_passes(&HostVars { host: h })),
        FilterKind::ServerGroupAntiAffinity => match &p.group {
            Some(g) if g.policy == GroupPolicy::AntiAffinity => {
                group.members_on_host < g.max_per_host
            }
            _ => true,
        },
        FilterKind::ServerGroupAffinity => match &p.group {
            Some(g) if g.policy == GroupPolicy::Affinity => {
                !group.group_has_hosts || group.members_on_host > 0
            }
            _ => true,
        },
        // Nova's SameHostFilter and DifferentHostFilter: an id no host holds (unknown, or not
        // placed) matches no host.
        FilterKind::SameHost => {
            p.same_host.is_empty() || h.instances.iter().any(|i| p.same_host.contains(i))
        }
        FilterKind::DifferentHost => {
            p.different_host.is_empty() || !h.instances.iter().any(|i| p.different_host.contains(i))
        }
        FilterKind::Compute
        | FilterKind::AvailabilityZone
        | FilterKind::Ram
        | FilterKind::Disk
        | FilterKind::Core
        | FilterKind::AggregateInstanceExtraSpecs
        | FilterKind::ImageProperties => return None,
    })
}

/// The largest RAM, disk and vCPU request the AggregateRam, AggregateDisk and AggregateCore
/// filters let through on this host: `passes(Ram)` is `fits[0] >= p.ram_mb as f64`, and so
/// on. Each is `min(usable, usable × ratio − used)` computed as `passes` computes it (so the
/// comparison is bit-for-bit the same), +∞ for a host that reports no vCPUs, and NaN (no
/// request fits) when the capacity is NaN.
pub(crate) fn fits(ctx: &HostCtx<'_>) -> [f64; 3] {
    // `passes` checks `usable >= req && head >= req`; with `head` NaN that is false, and
    // so is `NaN >= req`, which this minimum yields.
    let fit = |usable: f64, head: f64| if usable <= head { usable } else { head };
    let h = ctx.host;
    let ram = h.ram_mb_usable() as f64;
    let disk = h.disk_mb_usable() as f64;
    let cpu = f64::from(h.vcpus_usable());
    [
        fit(ram, ram * ctx.ratios.ram - h.ram_mb_used as f64),
        fit(disk, disk * ctx.ratios.disk - h.disk_mb_used as f64),
        if h.vcpus_total == 0 {
            f64::INFINITY
        } else {
            fit(cpu, cpu * ctx.ratios.cpu - f64::from(h.vcpus_used))
        },
    ]
}

/// AggregateInstanceExtraSpecsFilter over a host's merged aggregate metadata: every spec
/// needs the key on one of the host's aggregates with a value that matches.
pub(crate) fn extra_specs_pass(
    metadata: &BTreeMap<String, Vec<String>>,
    specs: &[(String, String)],
) -> bool {
    specs.iter().all(|(key, req)| {
        metadata
            .get(key)
            .is_some_and(|values| values.iter().any(|v| crate::extra_specs::matches(v, req)))
    })
}

/// ImagePropertiesFilter: the host must match the architecture and hypervisor type the image
/// asks for, and its hypervisor version must satisfy the image's requirement (a host that
/// reports no version passes that part, as in Nova). As in Nova, an image that names neither
/// an architecture nor a hypervisor type is supported everywhere, whatever version it asks for.
fn image_passes(ctx: &HostCtx<'_>, p: &Prepared) -> bool {
    if p.image_arch.is_none() && p.image_hv.is_none() {
        return true;
    }
    if p.image_arch.as_deref().is_some_and(|a| a != ctx.arch) {
        return false;
    }
    if p.image_hv.as_deref().is_some_and(|h| h != ctx.hv) {
        return false;
    }
    let version = ctx.host.hypervisor_version;
    match &p.image_version {
        Some(req) if version != 0 => req.satisfied_by(version_from_int(version)),
        _ => true,
    }
}
