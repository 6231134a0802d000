//! The network service (Neutron v2.0): networks with their VXLAN or flat segments, IPv4
//! subnets, ports with their addresses and MACs, security groups and rules, routers and
//! floating IPs (the L3 model; the datapath does not route or NAT yet), and the project quotas
//! that bound them.
//!
//! Owns: the rules of each resource (validation, Neutron's default policy, defaults), the
//! records of networks, subnets, security groups and rules (`records`), the IPAM allocator
//! (`ipam`), and every transaction that creates, changes or deletes them. Uniqueness that
//! matters (an address, a MAC, a VNI, a duplicate rule, a project's `default` group) is a row
//! written with an `Absent` precondition in the same transaction as the resource, so it holds
//! whichever node serves the request; quotas go through `shoal_state::quota`.
//!
//! Must never depend on axum or the `shoal` binary (the HTTP edge in `node/src/api/neutron`
//! translates to and from this crate), nor on another service's internals: the compute agent
//! and the network agent meet it only in the `ports` table (`shoal_state::records::PortRecord`).

pub mod agent;
pub mod config;
pub mod dhcp;
mod error;
mod floating_ips;
pub mod ip;
pub mod ipam;
mod networks;
mod ports;
pub mod prefix_set;
mod quotas;
pub mod records;
mod routers;
mod security_groups;
mod subnet_pools;
mod subnets;

use std::sync::Arc;

pub use config::{NetworkConfig, NetworkConfigError};
pub use error::{ErrorClass, NetResult, NetworkError, Resource};
pub use floating_ips::{FloatingIpCreate, FloatingIpUpdate};
pub use networks::{NetworkCreate, NetworkUpdate};
pub use ports::{AddressPairRequest, ExtraDhcpOptRequest, FixedIpRequest, PortCreate, PortUpdate};
pub use quotas::{QuotaUsage, COUNTED, DEFAULT_QUOTAS};
pub use routers::{
    GatewayRequest, InterfaceInfo, InterfaceRequest, RouterCreate, RouterUpdate, FLOATING_IP_OWNER,
    ROUTER_GATEWAY, ROUTER_INTERFACE,
};
pub use security_groups::{RuleCreate, SecurityGroupCreate, SecurityGroupUpdate};
use serde::{Deserialize, Deserializer};
pub use shoal_state::records::{AddressPair, FixedIp, PortRecord};
use shoal_state::{tables, State, Table};
pub use subnet_pools::{SubnetPoolCreate, SubnetPoolUpdate};
pub use subnets::{SubnetCreate, SubnetUpdate};

/// Who is asking, as the token says: the project it is scoped to and its strongest role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub project_id: Option<String>,
    /// The `admin` role: sees and changes every project's resources.
    pub admin: bool,
    /// The `member` role (or admin): may create and change resources of its project.
    /// Without it (a `reader`) the caller may only read.
    pub member: bool,
}

impl Caller {
    fn owns(&self, project: &str) -> bool {
        self.project_id.as_deref() == Some(project)
    }

    /// Admins act on anything; others on their own project's resources.
    fn may_change(&self, project: &str) -> bool {
        self.admin || (self.member && self.owns(project))
    }

    /// The project a create is for: the caller's own, or (admins only) the one named.
    fn project_for_create(
        &self,
        rule: &str,
        project_id: &Option<String>,
        tenant_id: &Option<String>,
    ) -> NetResult<String> {
        if !self.member && !self.admin {
            return Err(NetworkError::policy(rule));
        }
        let named = project_id.as_ref().or(tenant_id.as_ref());
        if let (Some(p), Some(t)) = (project_id, tenant_id) {
            if p != t {
                return Err(NetworkError::bad(
                    "project_id and tenant_id do not match; give one of them",
                ));
            }
        }
        match (named, &self.project_id) {
            (Some(p), own) if own.as_ref() == Some(p) => Ok(p.clone()),
            (Some(p), _) => {
                if !self.admin {
                    return Err(NetworkError::policy(&format!("{rule}:project_id")));
                }
                check_project_id(p)?;
                Ok(p.clone())
            }
            (None, Some(own)) => Ok(own.clone()),
            (None, None) => Err(NetworkError::bad(
                "the token is not scoped to a project: name the project (project_id)",
            )),
        }
    }
}

fn check_project_id(p: &str) -> NetResult<()> {
    let ok = (1..=64).contains(&p.len())
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(NetworkError::invalid(format!(
            "'{}' is not a valid project id",
            ip::shown(p)
        )))
    }
}

/// The network service over the replicated tables.
#[derive(Debug, Clone)]
pub struct NetworkService {
    state: State,
    config: Arc<NetworkConfig>,
}

impl NetworkService {
    pub fn new(state: State, config: NetworkConfig) -> Self {
        Self {
            state,
            config: Arc::new(config),
        }
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    fn networks(&self) -> Table<records::NetworkRecord> {
        self.state.table(tables::NETWORKS)
    }

    fn subnets(&self) -> Table<records::SubnetRecord> {
        self.state.table(tables::SUBNETS)
    }

    fn ports(&self) -> Table<PortRecord> {
        self.state.table(tables::PORTS)
    }

    fn groups(&self) -> Table<records::SecurityGroupRecord> {
        self.state.table(tables::SECURITY_GROUPS)
    }

    fn rules(&self) -> Table<records::RuleRecord> {
        self.state.table(tables::SECURITY_GROUP_RULES)
    }

    /// Rows whose value is another row's id (allocations, MACs, segments, rule keys).
    fn index(&self, table: &'static str) -> Table<String> {
        self.state.table(table)
    }

    /// Makes the reads that follow see every write acknowledged before the request came in,
    /// whichever node made it.
    async fn barrier(&self) -> NetResult<()> {
        self.state.read_barrier().await?;
        Ok(())
    }

    /// The network agents (one per node that runs one), as the agents publish themselves in
    /// `network_agents`. Listing agents is for admins, as in Neutron: anyone else sees none.
    pub async fn agents(&self, caller: &Caller) -> NetResult<Vec<agent::AgentRecord>> {
        if !caller.admin {
            return Ok(Vec::new());
        }
        self.barrier().await?;
        Ok(self
            .state
            .table::<agent::AgentRecord>(shoal_state::tables::NETWORK_AGENTS)
            .list("")
            .await?
            .into_values()
            .collect())
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Neutron's limit on names and descriptions.
const MAX_NAME: usize = 255;

fn check_text(field: &str, value: &str) -> NetResult<()> {
    if value.chars().count() > MAX_NAME {
        return Err(NetworkError::bad(format!(
            "Invalid input for {field}. Reason: '{}...' exceeds maximum length of {MAX_NAME}.",
            ip::shown(value)
        )));
    }
    Ok(())
}

/// Tags as Neutron's `standard-attr-tag` takes them: at most 50, each 1 to 255 characters
/// without a comma, kept sorted and unique.
pub fn check_tags(tags: &[String]) -> NetResult<Vec<String>> {
    if tags.len() > 50 {
        return Err(NetworkError::bad("a resource may carry at most 50 tags"));
    }
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for t in tags {
        if t.is_empty() || t.chars().count() > 255 || t.contains(',') {
            return Err(NetworkError::bad(format!(
                "Invalid input for tags. Reason: '{}' is not a valid tag: 1 to 255 characters, no comma.",
                ip::shown(t)
            )));
        }
        out.push(t.clone());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// For update bodies: an absent field is `None`, `null` is `Some(None)`.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// The resources a tag call may address, by Neutron's collection name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tagged {
    Network,
    Subnet,
    Port,
    SecurityGroup,
    Router,
    FloatingIp,
    SubnetPool,
}

/// What every stored resource has: tags, and a revision that moves with each change.
pub(crate) trait Revisioned: serde::Serialize + serde::de::DeserializeOwned {
    fn tags_mut(&mut self) -> &mut Vec<String>;
    /// Marks a change made at `now`.
    fn bump(&mut self, now: u64);
}

macro_rules! revisioned {
    ($($t:ty),*) => {$(
        impl Revisioned for $t {
            fn tags_mut(&mut self) -> &mut Vec<String> {
                &mut self.tags
            }
            fn bump(&mut self, now: u64) {
                self.revision_number += 1;
                self.updated_at = now;
            }
        }
    )*};
}

revisioned!(
    records::NetworkRecord,
    records::SubnetRecord,
    records::SubnetPoolRecord,
    records::SecurityGroupRecord,
    records::RouterRecord,
    records::FloatingIpRecord,
    PortRecord
);

impl NetworkService {
    /// Replaces the tags of a resource the caller may change; returns the stored tags.
    pub async fn set_tags(
        &self,
        caller: &Caller,
        kind: Tagged,
        id: &str,
        change: impl FnMut(&mut Vec<String>),
    ) -> NetResult<Vec<String>> {
        // Reading through the resource's own getter applies its visibility (404) first.
        let project = match kind {
            Tagged::Network => self.network(caller, id).await?.project_id,
            Tagged::Subnet => self.subnet(caller, id).await?.project_id,
            Tagged::Port => self.port(caller, id).await?.project_id,
            Tagged::SecurityGroup => self.security_group(caller, id).await?.project_id,
            Tagged::Router => self.router(caller, id).await?.project_id,
            Tagged::FloatingIp => self.floating_ip(caller, id).await?.project_id,
            Tagged::SubnetPool => self.subnet_pool(caller, id).await?.project_id,
        };
        if !caller.may_change(&project) {
            return Err(NetworkError::policy("update_tags"));
        }
        match kind {
            Tagged::Network => retag(self.networks(), id, change).await,
            Tagged::Subnet => retag(self.subnets(), id, change).await,
            Tagged::Port => retag(self.ports(), id, change).await,
            Tagged::SecurityGroup => retag(self.groups(), id, change).await,
            Tagged::Router => retag(self.routers(), id, change).await,
            Tagged::FloatingIp => retag(self.floating_ips(), id, change).await,
            Tagged::SubnetPool => retag(self.subnet_pools(), id, change).await,
        }
    }
}

async fn retag<T: Revisioned>(
    table: Table<T>,
    id: &str,
    mut change: impl FnMut(&mut Vec<String>),
) -> NetResult<Vec<String>> {
    let now = now_secs();
    let v = table
        .update(id, |r| {
            let tags = r.tags_mut();
            change(tags);
            *tags = check_tags(tags)?;
            r.bump(now);
            Ok::<(), NetworkError>(())
        })
        .await?;
    let mut record = v.value;
    Ok(std::mem::take(record.tags_mut()))
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn service() -> NetworkService {
        NetworkService::new(State::in_memory(), NetworkConfig::default())
    }

    pub fn member(project: &str) -> Caller {
        Caller {
            project_id: Some(project.into()),
            admin: false,
            member: true,
        }
    }

    pub fn admin() -> Caller {
        Caller {
            project_id: Some("admin-project".into()),
            admin: true,
            member: true,
        }
    }
}
