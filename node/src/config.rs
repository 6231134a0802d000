//! Node configuration: flags and environment over a TOML file in the data directory, into one
//! struct with `deny_unknown_fields` and a `validate()` that says what is wrong.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The file `init` and `join` write and `start` reads.
pub const CONFIG_FILE: &str = "node.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name, unique in the cluster.
    pub name: String,
    /// QUIC peer address (UDP).
    pub listen: SocketAddr,
    /// HTTP API address (TCP).
    pub api: SocketAddr,
    /// Availability zone; voters are spread across zones.
    #[serde(default = "default_zone")]
    pub zone: String,
    /// Region name in the service catalog.
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub identity: IdentitySection,
    #[serde(default)]
    pub api_tls: ApiTlsSection,
    /// Overrides of the capacity this node registers as a compute host; unset fields are
    /// detected (available parallelism, /proc/meminfo, statvfs of the data directory).
    #[serde(default, skip_serializing_if = "HostSection::is_empty")]
    pub host: HostSection,
    #[serde(default)]
    pub images: shoal_images::ImagesSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub compute: ComputeSection,
    /// Tenant networks: the VNI range, the underlay MTU, the flat physical networks
    /// (docs/network.md).
    #[serde(default)]
    pub network: shoal_network::NetworkConfig,
}

/// The compute agent (`shoal-compute`'s `agent`): libvirt, where instances live, timings, and
/// what of this host instances may claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeSection {
    /// `qemu:///system` on a host; `test:///default` runs libvirt's in-memory test hypervisor
    /// (real libvirt, no guests), which `shoal dev --libvirt-uri` passes for fast tests.
    #[serde(default = "default_libvirt_uri")]
    pub libvirt_uri: String,
    /// One directory per instance (overlay disk, console log). Default: `<data-dir>/instances`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances_path: Option<PathBuf>,
    /// `auto` (kvm where /dev/kvm opens, else qemu), `kvm` or `qemu`.
    #[serde(default = "default_virt_type")]
    pub virt_type: String,
    /// How long a stop or soft reboot waits for the guest to power off before forcing it.
    #[serde(default = "default_stop_grace")]
    pub shutdown_timeout_secs: u64,
    /// How often the agent checks every instance against libvirt (power-state sync).
    #[serde(default = "default_sync_interval")]
    pub sync_power_state_interval_secs: u64,
    /// How long a domain no server row claims is kept before it is destroyed.
    #[serde(default = "default_orphan_grace")]
    pub orphan_grace_secs: u64,
    /// How long a spawn waits for the network agent to program the server's ports before the
    /// server goes to ERROR (Nova's `vif_plugging_timeout`); 0 = do not wait. Only on nodes
    /// that run a network agent.
    #[serde(default = "default_vif_plugging_timeout")]
    pub vif_plugging_timeout_secs: u64,
    /// Every server this node builds gets a config drive, asked for or not (Nova's
    /// `force_config_drive`).
    #[serde(default)]
    pub force_config_drive: bool,
    /// RAM in MB held back for the host (Nova's `reserved_host_memory_mb`, default 512).
    #[serde(default = "default_reserved_ram")]
    pub reserved_host_memory_mb: u64,
    /// Disk in MB held back for the host (Nova's `reserved_host_disk_mb`).
    #[serde(default)]
    pub reserved_host_disk_mb: u64,
    /// vCPUs held back for the host (Nova's `reserved_host_cpus`).
    #[serde(default)]
    pub reserved_host_cpus: u32,
    /// Overcommit factors (Nova's `*_allocation_ratio`). Unset, as in Nova, keeps the host's
    /// current ratio: a new host starts at the `initial_*` ratios below, and the placement API
    /// (`PUT /shoal/v1/hosts/{name}`) may change it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_allocation_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_allocation_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_allocation_ratio: Option<f64>,
    /// How often unused base files are aged (Nova's `image_cache_manager_interval`).
    #[serde(default = "default_image_cache_interval")]
    pub image_cache_manager_interval: u64,
    /// A base image, ephemeral or swap base no instance on this node has used for this long is
    /// removed (Nova's `remove_unused_original_minimum_age_seconds`).
    #[serde(default = "default_remove_unused_age")]
    pub remove_unused_original_minimum_age_seconds: u64,
    /// The ratios a host starts with when the matching `*_allocation_ratio` is unset (Nova's
    /// `initial_*_allocation_ratio`, defaults 4.0, 1.0 and 1.0); a host that exists keeps its own.
    #[serde(default = "default_initial_cpu_ratio")]
    pub initial_cpu_allocation_ratio: f64,
    #[serde(default = "default_initial_ratio")]
    pub initial_ram_allocation_ratio: f64,
    #[serde(default = "default_initial_ratio")]
    pub initial_disk_allocation_ratio: f64,
    /// Seconds a shelved server keeps its host before it is offloaded (Nova's
    /// `shelved_offload_time`): 0 (the default) offloads at once, -1 never.
    #[serde(default)]
    pub shelved_offload_time: i64,
    /// Seconds a deleted server is still listed (`deleted=true`, `changes-since`) and counted
    /// by `os-simple-tenant-usage` before its tombstone is purged.
    #[serde(default = "default_deleted_server_retention")]
    pub deleted_server_retention_secs: u64,
    /// A resize may pick the server's own host (Nova's `allow_resize_to_same_host`).
    #[serde(default)]
    pub allow_resize_to_same_host: bool,
    /// Seconds after which a resized server is confirmed on its own (Nova's
    /// `resize_confirm_window`); 0 never.
    #[serde(default)]
    pub resize_confirm_window: u64,
}

fn default_libvirt_uri() -> String {
    "qemu:///system".to_owned()
}
fn default_virt_type() -> String {
    "auto".to_owned()
}
fn default_stop_grace() -> u64 {
    10
}
fn default_sync_interval() -> u64 {
    10
}
fn default_orphan_grace() -> u64 {
    600
}
fn default_vif_plugging_timeout() -> u64 {
    300
}
fn default_reserved_ram() -> u64 {
    512
}
fn default_image_cache_interval() -> u64 {
    2400
}
fn default_remove_unused_age() -> u64 {
    86_400
}
fn default_deleted_server_retention() -> u64 {
    shoal_compute::usage::DEFAULT_RETENTION_SECS
}
fn default_initial_cpu_ratio() -> f64 {
    4.0
}
fn default_initial_ratio() -> f64 {
    1.0
}

impl Default for ComputeSection {
    fn default() -> Self {
        Self {
            libvirt_uri: default_libvirt_uri(),
            instances_path: None,
            virt_type: default_virt_type(),
            shutdown_timeout_secs: default_stop_grace(),
            sync_power_state_interval_secs: default_sync_interval(),
            orphan_grace_secs: default_orphan_grace(),
            vif_plugging_timeout_secs: default_vif_plugging_timeout(),
            force_config_drive: false,
            reserved_host_memory_mb: default_reserved_ram(),
            reserved_host_disk_mb: 0,
            reserved_host_cpus: 0,
            cpu_allocation_ratio: None,
            ram_allocation_ratio: None,
            disk_allocation_ratio: None,
            image_cache_manager_interval: default_image_cache_interval(),
            remove_unused_original_minimum_age_seconds: default_remove_unused_age(),
            initial_cpu_allocation_ratio: default_initial_cpu_ratio(),
            initial_ram_allocation_ratio: default_initial_ratio(),
            initial_disk_allocation_ratio: default_initial_ratio(),
            shelved_offload_time: 0,
            deleted_server_retention_secs: default_deleted_server_retention(),
            allow_resize_to_same_host: false,
            resize_confirm_window: 0,
        }
    }
}

impl ComputeSection {
    fn validate(&self) -> Result<(), ConfigError> {
        if !["auto", "kvm", "qemu"].contains(&self.virt_type.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "compute.virt_type must be auto, kvm or qemu, not {:?}",
                self.virt_type
            )));
        }
        if self.libvirt_uri.is_empty() || !self.libvirt_uri.contains(":/") {
            return Err(ConfigError::Invalid(format!(
                "compute.libvirt_uri {:?} is not a libvirt URI such as qemu:///system",
                self.libvirt_uri
            )));
        }
        range(
            "compute.shutdown_timeout_secs",
            self.shutdown_timeout_secs,
            0,
            3600,
        )?;
        range(
            "compute.sync_power_state_interval_secs",
            self.sync_power_state_interval_secs,
            1,
            86_400,
        )?;
        range(
            "compute.deleted_server_retention_secs",
            self.deleted_server_retention_secs,
            0,
            366 * 86_400,
        )?;
        range(
            "compute.orphan_grace_secs",
            self.orphan_grace_secs,
            0,
            30 * 86_400,
        )?;
        range(
            "compute.vif_plugging_timeout_secs",
            self.vif_plugging_timeout_secs,
            0,
            3600,
        )?;
        range(
            "compute.image_cache_manager_interval",
            self.image_cache_manager_interval,
            1,
            7 * 86_400,
        )?;
        range(
            "compute.remove_unused_original_minimum_age_seconds",
            self.remove_unused_original_minimum_age_seconds,
            0,
            365 * 86_400,
        )?;
        range(
            "compute.reserved_host_memory_mb",
            self.reserved_host_memory_mb,
            0,
            1 << 34,
        )?;
        range(
            "compute.reserved_host_disk_mb",
            self.reserved_host_disk_mb,
            0,
            1 << 40,
        )?;
        range(
            "compute.reserved_host_cpus",
            u64::from(self.reserved_host_cpus),
            0,
            4096,
        )?;
        for (name, ratio) in [
            ("compute.cpu_allocation_ratio", self.cpu_allocation_ratio),
            ("compute.ram_allocation_ratio", self.ram_allocation_ratio),
            ("compute.disk_allocation_ratio", self.disk_allocation_ratio),
            (
                "compute.initial_cpu_allocation_ratio",
                Some(self.initial_cpu_allocation_ratio),
            ),
            (
                "compute.initial_ram_allocation_ratio",
                Some(self.initial_ram_allocation_ratio),
            ),
            (
                "compute.initial_disk_allocation_ratio",
                Some(self.initial_disk_allocation_ratio),
            ),
        ] {
            if let Some(v) = ratio {
                if !(v.is_finite() && v > 0.0 && v <= 1000.0) {
                    return Err(ConfigError::Invalid(format!(
                        "{name} must be a number above 0 and at most 1000, not {v}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Limits of the API's HTTP server (see `api/http_server.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Connections served at once; more are closed on arrival.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A request's headers must arrive within this many seconds; idle connections close then.
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout_secs: u64,
    /// A body that sends nothing for this many seconds is cut off.
    #[serde(default = "default_body_idle")]
    pub body_idle_timeout_secs: u64,
    /// The body of an ordinary call (not an image upload) must arrive within this many seconds.
    #[serde(default = "default_body_total")]
    pub body_timeout_secs: u64,
}

fn default_max_connections() -> usize {
    4096
}
fn default_header_timeout() -> u64 {
    10
}
fn default_body_idle() -> u64 {
    30
}
fn default_body_total() -> u64 {
    60
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            header_read_timeout_secs: default_header_timeout(),
            body_idle_timeout_secs: default_body_idle(),
            body_timeout_secs: default_body_total(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gb: Option<u64>,
}

/// How the API listener speaks: plain HTTP (the default, for local development), or HTTPS with a
/// certificate the node issues itself from the cluster CA, or with an operator's PEM files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApiTls {
    #[default]
    Off,
    ClusterCa,
    File,
}

impl ApiTls {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiTls::Off => "off",
            ApiTls::ClusterCa => "cluster-ca",
            ApiTls::File => "file",
        }
    }
}

impl std::str::FromStr for ApiTls {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(ApiTls::Off),
            "cluster-ca" => Ok(ApiTls::ClusterCa),
            "file" => Ok(ApiTls::File),
            _ => Err(format!(
                "{s:?} is not an API TLS mode: use off, cluster-ca or file"
            )),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsSection {
    /// `off`, `cluster-ca` or `file`.
    #[serde(default)]
    pub mode: ApiTls,
    /// With `tls = "file"`: the certificate chain (leaf first), PEM, absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// With `tls = "file"`: the leaf's private key, PEM, absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// With `tls = "file"`, optional: the CA bundle clients need to trust the certificate;
    /// `admin-openrc` exports it as `OS_CACERT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cacert: Option<PathBuf>,
}

impl HostSection {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// How many voters the cluster keeps (1, 3 or 5); all other nodes are learners. Read at
    /// `init` only: the count is then the cluster's (replicated), whatever a joining node says.
    #[serde(default = "default_voters")]
    pub voters: usize,
    /// How long a voter may be unreachable before a learner replaces it, in seconds.
    #[serde(default = "default_replace_after")]
    pub replace_unreachable_voter_after_secs: u64,
    /// Minimum time between two membership changes made by the voter manager, in seconds,
    /// so that a flapping node does not churn membership.
    #[serde(default = "default_stabilization")]
    pub membership_stabilization_secs: u64,
    /// Take a snapshot (and purge the log before it) every this many applied entries.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every_entries: u64,
    /// Raft heartbeat interval in milliseconds.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// A follower that hears no heartbeat for this long (randomised up to 4/3 of it, in
    /// milliseconds) campaigns to become the leader.
    #[serde(default = "default_election")]
    pub election_timeout_ms: u64,
    /// Ask the voters whether they would vote before raising the term (Raft's pre-vote), so a
    /// node back from a partition cannot depose a working leader.
    #[serde(default = "default_pre_vote")]
    pub pre_vote: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySection {
    /// Token lifetime in seconds. Every node should use the same value: a node retires a
    /// signing key once the tokens it could have signed, by its own lifetime, have expired.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// A new signing key is made when the newest is this old, in seconds.
    #[serde(default = "default_key_rotation")]
    pub key_rotation_secs: u64,
}

fn default_zone() -> String {
    "nova".to_owned()
}
fn default_region() -> String {
    "RegionOne".to_owned()
}
fn default_voters() -> usize {
    3
}
fn default_replace_after() -> u64 {
    30
}
fn default_stabilization() -> u64 {
    10
}
/// etcd's default `--snapshot-count`. Every snapshot reads the whole state machine, so on a
/// busy cluster a small interval costs a large share of each node's CPU (docs/benchmarks.md,
/// "Where the write time goes").
fn default_snapshot_every() -> u64 {
    100_000
}
// Sized by the failover breakdown in docs/benchmarks.md ("Where a failover's time goes"): a
// 200 ms lease and a 50 ms heartbeat keep a kill -9 of the leader under a second at p99 on a
// loaded two-core machine, with pre-vote shielding the leader from a lagging follower's timer.
fn default_heartbeat() -> u64 {
    50
}
fn default_election() -> u64 {
    300
}
fn default_pre_vote() -> bool {
    true
}
fn default_token_ttl() -> u64 {
    24 * 3600
}

fn default_key_rotation() -> u64 {
    24 * 3600
}

/// Most signing keys a configuration may keep live at once: tokens are checked against each
/// key in memory, and every node holds them all.
pub const MAX_LIVE_SIGNING_KEYS: u64 = 100;

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            voters: default_voters(),
            replace_unreachable_voter_after_secs: default_replace_after(),
            membership_stabilization_secs: default_stabilization(),
            snapshot_every_entries: default_snapshot_every(),
            heartbeat_ms: default_heartbeat(),
            election_timeout_ms: default_election(),
            pre_vote: default_pre_vote(),
        }
    }
}

impl Default for IdentitySection {
    fn default() -> Self {
        Self {
            token_ttl_secs: default_token_ttl(),
            key_rotation_secs: default_key_rotation(),
        }
    }
}

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("cannot write config file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The node name goes into the node's certificate, so the TLS layer's rule is the rule.
    #[error("node name is invalid")]
    BadName(#[source] shoal_consensus::net::TlsError),
    #[error(
        "availability zone {0:?} is invalid: use 1-63 characters from a-z, A-Z, 0-9, '-' and '_'"
    )]
    BadZone(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cluster.voters is {0}; it must be 1, 3 or 5")]
    BadVoters(usize),
    #[error("{field} must be between {min} and {max}, got {value}")]
    OutOfRange {
        field: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("cluster.election_timeout_ms ({election}) must be at least three times cluster.heartbeat_ms ({heartbeat})")]
    ElectionTooShort { election: u64, heartbeat: u64 },
    #[error("{field} must be a multiple of 4096, got {value}")]
    Unaligned { field: &'static str, value: u64 },
    #[error("--listen and --api must be different addresses, both are {0}")]
    SameAddress(SocketAddr),
    #[error("api_tls.mode = \"file\" needs {0} (--api-cert and --api-key on the command line)")]
    ApiTlsFileMissing(&'static str),
    #[error("{field} is only used with api_tls.mode = \"file\", but api_tls.mode is \"{mode}\"")]
    ApiTlsFileUnused {
        field: &'static str,
        mode: &'static str,
    },
    #[error("identity.key_rotation_secs ({rotation}) is too short for identity.token_ttl_secs ({ttl}): more than {max} signing keys would be live at once; rotate at least every {min} seconds", max = MAX_LIVE_SIGNING_KEYS)]
    RotationTooFast { rotation: u64, ttl: u64, min: u64 },
    #[error("{field} must be an absolute path, got {path}")]
    RelativePath { field: &'static str, path: PathBuf },
    #[error("the [network] section is invalid")]
    Network(#[source] shoal_network::NetworkConfigError),
}

/// Zone and aggregate names: 1-63 characters from a-z, A-Z, 0-9, '-' and '_'. Node names follow
/// the stricter certificate rule of `tls::validate_node_name`.
pub use shoal_compute::placement::valid_name;

impl NodeConfig {
    pub fn new(name: String, listen: SocketAddr, api: SocketAddr) -> Self {
        Self {
            name,
            listen,
            api,
            zone: default_zone(),
            region: default_region(),
            cluster: ClusterSection::default(),
            identity: IdentitySection::default(),
            api_tls: ApiTlsSection::default(),
            host: HostSection::default(),
            images: shoal_images::ImagesSection::default(),
            http: HttpSection::default(),
            compute: ComputeSection::default(),
            network: shoal_network::NetworkConfig::default(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        shoal_consensus::net::tls::validate_node_name(&self.name).map_err(ConfigError::BadName)?;
        if !valid_name(&self.zone) {
            return Err(ConfigError::BadZone(self.zone.clone()));
        }
        if ![1, 3, 5].contains(&self.cluster.voters) {
            return Err(ConfigError::BadVoters(self.cluster.voters));
        }
        if self.listen == self.api {
            return Err(ConfigError::SameAddress(self.listen));
        }
        let c = &self.cluster;
        range("cluster.heartbeat_ms", c.heartbeat_ms, 10, 10_000)?;
        range(
            "cluster.election_timeout_ms",
            c.election_timeout_ms,
            30,
            60_000,
        )?;
        if c.election_timeout_ms < 3 * c.heartbeat_ms {
            return Err(ConfigError::ElectionTooShort {
                election: c.election_timeout_ms,
                heartbeat: c.heartbeat_ms,
            });
        }
        range(
            "cluster.replace_unreachable_voter_after_secs",
            c.replace_unreachable_voter_after_secs,
            1,
            86_400,
        )?;
        range(
            "cluster.membership_stabilization_secs",
            c.membership_stabilization_secs,
            0,
            86_400,
        )?;
        range(
            "cluster.snapshot_every_entries",
            c.snapshot_every_entries,
            100,
            100_000_000,
        )?;
        let id = &self.identity;
        // 10 s is short for people but lets tests watch a token expire without a long wait.
        range(
            "identity.token_ttl_secs",
            id.token_ttl_secs,
            10,
            30 * 86_400,
        )?;
        range(
            "identity.key_rotation_secs",
            id.key_rotation_secs,
            10,
            365 * 86_400,
        )?;
        let keep = shoal_identity::key_lifetime_after_rotation(id.token_ttl_secs);
        let min = keep.div_ceil(MAX_LIVE_SIGNING_KEYS - 1);
        if id.key_rotation_secs < min {
            return Err(ConfigError::RotationTooFast {
                rotation: id.key_rotation_secs,
                ttl: id.token_ttl_secs,
                min,
            });
        }
        self.api_tls.validate()?;
        let h = &self.http;
        range(
            "http.max_connections",
            h.max_connections as u64,
            16,
            1_000_000,
        )?;
        range(
            "http.header_read_timeout_secs",
            h.header_read_timeout_secs,
            1,
            3600,
        )?;
        range(
            "http.body_idle_timeout_secs",
            h.body_idle_timeout_secs,
            1,
            3600,
        )?;
        range("http.body_timeout_secs", h.body_timeout_secs, 1, 3600)?;
        self.compute.validate()?;
        if let Some(v) = self.host.vcpus {
            range("host.vcpus", v.into(), 1, 4096)?;
        }
        if let Some(v) = self.host.ram_mb {
            range("host.ram_mb", v, 1, 1 << 34)?;
        }
        if let Some(v) = self.host.disk_gb {
            range("host.disk_gb", v, 0, 1 << 30)?;
        }
        let i = &self.images;
        range("images.replication", i.replication as u64, 1, 16)?;
        range("images.chunk_bytes", i.chunk_bytes, 64 << 10, 64 << 20)?;
        if !i.chunk_bytes.is_multiple_of(4096) {
            return Err(ConfigError::Unaligned {
                field: "images.chunk_bytes",
                value: i.chunk_bytes,
            });
        }
        range("images.max_image_bytes", i.max_image_bytes, 1, 1 << 50)?;
        range(
            "images.cache_min_age_secs",
            i.cache_min_age_secs,
            0,
            365 * 86_400,
        )?;
        range(
            "images.rereplicate_after_secs",
            i.rereplicate_after_secs,
            1,
            30 * 86_400,
        )?;
        self.network.validate().map_err(ConfigError::Network)?;
        Ok(())
    }

    pub fn replace_after(&self) -> Duration {
        Duration::from_secs(self.cluster.replace_unreachable_voter_after_secs)
    }

    pub fn load(data_dir: &Path) -> Result<Self, ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn save(&self, data_dir: &Path) -> Result<(), ConfigError> {
        let path = data_dir.join(CONFIG_FILE);
        let text = toml::to_string_pretty(self).expect("config serialises to TOML");
        std::fs::write(&path, text).map_err(|source| ConfigError::Write { path, source })
    }
}

impl ApiTlsSection {
    /// The paths' shape only: whether the files exist and hold a matching pair is checked when
    /// the node loads them (`api::tls`), so `init` fails before it creates anything.
    fn validate(&self) -> Result<(), ConfigError> {
        let files = [
            ("api_tls.cert", &self.cert),
            ("api_tls.key", &self.key),
            ("api_tls.cacert", &self.cacert),
        ];
        for (field, path) in files {
            match path {
                Some(_) if self.mode != ApiTls::File => {
                    return Err(ConfigError::ApiTlsFileUnused {
                        field,
                        mode: self.mode.as_str(),
                    })
                }
                Some(p) if !p.is_absolute() => {
                    return Err(ConfigError::RelativePath {
                        field,
                        path: p.clone(),
                    })
                }
                _ => {}
            }
        }
        if self.mode == ApiTls::File {
            if self.cert.is_none() {
                return Err(ConfigError::ApiTlsFileMissing("api_tls.cert"));
            }
            if self.key.is_none() {
                return Err(ConfigError::ApiTlsFileMissing("api_tls.key"));
            }
        }
        Ok(())
    }
}

fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        Err(ConfigError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped template parses and validates, so operators can start from it.
    #[test]
    fn shipped_template_is_valid() {
        let text = include_str!("../../docs/config-template.toml");
        let cfg = NodeConfig::parse(text, Path::new("docs/config-template.toml")).unwrap();
        assert_eq!(cfg.cluster.voters, 3);
        assert_eq!(cfg.host.vcpus, Some(8));
        assert_eq!(cfg.compute.reserved_host_memory_mb, 512);
        assert_eq!(cfg.compute.cpu_allocation_ratio, None);
        assert!(!cfg.compute.force_config_drive);
    }

    /// Reserved resources and allocation ratios take Nova's names; a ratio must be a positive
    /// number of at most 1000.
    #[test]
    fn compute_reservations_and_ratios() {
        let base = "name = \"a\"\nlisten = \"127.0.0.1:1\"\napi = \"127.0.0.1:2\"\n[compute]\n";
        let cfg = NodeConfig::parse(
            &format!("{base}reserved_host_memory_mb = 1024\nreserved_host_cpus = 2\ncpu_allocation_ratio = 4.0\n"),
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(cfg.compute.reserved_host_memory_mb, 1024);
        assert_eq!(cfg.compute.reserved_host_cpus, 2);
        assert_eq!(cfg.compute.cpu_allocation_ratio, Some(4.0));
        assert_eq!(cfg.compute.ram_allocation_ratio, None);
        // Nova's initial ratios for a new host, settable under the same names.
        let c = &cfg.compute;
        assert_eq!(
            (
                c.initial_cpu_allocation_ratio,
                c.initial_ram_allocation_ratio,
                c.initial_disk_allocation_ratio
            ),
            (4.0, 1.0, 1.0)
        );
        let cfg = NodeConfig::parse(
            &format!(
                "{base}initial_cpu_allocation_ratio = 16.0
initial_ram_allocation_ratio = 1.5
"
            ),
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(cfg.compute.initial_cpu_allocation_ratio, 16.0);
        assert_eq!(cfg.compute.initial_ram_allocation_ratio, 1.5);
        for bad in [
            "ram_allocation_ratio = 0.0",
            "disk_allocation_ratio = -1.0",
            "cpu_allocation_ratio = 1e9",
            "initial_cpu_allocation_ratio = 0.0",
            "initial_disk_allocation_ratio = 1001.0",
        ] {
            let err =
                NodeConfig::parse(&format!("{base}{bad}\n"), Path::new("x.toml")).unwrap_err();
            let chain = format!("{:#}", anyhow::Error::from(err));
            assert!(chain.contains("allocation_ratio"), "{bad}: {chain}");
        }
        let err = NodeConfig::parse(
            &format!("{base}reserved_host_cpus = 5000\n"),
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(format!("{err}").contains("reserved_host_cpus"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let text = "name = \"a\"\nlisten = \"127.0.0.1:1\"\napi = \"127.0.0.1:2\"\nvoterz = 3\n";
        let err = NodeConfig::parse(text, Path::new("x.toml")).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains("voterz"), "{chain}");
    }

    #[test]
    fn bad_values_are_refused() {
        let mut cfg = NodeConfig::new(
            "a".into(),
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        assert!(cfg.validate().is_ok());
        cfg.cluster.voters = 4;
        assert!(matches!(cfg.validate(), Err(ConfigError::BadVoters(4))));
        cfg.cluster.voters = 3;
        cfg.name = "bad name".into();
        assert!(matches!(cfg.validate(), Err(ConfigError::BadName(_))));
        // A name the certificate layer would refuse is refused here, before anything is set up.
        cfg.name = "Node_1".into();
        assert!(matches!(cfg.validate(), Err(ConfigError::BadName(_))));
        cfg.name = "a".into();
        cfg.host.vcpus = Some(0);
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::OutOfRange {
                field: "host.vcpus",
                ..
            })
        ));
        cfg.host.vcpus = Some(8);
        assert!(cfg.validate().is_ok());
        cfg.images.chunk_bytes = (4 << 20) + 1;
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Unaligned {
                field: "images.chunk_bytes",
                ..
            })
        ));
        cfg.images.chunk_bytes = 4 << 20;
        cfg.images.replication = 0;
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::OutOfRange {
                field: "images.replication",
                ..
            })
        ));
        cfg.images.replication = 2;
        assert!(cfg.validate().is_ok());
        cfg.images.rereplicate_after_secs = 0;
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::OutOfRange {
                field: "images.rereplicate_after_secs",
                ..
            })
        ));
        cfg.images.rereplicate_after_secs = 300;
        assert!(cfg.validate().is_ok());
        cfg.identity.key_rotation_secs = 60;
        let err = cfg.validate().unwrap_err();
        assert!(matches!(err, ConfigError::RotationTooFast { .. }), "{err}");
        assert!(
            err.to_string().contains("at least every 876 seconds"),
            "{err}"
        );
        cfg.identity.token_ttl_secs = 10;
        assert!(
            cfg.validate().is_ok(),
            "a short lifetime allows fast rotation"
        );
        cfg.identity.token_ttl_secs = 9;
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::OutOfRange {
                field: "identity.token_ttl_secs",
                ..
            })
        ));
        cfg.identity = IdentitySection::default();
        cfg.cluster.election_timeout_ms = 100;
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::ElectionTooShort { .. })
        ));
    }

    /// Each wrong `[api_tls]` combination is refused with the field it is about.
    #[test]
    fn api_tls_settings_are_checked() {
        let parse = |api: &str| {
            let text = format!(
                "name = \"a\"\nlisten = \"127.0.0.1:1\"\napi = \"127.0.0.1:2\"\n[api_tls]\n{api}"
            );
            NodeConfig::parse(&text, Path::new("x.toml")).map(|c| c.api_tls)
        };
        assert_eq!(parse("").unwrap().mode, ApiTls::Off);
        assert_eq!(
            parse("mode = \"cluster-ca\"").unwrap().mode,
            ApiTls::ClusterCa
        );
        let file = parse("mode = \"file\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"").unwrap();
        assert_eq!(file.cert.as_deref(), Some(Path::new("/c.pem")));
        let msg = |api: &str| format!("{:#}", anyhow::Error::from(parse(api).unwrap_err()));
        assert!(msg("mode = \"https\"").contains("unknown variant `https`"));
        assert_eq!(
            msg("mode = \"file\"\nkey = \"/k.pem\""),
            "api_tls.mode = \"file\" needs api_tls.cert (--api-cert and --api-key on the command line)"
        );
        assert!(msg("mode = \"file\"\ncert = \"/c.pem\"").contains("needs api_tls.key"));
        assert_eq!(
            msg("mode = \"cluster-ca\"\ncert = \"/c.pem\""),
            "api_tls.cert is only used with api_tls.mode = \"file\", but api_tls.mode is \"cluster-ca\""
        );
        assert_eq!(
            msg("mode = \"file\"\ncert = \"c.pem\"\nkey = \"/k.pem\""),
            "api_tls.cert must be an absolute path, got c.pem"
        );
        assert!("https"
            .parse::<ApiTls>()
            .unwrap_err()
            .contains("off, cluster-ca or file"));
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = NodeConfig::new(
            "n1".into(),
            "127.0.0.1:7000".parse().unwrap(),
            "127.0.0.1:8000".parse().unwrap(),
        );
        cfg.save(dir.path()).unwrap();
        assert_eq!(NodeConfig::load(dir.path()).unwrap(), cfg);
    }
}
