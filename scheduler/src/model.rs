//! The data the scheduler reads (hosts, aggregates, requests) and what it hands back (claims).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Overcommit factors: a host offers `total × ratio` of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AllocationRatios {
    pub cpu: f64,
    pub ram: f64,
    pub disk: f64,
}

impl Default for AllocationRatios {
    /// Nova's defaults: 16 vCPUs per core, 1.5 × RAM, no disk overcommit.
    fn default() -> Self {
        Self {
            cpu: 16.0,
            ram: 1.5,
            disk: 1.0,
        }
    }
}

/// A host aggregate: a named set of hosts with metadata. Metadata keys
/// `cpu_allocation_ratio`, `ram_allocation_ratio` and `disk_allocation_ratio` override the
/// host's ratios; every key can be matched by flavor extra specs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    pub name: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// One compute host as the scheduler sees it in the local replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub enabled: bool,
    pub up: bool,
    pub availability_zone: String,
    /// Names of the aggregates this host belongs to.
    #[serde(default)]
    pub aggregates: Vec<String>,
    pub vcpus_total: u32,
    pub vcpus_used: u32,
    pub ram_mb_total: u64,
    pub ram_mb_used: u64,
    pub disk_gb_total: u64,
    /// Used disk is kept in MB because swap is sized in MB (Nova's `free_disk_mb`).
    pub disk_mb_used: u64,
    /// Held back for the host's own use (Nova's `reserved_host_cpus`,
    /// `reserved_host_memory_mb`, `reserved_host_disk_mb`): what instances may claim is
    /// `(total - reserved) × allocation ratio`, as Placement computes a resource's capacity.
    #[serde(default)]
    pub vcpus_reserved: u32,
    #[serde(default)]
    pub ram_mb_reserved: u64,
    #[serde(default)]
    pub disk_mb_reserved: u64,
    #[serde(default)]
    pub allocation_ratios: AllocationRatios,
    pub hypervisor_type: String,
    pub architecture: String,
    /// Nova's integer encoding: 6002000 is version 6.2.0.
    #[serde(default)]
    pub hypervisor_version: u64,
    /// Instance ids placed on this host (server groups count their members here).
    #[serde(default)]
    pub instances: Vec<String>,
    /// Bumped by every claim; a claim names the generation it saw.
    #[serde(default)]
    pub generation: u64,
}

impl Host {
    /// vCPUs instances may use before the allocation ratio: the total less the reserved.
    pub fn vcpus_usable(&self) -> u32 {
        self.vcpus_total.saturating_sub(self.vcpus_reserved)
    }

    /// RAM in MB instances may use before the allocation ratio.
    pub fn ram_mb_usable(&self) -> u64 {
        self.ram_mb_total.saturating_sub(self.ram_mb_reserved)
    }

    /// Disk in MB instances may use before the allocation ratio.
    pub fn disk_mb_usable(&self) -> u64 {
        (self.disk_gb_total * 1024).saturating_sub(self.disk_mb_reserved)
    }
}

/// What a server asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flavor {
    pub name: String,
    pub vcpus: u32,
    pub ram_mb: u64,
    pub root_gb: u64,
    #[serde(default)]
    pub ephemeral_gb: u64,
    #[serde(default)]
    pub swap_mb: u64,
    #[serde(default)]
    pub extra_specs: BTreeMap<String, String>,
}

impl Flavor {
    /// Disk in MB, as Nova's DiskFilter counts it: root and ephemeral in GB, swap in MB.
    pub fn disk_mb(&self) -> u64 {
        1024 * (self.root_gb + self.ephemeral_gb) + self.swap_mb
    }
}

/// The image properties the ImagePropertiesFilter reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageProperties {
    /// `hw_architecture` (formerly `architecture`).
    #[serde(default)]
    pub architecture: Option<String>,
    /// `img_hv_type` (formerly `hypervisor_type`).
    #[serde(default)]
    pub hypervisor_type: Option<String>,
    /// `img_hv_requested_version` (formerly `hypervisor_version_requires`), e.g. `>=6.0,<7.0`.
    #[serde(default)]
    pub hypervisor_version_requires: Option<String>,
}

impl ImageProperties {
    /// Reads Glance image properties, accepting the current and the legacy names.
    pub fn from_glance(props: &BTreeMap<String, String>) -> Self {
        let get = |new: &str, old: &str| props.get(new).or_else(|| props.get(old)).cloned();
        Self {
            architecture: get("hw_architecture", "architecture"),
            hypervisor_type: get("img_hv_type", "hypervisor_type"),
            hypervisor_version_requires: get(
                "img_hv_requested_version",
                "hypervisor_version_requires",
            ),
        }
    }
}

/// Server group policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupPolicy {
    Affinity,
    AntiAffinity,
    SoftAffinity,
    SoftAntiAffinity,
}

/// The server group named in the `group` scheduler hint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerGroup {
    pub policy: GroupPolicy,
    /// Instance ids already in the group. Their hosts are found through `Host::instances`.
    #[serde(default)]
    pub members: Vec<String>,
    /// Anti-affinity rule `max_server_per_host` (default 1).
    #[serde(default)]
    pub max_server_per_host: Option<u32>,
}

/// Scheduler hints (`os:scheduler_hints`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SchedulerHints {
    /// JSON filter query, as the string the API received.
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    pub group: Option<ServerGroup>,
    /// Instance ids: the host must hold at least one of them (Nova's `same_host`).
    #[serde(default)]
    pub same_host: Vec<String>,
    /// Instance ids: the host must hold none of them (Nova's `different_host`).
    #[serde(default)]
    pub different_host: Vec<String>,
}

/// A request to place `instance_ids.len()` instances of one flavor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// One id per instance to place; the number of instances is its length. The ids are
    /// recorded on the chosen hosts so that server-group filters see earlier picks.
    pub instance_ids: Vec<String>,
    pub flavor: Flavor,
    #[serde(default)]
    pub image: ImageProperties,
    /// `zone`, or `zone:host` to force a host (admins only).
    #[serde(default)]
    pub availability_zone: Option<String>,
    #[serde(default)]
    pub is_admin: bool,
    #[serde(default)]
    pub hints: SchedulerHints,
}

/// What a placement needs written: the host and the generation it was chosen at, and the
/// resources to add. The caller turns it into a Raft transaction conditioned on `generation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub host: String,
    pub generation: u64,
    pub instance_id: String,
    pub vcpus: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
}

/// Why a claim could not be applied to a host view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("the claim is for host `{claim}` but was applied to host `{host}`")]
    WrongHost { claim: String, host: String },
    #[error("host `{0}` is not in the view")]
    UnknownHost(String),
    #[error("instance `{0}` is already placed on a host")]
    InstanceAlreadyPlaced(String),
    #[error("host `{host}` is at generation {found}, the claim was made at {expected}")]
    StaleGeneration {
        host: String,
        expected: u64,
        found: u64,
    },
}

/// Applies a claim to a host: checks the generation, adds the resources and the instance,
/// and bumps the generation. This is what the Raft transaction does on commit, and what the
/// scheduler does between the picks of a multi-instance request.
pub fn apply_claim(host: &mut Host, claim: &Claim) -> Result<(), ClaimError> {
    if host.name != claim.host {
        return Err(ClaimError::WrongHost {
            claim: claim.host.clone(),
            host: host.name.clone(),
        });
    }
    if host.generation != claim.generation {
        return Err(ClaimError::StaleGeneration {
            host: host.name.clone(),
            expected: claim.generation,
            found: host.generation,
        });
    }
    host.vcpus_used += claim.vcpus;
    host.ram_mb_used += claim.ram_mb;
    host.disk_mb_used += claim.disk_mb;
    host.instances.push(claim.instance_id.clone());
    host.generation += 1;
    Ok(())
}

/// Undoes `apply_claim` for the last claim applied to `host` (picks are reverted in reverse).
pub(crate) fn revert_claim(host: &mut Host, claim: &Claim) {
    host.vcpus_used -= claim.vcpus;
    host.ram_mb_used -= claim.ram_mb;
    host.disk_mb_used -= claim.disk_mb;
    let popped = host.instances.pop();
    debug_assert_eq!(popped.as_deref(), Some(claim.instance_id.as_str()));
    host.generation -= 1;
}
