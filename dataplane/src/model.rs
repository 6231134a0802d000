//! The desired state a driver applies, and its compilation into flat security-group
//! entries that both drivers share (remote groups expanded, port ranges checked).

use std::{collections::BTreeSet, fmt, net::Ipv4Addr};

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

/// Everything one node's datapath must do. Applying the same state twice changes nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub ports: Vec<LocalPort>,
    pub remote_ports: Vec<RemotePort>,
    pub security_groups: Vec<SecurityGroup>,
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

/// Remote-group rules expand to /32s of the group's members in the same network.
fn remotes(state: &DesiredState, vni: u32, remote: &Remote) -> Vec<Ipv4Cidr> {
    match remote {
        Remote::Cidr(c) => vec![Ipv4Cidr::new(c.addr, c.len)],
        Remote::Group(g) => {
            let local = state
                .ports
                .iter()
                .filter(|p| p.vni == vni && p.security_groups.contains(g))
                .flat_map(|p| p.ips.iter());
            let remote = state
                .remote_ports
                .iter()
                .filter(|p| p.vni == vni && p.security_groups.contains(g))
                .flat_map(|p| p.ips.iter());
            let set: BTreeSet<Ipv4Cidr> =
                local.chain(remote).map(|ip| Ipv4Cidr::host(*ip)).collect();
            set.into_iter().collect()
        }
    }
}

/// Checks that no address is claimed twice within a VNI.
pub fn check_addresses(state: &DesiredState) -> Result<(), CompileError> {
    let mut seen = BTreeSet::new();
    let local = state.ports.iter().map(|p| (p.vni, &p.ips));
    let remote = state.remote_ports.iter().map(|p| (p.vni, &p.ips));
    for (vni, ips) in local.chain(remote) {
        for ip in ips {
            if !seen.insert((vni, *ip)) {
                return Err(CompileError::DuplicateAddress { vni, ip: *ip });
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

    #[test]
    fn ranges_expand_and_full_range_is_any() {
        let state = DesiredState {
            ports: vec![port("a", [10, 0, 0, 1], &["g"])],
            remote_ports: vec![],
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
        state.remote_ports[0].vni = 200; // other network: not a member here
        assert_eq!(compile_sg(&state).unwrap().len(), 1);
    }

    #[test]
    fn bad_rules_are_refused() {
        let mk = |r: SgRule| DesiredState {
            ports: vec![port("a", [10, 0, 0, 1], &["g"])],
            remote_ports: vec![],
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
            compile_sg(&mk(rule(Some(6), Some((9, 2)), any))),
            Err(CompileError::BadRange { .. })
        ));
    }
}
