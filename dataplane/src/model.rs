//! The desired state a driver applies, and its compilation into flat security-group
//! entries that both drivers share (remote groups expanded, port ranges checked).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

/// A MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An IPv4 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Cidr {
    pub const ANY: Ipv4Cidr = Ipv4Cidr {
        addr: Ipv4Addr::UNSPECIFIED,
        len: 0,
    };

    /// The prefix with host bits cleared (`len` is clamped to 32).
    pub fn new(addr: Ipv4Addr, len: u8) -> Self {
        let len = len.min(32);
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len,
        }
    }

    pub fn host(addr: Ipv4Addr) -> Self {
        Ipv4Cidr { addr, len: 32 }
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The node's own underlay: the device VXLAN leaves through and its VTEP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Underlay {
    pub device: String,
    pub vtep: Ipv4Addr,
}

/// A port bound to this node: a VM-facing device (tap or veth).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPort {
    /// Neutron port id; stable across applies.
    pub id: String,
    pub device: String,
    pub mac: Mac,
    pub ips: Vec<Ipv4Addr>,
    pub vni: u32,
    pub security_groups: Vec<String>,
}

/// A port of a network this node takes part in, bound to another node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemotePort {
    pub id: String,
    pub mac: Mac,
    pub ips: Vec<Ipv4Addr>,
    pub vni: u32,
    /// Underlay address of the node hosting the port.
    pub vtep: Ipv4Addr,
    /// Needed only to expand remote-group rules.
    pub security_groups: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Towards the VM.
    Ingress,
    /// From the VM.
    Egress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EtherType {
    Ipv4,
    /// Accepted in the model (OpenStack's default group has IPv6 rules) but the
    /// datapath forwards IPv4 only, so these rules compile to nothing.
    Ipv6,
}

/// Where a rule's peer may be.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Remote {
    Cidr(Ipv4Cidr),
    /// Every address of every port in this security group (expanded to /32s).
    Group(String),
}

/// One OpenStack security-group rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SgRule {
    pub direction: Direction,
    pub ethertype: EtherType,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP); `None` = any.
    pub protocol: Option<u8>,
    /// Inclusive destination port range (TCP/UDP only); `None` = any.
    pub port_range: Option<(u16, u16)>,
    pub remote: Remote,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityGroup {
    pub id: String,
    pub rules: Vec<SgRule>,
}

/// One interface of a router: the router's address and MAC on a subnet of a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterInterface {
    /// The interface's Neutron port id (`network:router_interface`).
    pub port_id: String,
    /// The network the subnet belongs to.
    pub vni: u32,
    /// The interface port's MAC: VMs of the subnet send routed frames to it.
    pub mac: Mac,
    /// The interface port's address (usually the subnet's gateway): VMs' ARP for it is
    /// answered with `mac`.
    pub ip: Ipv4Addr,
    /// The subnet: the router's connected route into `vni`.
    pub subnet: Ipv4Cidr,
}

/// An extra route of a router (Neutron's `extraroute`): `destination` through `nexthop`, an
/// address in one of the router's subnets (usually a VM acting as a router).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterRoute {
    pub destination: Ipv4Cidr,
    pub nexthop: Ipv4Addr,
}

/// A router's side on an external network (Neutron's `external_gateway_info`): a flat
/// network whose physical network this node maps to a host interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalGateway {
    /// The gateway port's id (`network:router_gateway`).
    pub port_id: String,
    /// The host interface the external network's physical network is mapped to
    /// (`[network] physical_interface_mappings`).
    pub device: String,
    /// The external subnet the gateway address is on.
    pub subnet: Ipv4Cidr,
    /// The gateway port's address: the source of SNAT.
    pub ip: Ipv4Addr,
    /// The gateway port's MAC, used on the external link by the node holding the address.
    pub mac: Mac,
    /// The external subnet's own gateway (the upstream router): the router's default route.
    pub upstream: Option<Ipv4Addr>,
    /// Neutron's `enable_snat`: the router's subnets reach the outside from the gateway
    /// address. Without it, the router forwards between them and the outside unchanged.
    pub enable_snat: bool,
    /// Whether this node holds the gateway address on the external link (the router's
    /// gateway node). Exactly one node may hold it; the others only carry floating IPs.
    pub holds_address: bool,
}

impl ExternalGateway {
    /// Whether this node translates the router's subnets to the gateway address.
    pub fn snat_here(&self) -> bool {
        self.enable_snat && self.holds_address
    }
}

/// A floating IP associated with a port of this node: a 1:1 NAT between `floating` (on the
/// router's external subnet) and `fixed` (the port's address on one of the router's subnets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FloatingIp {
    /// Neutron floating IP id.
    pub id: String,
    pub floating: Ipv4Addr,
    pub fixed: Ipv4Addr,
    /// The local port holding `fixed`.
    pub port_id: String,
}

/// A distributed router: every node with a port on one of its networks routes between
/// its subnets itself, on the sending VM's node (no network node).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Router {
    /// Neutron router id; stable across applies.
    pub id: String,
    pub interfaces: Vec<RouterInterface>,
    pub routes: Vec<RouterRoute>,
    /// The router's external gateway, when it has one and this node maps its network.
    pub gateway: Option<ExternalGateway>,
    /// Floating IPs through this router whose ports are local to this node (NAT happens
    /// on the node of the associated port). Needs `gateway`.
    pub floating_ips: Vec<FloatingIp>,
}

impl Router {
    /// The interface whose subnet holds `ip`.
    pub fn interface_for(&self, ip: Ipv4Addr) -> Option<&RouterInterface> {
        self.interfaces.iter().find(|i| i.subnet.contains(ip))
    }
}

/// Everything one node's datapath must do. Applying the same state twice changes nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub ports: Vec<LocalPort>,
    /// Ports of other nodes, in the networks of local ports and in every network a
    /// router in `routers` connects them to.
    pub remote_ports: Vec<RemotePort>,
    pub security_groups: Vec<SecurityGroup>,
    /// Routers with an interface on a network of a local port.
    pub routers: Vec<Router>,
}

/// Port ranges wider than this (other than the full range) are refused rather than
/// expanded into that many exact-port entries; see docs/datapath.md.
pub const MAX_PORT_RANGE: u32 = 4096;

/// One compiled allow entry: a port, a direction, protocol/port (0 = any) and a CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SgEntry {
    pub port: usize,
    pub direction: Direction,
    pub proto: u8,
    pub dport: u16,
    pub remote: Ipv4Cidr,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("port {port} names security group {group}, which is not in the desired state")]
    UnknownGroup { port: String, group: String },
    #[error("rule of group {group} has port range {min}-{max}; ranges wider than {MAX_PORT_RANGE} ports must be the full range 1-65535")]
    RangeTooWide { group: String, min: u16, max: u16 },
    #[error("rule of group {group} has port range {min}-{max}: the minimum must be >= 1 and <= the maximum")]
    BadRange { group: String, min: u16, max: u16 },
    #[error("rule of group {group} has a port range without protocol TCP or UDP")]
    RangeWithoutProtocol { group: String },
    #[error("port {port} has no IPv4 address")]
    NoAddress { port: String },
    #[error("two ports claim address {ip} in VNI {vni}")]
    DuplicateAddress { vni: u32, ip: Ipv4Addr },
    #[error("router {router} has interfaces on overlapping subnets {a} and {b}")]
    OverlappingSubnets {
        router: String,
        a: Ipv4Cidr,
        b: Ipv4Cidr,
    },
    #[error(
        "router {router}'s route to {destination} has nexthop {nexthop} on none of its subnets"
    )]
    NexthopNotConnected {
        router: String,
        destination: Ipv4Cidr,
        nexthop: Ipv4Addr,
    },
    #[error("router {router}'s interface {port} has address {ip} outside its subnet {subnet}")]
    InterfaceOutsideSubnet {
        router: String,
        port: String,
        ip: Ipv4Addr,
        subnet: Ipv4Cidr,
    },
    #[error("router {router}'s gateway address {ip} is outside its external subnet {subnet}")]
    GatewayOutsideSubnet {
        router: String,
        ip: Ipv4Addr,
        subnet: Ipv4Cidr,
    },
    #[error("router {router}'s external subnet {external} overlaps its subnet {internal}")]
    ExternalOverlapsInternal {
        router: String,
        external: Ipv4Cidr,
        internal: Ipv4Cidr,
    },
    #[error("router {router}'s gateway device {device:?} is not a valid interface name (1 to 15 characters, no '/', ':' or space)")]
    BadGatewayDevice { router: String, device: String },
    #[error("floating IP {id} of router {router}, which has no external gateway here")]
    FloatingWithoutGateway { router: String, id: String },
    #[error("floating IP {id} has address {floating} outside router {router}'s external subnet {subnet}")]
    FloatingOutsideSubnet {
        router: String,
        id: String,
        floating: Ipv4Addr,
        subnet: Ipv4Cidr,
    },
    #[error("floating IP {id} maps to {fixed}, which is not an address of local port {port} on a subnet of router {router}")]
    FixedNotLocal {
        router: String,
        id: String,
        port: String,
        fixed: Ipv4Addr,
    },
    #[error("external address {ip} is claimed twice (floating IPs and router gateways)")]
    DuplicateExternal { ip: Ipv4Addr },
    #[error("fixed address {fixed} has two floating IPs through router {router}")]
    DuplicateFixed { router: String, fixed: Ipv4Addr },
}

/// Compiles the security groups of every local port (by index in `state.ports`) into
/// allow entries. Exact ports come from expanding ranges; `dport == 0` means any port.
pub fn compile_sg(state: &DesiredState) -> Result<BTreeSet<SgEntry>, CompileError> {
    let mut out = BTreeSet::new();
    for (index, port) in state.ports.iter().enumerate() {
        if port.ips.is_empty() {
            return Err(CompileError::NoAddress {
                port: port.id.clone(),
            });
        }
        for group_id in &port.security_groups {
            let group = state
                .security_groups
                .iter()
                .find(|g| &g.id == group_id)
                .ok_or_else(|| CompileError::UnknownGroup {
                    port: port.id.clone(),
                    group: group_id.clone(),
                })?;
            for rule in &group.rules {
                if rule.ethertype != EtherType::Ipv4 {
                    continue;
                }
                let proto = rule.protocol.unwrap_or(0);
                let ports = rule_ports(&group.id, rule)?;
                for remote in remotes(state, port.vni, &rule.remote) {
                    for &dport in &ports {
                        out.insert(SgEntry {
                            port: index,
                            direction: rule.direction,
                            proto,
                            dport,
                            remote,
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The remote of a compiled entry, with a remote group left as a set of member addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetRemote {
    Cidr(Ipv4Cidr),
    /// Index into [`SgSets::sets`].
    Set(usize),
}

/// One compiled allow entry whose remote may be a set (see [`compile_sg_sets`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SetEntry {
    pub port: usize,
    pub direction: Direction,
    pub proto: u8,
    pub dport: u16,
    pub remote: SetRemote,
}

/// Security groups compiled with each remote group kept as one set of member addresses per
/// group and the networks it is seen from, for drivers that update such a set in place: a
/// port joining or leaving a group then changes a set's elements, not the entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SgSets {
    pub entries: BTreeSet<SetEntry>,
    /// (group, the networks its members are taken from) and the members' addresses.
    pub sets: Vec<(GroupReach, BTreeSet<Ipv4Addr>)>,
}

/// A security group and the networks (VNIs) its members are taken from.
pub type GroupReach = (String, BTreeSet<u32>);

/// [`compile_sg`] with remote groups as sets: the same entries once each set is expanded into
/// its members' /32s, and the same errors.
pub fn compile_sg_sets(state: &DesiredState) -> Result<SgSets, CompileError> {
    let mut out = SgSets::default();
    let mut index_of: BTreeMap<GroupReach, usize> = BTreeMap::new();
    for (index, port) in state.ports.iter().enumerate() {
        if port.ips.is_empty() {
            return Err(CompileError::NoAddress {
                port: port.id.clone(),
            });
        }
        for group_id in &port.security_groups {
            let group = state
                .security_groups
                .iter()
                .find(|g| &g.id == group_id)
                .ok_or_else(|| CompileError::UnknownGroup {
                    port: port.id.clone(),
                    group: group_id.clone(),
                })?;
            for rule in &group.rules {
                if rule.ethertype != EtherType::Ipv4 {
                    continue;
                }
                let proto = rule.protocol.unwrap_or(0);
                let ports = rule_ports(&group.id, rule)?;
                let remote = match &rule.remote {
                    Remote::Cidr(c) => SetRemote::Cidr(Ipv4Cidr::new(c.addr, c.len)),
                    Remote::Group(g) => {
                        let key = (g.clone(), routed_vnis(state, port.vni));
                        let n = match index_of.get(&key) {
                            Some(n) => *n,
                            None => {
                                let members = group_members(state, &key.1, g);
                                out.sets.push((key.clone(), members));
                                index_of.insert(key, out.sets.len() - 1);
                                out.sets.len() - 1
                            }
                        };
                        SetRemote::Set(n)
                    }
                };
                for &dport in &ports {
                    out.entries.insert(SetEntry {
                        port: index,
                        direction: rule.direction,
                        proto,
                        dport,
                        remote,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The addresses of the ports (local and remote) of group `g` on the networks `reach`.
fn group_members(state: &DesiredState, reach: &BTreeSet<u32>, g: &str) -> BTreeSet<Ipv4Addr> {
    let named = |vni: u32, groups: &[String]| reach.contains(&vni) && groups.iter().any(|x| x == g);
    let local = state
        .ports
        .iter()
        .filter(|p| named(p.vni, &p.security_groups))
        .flat_map(|p| p.ips.iter());
    let remote = state
        .remote_ports
        .iter()
        .filter(|p| named(p.vni, &p.security_groups))
        .flat_map(|p| p.ips.iter());
    local.chain(remote).copied().collect()
}

fn rule_ports(group: &str, rule: &SgRule) -> Result<Vec<u16>, CompileError> {
    let Some((min, max)) = rule.port_range else {
        return Ok(vec![0]);
    };
    // OpenStack reuses the range for ICMP type/code; only TCP and UDP have ports here.
    match rule.protocol {
        Some(6) | Some(17) | Some(132) => {}
        Some(1) => return Ok(vec![0]),
        _ => {
            return Err(CompileError::RangeWithoutProtocol {
                group: group.to_string(),
            })
        }
    }
    if min == 0 || min > max {
        return Err(CompileError::BadRange {
            group: group.to_string(),
            min,
            max,
        });
    }
    if (min, max) == (1, u16::MAX) {
        return Ok(vec![0]);
    }
    if u32::from(max - min) + 1 > MAX_PORT_RANGE {
        return Err(CompileError::RangeTooWide {
            group: group.to_string(),
            min,
            max,
        });
    }
    Ok((min..=max).collect())
}

/// Remote-group rules expand to /32s of the group's members in the same network and in
/// the networks a router connects it to (their addresses reach the port routed; networks
/// without a router between them may reuse addresses, so theirs are left out).
fn remotes(state: &DesiredState, vni: u32, remote: &Remote) -> Vec<Ipv4Cidr> {
    match remote {
        Remote::Cidr(c) => vec![Ipv4Cidr::new(c.addr, c.len)],
        Remote::Group(g) => {
            let reach = routed_vnis(state, vni);
            let local = state
                .ports
                .iter()
                .filter(|p| reach.contains(&p.vni) && p.security_groups.contains(g))
                .flat_map(|p| p.ips.iter());
            let remote = state
                .remote_ports
                .iter()
                .filter(|p| reach.contains(&p.vni) && p.security_groups.contains(g))
                .flat_map(|p| p.ips.iter());
            let set: BTreeSet<Ipv4Cidr> =
                local.chain(remote).map(|ip| Ipv4Cidr::host(*ip)).collect();
            set.into_iter().collect()
        }
    }
}

/// `vni` and every VNI a router of the state connects it to.
pub fn routed_vnis(state: &DesiredState, vni: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::from([vni]);
    for r in &state.routers {
        if r.interfaces.iter().any(|i| i.vni == vni) {
            out.extend(r.interfaces.iter().map(|i| i.vni));
        }
    }
    out
}

impl Ipv4Cidr {
    /// Whether `ip` lies in this prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        Ipv4Cidr::new(ip, self.len).addr == Ipv4Cidr::new(self.addr, self.len).addr
    }

    /// Whether the two prefixes share an address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        let len = self.len.min(other.len);
        Ipv4Cidr::new(self.addr, len) == Ipv4Cidr::new(other.addr, len)
    }
}

/// Checks that no address is claimed twice within a VNI (router interfaces included) and
/// that each router's interfaces are on disjoint subnets that hold their addresses.
pub fn check_addresses(state: &DesiredState) -> Result<(), CompileError> {
    let mut seen = BTreeSet::new();
    let local = state.ports.iter().map(|p| (p.vni, p.ips.clone()));
    let remote = state.remote_ports.iter().map(|p| (p.vni, p.ips.clone()));
    let rifs = state
        .routers
        .iter()
        .flat_map(|r| r.interfaces.iter())
        .map(|i| (i.vni, vec![i.ip]));
    for (vni, ips) in local.chain(remote).chain(rifs) {
        for ip in ips {
            if !seen.insert((vni, ip)) {
                return Err(CompileError::DuplicateAddress { vni, ip });
            }
        }
    }
    for r in &state.routers {
        if let Some(route) = r
            .routes
            .iter()
            .find(|x| r.interface_for(x.nexthop).is_none())
        {
            return Err(CompileError::NexthopNotConnected {
                router: r.id.clone(),
                destination: route.destination,
                nexthop: route.nexthop,
            });
        }
        for (n, a) in r.interfaces.iter().enumerate() {
            if !a.subnet.contains(a.ip) {
                return Err(CompileError::InterfaceOutsideSubnet {
                    router: r.id.clone(),
                    port: a.port_id.clone(),
                    ip: a.ip,
                    subnet: a.subnet,
                });
            }
            if let Some(b) = r.interfaces[n + 1..]
                .iter()
                .find(|b| a.subnet.overlaps(&b.subnet))
            {
                return Err(CompileError::OverlappingSubnets {
                    router: r.id.clone(),
                    a: a.subnet,
                    b: b.subnet,
                });
            }
        }
    }
    check_external(state)
}

/// Checks the external side of the routers: each gateway is on its external subnet, on a
/// usable device, apart from the router's own subnets; each floating IP goes through a
/// router with a gateway, lies on its external subnet and maps to an address of a local
/// port on one of the router's subnets; no external address is claimed twice.
pub fn check_external(state: &DesiredState) -> Result<(), CompileError> {
    let mut external = BTreeSet::new();
    for r in &state.routers {
        let Some(g) = &r.gateway else {
            if let Some(f) = r.floating_ips.first() {
                return Err(CompileError::FloatingWithoutGateway {
                    router: r.id.clone(),
                    id: f.id.clone(),
                });
            }
            continue;
        };
        let device_ok = (1..=15).contains(&g.device.len())
            && !g
                .device
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace());
        if !device_ok {
            return Err(CompileError::BadGatewayDevice {
                router: r.id.clone(),
                device: g.device.clone(),
            });
        }
        if !g.subnet.contains(g.ip) {
            return Err(CompileError::GatewayOutsideSubnet {
                router: r.id.clone(),
                ip: g.ip,
                subnet: g.subnet,
            });
        }
        if let Some(i) = r.interfaces.iter().find(|i| i.subnet.overlaps(&g.subnet)) {
            return Err(CompileError::ExternalOverlapsInternal {
                router: r.id.clone(),
                external: g.subnet,
                internal: i.subnet,
            });
        }
        if g.holds_address && !external.insert(g.ip) {
            return Err(CompileError::DuplicateExternal { ip: g.ip });
        }
        let mut fixed = BTreeSet::new();
        for f in &r.floating_ips {
            if !g.subnet.contains(f.floating) {
                return Err(CompileError::FloatingOutsideSubnet {
                    router: r.id.clone(),
                    id: f.id.clone(),
                    floating: f.floating,
                    subnet: g.subnet,
                });
            }
            let local = state.ports.iter().any(|p| {
                p.id == f.port_id
                    && p.ips.contains(&f.fixed)
                    && r.interfaces
                        .iter()
                        .any(|i| i.vni == p.vni && i.subnet.contains(f.fixed))
            });
            if !local {
                return Err(CompileError::FixedNotLocal {
                    router: r.id.clone(),
                    id: f.id.clone(),
                    port: f.port_id.clone(),
                    fixed: f.fixed,
                });
            }
            if f.floating == g.ip || !external.insert(f.floating) {
                return Err(CompileError::DuplicateExternal { ip: f.floating });
            }
            if !fixed.insert(f.fixed) {
                return Err(CompileError::DuplicateFixed {
                    router: r.id.clone(),
                    fixed: f.fixed,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(id: &str, ip: [u8; 4], groups: &[&str]) -> LocalPort {
        LocalPort {
            id: id.into(),
            device: format!("tap-{id}"),
            mac: Mac([0xfa, 0x16, 0x3e, 0, 0, ip[3]]),
            ips: vec![Ipv4Addr::from(ip)],
            vni: 100,
            security_groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn rule(proto: Option<u8>, range: Option<(u16, u16)>, remote: Remote) -> SgRule {
        SgRule {
            direction: Direction::Ingress,
            ethertype: EtherType::Ipv4,
            protocol: proto,
            port_range: range,
            remote,
        }
    }

    /// `compile_sg_sets` with every set replaced by its members' /32s: what `compile_sg` gives.
    fn expand(state: &DesiredState) -> BTreeSet<SgEntry> {
        let s = compile_sg_sets(state).unwrap();
        let mut out = BTreeSet::new();
        for e in &s.entries {
            let remotes = match e.remote {
                SetRemote::Cidr(c) => vec![c],
                SetRemote::Set(n) => s.sets[n].1.iter().map(|ip| Ipv4Cidr::host(*ip)).collect(),
            };
            for remote in remotes {
                out.insert(SgEntry {
                    port: e.port,
                    direction: e.direction,
                    proto: e.proto,
                    dport: e.dport,
                    remote,
                });
            }
        }
        out
    }

    #[test]
    fn ranges_expand_and_full_range_is_any() {
        let state = DesiredState {
            ports: vec![port("a", [10, 0, 0, 1], &["g"])],
            remote_ports: vec![],
            routers: vec![],
            security_groups: vec![SecurityGroup {
                id: "g".into(),
                rules: vec![
                    rule(Some(6), Some((80, 82)), Remote::Cidr(Ipv4Cidr::ANY)),
                    rule(Some(17), Some((1, 65535)), Remote::Cidr(Ipv4Cidr::ANY)),
                    rule(
                        Some(1),
                        Some((8, 0)),
                        Remote::Cidr(Ipv4Cidr::new([10, 9, 9, 9].into(), 8)),
                    ),
                ],
            }],
        };
        let entries = compile_sg(&state).unwrap();
        assert_eq!(expand(&state), entries);
        let ports: Vec<(u8, u16)> = entries.iter().map(|e| (e.proto, e.dport)).collect();
        assert_eq!(ports, vec![(1, 0), (6, 80), (6, 81), (6, 82), (17, 0)]);
        let icmp = entries.iter().find(|e| e.proto == 1).unwrap();
        assert_eq!(icmp.remote, Ipv4Cidr::new([10, 0, 0, 0].into(), 8));
    }

    #[test]
    fn remote_group_expands_to_member_hosts() {
        let mut state = DesiredState {
            ports: vec![
                port("a", [10, 0, 0, 1], &["web"]),
                port("b", [10, 0, 0, 2], &["db"]),
            ],
            remote_ports: vec![RemotePort {
                id: "r".into(),
                mac: Mac([2, 0, 0, 0, 0, 3]),
                ips: vec![[10, 0, 0, 3].into()],
                vni: 100,
                vtep: [192, 0, 2, 2].into(),
                security_groups: vec!["web".into()],
            }],
            routers: vec![],
            security_groups: vec![
                SecurityGroup {
                    id: "web".into(),
                    rules: vec![],
                },
                SecurityGroup {
                    id: "db".into(),
                    rules: vec![rule(
                        Some(6),
                        Some((5432, 5432)),
                        Remote::Group("web".into()),
                    )],
                },
            ],
        };
        let remotes: Vec<String> = compile_sg(&state)
            .unwrap()
            .iter()
            .map(|e| e.remote.to_string())
            .collect();
        assert_eq!(remotes, vec!["10.0.0.1/32", "10.0.0.3/32"]);
        assert_eq!(expand(&state), compile_sg(&state).unwrap());
        // One set (group "web" seen from VNI 100) holds both members.
        let sets = compile_sg_sets(&state).unwrap();
        assert_eq!(sets.sets.len(), 1);
        assert_eq!(sets.entries.len(), 1);
        state.remote_ports[0].vni = 200; // other network: not a member here
        assert_eq!(compile_sg(&state).unwrap().len(), 1);
        assert_eq!(expand(&state), compile_sg(&state).unwrap());
    }

    #[test]
    fn bad_rules_are_refused() {
        let mk = |r: SgRule| DesiredState {
            ports: vec![port("a", [10, 0, 0, 1], &["g"])],
            remote_ports: vec![],
            routers: vec![],
            security_groups: vec![SecurityGroup {
                id: "g".into(),
                rules: vec![r],
            }],
        };
        let any = Remote::Cidr(Ipv4Cidr::ANY);
        assert!(matches!(
            compile_sg(&mk(rule(Some(6), Some((1, 10000)), any.clone()))),
            Err(CompileError::RangeTooWide { .. })
        ));
        assert!(matches!(
            compile_sg(&mk(rule(None, Some((1, 2)), any.clone()))),
            Err(CompileError::RangeWithoutProtocol { .. })
        ));
        assert!(matches!(
            compile_sg(&mk(rule(Some(6), Some((9, 2)), any.clone()))),
            Err(CompileError::BadRange { .. })
        ));
        assert!(matches!(
            compile_sg_sets(&mk(rule(Some(6), Some((9, 2)), any))),
            Err(CompileError::BadRange { .. })
        ));
    }

    fn rif(port_id: &str, vni: u32, ip: [u8; 4], len: u8) -> RouterInterface {
        RouterInterface {
            port_id: port_id.into(),
            vni,
            mac: Mac([0xfa, 0x16, 0x3e, 0xff, vni as u8, ip[3]]),
            ip: Ipv4Addr::from(ip),
            subnet: Ipv4Cidr::new(Ipv4Addr::from(ip), len),
        }
    }

    /// A remote-group rule admits the group's members of networks a router joins to the
    /// port's, and still not those of an unrouted network (which may reuse addresses).
    #[test]
    fn remote_group_spans_networks_joined_by_a_router() {
        let mut b = port("b", [10, 0, 2, 5], &["g"]);
        b.vni = 200;
        let mut c = port("c", [10, 0, 3, 5], &["g"]);
        c.vni = 300;
        let mut state = DesiredState {
            ports: vec![port("a", [10, 0, 0, 5], &["g"]), b, c],
            remote_ports: vec![],
            security_groups: vec![SecurityGroup {
                id: "g".into(),
                rules: vec![rule(None, None, Remote::Group("g".into()))],
            }],
            routers: vec![Router {
                id: "r".into(),
                interfaces: vec![
                    rif("ra", 100, [10, 0, 0, 1], 24),
                    rif("rb", 200, [10, 0, 2, 1], 24),
                ],
                ..Default::default()
            }],
        };
        let of = |state: &DesiredState, port: usize| -> Vec<String> {
            assert_eq!(expand(state), compile_sg(state).unwrap());
            compile_sg(state)
                .unwrap()
                .iter()
                .filter(|e| e.port == port)
                .map(|e| e.remote.to_string())
                .collect()
        };
        assert_eq!(of(&state, 0), vec!["10.0.0.5/32", "10.0.2.5/32"]);
        assert_eq!(of(&state, 1), vec!["10.0.0.5/32", "10.0.2.5/32"]);
        assert_eq!(of(&state, 2), vec!["10.0.3.5/32"]);
        state.routers.clear();
        assert_eq!(of(&state, 0), vec!["10.0.0.5/32"]);
    }

    /// A router's interfaces take part in the address check and must be on disjoint
    /// subnets that hold their own addresses.
    #[test]
    fn router_interfaces_are_checked() {
        let mk = |interfaces| DesiredState {
            ports: vec![port("a", [10, 0, 0, 5], &[])],
            routers: vec![Router {
                id: "r".into(),
                interfaces,
                ..Default::default()
            }],
            ..Default::default()
        };
        check_addresses(&mk(vec![
            rif("ra", 100, [10, 0, 0, 1], 24),
            rif("rb", 200, [10, 0, 2, 1], 24),
        ]))
        .unwrap();
        assert_eq!(
            check_addresses(&mk(vec![rif("ra", 100, [10, 0, 0, 5], 24)])),
            Err(CompileError::DuplicateAddress {
                vni: 100,
                ip: [10, 0, 0, 5].into()
            })
        );
        assert!(matches!(
            check_addresses(&mk(vec![
                rif("ra", 100, [10, 0, 0, 1], 24),
                rif("rb", 200, [10, 0, 0, 129], 25)
            ])),
            Err(CompileError::OverlappingSubnets { .. })
        ));
        let mut far = mk(vec![rif("ra", 100, [10, 0, 0, 1], 24)]);
        far.routers[0].routes.push(RouterRoute {
            destination: Ipv4Cidr::new([192, 168, 0, 0].into(), 16),
            nexthop: [10, 5, 0, 1].into(),
        });
        assert!(matches!(
            check_addresses(&far),
            Err(CompileError::NexthopNotConnected { .. })
        ));
        far.routers[0].routes[0].nexthop = [10, 0, 0, 9].into();
        check_addresses(&far).unwrap();
        let mut outside = rif("ra", 100, [10, 0, 0, 1], 24);
        outside.subnet = Ipv4Cidr::new([10, 9, 0, 0].into(), 16);
        assert!(matches!(
            check_addresses(&mk(vec![outside])),
            Err(CompileError::InterfaceOutsideSubnet { .. })
        ));
        assert_eq!(
            routed_vnis(
                &mk(vec![
                    rif("ra", 100, [10, 0, 0, 1], 24),
                    rif("rb", 200, [10, 0, 2, 1], 24)
                ]),
                200
            ),
            BTreeSet::from([100, 200])
        );
    }
    fn gateway(ip: [u8; 4]) -> ExternalGateway {
        ExternalGateway {
            port_id: "gw".into(),
            device: "eth1".into(),
            subnet: Ipv4Cidr::new([203, 0, 113, 0].into(), 24),
            ip: ip.into(),
            mac: Mac([0xfa, 0x16, 0x3e, 0xee, 0, 1]),
            upstream: Some([203, 0, 113, 1].into()),
            enable_snat: true,
            holds_address: true,
        }
    }

    fn fip(id: &str, floating: [u8; 4], port: &str, fixed: [u8; 4]) -> FloatingIp {
        FloatingIp {
            id: id.into(),
            floating: floating.into(),
            fixed: fixed.into(),
            port_id: port.into(),
        }
    }

    /// The external side is refused, with a typed error, wherever it could not be programmed
    /// unambiguously: a floating IP without a gateway, outside the external subnet, to an
    /// address no local port of the router's subnets holds, or an external address twice.
    #[test]
    fn external_side_is_checked() {
        let mk = |gw: Option<ExternalGateway>, fips: Vec<FloatingIp>| DesiredState {
            ports: vec![port("a", [10, 0, 0, 5], &[]), port("b", [10, 0, 0, 6], &[])],
            routers: vec![Router {
                id: "r".into(),
                interfaces: vec![rif("ra", 100, [10, 0, 0, 1], 24)],
                routes: vec![],
                gateway: gw,
                floating_ips: fips,
            }],
            ..Default::default()
        };
        let ok = mk(
            Some(gateway([203, 0, 113, 10])),
            vec![
                fip("f1", [203, 0, 113, 20], "a", [10, 0, 0, 5]),
                fip("f2", [203, 0, 113, 21], "b", [10, 0, 0, 6]),
            ],
        );
        check_addresses(&ok).unwrap();
        assert!(ok.routers[0].gateway.as_ref().unwrap().snat_here());
        let err = |s: &DesiredState| check_addresses(s).unwrap_err();
        assert!(matches!(
            err(&mk(
                None,
                vec![fip("f", [203, 0, 113, 20], "a", [10, 0, 0, 5])]
            )),
            CompileError::FloatingWithoutGateway { .. }
        ));
        assert!(matches!(
            err(&mk(Some(gateway([198, 51, 100, 10])), vec![])),
            CompileError::GatewayOutsideSubnet { .. }
        ));
        let mut bad_dev = gateway([203, 0, 113, 10]);
        bad_dev.device = "eth1/../x".into();
        assert!(matches!(
            err(&mk(Some(bad_dev), vec![])),
            CompileError::BadGatewayDevice { .. }
        ));
        let mut overlap = gateway([10, 0, 0, 200]);
        overlap.subnet = Ipv4Cidr::new([10, 0, 0, 0].into(), 16);
        assert!(matches!(
            err(&mk(Some(overlap), vec![])),
            CompileError::ExternalOverlapsInternal { .. }
        ));
        assert!(matches!(
            err(&mk(
                Some(gateway([203, 0, 113, 10])),
                vec![fip("f", [198, 51, 100, 20], "a", [10, 0, 0, 5])]
            )),
            CompileError::FloatingOutsideSubnet { .. }
        ));
        // The port must be local and hold the address, on one of the router's subnets.
        for (port_id, fixed) in [("z", [10, 0, 0, 5]), ("a", [10, 0, 0, 6])] {
            assert!(matches!(
                err(&mk(
                    Some(gateway([203, 0, 113, 10])),
                    vec![fip("f", [203, 0, 113, 20], port_id, fixed)]
                )),
                CompileError::FixedNotLocal { .. }
            ));
        }
        assert!(matches!(
            err(&mk(
                Some(gateway([203, 0, 113, 10])),
                vec![fip("f", [203, 0, 113, 10], "a", [10, 0, 0, 5])]
            )),
            CompileError::DuplicateExternal { .. }
        ));
        assert!(matches!(
            err(&mk(
                Some(gateway([203, 0, 113, 10])),
                vec![
                    fip("f1", [203, 0, 113, 20], "a", [10, 0, 0, 5]),
                    fip("f2", [203, 0, 113, 20], "b", [10, 0, 0, 6])
                ]
            )),
            CompileError::DuplicateExternal { .. }
        ));
        assert!(matches!(
            err(&mk(
                Some(gateway([203, 0, 113, 10])),
                vec![
                    fip("f1", [203, 0, 113, 20], "a", [10, 0, 0, 5]),
                    fip("f2", [203, 0, 113, 21], "a", [10, 0, 0, 5])
                ]
            )),
            CompileError::DuplicateFixed { .. }
        ));
        // A node that does not hold the gateway address does no SNAT, floating IPs still.
        let mut carrier = gateway([203, 0, 113, 10]);
        carrier.holds_address = false;
        assert!(!carrier.snat_here());
        check_addresses(&mk(
            Some(carrier),
            vec![fip("f1", [203, 0, 113, 20], "a", [10, 0, 0, 5])],
        ))
        .unwrap();
    }
}
