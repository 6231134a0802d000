//! The rows this service owns (the port's record is shared and lives in
//! `shoal_state::records`). Field names are stored in every row: new fields come with
//! `#[serde(default)]`, existing ones keep their names.

use serde::{Deserialize, Serialize};

use crate::ipam::Pool;

/// A network, keyed by id in table `networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub description: String,
    pub admin_state_up: bool,
    pub shared: bool,
    /// Neutron's `router:external`.
    pub external: bool,
    pub port_security_enabled: bool,
    pub mtu: u32,
    /// `vxlan` or `flat`.
    pub network_type: String,
    /// Set for `flat` networks.
    pub physical_network: Option<String>,
    /// The VNI of a `vxlan` network.
    pub segmentation_id: Option<u32>,
    /// Subnet ids, in creation order. Creating or deleting a subnet rewrites this row, which
    /// serialises the overlap check of the network's subnets.
    pub subnets: Vec<String>,
    pub availability_zone_hints: Vec<String>,
    pub tags: Vec<String>,
    pub status: String,
    pub created_at: u64,
    pub updated_at: u64,
    pub revision_number: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRoute {
    pub destination: String,
    pub nexthop: String,
}

/// An IPv4 or IPv6 subnet, keyed by id in table `subnets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetRecord {
    pub id: String,
    pub project_id: String,
    pub network_id: String,
    pub name: String,
    pub description: String,
    pub cidr: String,
    pub gateway_ip: Option<String>,
    pub allocation_pools: Vec<Pool>,
    pub dns_nameservers: Vec<String>,
    pub host_routes: Vec<HostRoute>,
    pub enable_dhcp: bool,
    pub tags: Vec<String>,
    pub created_at: u64,
    pub updated_at: u64,
    pub revision_number: u64,
    /// 4 or 6 (rows written before IPv6 subnets existed have none: 4).
    #[serde(default = "ipv4")]
    pub ip_version: u8,
    /// IPv6 only: `slaac`, `dhcpv6-stateful` or `dhcpv6-stateless`, as Neutron.
    #[serde(default)]
    pub ipv6_ra_mode: Option<String>,
    #[serde(default)]
    pub ipv6_address_mode: Option<String>,
    /// Not stored: the network's `router:external`, filled in when a subnet is read through
    /// the service (Neutron's `subnet-external-network`).
    #[serde(skip)]
    pub router_external: bool,
    /// The subnet pool its cidr was allocated from.
    #[serde(default)]
    pub subnetpool_id: Option<String>,
}

fn ipv4() -> u8 {
    4
}

impl SubnetRecord {
    /// Whether ports get their address here from the prefix and their MAC (SLAAC or
    /// DHCPv6-stateless), never from the pools: Neutron's "auto-address" subnets.
    pub fn auto_address(&self) -> bool {
        matches!(
            self.ipv6_address_mode.as_deref(),
            Some("slaac" | "dhcpv6-stateless")
        )
    }
}

/// A subnet pool, keyed by id in table `subnet_pools`: prefixes subnets are carved from.
/// Its allocations are the subnets whose `subnetpool_id` names it; every allocation writes
/// this row too, so its revision serialises them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetPoolRecord {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub description: String,
    /// Compacted (the fewest prefixes covering the same addresses), as Neutron stores them.
    pub prefixes: Vec<String>,
    pub ip_version: u8,
    pub default_prefixlen: u8,
    pub min_prefixlen: u8,
    pub max_prefixlen: u8,
    pub shared: bool,
    pub is_default: bool,
    /// Per project, in units of /32 (IPv4) or /64 (IPv6); `None` is unlimited.
    pub default_quota: Option<u64>,
    pub tags: Vec<String>,
    pub created_at: u64,
    pub updated_at: u64,
    pub revision_number: u64,
}

/// A security group, keyed by id in table `security_groups`. Its rules are rows of their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityGroupRecord {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    pub created_at: u64,
    pub updated_at: u64,
    pub revision_number: u64,
}

/// A security group rule, keyed by id in table `security_group_rules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRecord {
    pub id: String,
    pub project_id: String,
    pub security_group_id: String,
    /// `ingress` or `egress`.
    pub direction: String,
    /// `IPv4` or `IPv6`.
    pub ethertype: String,
    /// As the request gave it (a name or a number); `None` for any protocol.
    pub protocol: Option<String>,
    pub port_range_min: Option<u32>,
    pub port_range_max: Option<u32>,
    pub remote_ip_prefix: Option<String>,
    pub remote_group_id: Option<String>,
    pub description: String,
    pub created_at: u64,
    pub updated_at: u64,
    pub revision_number: u64,
}

/// A router's external gateway: a port of its own on a `router:external` network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterGateway {
    pub network_id: String,
    pub enable_snat: bool,
    /// The gateway port (`network:router_gateway`, `device_id` = the router).
    pub port_id: String,
    /// The gateway port's addresses, as Neutron shows them in `external_fixed_ips`.
    pub external_fixed_ips: Vec<shoal_state::records::FixedIp>,
}

/// A router, keyed by id in table `routers`. Its interfaces are ports
/// (`network:router_interface`, `device_id` = the router), not fields of this row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterRecord {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub description: String,
    pub admin_state_up: bool,
    pub status: String,
    pub gateway: Option<RouterGateway>,
    /// Extra routes; every nexthop lies in a subnet the router is connected to.
    pub routes: Vec<HostRoute>,
    pub tags: Vec<String>,
    pub created_at: u64,
    pub updated_at: u64,
    pub revision_number: u64,
}

/// A floating IP, keyed by id in table `floating_ips`. Its address is held by a port of its own
/// on the external network (`network:floatingip`, `device_id` = the floating IP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloatingIpRecord {
    pub id: String,
    pub project_id: String,
    pub description: String,
    pub floating_network_id: String,
    pub floating_ip_address: String,
    /// The port holding the address on the external network.
    pub floating_port_id: String,
    /// The associated port, its fixed address and the router that reaches it.
    pub port_id: Option<String>,
    pub fixed_ip_address: Option<String>,
    pub router_id: Option<String>,
    pub status: String,
    pub tags: Vec<String>,
    pub created_at: u64,
    pub updated_at: u64,
    pub revision_number: u64,
}
